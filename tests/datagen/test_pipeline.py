"""`datagen run` end to end on Ray: synthetic (oracle), a messy folder with the bad-image zoo, KITTI and NYU
(tiny Depth Anything teacher); shards validate, keys are stable, every input lands exactly once. The local
executor (no Ray) writes the same bytes as Ray, file for file, on synthetic and on the folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
torch = pytest.importorskip("torch")

from fixtures import make_bad_images, make_folder, make_kitti, make_nyu  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from datagen.cli import app  # noqa: E402
from datagen.job.pipeline import process_shard, run  # noqa: E402
from datagen.job.settings import PipelineError, RunConfig  # noqa: E402
from datagen.job.shard_files import shard_name  # noqa: E402
from datagen.sample import sample_seed  # noqa: E402
from datagen.sources import get_source  # noqa: E402
from datagen.teachers.runner import OracleTeacher, save_random_teacher  # noqa: E402
from shared.shard import iter_samples, list_shards, validate_shard  # noqa: E402

SYN = dict(source="synthetic", source_options={"width": 96, "height": 64}, progress="none")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory):
    """A tiny random Depth Anything saved with save_pretrained, loaded like real weights."""
    return save_random_teacher(tmp_path_factory.mktemp("tiny_da"))


def tables(out_dir: Path) -> tuple[list[dict], list[dict]]:
    return pq.read_table(out_dir / "manifest.parquet").to_pylist(), pq.read_table(out_dir / "failures.parquet").to_pylist()


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in list_shards(str(out_dir))}


def job_files(out_dir: Path) -> dict[str, bytes]:
    """Every file a job leaves (shards, sidecars, both tables, job.json) but the lock: name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.name != ".lock"}


def check_outputs(out_dir: Path, items: list) -> tuple[list[dict], list[dict], dict]:
    """Shards validate; manifest + failures hold every input exactly once; manifest rows match the shards."""
    manifest, failures = tables(out_dir)
    for shard in list_shards(str(out_dir)):
        report = validate_shard(shard)
        assert report.ok, report.errors
    keys = [r["key"] for r in manifest] + [r["key"] for r in failures]
    assert sorted(keys) == sorted(it.key for it in items)  # exactly once each
    assert {r["source_path"] for r in manifest} | {r["source_path"] for r in failures} == {it.path for it in items}
    samples = {}
    for s in iter_samples(str(out_dir)):
        samples[s.key] = s
    assert sorted(samples) == sorted(r["key"] for r in manifest)
    for r in manifest:
        s = samples[r["key"]]
        assert (r["width"], r["height"]) == (s.width, s.height)
        np.testing.assert_allclose(np.reshape(r["K"], (3, 3)), s.K)
        assert r["points"] == int(np.count_nonzero(s.sparse))
        assert s.meta["source_path"] == r["source_path"]
        # the sample sits in the shard the manifest names, which holds the inputs [i*S, (i+1)*S)
        assert r["shard"] in {Path(p).name for p in list_shards(str(out_dir))}
    return manifest, failures, samples


def test_synthetic_oracle_deterministic_and_resumable(tmp_path):
    items = get_source("synthetic", None, count=7, width=96, height=64).items()
    a = run(RunConfig(**SYN, out=str(tmp_path / "a"), limit=7, shard_size=3, workers=2))
    out = tmp_path / "a" / "synthetic"
    manifest, failures, samples = check_outputs(out, items)
    assert (a.done, a.skipped, a.failed, a.shards) == (7, 0, 0, 3) and not failures
    assert sorted(shard_bytes(out)) == [f"synthetic-00000{i}.tar" for i in range(3)]
    for i, it in enumerate(items):  # deterministic assignment: input i is in shard i // 3, in order
        row = next(r for r in manifest if r["key"] == it.key)
        assert row["shard"] == f"{shard_name('synthetic', i // 3)}.tar"
    for s in samples.values():
        assert s.depth is not None and s.teacher is not None and s.gt is None
        assert s.meta["lidar"]["seed"] == sample_seed(0, s.key)
        assert s.meta["teacher"]["model"] == "oracle"
        # simulated returns lie on the dense depth's range (a parallax point may come from a nearby pixel)
        d, sp = s.depth, s.sparse
        assert sp[sp > 0].min() >= d[d > 0].min() * 0.9 and sp.max() <= d.max() * 1.1

    # one worker instead of two, and a plain call without Ray: the same bytes (scheduling does not matter)
    run(RunConfig(**SYN, out=str(tmp_path / "b"), limit=7, shard_size=3, workers=1))
    assert shard_bytes(tmp_path / "b" / "synthetic") == shard_bytes(out)
    assert tables(tmp_path / "b" / "synthetic") == (manifest, failures)
    # the local executor, in this process without Ray: every file the same, byte for byte
    local = run(RunConfig(**SYN, out=str(tmp_path / "local"), limit=7, shard_size=3, executor="local"))
    assert (local.done, local.workers, local.executor) == (7, 1, "local") and "in this process" in local.format()
    assert set(job_files(out)) >= {"manifest.parquet", "failures.parquet", "job.json", "synthetic-000002.rows.json"}
    assert job_files(tmp_path / "local" / "synthetic") == job_files(out)
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = RunConfig(**{**SYN, "source_options": {"width": 96, "height": 64, "count": 7}})
    rows = process_shard(cfg, 1, items[3:6], None, OracleTeacher().info(), str(plain))
    assert (plain / "synthetic-000001.tar").read_bytes() == (out / "synthetic-000001.tar").read_bytes()
    assert rows["keys"] == [it.key for it in items[3:6]] and rows["samples"] == 3

    # a rerun finds everything finished: nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(RunConfig(**SYN, out=str(tmp_path / "a"), limit=7, shard_size=3, workers=2))
    assert (again.done, again.skipped, again.failed) == (0, 7, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert tables(out) == (manifest, failures)

    # a larger --limit keeps the full shards and redoes only the last, now longer one
    more = run(RunConfig(**SYN, out=str(tmp_path / "a"), limit=9, shard_size=3, workers=2))
    assert (more.done, more.skipped) == (3, 6)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}["synthetic-000000.tar"] == mtimes[
        "synthetic-000000.tar"]
    check_outputs(out, get_source("synthetic", None, count=9, width=96, height=64).items())

    # other settings into the same folder are refused rather than mixed
    with pytest.raises(PipelineError, match="other settings"):
        run(RunConfig(**SYN, out=str(tmp_path / "a"), limit=7, shard_size=3, seed=1))


def test_folder_with_bad_images(tmp_path, tiny_da):
    tree = make_folder(tmp_path / "tree")
    zoo = make_bad_images(tmp_path / "tree" / "zoo")
    items = get_source("folder", tmp_path / "tree").items()
    assert len(items) == len(tree["paths"]) + len(zoo)
    cfg = RunConfig(source="folder", root=str(tmp_path / "tree"), out=str(tmp_path / "out"), teacher=tiny_da,
                    shard_size=3, max_size=320, workers=2, teacher_batch=2, progress="none")
    s = run(cfg)
    manifest, failures, samples = check_outputs(tmp_path / "out" / "folder", items)
    assert s.done == len(manifest) and s.failed == len(failures)
    # the local executor (--workers 0): the teacher in this process, the same bytes as the Ray replica's
    local = run(replace(cfg, out=str(tmp_path / "local"), workers=0))
    assert local.executor == "local" and (local.done, local.failed) == (s.done, s.failed)
    assert job_files(tmp_path / "local" / "folder") == job_files(tmp_path / "out" / "folder")
    by_path = {r["source_path"]: r for r in manifest}
    failed = {r["source_path"]: r for r in failures}
    for name, z in zoo.items():
        path = str(z["path"])
        if z["expect"] == "ok":  # converted: grey, RGBA, 16-bit, CMYK, palette, the 9000 x 6000 one
            assert path in by_path, (name, failed.get(path))
        else:  # truncated, empty, text, 20 x 20: a row with a reason
            assert failed[path]["stage"] == "load" and failed[path]["error"], name
    huge = by_path[str(zoo["huge_9000x6000.jpg"]["path"])]
    assert (huge["width"], huge["height"]) == (320, 213)
    assert samples[huge["key"]].meta["resized_from"] == [9000, 6000]
    for p in tree["paths"]:
        assert str(p) in by_path
    # a shard whose every input failed has its rows (the "finished" marker) and no tar
    bad = {str(z["path"]) for z in zoo.values() if z["expect"] == "error"}
    empty = [i for i in range(0, len(items), 3) if all(it.path in bad for it in items[i:i + 3])]
    assert empty, "the sorted zoo should end in a shard of bad inputs only"
    for i in empty:
        name = shard_name("folder", i // 3)
        assert not (tmp_path / "out" / "folder" / f"{name}.tar").exists()
        assert (tmp_path / "out" / "folder" / f"{name}.rows.json").exists()
    again = run(cfg)  # everything finished: nothing to do, not even the teacher is loaded
    assert (again.done, again.failed, again.skipped) == (0, 0, len(items))
    assert tables(tmp_path / "out" / "folder") == (manifest, failures)
    for smp in samples.values():
        assert smp.meta["teacher"]["model"] == tiny_da and smp.depth is not None and smp.teacher.max() > 0


def test_kitti_labelled(tmp_path, tiny_da):
    tree = make_kitti(tmp_path / "kitti", frames=2, splits=("train",), selection=0, test=0, missing_gt=1)
    items = get_source("kitti", tmp_path / "kitti").items()
    s = run(RunConfig(source="kitti", root=str(tmp_path / "kitti"), out=str(tmp_path / "out"), teacher=tiny_da,
                      shard_size=2, workers=2, progress="none"))
    manifest, failures, samples = check_outputs(tmp_path / "out" / "kitti", items)
    recs = tree["splits"]["train"]["items"]
    assert s.failed == 1 and failures[0]["stage"] == "load"  # the frame whose GT was deleted
    assert len(manifest) == len(recs) - 1
    for rec in recs:
        if rec.get("gt_missing"):
            continue
        smp = next(x for x in samples.values() if x.meta["source_path"] == str(rec["velodyne"]))
        np.testing.assert_array_equal(smp.sparse, rec["sparse"])  # the real scan, not a simulated one
        np.testing.assert_array_equal(smp.gt, rec["gt"])
        np.testing.assert_allclose(smp.K, rec["K"], rtol=1e-6)
        assert smp.depth is None and smp.teacher is not None and "depth.png" not in smp.meta["members"]
    assert all(r["lidar"] is None for r in manifest)


def test_nyu_labelled(tmp_path, tiny_da):
    tree = make_nyu(tmp_path / "nyu", splits=("train",), frames=3)
    items = get_source("nyu", tmp_path / "nyu").items()
    run(RunConfig(source="nyu", root=str(tmp_path / "nyu"), out=str(tmp_path / "out"), teacher=tiny_da,
                  shard_size=2, workers=2, progress="none"))
    manifest, failures, samples = check_outputs(tmp_path / "out" / "nyu", items)
    assert not failures and len(manifest) == 3
    for rec, row in zip(tree["splits"]["train"]["items"], manifest, strict=True):
        smp = samples[row["key"]]
        assert np.abs(smp.gt - rec["depth"]).max() <= 1 / 512 + 1e-6  # depth PNG quantisation only
        on = smp.sparse > 0
        assert 0 < on.sum() <= 500 and np.all(smp.gt[on] > 0)
        np.testing.assert_array_equal(smp.sparse[on], smp.gt[on])  # sparse points are sampled from GT


def test_metric_teachers_through_ray(tmp_path, caplog):
    """A metric Depth Anything and Depth Pro (tiny, random) as teachers in real runs: the kind is recorded in
    job.json and meta.json, depth.png is the teacher's own metric map, the licence is said once at the start."""
    import logging

    make_folder(tmp_path / "tree")
    items = get_source("folder", tmp_path / "tree").items()[:3]
    for arch in ("depth_anything_metric", "depth_pro"):
        teacher = save_random_teacher(tmp_path / arch, arch=arch)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="datagen"):
            s = run(RunConfig(source="folder", root=str(tmp_path / "tree"), out=str(tmp_path / arch / "out"),
                              teacher=teacher, limit=3, shard_size=3, workers=1, teacher_batch=2, progress="none"))
        assert (s.done, s.failed) == (3, 0)
        assert sum("licence" in r.getMessage() for r in caplog.records) == 1
        out = tmp_path / arch / "out" / "folder"
        job = json.loads((out / "job.json").read_text())
        assert job["teacher_output"] == "metric" and job["metric_scale_jitter"] == 0.0
        assert job["teacher_about"]["output_source"] == "config" and job["teacher_about"]["license"]["license"]
        _, _, samples = check_outputs(out, items)
        for smp in samples.values():
            assert smp.meta["teacher"]["output"] == "metric"
            on = smp.depth > 0
            assert on.mean() > 0.5  # no near/far draw: the teacher's metres, to the depth PNG's 1/256 m
            span = float(smp.meta["teacher_scaling"]["max"] - smp.meta["teacher_scaling"]["min"])
            assert np.abs(smp.depth[on] - smp.teacher[on]).max() <= 0.5 / 256 + span / 65534 + 1e-5
            assert (arch == "depth_pro") == ("fov_deg" in smp.meta["teacher"])
    # the same folder with another kind of teacher is another job
    with pytest.raises(PipelineError, match="teacher_output: 'metric' before, 'disparity' now"):
        run(RunConfig(source="folder", root=str(tmp_path / "tree"), out=str(tmp_path / "depth_pro" / "out"),
                      teacher=save_random_teacher(tmp_path / "rel"), limit=3, shard_size=3, progress="none"))


def test_job_file_from_before_teacher_kinds_still_resumes(tmp_path):
    """A job.json written before teacher_output existed meant a disparity teacher: it resumes as one, and a
    metric teacher in that folder is refused. teacher_about (licence, ...) is written but never compared."""

    from datagen.job.pipeline import check_job_file

    cfg = RunConfig(source="folder", root="/x", teacher="/m", teacher_output="disparity")  # as prepare fills it
    old = {k: v for k, v in cfg.fingerprint().items() if k not in ("teacher_output", "metric_scale_jitter")}
    (tmp_path / "job.json").write_text(json.dumps(old))
    check_job_file(tmp_path, cfg, {"teacher_about": {"license": {"license": "mit"}}})
    written = json.loads((tmp_path / "job.json").read_text())
    assert written["teacher_output"] == "disparity" and written["teacher_about"]["license"]["license"] == "mit"
    check_job_file(tmp_path, cfg, {"teacher_about": {"license": {"license": "another card"}}})
    (tmp_path / "job.json").write_text(json.dumps(old))
    with pytest.raises(PipelineError, match="teacher_output: 'disparity' before, 'metric' now"):
        check_job_file(tmp_path, replace(cfg, teacher_output="metric"))
    with pytest.raises(PipelineError, match="metric_scale_jitter"):
        check_job_file(tmp_path, replace(cfg, metric_scale_jitter=0.2))


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["run", "--source", "synthetic", "--width", "96", "--height", "64", "--limit", "3",
                              "--shard-size", "2", "--out", str(out), "--progress", "log"])
    assert res.exit_code == 0, res.output
    assert "done 3, skipped 0, failed 0" in res.output
    assert json.loads((out / "synthetic" / "job.json").read_text())["shard_size"] == 2
    assert len(pq.read_table(out / "synthetic" / "manifest.parquet")) == 3

    # a wrong --root fails at once, naming the layout it expected, with exit code 2 and no traceback
    res = runner.invoke(app, ["run", "--source", "coco", "--root", str(tmp_path), "--out", str(tmp_path / "x"),
                              "--teacher", str(tmp_path)])
    assert res.exit_code == 2 and "train2017" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()
    # a teacher that cannot be loaded fails before any work, with the teacher's message
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    res = runner.invoke(app, ["run", "--source", "coco", "--root", str(tmp_path / "coco"), "--out",
                              str(tmp_path / "x"), "--teacher", str(tmp_path / "no-such-model")])
    assert res.exit_code == 2 and "no-such-model" in res.output and not (tmp_path / "x").exists()


def test_hidden_geometry_and_sensor_are_recorded_and_fingerprinted(tmp_path):
    """--hidden-geometry/--no-hidden-geometry and --sensor reach the sample, its meta.json and job.json."""
    from datagen.job.pipeline import prepare
    from shared.scan.sensor import get_sensor
    from shared.scan.spec import ScanSpec, ScanSpecError

    items = get_source("synthetic", None, count=1, width=96, height=64).items()
    base = {**SYN, "source_options": {"width": 96, "height": 64, "count": 1}}
    metas = {}
    for name, extra in (("default", {}), ("off", {"hidden": False}), ("real", {"sensor": "realistic"})):
        out = tmp_path / name
        out.mkdir()
        process_shard(RunConfig(**base, scan=ScanSpec(mount="kitti", **extra)), 0, items, None, OracleTeacher().info(),
                      str(out))
        metas[name] = next(iter_samples(str(out))).meta["lidar"]
    assert metas["default"]["hidden_geometry"] is True and metas["off"]["hidden_geometry"] is False  # kitti: on
    assert get_sensor(metas["default"]["sensor"]) == get_sensor("ideal")
    assert get_sensor(metas["real"]["sensor"]) == get_sensor("realistic")
    fp = prepare(RunConfig(**SYN, limit=1))[0].fingerprint()
    assert fp["hidden_geometry"] is None and fp["sensor"] == "ideal"
    assert prepare(RunConfig(**SYN, limit=1, scan=ScanSpec(hidden=False)))[0].fingerprint() != fp
    assert prepare(RunConfig(**SYN, limit=1, scan=ScanSpec(sensor="realistic")))[0].fingerprint() != fp
    with pytest.raises(ScanSpecError, match="sensor"):
        ScanSpec(sensor="realistic:bogus=1")
    with pytest.raises(ScanSpecError, match="grid"):
        ScanSpec(mesh="poisson", hidden=True)
    for bad in (["--sensor", "realistic:bogus=1"], ["--mesh", "poisson", "--hidden-geometry"], ["--lidar", "hdl6"],
                ["--mount", "roof"]):  # refused before any work, with the option named
        res = CliRunner().invoke(app, ["run", "--source", "synthetic", "--out", str(tmp_path / "bad"), *bad])
        assert res.exit_code == 2 and bad[0] in res.output and not (tmp_path / "bad").exists(), res.output


def test_a_pattern_files_own_sensor_reaches_the_shards(tmp_path):
    """`datagen run --lidar mine.json` without --sensor simulates the sensor the pattern file names (as
    docs/own_sensor.md says); it used to be replaced by --sensor's old default, ideal. --sensor still wins."""
    from shared.scan.patterns import get_pattern, save_pattern
    from shared.scan.sensor import get_sensor

    pat = get_pattern("vlp16")
    pat.sensor = get_sensor("realistic")
    save_pattern(pat, tmp_path / "mine.json")
    for name, extra, want in (("own", [], "realistic"), ("named", ["--sensor", "ideal"], "ideal")):
        res = CliRunner().invoke(app, ["run", "--source", "synthetic", "--width", "96", "--height", "64", "--limit",
                                       "1", "--out", str(tmp_path / name), "--lidar", str(tmp_path / "mine.json"),
                                       "--progress", "none", *extra])
        assert res.exit_code == 0, res.output
        meta = next(iter_samples(str(tmp_path / name / "synthetic"))).meta
        assert get_sensor(meta["lidar"]["sensor"]) == get_sensor(want)


def test_shard_that_cannot_be_written_stops_the_job(tmp_path):
    """A shard task that raises (here: its final name is taken by a folder) stops the job with exit code 1
    and a message naming the shard; the shard is not marked finished. Last in the module: the job cancels
    its other tasks by killing their workers."""
    (tmp_path / "synthetic" / "synthetic-000000.tar").mkdir(parents=True)
    res = CliRunner().invoke(app, ["run", "--source", "synthetic", "--width", "96", "--height", "64", "--limit", "2",
                                   "--shard-size", "2", "--out", str(tmp_path), "--progress", "none"])
    assert res.exit_code == 1 and "shard synthetic-000000 failed" in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "synthetic" / "manifest.parquet").exists()
