"""`datagen`: turn image sets into training shards. Thin: parse, call one function, print."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from datagen.job.pipeline import run as run_job
from datagen.job.settings import ConfigError, PipelineError, RunConfig
from datagen.lidar_cli import lidar_app
from datagen.sources.base import LayoutError
from datagen.teachers.runner import TeacherUnavailable
from datagen.teachers.zoo import format_table
from shared.inspect import format_summary, summarize
from shared.inspect import preview as write_preview
from shared.scan.spec import ScanSpec, ScanSpecError
from shared.storage import StorageError, join

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(lidar_app, name="lidar", help="Scan patterns: fit one from your own scans, show one.")


@app.callback()
def main() -> None:
    """Turn image sets into WebDataset shards for pre-training and fine-tuning."""


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A shard (.tar), a directory of shards, a glob, or the same in object "
                               "storage (s3://bucket/prefix/)."),
    preview: Path | None = typer.Option(None, "--preview", help="Write a contact sheet PNG here."),
    samples: int = typer.Option(4, help="Samples in the preview."),
    limit: int | None = typer.Option(None, help="Read at most this many samples."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON."),
) -> None:
    """Sample count, members, value ranges, LiDAR density and K of shards; optional preview."""
    try:
        summary, kept = summarize(path, limit=limit, keep=samples if preview else 0)
    except (FileNotFoundError, StorageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_summary(summary))
    if json_out:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))
    if preview:
        write_preview(kept, str(preview))
        typer.echo(f"preview written to {preview}")


def _parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE from --option; true/false and integers are converted, anything else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected KEY=VALUE, got {text!r}")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


@app.command()
def run(
    source: str = typer.Option("synthetic", help="coco, landmarks, nuscenes, cityscapes, davis, folder, synthetic, "
                               "kitti, nyu."),
    root: str | None = typer.Option(None, help="The data set's folder (not needed for synthetic); folder and coco "
                                    "also read s3://bucket/prefix (gs://, az://)."),
    out: str = typer.Option("shards", help="Output folder or object-store prefix (s3://bucket/prefix, gs://, "
                            "az://); shards go to OUT/<source>/."),
    workers: int | None = typer.Option(None, help="CPU workers (shard tasks at a time). Default: every core. "
                                       "0: no Ray, the shards run in this process (= --executor local)."),
    executor: str | None = typer.Option(None, help="ray (shard tasks on a local Ray or a cluster) or local (one "
                                        "shard at a time in this process, no Ray; same bytes). Default: ray, "
                                        "local with --workers 0."),
    address: str | None = typer.Option(None, help="Ray cluster to join (host:port); default RAY_ADDRESS, "
                                       "else a local Ray on 127.0.0.1."),
    runtime_env: str = typer.Option("auto", help="Code shipped to a cluster's nodes: full (datagen + shared and "
                                    "their pip requirements), code (the packages only), off (an image with "
                                    "the project), auto (full with --address, off for a local Ray)."),
    teacher: str | None = typer.Option(None, help="Hub id or local folder of any depth model transformers loads "
                                       "(see `datagen teachers`), or 'oracle'. Default: oracle for synthetic, "
                                       "Depth-Anything-V2-Large-hf (CC-BY-NC-4.0) otherwise."),
    teacher_output: str | None = typer.Option(None, help="What the teacher's map is: disparity, depth (relative) "
                                              "or metric. Default: from the model's config or datagen's table."),
    metric_scale_jitter: float = typer.Option(0.0, help="Metric teachers: multiply each pseudo depth map by one "
                                              "random factor in [1/(1+J), 1+J] (seeded). 0: off."),
    teacher_replicas: int | None = typer.Option(None, help="Copies of the teacher model. Default: one per GPU, or 1."),
    teacher_batch: int = typer.Option(8, help="Images per teacher call."),
    limit: int | None = typer.Option(None, help="Only the first N inputs (synthetic: N scenes)."),
    seed: int = typer.Option(0, help="Seed of every random draw (per sample: derived from seed and key)."),
    shard_size: int = typer.Option(128, help="Samples (inputs) per shard."),
    lidar: str = typer.Option("hdl64", help="LiDAR preset: hdl64, vlp32, vlp16, os128, random, ...; or "
                              "points:N / keypoints:N (N pixels of the pseudo depth, no scan)."),
    mesh: str = typer.Option("grid", help="grid (fast, exact) or poisson (the paper's)."),
    occlusion: str = typer.Option("none", help="none (keep parallax points, like real scans) or zbuffer."),
    mount: str = typer.Option("random", help="LiDAR mount relative to the camera: random (a rig drawn per "
                              "sample), kitti, or none (at the camera centre)."),
    lidar_noise_m: float = typer.Option(0.0, help="Gaussian range noise of the simulated LiDAR (metres)."),
    lidar_dropout: float = typer.Option(0.0, help="Fraction of simulated returns dropped."),
    hidden_geometry: bool | None = typer.Option(None, "--hidden-geometry/--no-hidden-geometry",
                                                help="Extend the background behind occluding edges so an offset "
                                                "LiDAR sees past them. Default: on for --mount kitti/random "
                                                "(grid mesh), off for none."),
    sensor: str | None = typer.Option(None, help="Sensor effects: ideal (none), realistic (HDL-64E-like noise, "
                                      "dropouts, mixed returns), PRESET:key=value,... or a .json "
                                      "(docs/own_sensor.md). --lidar-noise-m/--lidar-dropout > 0 replace its "
                                      "uniform noise/dropout. Default: a pattern file's own sensor, else ideal."),
    intrinsics: str = typer.Option("random", help="random, or native where the source has real intrinsics."),
    max_size: int = typer.Option(1280, help="Longest image side; larger inputs are downscaled (K follows). "
                                 "0: never."),
    rgb_format: str = typer.Option("jpg", help="jpg or png for rgb in the shards."),
    labelled: bool | None = typer.Option(None, "--labelled/--unlabelled", help="synthetic: KITTI-like labelled "
                                         "samples (simulated scan + GT)."),
    gt: str | None = typer.Option(None, help="synthetic --labelled: semi or dense GT."),
    family: str | None = typer.Option(None, help="synthetic: street, room, nature, tabletop or mixed (default: street)."),
    width: int | None = typer.Option(None, help="synthetic: image width."),
    height: int | None = typer.Option(None, help="synthetic: image height."),
    option: list[str] = typer.Option([], "--option", "-o", help="Source option KEY=VALUE (e.g. splits=val2017)."),
    progress: str = typer.Option("auto", help="auto, bar, log or none."),
) -> None:
    """Turn a data set into shards: teacher, pseudo depth, random K, simulated LiDAR. Resumable."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = dict(labelled=labelled, gt=gt, family=family, width=width, height=height)
    options.update(_parse_option(o) for o in option)
    try:
        scan = ScanSpec.from_cli(lidar=lidar, mount=mount, mesh=mesh, occlusion=occlusion, lidar_noise_m=lidar_noise_m,
                                 lidar_dropout=lidar_dropout, hidden_geometry=hidden_geometry, sensor=sensor)
    except ScanSpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    cfg = RunConfig(source=source, root=root or None, out=out, workers=workers, executor=executor,
                    address=address, runtime_env=runtime_env, teacher=teacher, teacher_replicas=teacher_replicas,
                    teacher_batch=teacher_batch, teacher_output=teacher_output,
                    metric_scale_jitter=metric_scale_jitter, limit=limit, seed=seed, shard_size=shard_size, scan=scan,
                    intrinsics=intrinsics,
                    max_size=max_size or None, rgb_format=rgb_format,
                    source_options={k: v for k, v in options.items() if v is not None}, progress=progress)
    try:
        summary = run_job(cfg)
    except (LayoutError, TeacherUnavailable, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(summary.format())
    if summary.failed:
        typer.echo(f"failures are listed in {join(summary.out_dir, 'failures.parquet')}")


@app.command()
def export(
    shards: str = typer.Argument(..., help="A shard (.tar), a directory of shards, a glob, or the same in object "
                                 "storage (s3://bucket/prefix/)."),
    fmt: str = typer.Option(..., "--format", help="kitti (KITTI depth completion's layout) or nyu-h5 "
                               "(NYUv2 as Ma & Karaman's HDF5 files)."),
    out: Path = typer.Option(..., "--out", help="A new or empty local folder: the layout's root."),
    split: str = typer.Option("train", help="train or val."),
    val_selection: int = typer.Option(0, help="kitti, --split val: also copy the first N samples to "
                                      "val_selection_cropped/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out."),
    add: bool = typer.Option(False, "--add", help="Add this split to an earlier export in --out."),
    progress: str = typer.Option("auto", help="auto, bar, log or none."),
) -> None:
    """Write shards in the layout other trainers read (KITTI DC or NYUv2 HDF5); docs/datasets.md."""
    import shlex

    from datagen.export import ExportError
    from datagen.export import export as export_shards
    from shared.shard import ShardError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = shlex.join(["datagen", "export", shards, "--format", fmt, "--out", str(out), "--split", split,
                          *(["--val-selection", str(val_selection)] if val_selection else []),
                          *(["--overwrite"] if overwrite else []), *(["--add"] if add else [])])
    try:
        summary = export_shards(shards, out, fmt, split=split, val_selection=val_selection, overwrite=overwrite,
                                add=add, progress=progress, command=command)
    except (ExportError, ShardError, FileNotFoundError, StorageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary.format_text())


@app.command()
def teachers() -> None:
    """The depth models datagen knows: output kind, licence as published, size, example checkpoints."""
    typer.echo(format_table())


if __name__ == "__main__":
    app()
