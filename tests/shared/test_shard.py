"""The shard format: round trips through ShardWriter, plain WebDataset and tarfile; bad input."""

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from shared.shard import (
    SCHEMA_VERSION,
    ReadStats,
    ShardError,
    ShardWriter,
    decode_sample,
    encode_sample,
    iter_samples,
    list_shards,
    validate_shard,
)


def write(path, samples, **kw):
    with ShardWriter(path, **kw) as w:
        for s in samples:
            w.write(s)
    return path


def assert_same(a, b, rgb_exact):
    assert a.key == b.key
    assert np.allclose(a.K, b.K)
    if rgb_exact:
        assert np.array_equal(a.rgb, b.rgb)
    for name in ("depth", "sparse", "gt"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert np.max(np.abs(x - y)) <= 0.5 / 256 + 1e-6
            assert np.array_equal(x == 0, y == 0)
    rel = np.abs(a.teacher - b.teacher) / np.ptp(a.teacher)
    assert rel.max() < 1e-4


def test_round_trip_via_iter_samples(tmp_path, samples):
    path = write(tmp_path / "s-000000.tar", samples, rgb_format="png")
    back = list(iter_samples(path))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert_same(a, b, rgb_exact=True)
        assert b.meta["schema_version"] == SCHEMA_VERSION
        assert b.meta["point_count"] == np.count_nonzero(a.sparse)
        assert b.meta["source_path"] == a.meta["source_path"]


def test_read_back_by_plain_webdataset_and_tarfile(tmp_path, samples):
    path = write(tmp_path / "s.tar", samples)
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    raws = list(ds)
    assert [r["__key__"] for r in raws] == [s.key for s in samples]
    for raw, s in zip(raws, samples, strict=True):
        assert set(k for k in raw if not k.startswith("__")) == {
            "rgb.jpg", "teacher.png", "depth.png", "sparse.png", "gt.png", "meta.json"}
        assert_same(s, decode_sample(raw), rgb_exact=False)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert len(names) == 6 * len(samples)
        meta = json.load(tar.extractfile(f"{samples[0].key}.meta.json"))
        assert meta["key"] == samples[0].key and len(meta["K"]) == 3


def test_long_keys_as_real_nuscenes_names(tmp_path, samples):
    """A nuScenes camera frame's key is about 95 characters; with ".teacher.png" its member name passes
    ustar's 100-character limit, which once failed every nuScenes shard ("name is too long")."""
    key = "nuscenes-samples_CAM_FRONT_LEFT_n015-2018-07-24-11-22-45_0800__CAM_FRONT_LEFT__1532402927662462"
    s = samples[0]
    long = dataclasses.replace(s, key=key)
    path = write(tmp_path / "s.tar", [long])
    (back,) = list(iter_samples(path))
    assert back.key == key
    assert_same(long, back, rgb_exact=False)
    with tarfile.open(path) as tar:
        assert f"{key}.teacher.png" in tar.getnames()
    assert validate_shard(path).ok


def test_short_names_keep_their_ustar_bytes(tmp_path, samples):
    """Shards written before long names were allowed (plain ustar) have the same bytes as today's."""
    path = write(tmp_path / "s.tar", samples)
    buf = io.BytesIO()
    with tarfile.open(path) as old, tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as ustar:
        for m in old.getmembers():
            ustar.addfile(m, old.extractfile(m))
    assert buf.getvalue() == path.read_bytes()


def test_same_samples_same_bytes(tmp_path, samples):
    a = write(tmp_path / "a.tar", samples).read_bytes()
    b = write(tmp_path / "b.tar", samples).read_bytes()
    assert a == b


def test_writer_is_atomic(tmp_path, samples):
    path = tmp_path / "s.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write(samples[0])
            assert not path.exists() and list(tmp_path.glob("s.tar.tmp-*"))
            assert list_shards_or_empty(tmp_path) == []
            raise RuntimeError("crash")
    assert not path.exists() and not list(tmp_path.iterdir())


def list_shards_or_empty(d):
    try:
        return list_shards(d)
    except FileNotFoundError:
        return []


def test_duplicate_and_bad_keys_refused(tmp_path, samples):
    with ShardWriter(tmp_path / "s.tar") as w:
        w.write(samples[0])
        with pytest.raises(ShardError, match="duplicate"):
            w.write(samples[0])
    samples[1].key = "bad.key"
    with pytest.raises(ShardError, match="invalid sample key"):
        encode_sample(samples[1])


def test_list_shards_specs(tmp_path, samples):
    for i in range(3):
        write(tmp_path / "sub" / f"x-{i:06d}.tar", samples[:1])
    (tmp_path / "sub" / "x-000009.tar.tmp-123").write_bytes(b"partial")
    d = list_shards(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in d] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert list_shards(str(tmp_path / "sub" / "x-{000000..000001}.tar")) == d[:2]
    assert list_shards(str(tmp_path / "sub" / "*.tar")) == d
    with pytest.raises(FileNotFoundError, match="no shards match"):
        list_shards(str(tmp_path / "nothing*.tar"))


# ---- bad input: strict mode names shard and key, streaming mode skips and counts ----

def tar_with(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(sample):
    enc = encode_sample(sample)
    return {f"{enc['__key__']}.{k}": v for k, v in enc.items() if not k.startswith("__")}


def corrupt(tmp_path, samples, kind):
    good0, bad, good2 = (members_of(s) for s in samples[:3])
    key = samples[1].key
    if kind == "missing":
        del bad[f"{key}.sparse.png"]
    elif kind == "schema":
        meta = json.loads(bad[f"{key}.meta.json"])
        meta["schema_version"] = 99
        bad[f"{key}.meta.json"] = json.dumps(meta).encode()
    elif kind == "not_png":
        bad[f"{key}.depth.png"] = b"\xff\xd8\xff\xe0" + b"JFIF" * 50
    elif kind == "bitflip":
        data = bytearray(bad[f"{key}.gt.png"])
        for i in range(60, len(data) - 20, 7):
            data[i] ^= 0x5A
        bad[f"{key}.gt.png"] = bytes(data)
    return tar_with(tmp_path / f"{kind}.tar", {**good0, **bad, **good2}), key


@pytest.mark.parametrize("kind,reason", [
    ("missing", "missing member"), ("schema", "schema_version"), ("not_png", "not a PNG"),
    ("bitflip", "PNG"),
])
def test_bad_sample_strict_and_streaming(tmp_path, samples, kind, reason):
    path, key = corrupt(tmp_path, samples, kind)
    with pytest.raises(ShardError) as err:
        list(iter_samples(path, strict=True))
    assert str(path) in str(err.value) and key in str(err.value) and reason in str(err.value)
    stats = ReadStats()
    got = [s.key for s in iter_samples(path, strict=False, stats=stats)]
    assert got == [samples[0].key, samples[2].key]
    assert stats.skipped == 1 and key in stats.reasons[0]
    report = validate_shard(path)
    assert not report.ok and any(key in e for e in report.errors)


def test_truncated_tar(tmp_path, samples):
    path = write(tmp_path / "t.tar", samples)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        offsets = [m.offset_data for m in tar.getmembers()]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: offsets[8] + 100])  # inside a member of the second sample
    with pytest.raises(ShardError) as err:
        list(iter_samples(cut, strict=True))
    assert "cut.tar" in str(err.value)
    stats = ReadStats()
    got = [s.key for s in iter_samples(cut, strict=False, stats=stats)]
    assert got == [samples[0].key] and stats.skipped >= 1
    assert any("truncated" in e or "unexpected end" in e for e in validate_shard(cut).errors)
    # cut exactly at a member boundary: tarfile sees a clean end, the member list in meta does not
    cut.write_bytes(data[: offsets[8] - 512])
    with pytest.raises(ShardError, match="missing member"):
        list(iter_samples(cut, strict=True))
    assert any("truncated" in e for e in validate_shard(cut).errors)


def test_valid_shard_validates(tmp_path, samples):
    report = validate_shard(write(tmp_path / "ok.tar", samples))
    assert report.ok, report.errors
    assert report.samples == len(samples) and report.members["meta.json"] == len(samples)


def test_every_member_round_trips_exactly(samples):
    # decoded values are exactly the codes' values: depth maps round(m * 256) / 256, the teacher its
    # 16-bit code mapped back with the stored scaling, rgb (PNG) the same bytes
    for s in samples:
        back = decode_sample(encode_sample(s, rgb_format="png"))
        assert np.array_equal(back.rgb, s.rgb)
        for name in ("depth", "sparse", "gt"):
            x = getattr(s, name).astype(np.float64)
            code = np.maximum(np.rint(x * 256), x > 0)
            assert np.array_equal(getattr(back, name), (code / 256).astype(np.float32))
        lo, hi = float(s.teacher.min()), float(s.teacher.max())
        code = np.rint(1.0 + (s.teacher.astype(np.float64) - lo) / (hi - lo) * 65534.0)
        assert np.array_equal(back.teacher, (lo + (code - 1.0) / 65534.0 * (hi - lo)).astype(np.float32))


def test_shards_written_by_the_pil_png_writer_decode_the_same(tmp_path, samples, monkeypatch):
    # shards written before the direct PNG writer (PIL, zlib level 3) must read back to the same arrays
    import shared.depth

    new = list(iter_samples(write(tmp_path / "new.tar", samples)))
    monkeypatch.setattr(shared.depth, "_uint16_png", shared.depth.uint16_png_pil)
    old_path = write(tmp_path / "old.tar", samples)
    monkeypatch.undo()
    with tarfile.open(old_path) as t_old, tarfile.open(tmp_path / "new.tar") as t_new:
        name = f"{samples[0].key}.depth.png"
        assert t_old.extractfile(name).read() != t_new.extractfile(name).read()  # two writers indeed
    old = list(iter_samples(old_path))
    for a, b in zip(new, old, strict=True):
        assert a.key == b.key and a.meta == b.meta
        for name in ("rgb", "teacher", "depth", "sparse", "gt"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
