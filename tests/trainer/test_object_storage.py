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
