"""`trainer` command line: parse, call one function, print. The modules behind a command are imported in
the command: torch takes seconds to import, and `trainer score` and `--help` need none of it.

    trainer pretrain --shards shards/synthetic [--preset laptop|paper] [--model bpnet-s] [--steps N] ...
    trainer finetune --shards shards/kitti --init runs/pretrain [--val-shards shards/val --val-every 100] [...]
    trainer eval     --ckpt runs/finetune --shards shards/kitti-val [--kind kitti|nyu] [--json F]
                     [--sparsity lines:16 | --sweep lines:64,32,16,8]
    trainer predict  --ckpt runs/finetune --shards shards/kitti-test --out preds/
    trainer score    --pred preds/ --gt gt/ --kind kitti [--json F]
    trainer baseline --method ip-basic|nearest --shards shards/kitti-val | --sparse-dir scans/ --out preds/
    trainer complete --ckpt runs/finetune --rgb img.png --sparse scan.png --K K.txt --out depth.png
    trainer export   --ckpt runs/finetune --out model.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import typer

from shared.fsutil import write_json
from shared.sparsity import parse_protocol
from trainer.metrics import format_table, score_dirs  # numpy only: `trainer score` needs no torch

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="BP-Net depth completion: pre-train on generated shards, fine-tune with SSI "
                       "distillation, evaluate, predict.")


def _local(value: str | None) -> str | None:
    """Options naming local files: a URL is refused, never taken as a local path (only --shards streams
    from object storage)."""
    from shared.storage import is_url

    if value is not None and is_url(str(value)):
        raise typer.BadParameter(f"{value!r} is a URL; a local path is expected here (--shards reads object "
                                 "storage; copy checkpoints and outputs there afterwards)")
    return value


def _setup_logging() -> None:
    quiet = int(os.environ.get("RANK", 0)) != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def _train_command(stage: str):
    def command(
        shards: str = typer.Option(..., help="shard directory, .tar, glob, brace pattern or URL"),
        preset: str = typer.Option("laptop", help="laptop (default, CPU) or paper (bpnet, batch 16, 256x1216)"),
        model: str = typer.Option(None, help="network preset: bpnet, bpnet-s, tiny (default: --init's, else "
                                  "bpnet-s), or any nn.Module as pkg.module:Class (imports that module; "
                                  "docs/trainer.md, 'Any network')"),
        model_kwargs: str = typer.Option(None, help="with --model pkg.module:Class: its constructor kwargs as a "
                                         "JSON object, recorded in the checkpoint"),
        init: str = typer.Option(None, help="start from our checkpoint/run dir or an original BP-Net/DMD3C .pth",
                                 callback=_local),
        steps: int = typer.Option(None, help="optimizer steps in all (a resumed run counts its done ones)"),
        batch_size: int = typer.Option(None, help="global batch, split over torchrun processes"),
        crop: str = typer.Option(None, help="training crop HxW, multiples of 32"),
        out: str = typer.Option(None, help="run directory: checkpoints, log.csv, tb/", callback=_local),
        resume: bool = typer.Option(False, help="continue from the latest checkpoint in --out"),
        lr: float = typer.Option(None, help="peak learning rate of the one-cycle schedule"),
        workers: int = typer.Option(None, help="DataLoader workers per process"),
        ema_decay: float = typer.Option(None, help="EMA decay of the weights"),
        seed: int = typer.Option(None),
        device: str = typer.Option(None, help="auto, cpu or cuda"),
        amp: str = typer.Option(None, help="auto (bf16 on GPU), bf16 or none"),
        convention: str = typer.Option(None, help="input convention: default what --init records, else kitti; "
                                       "nyu to fine-tune an original BP-Net NYU .pth (ImageNet RGB, depth x 10)"),
        ckpt_every: int = typer.Option(None, help="steps between checkpoints"),
        log_every: int = typer.Option(None, help="steps between log lines"),
        lambda_ssi: float = typer.Option(None, help="finetune: weight of L_SSI"),
        lambda_reg: float = typer.Option(None, help="finetune: weight of L_reg"),
        space: str = typer.Option(None, help="finetune: where the teacher is fitted: disparity (default; Depth "
                                  "Anything's output) or depth (needs depth.png, i.e. unlabelled shards)"),
        penalty: str = typer.Option(None, help="finetune: units of L_SSI/L_reg: depth (default, metres as L_sup) "
                                    "or disparity (1/m: the pre-metric penalty, ~100x weaker)"),
        fit: str = typer.Option(None, help="finetune: lsq (default, closed-form scale and shift) or l1 "
                                "(the L1-optimal scale and shift: robust to outliers)"),
        threads: int = typer.Option(None, help="torch CPU threads"),
        lidar: str = typer.Option(None, help="pretrain: cast a new scan of every frame each epoch from its dense "
                                  "pseudo depth, as datagen run --lidar spells it (hdl64, vlp16, random, livox:..., "
                                  "lines:..., points:N, mine.json), or shard: each sample's own settings. Default: "
                                  "the shards' stored scans"),
        mount: str = typer.Option(None, help="with --lidar: random (default), kitti or none"),
        sensor: str = typer.Option(None, help="with --lidar: ideal, realistic, PRESET:key=value or a .json "
                                   "(default: a pattern file's own, else ideal)"),
        hidden_geometry: bool = typer.Option(None, "--hidden-geometry/--no-hidden-geometry",
                                             help="with --lidar: the background behind occluding edges (default: "
                                             "on for an offset mount)"),
        json_path: str = typer.Option(None, "--json", help="write the run summary here", callback=_local),
        log_keys: bool = typer.Option(False, help="log consumed sample keys per rank (data audits)"),
        val_shards: str = typer.Option(None, help="labelled shards (with GT) to score the EMA network on every "
                                       "--val-every steps: val_* in log.csv, RUN/best = lowest RMSE"),
        val_every: int = typer.Option(None, help="steps between validations (default: --ckpt-every); each "
                                      "one saves a checkpoint"),
        val_top_rows: str = typer.Option(None, help="also score the top R rows (e.g. those above every label), "
                                         "or auto: R from the fine-tuning shards' labels"),
        quiet: bool = typer.Option(False, help="no progress bar"),
    ):
        from trainer.presets import get_preset

        _setup_logging()
        cfg = get_preset(preset, stage)
        try:
            kwargs = json.loads(model_kwargs) if model_kwargs else None
            if kwargs is not None and not isinstance(kwargs, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            typer.echo(f"error: --model-kwargs {model_kwargs!r}: expected a JSON object ({exc})", err=True)
            raise typer.Exit(2) from exc
        given = {"shards": shards, "model": model, "model_kwargs": kwargs, "init": init, "steps": steps, "batch_size": batch_size,
                 "crop": crop, "out": out, "lr": lr, "workers": workers, "ema_decay": ema_decay, "seed": seed,
                 "device": device, "amp": amp, "ckpt_every": ckpt_every, "log_every": log_every,
                 "lambda_ssi": lambda_ssi, "lambda_reg": lambda_reg, "space": space, "penalty": penalty,
                 "fit": fit, "threads": threads, "lidar": lidar, "mount": mount, "sensor": sensor,
                 "hidden_geometry": hidden_geometry, "json": json_path, "convention": convention,
                 "val_shards": val_shards, "val_every": val_every, "val_top_rows": val_top_rows}
        cfg = dataclasses.replace(cfg, resume=resume, log_keys=log_keys, progress=not quiet,
                                  **{k: v for k, v in given.items() if v is not None})
        from trainer.model import build_model, is_plugin_name
        from trainer.train import train, validate

        try:
            validate(cfg)
            if cfg.model and is_plugin_name(cfg.model) and not cfg.init and not cfg.resume:
                build_model(cfg.model, cfg.model_kwargs)  # a wrong path or kwargs fail here, before any work
        except (ValueError, TypeError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        summary = train(cfg)
        if int(os.environ.get("RANK", 0)) == 0:
            typer.echo(json.dumps({k: summary[k] for k in ("stage", "model", "steps", "first_loss", "final_loss",
                                                           "samples_per_s", "skipped_samples", "checkpoint",
                                                           "best_checkpoint", "best_val_rmse_m")}))

    command.__doc__ = {"pretrain": "Pre-train on (simulated LiDAR -> dense pseudo depth) shards: multi-scale L1.",
                       "finetune": "Fine-tune: L_sup on GT + lambda_ssi L_SSI + lambda_reg L_reg to the teacher.",
                       }[stage]
    return command


app.command("pretrain")(_train_command("pretrain"))
app.command("finetune")(_train_command("finetune"))


# Options that `eval` and `predict` share (one definition, one help text).
CKPT_OPT = typer.Option(..., help="checkpoint, run directory (its latest), RUN/best (lowest validation RMSE), "
                        "export, or original .pth", callback=_local)
STEPS_OPT = typer.Option(None, help="at most this many batches")
MODEL_OPT = typer.Option(None, help="network of an original .pth (default bpnet)")
RAW_OPT = typer.Option(False, help="use the trained weights instead of the EMA")
CROP_OPT = typer.Option(None, help="bottom-centre crop HxW (default: whole image padded to x32), or "
                        "bpnet-nyu: BP-Net's NYUv2 test frame (half size, 228x304 centre crop, fixed 500 points)")
CONVENTION_OPT = typer.Option(None, help="input convention of an original .pth: kitti (default; BP-Net KITTI) "
                              "or nyu (BP-Net NYU: ImageNet normalisation, depth x 10); ours record theirs")
SPARSITY_OPT = typer.Option("full", help="input protocol, applied to the sparse input only: full, lines:N (N "
                            "of the LiDAR's rings), lines-uniform:N (the literature's 64 pitch bins), points:N, "
                            "keypoints:N (docs/finetune.md)")
SPARSITY_SEED_OPT = typer.Option(0, help="seed of points:N (the draw is per sample key: the same for every model)")
BATCH_OPT = typer.Option(1, help="samples per forward pass")
WORKERS_OPT = typer.Option(0, help="DataLoader workers")
DEVICE_OPT = typer.Option("auto", help="auto, cpu or cuda")


def _inference_options(model, raw, crop, batch_size, workers, device, convention, steps, sparsity, sparsity_seed):
    """The options `eval` and `predict` share, as trainer.evaluate.InferenceOptions."""
    from trainer.evaluate import InferenceOptions

    return InferenceOptions(model_name=model, which="model" if raw else "ema", crop=crop, batch_size=batch_size,
                            workers=workers, device=device, convention=convention, steps=steps,
                            sparsity=parse_protocol(sparsity, sparsity_seed))


@app.command("eval")
def eval_cmd(
    ckpt: str = CKPT_OPT,
    shards: str = typer.Option(...),
    kind: str = typer.Option("kitti", help="kitti (mm, 1/km) or nyu (m, REL, deltas)"),
    json_path: str = typer.Option(None, "--json", callback=_local),
    steps: int = STEPS_OPT,
    model: str = MODEL_OPT,
    raw: bool = RAW_OPT,
    crop: str = CROP_OPT,
    target: str = typer.Option("gt", help="member to score against: gt, or depth (pseudo depth)"),
    batch_size: int = BATCH_OPT,
    workers: int = WORKERS_OPT,
    device: str = DEVICE_OPT,
    convention: str = CONVENTION_OPT,
    sparsity: str = SPARSITY_OPT,
    sweep: list[str] = typer.Option([], help="evaluate under each setting, e.g. lines:64,32,16,8 or "
                                    "points:500,200,100,50 (repeatable; full is always the first row): one "
                                    "table, and with --json F the JSON there and the Markdown beside it (.md)"),
    sparsity_seed: int = SPARSITY_SEED_OPT,
):
    """Metrics table of a checkpoint on shards (stdout) and JSON."""
    from trainer.evaluate import evaluate

    _setup_logging()
    if sweep and sparsity != "full":
        raise typer.BadParameter("give --sparsity or --sweep, not both (a sweep sets the input of each row)")
    opts = _inference_options(model, raw, crop, batch_size, workers, device, convention, steps, sparsity,
                              sparsity_seed)
    if sweep:
        from trainer.sparsity import format_sweep
        from trainer.sparsity import sweep as run_sweep

        typer.echo(format_sweep(run_sweep(ckpt, shards, sweep, kind, opts, target, json_path, sparsity_seed)))
        return
    typer.echo(format_table(evaluate(ckpt, shards, kind, opts, target, json_path)))


@app.command("predict")
def predict_cmd(
    ckpt: str = CKPT_OPT,
    shards: str = typer.Option(...),
    out: str = typer.Option(..., help="output directory: <key>.png (uint16, depth x 256) and preview/",
                            callback=_local),
    previews: int = typer.Option(16, help="colourised previews of the first N samples"),
    steps: int = STEPS_OPT,
    model: str = MODEL_OPT,
    raw: bool = RAW_OPT,
    crop: str = CROP_OPT,
    batch_size: int = BATCH_OPT,
    workers: int = WORKERS_OPT,
    device: str = DEVICE_OPT,
    convention: str = CONVENTION_OPT,
    sparsity: str = SPARSITY_OPT,
    sparsity_seed: int = SPARSITY_SEED_OPT,
):
    """KITTI-submission PNGs at each sample's full size, named <key>.png, plus previews."""
    from trainer.evaluate import predict

    _setup_logging()
    opts = _inference_options(model, raw, crop, batch_size, workers, device, convention, steps, sparsity,
                              sparsity_seed)
    typer.echo(json.dumps(predict(ckpt, shards, out, previews, opts)))


@app.command("complete")
def complete_cmd(
    ckpt: str = CKPT_OPT,
    rgb: str = typer.Option(..., help="an RGB image (.png/.jpg), or a folder of them", callback=_local),
    sparse: str = typer.Option(..., help="its scan: uint16 .png (metres x 256, KITTI) or .npy (float metres); "
                               "or a folder of them, paired with the images by file name", callback=_local),
    K: str = typer.Option(None, "--K", help="intrinsics: a text file of 9 numbers (3 x 3), or a folder of "
                          "<name>.txt", callback=_local),
    calib: str = typer.Option(None, help="or KITTI's calib_cam_to_cam.txt (P_rect_02)", callback=_local),
    out: str = typer.Option(..., help="output depth .png (uint16, metres x 256); for folders, a folder",
                            callback=_local),
    max_depth: float = typer.Option(None, help="clamp the output to this depth in metres (default: the PNG's "
                                    "range, 256 m); also the top of the previews' colour scale"),
    preview: bool = typer.Option(True, help="also write a colour preview (rgb | scan | depth)"),
    raw: bool = RAW_OPT,
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
):
    """Complete your own frames: depth PNGs (uint16, metres x 256) and colour previews."""
    from trainer.complete import InputError, complete_files

    _setup_logging()
    try:
        result = complete_files(ckpt, rgb, sparse, out, K=K, calib=calib, max_depth=max_depth, previews=preview,
                                device=device, which="model" if raw else "ema")
    except (InputError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "files"}))


@app.command("score")
def score_cmd(
    pred: str = typer.Option(..., help="directory of prediction PNGs"),
    gt: str = typer.Option(..., help="directory of GT PNGs (same names)"),
    kind: str = typer.Option("kitti"),
    json_path: str = typer.Option(None, "--json"),
):
    """Score any method's prediction PNGs against GT PNGs (what the KITTI devkit does)."""
    result = score_dirs(pred, gt, kind)
    if json_path:
        write_json(json_path, result)
    typer.echo(format_table(result))


@app.command("baseline")
def baseline_cmd(
    method: str = typer.Option(..., help="ip-basic (Ku et al. 2018, fill_in_fast) or nearest (nearest LiDAR point)"),
    out: str = typer.Option(..., help="output directory: <name>.png (uint16, depth x 256; 0 = no value)",
                            callback=_local),
    shards: str = typer.Option(None, help="a shard set: fill each sample's sparse.png, name <key>.png"),
    sparse_dir: str = typer.Option(None, help="or a folder of sparse depth PNGs (uint16, m x 256): same names"),
    max_depth: float = typer.Option(100.0, help="ip-basic: the inversion's pivot in metres (points beyond are lost)"),
    blur: str = typer.Option("gaussian", help="ip-basic: gaussian (its published KITTI result), bilateral or none"),
    extrapolate: bool = typer.Option(True, help="ip-basic: extend each column's top value to the top of the "
                                     "frame, then a 31x31 fill"),
):
    """A classical baseline's prediction PNGs (no learning), scorable with `trainer score`."""
    from trainer.baselines import run_baseline

    typer.echo(json.dumps(run_baseline(method, out, shards=shards, sparse_dir=sparse_dir, max_depth=max_depth,
                                       blur=blur, extrapolate=extrapolate)))


@app.command("export")
def export_cmd(
    ckpt: str = CKPT_OPT,
    out: str = typer.Option(None, help="output .safetensors", callback=_local),
    model_card: str = typer.Option(None, help="also (or instead) a Hugging Face hub-style folder, offline: "
                                   "model.safetensors, config.json, README.md (licence, provenance, validation)",
                                   callback=_local),
    onnx: str = typer.Option(None, help="also (or instead) an ONNX graph (BP-Net; dynamic height and width, "
                             "multiples of 32), checked with onnxruntime against PyTorch: docs/trainer.md",
                             callback=_local),
    raw: bool = typer.Option(False, help="export the trained weights instead of the EMA"),
    onnx_optimize: bool = typer.Option(True, help="with --onnx: the exporter's graph clean-up (onnxscript's "
                                       "constant folding and fusions; about half the export time; onnxruntime "
                                       "optimises the graph again when it loads it)"),
):
    """The EMA weights, the network config and the provenance as one plain safetensors file (or a model card,
    or an ONNX graph)."""
    from trainer.checkpoint import read_metadata
    from trainer.evaluate import export
    from trainer.provenance import warn_noncommercial

    _setup_logging()
    if not out and not model_card and not onnx:
        raise typer.BadParameter("give --out FILE.safetensors, --model-card DIR, --onnx FILE.onnx, or several")
    which = "model" if raw else "ema"
    warn_noncommercial(read_metadata(ckpt), str(ckpt))
    if out:
        typer.echo(export(ckpt, out, which))
    if onnx:
        from trainer.onnx_export import OnnxExportError, export_onnx

        try:
            report = export_onnx(ckpt, onnx, which, optimize=onnx_optimize)
        except OnnxExportError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"{report['path']}: opset {report['opset']}, {report['nodes']} nodes, exported in "
                   f"{report['export_s']:.0f} s; onnxruntime vs PyTorch: max relative error "
                   f"{report['max_rel_err']:.1e} on {', '.join(report['rel_err_by_size'])}")
    if model_card:
        from trainer.model_card import write_model_card

        typer.echo(write_model_card(ckpt, model_card, which))


if __name__ == "__main__":
    app()
