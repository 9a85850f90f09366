"""Fault injection on real processes (`make chaos`): slower and harsher than the fault tests.

    python bench/chaos.py                 # every scenario, about 8-11 minutes on 2 cores
    python bench/chaos.py --only datagen_kills,ray_worker_kill --seed 1 --json chaos.json

Scenarios (each prints PASS/FAIL and what it saw; the exit code is 1 if any failed):
- datagen_kills: `datagen run` SIGKILLed (with its whole process tree) at several random moments drawn
  from a seeded rng, each time rerun; then run to the end. Shards and manifest must equal an
  uninterrupted run's, byte for byte, and at every kill the tars under final names must be complete.
- ray_worker_kill: `ray::process_shard` worker processes SIGKILLed mid-run (found with psutil). The
  job must end with exit code 0 and every input exactly once in manifest.parquet or failures.parquet.
- trainer_ckpt_kill: the trainer SIGKILLed inside each of its three checkpoint writes (state, weights,
  `latest`; a child that stops half-way through the write), and then at random moments of a run that
  checkpoints every step. After each kill the newest checkpoint loads, and resuming to the end gives
  the weights of an uninterrupted run.
- corrupt_during_training: `trainer pretrain` with 2 DataLoader workers over few shards; once it is
  training, one shard is truncated and a PNG inside another gets bit flips. The run must finish, with
  the skipped samples counted in its summary and logged.
- disk_full / not_writable: `datagen run` into a 64 KiB tmpfs, into a read-only mount, into a path that is
  a file: exit code 1, a message naming the cause, no shard under its final name. Needs `mount` (root);
  skipped otherwise.
- object_store_faults: moto's S3 server behind the fault proxy of tests/s3faults.py. `datagen run --out
  s3://... --workers 2` and then `trainer pretrain --shards s3://... --workers 2`, each once with the proxy
  failing no request and once with it failing 20% (503 SlowDown, 500, a reset mid-request, a body cut
  mid-read, a 2 s stall), under the default retry policy. The faulty job must write the same shards
  (bytes) and manifest, the faulty training read the same samples (same keys, same weights, none skipped);
  reports how much slower the faulty runs were.
- ddp_rank_kills: `torchrun --nproc-per-node 2 --max-restarts N` (CPU, gloo) of `trainer pretrain --resume`
  checkpointing every step; one rank SIGKILLed several times: first inside a checkpoint write (rank 0,
  stopped half-way through the weights), then at seeded random steps, a random rank each time. The run
  must end with the weights and EMA of an uninterrupted 2-rank run, bit for bit, and no temporary file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from datagen.job.pipeline import process_shard  # noqa: E402
from datagen.job.settings import RunConfig  # noqa: E402
from datagen.job.shard_files import write_tables  # noqa: E402
from datagen.sources import get_source  # noqa: E402
from datagen.teachers.runner import OracleTeacher  # noqa: E402
from shared.camera import make_K  # noqa: E402
from shared.shard import Sample, ShardWriter, validate_shard  # noqa: E402
from tests.procs import kill_tree  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402


class Failed(AssertionError):
    pass


def check(cond, message: str) -> None:
    if not cond:
        raise Failed(message)




# ---------------------------------------------------------------------------------------------------------
# datagen


def datagen_cmd(out: Path, n: int, shard: int, seed: int, size=(64, 48), workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "datagen.cli", "run", "--source", "synthetic", "--width", str(size[0]),
            "--height", str(size[1]), "--limit", str(n), "--shard-size", str(shard), "--seed", str(seed),
            "--out", str(out), "--workers", str(workers), "--progress", "log"]


def datagen_reference(out: Path, n: int, shard: int, seed: int, size=(64, 48)) -> Path:
    """The uninterrupted job, shard after shard in this process (the bytes do not depend on Ray)."""

    job = out / "synthetic"
    job.mkdir(parents=True)
    opts = {"width": size[0], "height": size[1], "seed": seed}
    items = get_source("synthetic", None, count=n, **opts).items()
    cfg = RunConfig(source="synthetic", source_options=opts, seed=seed)
    shards = [items[i:i + shard] for i in range(0, n, shard)]
    for i, chunk in enumerate(shards):
        process_shard(cfg, i, chunk, None, OracleTeacher().info(), str(job))
    write_tables(job, [True] * len(shards), "synthetic", [])
    return job


def same_job(job: Path, ref: Path) -> None:
    check(not [p for p in job.iterdir() if ".tmp-" in p.name], "partial files left")
    a, b = (pq.read_table(d / "manifest.parquet").to_pylist() for d in (job, ref))
    check(a == b, f"manifest differs from the uninterrupted run ({len(a)} vs {len(b)} rows)")
    tars = sorted(p.name for p in job.glob("*.tar"))
    check(tars == sorted(p.name for p in ref.glob("*.tar")), "different shard files")
    for name in tars:
        check((job / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs")


def scenario_datagen_kills(tmp: Path, rng: np.random.Generator, kills: int = 4) -> dict:
    n, shard, seed = 60, 2, 7
    ref = datagen_reference(tmp / "ref", n, shard, seed)
    out, job, log = tmp / "killed", tmp / "killed" / "synthetic", tmp / "killed.log"
    n_shards, seen = -(-n // shard), []
    for k in range(kills):
        before = len(list(job.glob("*.tar"))) if job.exists() else 0
        with open(log, "a") as f:
            proc = subprocess.Popen(datagen_cmd(out, n, shard, seed), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not (job.exists() and len(list(job.glob("*.tar"))) > before):  # this run is producing
                check(proc.poll() is None and time.monotonic() < deadline, f"run {k} ended or hung early")
                time.sleep(0.005)
            delay = float(rng.uniform(0.0, 0.12))
            time.sleep(delay)
        finally:
            kill_tree(proc.pid)
        done = len(list(job.glob("*.tar")))
        for tar in job.glob("*.tar"):
            check((job / f"{tar.stem}.rows.json").is_file(), f"kill {k}: {tar.name} has no rows")
            check(tar.read_bytes() == (ref / tar.name).read_bytes(), f"kill {k}: {tar.name} differs")
        seen.append({"kill": k, "delay_s": round(delay, 3), "finished_shards": done,
                     "partial_files": len([p for p in job.iterdir() if ".tmp-" in p.name])})
        check(done < n_shards, f"kill {k} landed after the job's end")
    res = subprocess.run(datagen_cmd(out, n, shard, seed), capture_output=True, text=True)
    check(res.returncode == 0, f"final run failed: {res.stdout[-1500:]}{res.stderr[-1500:]}")
    same_job(job, ref)
    check(all(validate_shard(t).ok for t in job.glob("*.tar")), "a shard does not validate")
    return {"kills": seen, "shards": n_shards}


def scenario_ray_worker_kill(tmp: Path, rng: np.random.Generator, kills: int = 2) -> dict:
    n, shard, seed, size = 48, 4, 3, (160, 96)  # shard tasks of about a second: there is time to aim
    ref = datagen_reference(tmp / "ref", n, shard, seed, size)
    out, log = tmp / "out", tmp / "ray.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(datagen_cmd(out, n, shard, seed, size), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    killed = []
    try:
        deadline = time.monotonic() + 240
        while len(killed) < kills and proc.poll() is None and time.monotonic() < deadline:
            workers = []
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "ray::process_shard" in " ".join(p.cmdline()) or p.name().startswith("ray::process_sh"):
                        workers.append(p)
                except psutil.Error:
                    pass
            if workers:
                time.sleep(float(rng.uniform(0.05, 0.4)))  # somewhere inside the task
                victim = workers[int(rng.integers(len(workers)))]
                try:
                    victim.kill()
                    killed.append(victim.pid)
                except psutil.NoSuchProcess:
                    pass
                time.sleep(1.0)  # let Ray notice and retry before aiming again
            time.sleep(0.02)
        rc = proc.wait(timeout=300)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    check(killed, "no ray::process_shard worker was found to kill")
    check(rc == 0, f"the job failed after a worker kill (exit {rc}): {text[-2000:]}")
    job = out / "synthetic"
    manifest = pq.read_table(job / "manifest.parquet").to_pylist()
    failures = pq.read_table(job / "failures.parquet").to_pylist()
    keys = [r["key"] for r in manifest] + [r["key"] for r in failures]
    ref_keys = [r["key"] for r in pq.read_table(ref / "manifest.parquet").to_pylist()]
    check(sorted(keys) == sorted(ref_keys), "an input is missing or appears twice")
    check(all(r["stage"] == "worker" for r in failures), f"unexpected failure rows {failures[:2]}")
    if not failures:  # retried shards are the same bytes
        same_job(job, ref)
    return {"workers_killed": len(killed), "done": len(manifest), "failed_worker": len(failures)}


# ---------------------------------------------------------------------------------------------------------
# trainer

TRAIN_CHILD = r"""
import json, os, sys, time
from shared import fsutil
from trainer.train import TrainConfig, train
real, prefix, nth = fsutil._write_all, sys.argv[2], int(sys.argv[3])
seen = [0]
def half_then_wait(f, data, chunk=1 << 22):
    hit = os.path.basename(f.name).startswith(prefix)
    seen[0] += hit
    if hit and seen[0] == nth:
        real(f, data[: len(data) // 2], chunk)
        f.flush(); os.fsync(f.fileno())
        print("IN_WRITE", flush=True)
        time.sleep(600)
    real(f, data, chunk)
if prefix:
    fsutil._write_all = half_then_wait
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def write_train_shards(root: Path, n_shards: int, per_shard: int, hw=(64, 96)) -> None:
    rng = np.random.default_rng(0)
    h, w = hw
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with ShardWriter(root / f"chaos-{s:06d}.tar", rgb_format="png") as wr:
            for j in range(per_shard):
                depth = (rng.uniform(2, 30) + 5 * np.linspace(0, 1, w)[None, :] * np.ones((h, 1))).astype(np.float32)
                wr.write(Sample(key=f"chaos-{s}-{j}", rgb=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                K=make_K(60, 60, w / 2, h / 2), teacher=1 / depth, depth=depth,
                                sparse=np.where(rng.random((h, w)) < 0.08, depth, 0).astype(np.float32),
                                meta={"source": "chaos"}))


def train_config(shards: Path, out: Path, **kw):
    base = dict(shards=str(shards), model="tiny", steps=12, batch_size=2, crop="32x64", workers=0, lr=3e-3,
                seed=5, shuffle_buffer=4, ema_decay=0.9, log_every=1, ckpt_every=2, keep=50, progress=False,
                out=str(out), threads=1)
    return TrainConfig(**{**base, **kw})


def ckpt_weights(path) -> dict:
    model, _ = ckpt.read_checkpoint(path, "model")
    ema, _ = ckpt.read_checkpoint(path, "ema")
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def assert_resumes_exactly(cfg, want: dict) -> None:

    latest = ckpt.latest_checkpoint(cfg.out)
    if latest is not None:  # whatever the kill hit, the checkpoint of record loads completely
        ckpt_weights(latest)
        ckpt.read_state(latest)
        ckpt.load_model(cfg.out)
    summary = train(dataclasses.replace(cfg, resume=True))
    check(summary["steps"] == cfg.steps, "resume did not reach the last step")
    got = ckpt_weights(summary["checkpoint"])
    check(all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want),
          "resumed weights differ from the uninterrupted run")


def scenario_trainer_ckpt_kill(tmp: Path, rng: np.random.Generator, random_kills: int = 6) -> dict:
    shards = tmp / "s"
    write_train_shards(shards, 3, 2)
    straight = train(train_config(shards, tmp / "straight"))
    want = ckpt_weights(straight["checkpoint"])
    out = {"hooked": {}, "random": []}
    # 1. inside each write, deterministically
    for which, (prefix, nth) in {"state": ("state-0000004.pt.tmp-", 1),
                                 "weights": ("ckpt-0000004.safetensors.tmp-", 1),
                                 "latest": ("latest.tmp-", 2)}.items():
        cfg = train_config(shards, tmp / which)
        proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, json.dumps(dataclasses.asdict(cfg)), prefix,
                                 str(nth)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("IN_WRITE"):
                break
        proc.kill()
        proc.wait()
        check(lines and lines[-1].startswith("IN_WRITE"), f"{which}: child never reached the write")

        check(ckpt.latest_checkpoint(cfg.out).name == "ckpt-0000002.safetensors", f"{which}: latest moved")
        assert_resumes_exactly(cfg, want)
        out["hooked"][which] = "ok"
    # 2. at random moments of a run that checkpoints every step (many land in a write)
    cfg = train_config(shards, tmp / "random", ckpt_every=1)
    run_dir = Path(cfg.out)
    for k in range(random_kills):
        proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD,
                                 json.dumps(dataclasses.asdict(dataclasses.replace(cfg, resume=True))), "", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (run_dir / "log.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rows0 = len((run_dir / "log.csv").read_text().splitlines()) if (run_dir / "log.csv").exists() else 0
        while proc.poll() is None and time.monotonic() < deadline:  # until this run has trained a step
            if (run_dir / "log.csv").exists() and len((run_dir / "log.csv").read_text().splitlines()) > rows0:
                break
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 2.0)))  # a step with its checkpoint takes about 0.5 s here
        proc.kill()
        proc.wait()

        latest = ckpt.latest_checkpoint(run_dir)
        partial = sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name and f"-{proc.pid}" in p.name)
        out["random"].append({"kill": k, "latest_step": ckpt.read_state(latest)["step"] if latest else None,
                              "partial_files": partial})
        if latest is not None:
            ckpt_weights(latest)
            if ckpt.read_state(latest)["step"] >= cfg.steps:
                break
    assert_resumes_exactly(cfg, want)
    out["random_kills_inside_a_write"] = sum(bool(r["partial_files"]) for r in out["random"])
    return out


def scenario_corrupt_during_training(tmp: Path, rng: np.random.Generator) -> dict:
    shards = tmp / "s"
    write_train_shards(shards, 4, 3)
    out = tmp / "run"
    cmd = [sys.executable, "-m", "trainer.cli", "pretrain", "--shards", str(shards), "--model", "tiny",
           "--steps", "40", "--batch-size", "2", "--crop", "32x64", "--workers", "2", "--ckpt-every", "1000",
           "--log-every", "1", "--out", str(out), "--json", str(tmp / "summary.json"), "--quiet", "--threads", "1"]
    log = tmp / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # a few steps in: the trainer is reading
            if (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) > 4:
                break
            time.sleep(0.05)
        check(proc.poll() is None, f"training ended before the damage: {log.read_text()[-2000:]}")
        tars = sorted(shards.glob("*.tar"))
        with open(tars[1], "r+b") as f:
            f.truncate(tars[1].stat().st_size // 2)
        with tarfile.open(tars[2]) as tar:
            info = next(m for m in tar.getmembers() if m.name.endswith(".depth.png"))
        with open(tars[2], "r+b") as f:
            for j in range(info.offset_data + 60, info.offset_data + info.size - 20, 7):
                f.seek(j)
                b = f.read(1)
                f.seek(j)
                f.write(bytes([b[0] ^ 0xFF]))
        rc = proc.wait(timeout=300)
    finally:
        kill_tree(proc.pid)
    text = log.read_text()
    check(rc == 0, f"training failed after the damage: {text[-2000:]}")
    summary = json.loads((tmp / "summary.json").read_text())
    check(summary["steps"] == 40, "training stopped early")
    check(summary["skipped_samples"] > 0, "no sample was counted as skipped")
    check("skipped a corrupt sample" in text, "the skips were not logged")
    return {"steps": summary["steps"], "skipped": summary["skipped_samples"],
            "logged": text.count("skipped a corrupt sample")}


# ---------------------------------------------------------------------------------------------------------
# disk


def try_mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def scenario_disk(tmp: Path, rng: np.random.Generator) -> dict:
    results = {}
    # a path that is a file: works everywhere
    (tmp / "file").write_text("x")
    res = subprocess.run(datagen_cmd(tmp / "file", 4, 2, 0), capture_output=True, text=True)
    check(res.returncode == 1 and "cannot create the output folder" in res.stderr + res.stdout,
          f"output path is a file: exit {res.returncode}: {res.stderr[-800:]}")
    results["output_is_a_file"] = "exit 1, " + next(ln for ln in (res.stderr + res.stdout).splitlines()
                                                     if "cannot create" in ln)[:120]
    full = tmp / "full"
    if not try_mount(full, "size=64k"):
        results["disk_full"] = results["read_only"] = "skipped (cannot mount a tmpfs here)"
        return results
    try:
        res = subprocess.run(datagen_cmd(full, 8, 4, 0, size=(160, 96)), capture_output=True, text=True)
        text = res.stderr + res.stdout
        job = full / "synthetic"
        names = sorted(p.name for p in job.iterdir()) if job.exists() else []
        check(res.returncode == 1, f"disk full: exit {res.returncode}: {text[-800:]}")
        check("No space left" in text, f"disk full: the message does not say so: {text[-800:]}")
        check(not [n for n in names if n.endswith(".tar")], f"disk full: a shard under its final name: {names}")
        check("Traceback" not in text, "disk full: a traceback instead of a message")
        results["disk_full"] = "exit 1, " + next(ln for ln in text.splitlines() if "No space left" in ln)[:160]
        results["disk_full_leftovers"] = names
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    ro = tmp / "ro"
    if try_mount(ro, "size=1m"):
        try:
            (ro / "synthetic").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            res = subprocess.run(datagen_cmd(ro, 4, 2, 0), capture_output=True, text=True)
            text = res.stderr + res.stdout
            check(res.returncode == 1 and "Read-only file system" in text, f"read-only: {text[-800:]}")
            results["read_only"] = "exit 1, " + next(ln for ln in text.splitlines() if "Read-only" in ln)[:160]
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)
    return results


# ---------------------------------------------------------------------------------------------------------
# a throttling, flaky object store


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float = 900) -> tuple[int, float]:
    """(exit code, seconds) of a command in its own process group, whose whole tree is killed afterwards."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc.pid)
    return rc, time.monotonic() - t0


def scenario_object_store_faults(tmp: Path, rng: np.random.Generator, rate: float = 0.2) -> dict:
    import fsspec

    from shared import storage
    from tests.s3faults import FaultProxy, MotoServer, aws_env

    n, shard, seed, size = 96, 4, 11, (128, 96)
    moto = MotoServer(tmp / "moto.log")
    saved = dict(os.environ)
    try:
        env = {**os.environ, **aws_env(moto.endpoint), "OMP_NUM_THREADS": "1"}
        env.pop(storage.RETRY_ENV, None)  # the default policy
        os.environ.update(aws_env(moto.endpoint))  # this process reads the results directly from moto
        fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir("chaos")
        results, seeds = {}, [int(x) for x in rng.integers(0, 2**31, 4)]

        fault_log = {}

        def through_proxy(name: str, fault_rate: float, proxy_seed: int, cmd: list[str]) -> dict:
            with FaultProxy(moto.endpoint, rate=fault_rate, seed=proxy_seed, stall_s=2.0) as proxy:
                rc, wall = run_logged(cmd, tmp / f"{name}.log", {**env, "AWS_ENDPOINT_URL": proxy.url})
                stats = dict(proxy.stats)
                fault_log[name] = list(proxy.log)
            check(rc == 0, f"{name}: exit {rc}: {(tmp / f'{name}.log').read_text()[-2000:]}")
            return {"seconds": round(wall, 1), "requests": stats.get("requests", 0),
                    "faults": {k: v for k, v in stats.items() if k not in ("requests",)}}

        # datagen: the same job without and with faults
        for name, fault_rate, proxy_seed in (("datagen_clean", 0.0, seeds[0]), ("datagen_faulty", rate, seeds[1])):
            cmd = datagen_cmd(f"s3://chaos/{name}", n, shard, seed, size)
            results[name] = through_proxy(name, fault_rate, proxy_seed, cmd)
        clean, faulty = "s3://chaos/datagen_clean/synthetic", "s3://chaos/datagen_faulty/synthetic"
        names = sorted(storage.listdir(faulty))
        check(names == sorted(storage.listdir(clean)), "the faulty job's files differ from the clean job's")
        check(not [x for x in names if ".tmp-" in x] and ".lock" not in names, f"left behind: {names}")
        for name in names:
            if name.endswith((".tar", ".parquet", ".rows.json")):
                a, b = storage.read_bytes(f"{clean}/{name}"), storage.read_bytes(f"{faulty}/{name}")
                if a != b:  # keep the evidence: both files, which members differ, the faults on that shard
                    keep = Path(tempfile.mkdtemp(prefix="chaos-object-store-diff-"))
                    (keep / f"clean-{name}").write_bytes(a)
                    (keep / f"faulty-{name}").write_bytes(b)
                    stem = name.split(".")[0]
                    faults = [f for f in fault_log["datagen_faulty"] if stem in f[3]]
                    check(False, f"{name} differs from the run without faults ({len(a)} vs {len(b)} bytes, "
                                 f"first at byte {next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)}; "
                                 f"faults on it: {faults}; both kept in {keep})")
        with storage.open_read(f"{faulty}/manifest.parquet") as f:
            check(pq.read_table(f).num_rows == n, "not every input is in the manifest")
        check(not fs.call_s3("list_multipart_uploads", Bucket="chaos").get("Uploads"), "unfinished uploads left")

        # trainer: the same training from those shards without and with faults
        for name, fault_rate, proxy_seed in (("trainer_clean", 0.0, seeds[2]), ("trainer_faulty", rate, seeds[3])):
            cmd = [sys.executable, "-m", "trainer.cli", "pretrain", "--shards", f"{clean}/", "--model", "tiny",
                   "--steps", "40", "--batch-size", "4", "--crop", "64x96", "--workers", "2", "--ckpt-every", "40",
                   "--log-every", "5", "--threads", "1", "--log-keys", "--quiet", "--out", str(tmp / name),
                   "--json", str(tmp / f"{name}.json")]
            results[name] = through_proxy(name, fault_rate, proxy_seed, cmd)
            results[name]["skipped"] = json.loads((tmp / f"{name}.json").read_text())["skipped_samples"]
        check(results["trainer_faulty"]["skipped"] == 0, "the faulty training skipped samples")
        keys = {name: (tmp / name / "keys-rank0.tsv").read_text() for name in ("trainer_clean", "trainer_faulty")}
        check(keys["trainer_clean"] == keys["trainer_faulty"], "the faulty training read other samples")
        check(len({line.split("\t")[2] for line in keys["trainer_faulty"].splitlines()}) == n,
              "an epoch did not read every sample")
        a, b = (ckpt_weights(ckpt.latest_checkpoint(tmp / name)) for name in ("trainer_clean", "trainer_faulty"))
        check(all(torch.equal(a[k], b[k]) for k in a), "the faulty training ended with other weights")
        for what in ("datagen", "trainer"):
            results[f"{what}_slowdown"] = round(results[f"{what}_faulty"]["seconds"]
                                                / results[f"{what}_clean"]["seconds"], 2)
        return results
    finally:
        moto.stop()
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------------
# a DDP rank that dies


def ddp_cmd(shards: Path, out: Path, steps: int, max_restarts: int) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else
            ["-m", "torch.distributed.run"]), "--standalone", "--nproc-per-node", "2", "--max-restarts",
            str(max_restarts), "--monitor-interval", "0.2", str(ROOT / "tests" / "trainer" / "ddp_child.py"),
            "pretrain", "--shards", str(shards), "--model", "tiny", "--steps", str(steps), "--batch-size", "4",
            "--crop", "32x64", "--out", str(out), "--workers", "1", "--device", "cpu", "--threads", "1", "--quiet",
            "--log-every", "1", "--ckpt-every", "1", "--resume"]


def last_step(run: Path) -> int:
    rows = (run / "log.csv").read_text().splitlines()[1:] if (run / "log.csv").exists() else []
    return int(rows[-1].split(",")[0]) if rows else 0


def scenario_ddp_rank_kills(tmp: Path, rng: np.random.Generator, random_kills: int = 3, steps: int = 16) -> dict:
    shards = tmp / "s"
    write_train_shards(shards, 4, 3)
    # torchrun's shared TCPStore keeps the workers' keys from one restart to the next: a restarted rank can
    # read its peer's old address and fail to connect or hang (docs/reliability.md); each restart gets its own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    rc, ref_s = run_logged(ddp_cmd(shards, tmp / "ref", steps, 0), tmp / "ref.log",
                           {**env, "DMD3C_TEST_MARKS": str(tmp)})
    check(rc == 0, f"the uninterrupted run failed: {(tmp / 'ref.log').read_text()[-2000:]}")
    want = ckpt_weights(ckpt.latest_checkpoint(tmp / "ref"))
    out, marks = tmp / "run", tmp / "marks"
    marks.mkdir()
    stall_step = int(rng.integers(3, 7))
    env = {**env, "DMD3C_TEST_MARKS": str(marks),
           "DMD3C_TEST_STALL": f"ckpt-{stall_step:07d}.safetensors.tmp-:0:0"}
    t0 = time.monotonic()
    log = open(tmp / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(ddp_cmd(shards, out, steps, random_kills + 1), stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=ROOT)
    kills = []

    def pid_of(rank: int, restart: int, deadline: float) -> int | None:
        path = marks / f"rank{rank}-restart{restart}.pid"
        while not (path.exists() and path.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return int(path.read_text())

    try:
        deadline = time.monotonic() + 600
        while not (marks / "in-write.pid").exists():  # kill 1: rank 0 inside a checkpoint write
            check(proc.poll() is None and time.monotonic() < deadline, "the run never reached the write")
            time.sleep(0.02)
        pid, partial = (marks / "in-write.pid").read_text().split()
        os.kill(int(pid), signal.SIGKILL)
        kills.append({"restart": 0, "rank": 0, "step": last_step(out), "inside_write": Path(partial).name})
        for restart in range(1, random_kills + 1):  # then at random steps, a random rank
            rank = int(rng.integers(0, 2))
            victim = pid_of(rank, restart, deadline)
            if victim is None:
                break
            target = min(steps - 1, max(last_step(out), ckpt.read_state(ckpt.latest_checkpoint(out))["step"])
                         + int(rng.integers(1, 4)))
            while last_step(out) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0, 0.4)))  # somewhere in the step (with its checkpoint)
            if proc.poll() is not None:
                break
            os.kill(victim, signal.SIGKILL)
            left = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)
            kills.append({"restart": restart, "rank": rank, "step": last_step(out), "partial_files": left})
        rc = proc.wait(timeout=600)
    finally:
        kill_tree(proc.pid)
        for mark in marks.glob("rank*.pid"):  # torchrun's workers have their own sessions: one may outlive it
            try:
                if "ddp_child.py" in " ".join(psutil.Process(int(mark.read_text())).cmdline()):
                    kill_tree(int(mark.read_text()))
            except (psutil.Error, ValueError):
                pass
        log.close()
    check(rc == 0, f"the restarted run failed (exit {rc}): {(tmp / 'killed.log').read_text()[-2000:]}")
    restarts = max(int(p.stem.split("restart")[1]) for p in marks.glob("rank*-restart*.pid"))
    check(restarts == len(kills), f"{len(kills)} kills but {restarts} restarts")
    got = ckpt_weights(ckpt.latest_checkpoint(out))
    check(ckpt.read_state(ckpt.latest_checkpoint(out))["step"] == steps, "the run did not reach its last step")
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    check(not differ, f"weights differ from the uninterrupted run: {differ[:3]}")
    check(not [p for p in out.iterdir() if ".tmp-" in p.name], "a temporary file was left")
    for path in ckpt.list_checkpoints(out):
        ckpt_weights(path)
        ckpt.read_state(path)
    return {"kills": kills, "restarts": restarts, "uninterrupted_s": round(ref_s, 1),
            "with_kills_s": round(time.monotonic() - t0, 1), "weights": "bitwise equal (model and EMA)"}


SCENARIOS = {"datagen_kills": scenario_datagen_kills, "ray_worker_kill": scenario_ray_worker_kill,
             "trainer_ckpt_kill": scenario_trainer_ckpt_kill, "corrupt_during_training": scenario_corrupt_during_training,
             "disk": scenario_disk, "object_store_faults": scenario_object_store_faults,
             "ddp_rank_kills": scenario_ddp_rank_kills}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results, t_all = {}, time.monotonic()
    for name in args.only.split(","):
        rng = np.random.default_rng([args.seed, list(SCENARIOS).index(name)])
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            try:
                detail = SCENARIOS[name](Path(tmp), rng)
                status = "PASS"
            except Exception as exc:  # noqa: BLE001 (a scenario's failure is a result, the others still run)
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, Failed):
                    traceback.print_exc()
        results[name] = {"status": status, "seconds": round(time.monotonic() - t0, 1), "detail": detail}
        print(f"{status} {name} ({results[name]['seconds']} s): {json.dumps(detail, default=str)}", flush=True)
    total = time.monotonic() - t_all
    print(f"\nchaos: {sum(r['status'] == 'PASS' for r in results.values())}/{len(results)} passed in {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "total_s": total, "results": results}, indent=2,
                                        default=str))
    sys.exit(0 if all(r["status"] == "PASS" for r in results.values()) else 1)


if __name__ == "__main__":
    main()
