"""The trainer streaming shards from an S3 server (moto's, on 127.0.0.1; see tests/conftest.py): the same
batches as from a local copy, the rank x worker split, corrupt and missing shards skipped, and
`trainer pretrain|finetune|eval --shards s3://...` end to end."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from conftest import write_shards
from test_data import _corrupt_shards, _pass_keys
from typer.testing import CliRunner

from shared.shard import ReadStats, ShardError, iter_samples, list_shards
from shared.storage import StorageError
from trainer.cli import app
from trainer.data import DataConfig, make_loader

pytest.importorskip("s3fs")


def upload(local, url: str) -> None:
    import fsspec

    fsspec.filesystem("s3").put(f"{local}/", url.removeprefix("s3://"), recursive=True)


def batches(shards: str, n: int, **kw) -> list[tuple[list[str], torch.Tensor]]:
    cfg = DataConfig(shards, batch_size=2, crop_hw=(32, 64), workers=2, seed=5, shuffle_buffer=4, **kw)
    out, it = [], iter(make_loader(cfg))
    for _ in range(n):
        b = next(it)
        out.append((b["key"], b["rgb_raw"]))
    return out


def test_a_stream_from_s3_equals_the_stream_from_a_local_copy(tmp_path, s3_bucket):
    write_shards(tmp_path / "shards", 4, 3, h=32, w=64)
    url = f"{s3_bucket}/runs/shards"
    upload(tmp_path / "shards", url)
    # a temporary object of an unfinished upload sits beside them and is never listed
    import fsspec

    fsspec.filesystem("s3").pipe_file(f"{url}/test-000009.tar.tmp-77".removeprefix("s3://"), b"partial")
    assert list_shards(url + "/") == [f"{url}/test-{i:06d}.tar" for i in range(4)]
    local, remote = batches(str(tmp_path / "shards"), 8), batches(url + "/", 8)
    for (lk, lrgb), (rk, rrgb) in zip(local, remote, strict=True):
        assert lk == rk and torch.equal(lrgb, rrgb)  # same shuffle, crops, flips and jitter


def test_two_ranks_two_workers_on_s3_see_each_sample_exactly_once(tmp_path, s3_bucket):
    keys = write_shards(tmp_path / "shards", 6, 3, h=32, w=32)  # uneven over 4 readers
    upload(tmp_path / "shards", f"{s3_bucket}/shards")
    seen = _pass_keys(f"{s3_bucket}/shards", world=2, workers=2)
    assert set(seen) == set(keys) and set(seen.values()) == {1}


def test_corrupt_and_missing_shards_on_s3_are_skipped(tmp_path, s3_bucket):
    good = _corrupt_shards(tmp_path / "shards")  # a bit-flipped PNG, a tar truncated inside a sample
    url = f"{s3_bucket}/shards"
    upload(tmp_path / "shards", url)
    # a brace pattern naming one shard more than there is: a missing object is skipped like a corrupt one
    spec = f"{url}/test-{{000000..000003}}.tar"
    keys, skipped = Counter(), 0
    for batch in make_loader(DataConfig(spec, batch_size=1, crop_hw=None, train=False, workers=0)):
        keys.update(batch["key"])
        skipped += batch["_pos"]["skipped"]
    assert set(keys) == good and set(keys.values()) == {1}
    assert skipped >= 3  # the bit-flipped PNG, the truncated tar, the missing shard
    assert any(f"shard {url}/test-000003.tar: missing shard" in r for r in reasons(spec))
    with pytest.raises(ShardError, match="test-000001.tar, key test-02-0002"):  # strict: the first bad one
        for _ in make_loader(DataConfig(spec, batch_size=1, crop_hw=None, train=False, workers=0, strict=True)):
            pass


def reasons(spec: str) -> list[str]:
    stats = ReadStats()
    list(iter_samples(spec, strict=False, stats=stats))
    return stats.reasons


def test_unknown_or_malformed_shard_urls_are_refused():
    for bad in ("s4://bucket/shards", "s3:/bucket/shards", "s3://", "s3://Bucket/x"):
        with pytest.raises(StorageError, match="s3|s4"):
            list_shards(bad)


def test_pretrain_finetune_and_eval_read_s3(tmp_path, s3_bucket):
    runner = CliRunner()

    def invoke(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    torch.set_num_threads(1)
    write_shards(tmp_path / "train", 2, 2, seed=1)
    write_shards(tmp_path / "val", 1, 2, seed=9)
    upload(tmp_path / "train", f"{s3_bucket}/train")
    upload(tmp_path / "val", f"{s3_bucket}/val")
    common = ["--model", "tiny", "--batch-size", "2", "--crop", "64x96", "--workers", "0", "--quiet"]
    invoke("pretrain", "--shards", f"{s3_bucket}/train/", "--steps", "2", "--out", tmp_path / "pre", *common)
    invoke("finetune", "--shards", f"{s3_bucket}/train/", "--init", tmp_path / "pre", "--steps", "2",
           "--out", tmp_path / "ft", "--json", tmp_path / "ft.json", *common[2:])
    assert json.loads((tmp_path / "ft.json").read_text())["steps"] == 2
    result = {}
    for where, shards in (("s3", f"{s3_bucket}/val/"), ("local", tmp_path / "val")):
        invoke("eval", "--ckpt", tmp_path / "ft", "--shards", shards, "--json", tmp_path / f"{where}.json")
        result[where] = json.loads((tmp_path / f"{where}.json").read_text())
    assert result["s3"]["count"] == 2 and result["s3"]["skipped"] == 0
    assert result["s3"]["per_image"] == result["local"]["per_image"]  # the same numbers, image by image


def test_a_url_where_a_local_path_is_expected_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in (["pretrain", "--shards", "s3://bucket/shards/", "--out", "s3://bucket/run"],
                 ["export", "--ckpt", "s3://bucket/run", "--out", "model.safetensors"],
                 ["predict", "--ckpt", "run", "--shards", "s3://bucket/shards/", "--out", "gs://bucket/pred"]):
        result = runner.invoke(app, args)
        text = re.sub(r"[\s│]+", " ", result.output)  # typer's error box wraps the message
        assert result.exit_code == 2 and "is a URL; a local path is expected" in text, result.output
    assert list(tmp_path.iterdir()) == []  # no folder named s3: or gs:


# ---------------------------------------------------------------------------------------------------------
# a throttling, flaky store (tests/s3faults.py's proxy in front of the S3 server)


def test_pretrain_through_a_flaky_store_reads_every_sample_and_equals_a_local_run(tmp_path, s3_bucket,
                                                                                   fault_proxy, monkeypatch):
    """`trainer pretrain --shards s3://...` with 2 DataLoader workers while a quarter of the requests fail
    (503, 500, reset, body cut, 0.5 s stall): the same samples in the same order as from a local copy (so
    the same weights, bit for bit), none skipped."""
    from trainer import checkpoint as ckpt

    keys = write_shards(tmp_path / "s", 4, 3, h=32, w=64)
    upload(tmp_path / "s", f"{s3_bucket}/s")
    args = ["--model", "tiny", "--steps", "8", "--batch-size", "2", "--crop", "32x64", "--workers", "2", "--seed",
            "3", "--log-every", "1", "--ckpt-every", "8", "--threads", "1", "--log-keys", "--quiet"]

    def pretrain(shards: str, name: str) -> dict:
        result = CliRunner().invoke(app, ["pretrain", "--shards", shards, "--out", str(tmp_path / name), "--json",
                                          str(tmp_path / f"{name}.json"), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / f"{name}.json").read_text())

    local = pretrain(str(tmp_path / "s"), "local")
    monkeypatch.setenv("DMD3C_STORAGE_RETRY", "attempts=5,base=0.01,max=0.1")
    proxy = fault_proxy(rate=0.25, stall_s=0.5, seed=4)  # the DataLoader workers inherit the environment
    summary = pretrain(f"{s3_bucket}/s/", "s3")
    assert summary["skipped_samples"] == 0 and summary["steps"] == 8
    got, want = ((tmp_path / run / "keys-rank0.tsv").read_text() for run in ("s3", "local"))
    assert got == want  # 16 samples: every one of the 12 once, then 4 of the next pass
    first_pass = [line.split("\t")[2] for line in got.splitlines() if line.split("\t")[1] == "0"]
    assert sorted(first_pass) == sorted(keys)
    a = ckpt.read_checkpoint(summary["checkpoint"], "model")[0]
    b = ckpt.read_checkpoint(local["checkpoint"], "model")[0]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert proxy.stats["faults"] >= 4, proxy.stats  # the faults did happen


def test_a_shard_that_stays_unreadable_is_skipped_counted_and_named(tmp_path, s3_bucket, fault_proxy,
                                                                    monkeypatch, caplog):
    """One shard's body is cut short on every read (not transient): after the retries its samples are
    skipped, counted in the batches' `skipped` and logged with the shard's URL; the others are all read."""
    keys = write_shards(tmp_path / "s", 3, 2, h=32, w=64)
    upload(tmp_path / "s", f"{s3_bucket}/s")
    monkeypatch.setenv("DMD3C_STORAGE_RETRY", "attempts=3,base=0.01,max=0.02")
    proxy = fault_proxy(rate=1.0, kinds=("truncate",), max_in_a_row=10**6, match=r"test-000001\.tar$")
    seen, skipped = [], 0
    with caplog.at_level("WARNING", logger="trainer.data"):
        for batch in make_loader(DataConfig(f"{s3_bucket}/s/", batch_size=1, crop_hw=None, train=False,
                                            workers=0)):
            seen += batch["key"]
            skipped += batch["_pos"]["skipped"]
    assert sorted(seen) == sorted(keys[:2] + keys[4:])  # shard 1 holds samples 2 and 3
    assert skipped >= 1 and proxy.stats["truncate"] >= 3
    assert f"{s3_bucket}/s/test-000001.tar" in caplog.text and "read failed at byte 0 after 3 attempts" in caplog.text
