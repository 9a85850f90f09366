"""`datagen run` with object storage, against a real S3 server (moto's, on 127.0.0.1; see the repository's
conftest.py): URLs refused rather than taken as local paths, folder and coco read from S3, the lease lock,
and a job writing to S3 that is killed with SIGKILL, rerun, and read back by the trainer. A job on a
two-node cluster reading and writing S3: tests/datagen/test_two_nodes.py."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("s3fs")

from fixtures import make_bad_images, make_coco, make_folder  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from datagen.cli import app  # noqa: E402
from datagen.job import lock as job_lock  # noqa: E402
from datagen.job.pipeline import RunConfig, run  # noqa: E402
from datagen.job.runtime_env import requirements, runtime_env  # noqa: E402
from datagen.sources import InputError, LayoutError, get_source  # noqa: E402
from shared import storage  # noqa: E402
from shared.shard import iter_samples, list_shards  # noqa: E402
from shared.storage import TMP_MARK  # noqa: E402


def s3fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)


def upload(local, url: str) -> None:
    s3fs().put(f"{local}/", url.removeprefix("s3://"), recursive=True)


def read_table(url: str) -> list[dict]:
    with storage.open_read(url) as f:
        return pq.read_table(f).to_pylist()


# ---------------------------------------------------------------------------------------------------------
# no Ray needed: refused before anything starts


@pytest.mark.parametrize("args,why", [
    (["--out", "s3:/bucket/shards"], "--out 's3:/bucket/shards' is not a valid s3 URL"),
    (["--out", "s3://"], "--out 's3://' is not a valid s3 URL"),
    (["--out", "ftp://host/shards"], "unknown URL scheme 'ftp'"),
    (["--source", "folder", "--root", "foo://bucket/photos"], "--root 'foo://bucket/photos': unknown URL scheme"),
    (["--source", "kitti", "--root", "s3://bucket/kitti"], "source 'kitti' reads a local --root only"),
])
def test_urls_are_refused_and_never_become_local_folders(tmp_path, monkeypatch, args, why):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", *args, "--limit", "2", "--progress", "none"])
    assert result.exit_code == 2, result.output
    assert why in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []  # no folder named s3: (or anything else) was made


def test_out_s3_as_in_the_issue_writes_nothing_locally(tmp_path, monkeypatch, s3_server):
    """`--out s3://bucket/shards` once made a folder named `s3:` here and died with ArrowInvalid. Now the
    URL goes to the store: a bucket that does not exist is named, before Ray starts, and nothing is local."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--out", "s3://bucket/shards", "--limit", "1", "--width", "64",
                                      "--height", "48", "--progress", "none"])
    assert result.exit_code == 1, result.output
    assert "the bucket 'bucket' does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


def reason(exc: Exception, path: str) -> str:
    """'<path>: empty file (0 bytes)' -> 'empty file'."""
    text = str(exc)
    assert text.startswith(f"{path}: "), text
    return text[len(path) + 2:].split(" (")[0]


def test_folder_and_coco_list_and_load_from_s3_as_from_disk(tmp_path, s3_bucket):
    make_folder(tmp_path / "photos")
    zoo = make_bad_images(tmp_path / "photos" / "zoo")
    make_coco(tmp_path / "coco")
    for name, kw in (("photos", {}), ("coco", {"splits": "val2017"})):
        upload(tmp_path / name, f"{s3_bucket}/data/{name}")
        source = "folder" if name == "photos" else "coco"
        local = get_source(source, tmp_path / name, **kw)
        remote = get_source(source, f"{s3_bucket}/data/{name}/", **kw)
        remote.check_layout()
        a, b = local.items(), remote.items()
        assert [it.key for it in b] == [it.key for it in a] and a  # same keys, same order
        for x, y in zip(a, b, strict=True):
            rel = os.path.relpath(x.path, tmp_path / name)
            assert y.path == f"{s3_bucket}/data/{name}/{rel}"
            try:
                expected = local.load(x)
            except InputError as exc:  # the same reason, naming the object
                with pytest.raises(InputError) as remote_exc:
                    remote.load(y)
                assert reason(remote_exc.value, y.path) == reason(exc, x.path)
                continue
            got = remote.load(y)
            assert np.array_equal(got.rgb, expected.rgb) and got.meta == expected.meta and got.source_path == y.path
    assert sum(v["expect"] == "error" for v in zoo.values()) >= 3
    storage.write_bytes(f"{s3_bucket}/notes/readme.txt", b"no images here")
    with pytest.raises(LayoutError, match="no image files below --root"):
        get_source("folder", f"{s3_bucket}/notes").items()
    for source in ("folder", "coco"):  # an empty prefix is no folder
        with pytest.raises(LayoutError, match=f"--root {s3_bucket}/nothing-here is not a directory"):
            get_source(source, f"{s3_bucket}/nothing-here").check_layout()


def test_the_lease_lock_on_s3(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/shards/synthetic"
    with job_lock.job_lock(out) as lease:
        held = json.loads(storage.read_bytes(f"{out}/.lock"))
        assert held["pid"] == os.getpid() and held["token"] == lease.token
        with pytest.raises(job_lock.LockBusy, match=f"another datagen run is writing to {out} .*pid {os.getpid()}"):
            with job_lock.job_lock(out):
                pass
    assert not storage.exists(f"{out}/.lock")  # released

    def stale(**held) -> None:
        record = {"token": "theirs", "host": "elsewhere", "pid": 1, "renewed": time.time(), "lease_s": 120, **held}
        storage.write_bytes(f"{out}/.lock", json.dumps(record).encode())

    stale(host="elsewhere", renewed=time.time() - 3600)  # a run on another machine, silent for an hour
    with job_lock.job_lock(out) as lease:
        assert json.loads(storage.read_bytes(f"{out}/.lock"))["token"] == lease.token
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale(host=socket.gethostname(), pid=int(dead.stdout))  # killed on this machine a moment ago
    with job_lock.job_lock(out) as lease:
        assert json.loads(storage.read_bytes(f"{out}/.lock"))["token"] == lease.token
    stale(host="elsewhere")  # alive elsewhere: refused
    with pytest.raises(job_lock.LockBusy, match="host elsewhere"):
        with job_lock.job_lock(out):
            pass
    # the lease is renewed while the run goes on, and a run whose lease was taken over says so at the end
    storage.remove(f"{out}/.lock")
    monkeypatch.setattr(job_lock, "LEASE_S", 0.4)
    with pytest.raises(job_lock.LockBusy, match="lost"):
        with job_lock.job_lock(out):
            first = json.loads(storage.read_bytes(f"{out}/.lock"))["renewed"]
            deadline = time.monotonic() + 10
            while json.loads(storage.read_bytes(f"{out}/.lock"))["renewed"] == first:
                assert time.monotonic() < deadline, "the lease was not renewed"
                time.sleep(0.05)
            stale(host="elsewhere")  # another run took it over
            time.sleep(0.5)
    assert json.loads(storage.read_bytes(f"{out}/.lock"))["token"] == "theirs"  # not deleted by the loser


def test_a_lease_whose_create_was_retried_after_it_reached_the_store_is_ours(s3_bucket, monkeypatch):
    """The conditional PUT of the lease reached the store but its reply was lost; the retried PUT finds an
    object there. It holds this run's token, so the run holds the lock (it used to refuse itself: 'another
    datagen run is writing ... pid <its own>')."""
    out = f"{s3_bucket}/shards/synthetic"
    real = storage.create_exclusive

    def reply_lost(location, data):
        real(location, data)
        raise FileExistsError(location)  # what the retried request is answered

    monkeypatch.setattr(storage, "create_exclusive", reply_lost)
    with job_lock.job_lock(out) as lease:
        assert json.loads(storage.read_bytes(f"{out}/.lock"))["token"] == lease.token
    assert not storage.exists(f"{out}/.lock")
    storage.write_bytes(f"{out}/.lock", json.dumps({"token": "theirs", "host": "elsewhere", "pid": 1,
                                                    "renewed": time.time(), "lease_s": 120}).encode())
    with pytest.raises(job_lock.LockBusy, match="host elsewhere"):  # someone else's is still refused
        with job_lock.job_lock(out):
            pass


def test_runtime_env_ships_the_code_and_the_requirements(monkeypatch):
    import datagen
    import shared

    monkeypatch.delenv(storage.RETRY_ENV, raising=False)
    assert runtime_env("auto", joining_cluster=False) is None and runtime_env("off", joining_cluster=True) is None
    full = runtime_env("auto", joining_cluster=True)
    assert full["py_modules"] == [datagen.__path__[0], shared.__path__[0]]
    names = {r.split(">")[0].split("=")[0].split("[")[0] for r in full["pip"]}
    assert {"numpy", "webdataset", "open3d", "transformers", "pyarrow", "s3fs", "torch"} <= names
    assert "ray" not in names and "pytest" not in names and "safetensors" not in names  # not ray, not other extras
    assert full["pip"] == requirements()
    assert "pip" not in runtime_env("code", joining_cluster=True)
    assert "env_vars" not in full
    monkeypatch.setenv(storage.RETRY_ENV, "attempts=9")  # the retry policy goes to the nodes with the code
    assert runtime_env("code", joining_cluster=True)["env_vars"] == {storage.RETRY_ENV: "attempts=9"}
    with pytest.raises(ValueError, match="--runtime-env"):
        runtime_env("everything", joining_cluster=True)


# ---------------------------------------------------------------------------------------------------------
# jobs on Ray


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


N, SHARD = 12, 2
ARGS = ["--source", "synthetic", "--width", "96", "--height", "64", "--limit", str(N), "--shard-size", str(SHARD),
        "--seed", "4", "--workers", "2"]
CFG = dict(source="synthetic", source_options={"width": 96, "height": 64}, limit=N, shard_size=SHARD, seed=4,
           workers=2, progress="none")


def objects(prefix: str) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, ETag) of the finished shards under a prefix."""
    fs = s3fs()
    return {storage.basename(u): (storage.read_bytes(u), fs.info(u)["ETag"]) for u in list_shards(prefix + "/")}


def test_a_job_to_s3_killed_and_rerun_equals_an_uninterrupted_run(tmp_path, s3_bucket, ray_session):
    ref = run(RunConfig(**CFG, out=str(tmp_path / "ref")))
    ref_dir = tmp_path / "ref" / "synthetic"
    assert (ref.done, ref.failed) == (N, 0)

    out = f"{s3_bucket}/shards"
    job = f"{out}/synthetic"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "datagen.cli", "run", *ARGS, "--out", out, "--progress", "log"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [n for n in storage.listdir(job) if n.endswith(".tar")]:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job ended or hung before its first shard: {(tmp_path / 'killed.log').read_text()}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-job
        proc.wait()
        finished = objects(job)  # final names are finished shards
    finally:
        try:  # the local Ray the driver started shares its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    assert 1 <= len(finished) < N // SHARD, "the kill must land midway for this test to mean anything"
    assert storage.exists(f"{job}/.lock")  # the killed driver's lease is still there
    storage.write_bytes(f"{job}/synthetic-000005.tar{TMP_MARK}999", b"an upload cut short")

    resumed = run(RunConfig(**CFG, out=out))  # takes over the lease of the dead driver at once
    assert resumed.skipped >= SHARD * len(finished) and resumed.done + resumed.skipped == N
    names = storage.listdir(job)
    assert not [n for n in names if TMP_MARK in n] and ".lock" not in names
    now = objects(job)
    for name, (data, etag) in finished.items():  # finished before the kill: untouched
        assert now[name] == (data, etag)
    assert sorted(now) == sorted(p.name for p in ref_dir.glob("*.tar"))
    for name, (data, etag) in now.items():  # the same bytes as the local run, each one whole object
        assert data == (ref_dir / name).read_bytes() and etag.strip('"') == hashlib.md5(data).hexdigest()
    assert read_table(f"{job}/manifest.parquet") == pq.read_table(ref_dir / "manifest.parquet").to_pylist()
    assert read_table(f"{job}/failures.parquet") == []
    assert json.loads(storage.read_bytes(f"{job}/job.json")) == json.loads((ref_dir / "job.json").read_text())

    inspected = CliRunner().invoke(app, ["inspect", f"{job}/"])  # datagen inspect reads them there too
    assert inspected.exit_code == 0 and re.search(rf"samples +{N} ", inspected.output), inspected.output

    # and the trainer streams them back from S3, every sample once (its rank x worker split on S3:
    # tests/trainer/test_object_storage.py)
    from trainer.data import DataConfig, make_loader

    keys = []
    for batch in make_loader(DataConfig(f"{job}/", batch_size=3, crop_hw=None, train=False, workers=0)):
        keys += batch["key"]
    assert sorted(keys) == sorted(s.key for s in iter_samples(str(ref_dir)))


def local_reference(out, n: int = N, shard: int = SHARD):
    """The job of ARGS written shard after shard in this process, without Ray (the bytes do not depend on it)."""
    from datagen.job.pipeline import process_shard
    from datagen.job.shard_files import write_tables
    from datagen.teachers.runner import OracleTeacher

    job = out / "synthetic"
    job.mkdir(parents=True)
    opts = {"width": 96, "height": 64, "seed": 4}
    items = get_source("synthetic", None, count=n, **opts).items()
    cfg = RunConfig(source="synthetic", source_options=opts, seed=4)
    chunks = [items[i:i + shard] for i in range(0, n, shard)]
    for i, chunk in enumerate(chunks):
        process_shard(cfg, i, chunk, None, OracleTeacher().info(), str(job))
    write_tables(job, [True] * len(chunks), "synthetic", [])
    return job


def test_a_job_to_a_throttling_flaky_store_writes_what_a_run_without_faults_writes(tmp_path, s3_bucket,
                                                                                   fault_proxy, monkeypatch):
    """`datagen run --out s3://... --workers 2` while a fifth of the requests of the driver and of its Ray
    workers fail (503 SlowDown, 500, a reset mid-upload, a body cut mid-read, a stall): exit 0, every
    input in the manifest, the same shards (byte for byte), manifest and job.json as the job written
    without faults, and nothing temporary left (keys, unfinished uploads, the lease)."""
    ref = local_reference(tmp_path / "ref")
    monkeypatch.setenv(storage.RETRY_ENV, "attempts=5,base=0.05,max=0.5")
    proxy = fault_proxy(rate=0.2, stall_s=0.5, seed=5)  # (make chaos stalls 2 s, on a larger job)
    out = f"{s3_bucket}/shards"
    log = tmp_path / "faulty.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "datagen.cli", "run", *ARGS, "--out", out, "--progress", "log"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=600)
    finally:
        try:  # the local Ray the driver started shares its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == 0, log.read_text()[-3000:]
    job = f"{out}/synthetic"
    names = storage.listdir(job)
    assert not [n for n in names if TMP_MARK in n] and ".lock" not in names
    assert sorted(n for n in names if n.endswith(".tar")) == sorted(p.name for p in ref.glob("*.tar"))
    for p in ref.glob("*.tar"):
        assert storage.read_bytes(f"{job}/{p.name}") == p.read_bytes(), p.name
    manifest = read_table(f"{job}/manifest.parquet")
    assert manifest == pq.read_table(ref / "manifest.parquet").to_pylist() and len(manifest) == N
    assert read_table(f"{job}/failures.parquet") == []
    assert json.loads(storage.read_bytes(f"{job}/job.json"))["source"] == "synthetic"
    bucket = s3_bucket.removeprefix("s3://")
    assert s3fs().call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    kinds = {k for k in ("503", "500", "reset", "truncate", "stall") if proxy.stats[k]}
    assert proxy.stats["faults"] >= 10 and len(kinds) >= 4, proxy.stats  # the seed fixes the pattern
    workers_hit = {path for _, _, method, path in proxy.log if method == "PUT" and ".tar" in path}
    assert workers_hit, "no fault hit a shard upload (the Ray workers' requests)"
