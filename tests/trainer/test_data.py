"""Streaming data: geometry of crop and flip (every member, the teacher included), corrupt shards,
exactly-once splitting over ranks x workers, and exact resume of the stream."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_sample, plane_depth, write_shards

from shared.camera import backproject, project
from shared.shard import ShardWriter, encode_sample
from trainer.data import (
    DataConfig,
    DataPosition,
    ShardStream,
    eval_frame,
    frame_sample,
    hflip,
    make_loader,
    parse_hw,
    train_frame,
)

DEPTH_MAPS = ("sparse", "depth", "gt")


def mirrored(points: np.ndarray) -> np.ndarray:
    """Points of the mirrored image: columns reversed, x negated."""
    return points[:, ::-1] * np.array([-1.0, 1.0, 1.0])


def test_flip_mirrors_the_3d_points_of_every_member():
    sample = make_sample(3)
    frame = frame_sample(sample, (64, 96), 0, 0)
    flipped = hflip(frame)
    assert flipped["K"][0, 2] == pytest.approx(96 - 1 - frame["K"][0, 2])
    for name in DEPTH_MAPS:
        p = backproject(frame[name], frame["K"])
        q = backproject(flipped[name], flipped["K"])
        np.testing.assert_allclose(q, mirrored(p), atol=1e-9, err_msg=name)
        assert np.count_nonzero(frame[name]) > 0
    # the teacher (disparity): the flipped map is the mirrored map, and its depth back-projects mirrored
    np.testing.assert_array_equal(flipped["teacher"], frame["teacher"][:, ::-1])
    t_depth = np.where(frame["teacher"] > 0, 1.0 / np.maximum(frame["teacher"], 1e-9), 0)
    tf_depth = np.where(flipped["teacher"] > 0, 1.0 / np.maximum(flipped["teacher"], 1e-9), 0)
    np.testing.assert_allclose(backproject(tf_depth, flipped["K"]), mirrored(backproject(t_depth, frame["K"])),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(flipped["rgb"], frame["rgb"][:, ::-1])
    np.testing.assert_array_equal(flipped["valid"], frame["valid"][:, ::-1])


def test_train_frame_keeps_every_member_on_the_same_mirrored_plane():
    """Through the training transform (random crop, flip, jitter), every member still describes one
    plane n . P = d, mirrored (n_x negated) when flipped: a member flipped alone would break it."""
    sample = make_sample(5)
    # the plane of the unflipped full frame, fitted once (the depth PNG rounds to 1/256 m)
    P = backproject(sample.depth, sample.K).reshape(-1, 3)
    A = np.c_[P, -np.ones(len(P))]
    n = np.linalg.svd(A)[2][-1]
    n = n / n[2]  # n[:3] . P = n[3], n_z = 1
    flips = 0
    for seed in range(8):
        f = train_frame(sample, (32, 64), np.random.default_rng(seed), flip=True, jitter=0.2)
        flipped = f["K"][0, 2] != sample.K[0, 2] - f["box"][1]
        flips += flipped
        normal = n[:3] * (np.array([-1.0, 1, 1]) if flipped else 1)
        for name in DEPTH_MAPS:
            pts = backproject(f[name], f["K"])[f[name] > 0]
            np.testing.assert_allclose(pts @ normal, n[3], rtol=1e-3, err_msg=f"{name} seed {seed}")
        teacher_depth = 0.7 / (f["teacher"] - 0.05)  # the conftest's teacher = 0.7 / depth + 0.05
        np.testing.assert_allclose(teacher_depth, f["depth"], rtol=2e-3)
        # rgb's green channel codes the original column: flipped frames must run right to left
        col_code = f["rgb"][:, :, 1].astype(float)  # before jitter it is u * 255 / (W - 1); jitter keeps order
        assert (np.diff(col_code.mean(0)) <= 0).all() if flipped else (np.diff(col_code.mean(0)) >= 0).all()
    assert 0 < flips < 8


def test_crop_moves_K_so_a_point_projects_to_the_same_pixel():
    sample = make_sample(1)
    top, left = 17, 23
    frame = frame_sample(sample, (32, 64), top, left)
    point = np.array([[0.4, -0.2, 5.0]])
    uv, _ = project(point, sample.K)
    uv_c, _ = project(point, frame["K"])
    np.testing.assert_allclose(uv_c, uv - [left, top], atol=1e-12)
    # and the cropped depth back-projects to the very points of the original pixels
    np.testing.assert_allclose(backproject(frame["depth"], frame["K"]),
                               backproject(sample.depth, sample.K)[top:top + 32, left:left + 64], atol=1e-9)
    assert tuple(frame["box"]) == (top, left, 32, 64)


def test_smaller_images_are_padded_and_eval_frames_are_multiples_of_32():
    sample = make_sample(0, h=50, w=70)
    f = frame_sample(sample, (64, 96), 0, 0)
    assert f["rgb"].shape == (64, 96, 3) and f["valid"].sum() == 50 * 70
    assert (f["depth"][50:] == 0).all() and (f["depth"][:, 70:] == 0).all()
    e = eval_frame(sample)
    assert e["depth"].shape == (64, 96) and tuple(e["box"]) == (0, 0, 50, 70)
    np.testing.assert_array_equal(e["K"], sample.K)
    c = eval_frame(make_sample(0), (32, 64))  # BP-Net's test crop: bottom rows, centred columns
    assert tuple(c["box"]) == (32, 16, 32, 64)


def test_parse_hw():
    assert parse_hw("256x1216") == (256, 1216)
    for bad in ("250x1216", "256", "axb"):
        with pytest.raises(ValueError):
            parse_hw(bad)


def test_missing_members_are_zeros_with_a_flag(tmp_path):
    write_shards(tmp_path, 1, 2, labelled=False, teacher=False)
    batch = next(iter(make_loader(DataConfig(str(tmp_path), batch_size=2, crop_hw=(64, 64), workers=0))))
    assert not batch["has_gt"].any() and not batch["has_teacher"].any() and batch["has_depth"].all()
    assert batch["gt"].abs().sum() == 0 and batch["teacher"].abs().sum() == 0
    assert batch["rgb"].dtype == torch.float32 and batch["K"].shape == (2, 3, 3)
    assert batch["K"].dtype == torch.float32 and batch["rgb_raw"].dtype == torch.uint8


def _corrupt_shards(root):
    """A good shard, one whose third sample has a bit-flipped depth PNG, one truncated inside sample 2."""
    write_shards(root, 1, 4, seed=1)  # test-000000.tar, keys test-01-0000..0003
    flipped = [make_sample(i, seed=2) for i in range(4)]
    with ShardWriter(root / "test-000001.tar", rgb_format="png") as w:
        for i, s in enumerate(flipped):
            m = encode_sample(s, "png")
            if i == 2:
                data = bytearray(m["depth.png"])
                for j in range(60, len(data) - 20, 7):  # inside the compressed pixel data
                    data[j] ^= 0xFF
                m["depth.png"] = bytes(data)
            w.write(m)
    samples = [make_sample(i, seed=3) for i in range(4)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        offsets = []
        for s in samples:
            offsets.append(buf.tell())
            for name, data in sorted(encode_sample(s, "png").items()):
                if name.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s.key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cut = offsets[2] + 3000  # inside sample 2
    (root / "test-000002.tar").write_bytes(buf.getvalue()[:cut])
    good = {f"test-01-{i:04d}" for i in range(4)} | {f"test-02-{i:04d}" for i in (0, 1, 3)} | {
        f"test-03-{i:04d}" for i in (0, 1)}
    return good


def test_corrupt_samples_are_skipped_counted_and_iteration_goes_on(tmp_path, caplog):
    good = _corrupt_shards(tmp_path)
    cfg = DataConfig(str(tmp_path), batch_size=1, crop_hw=None, train=False, workers=0)
    keys, skipped = [], 0
    with caplog.at_level("WARNING", logger="trainer.data"):
        for batch in make_loader(cfg):
            keys += batch["key"]
            skipped += batch["_pos"]["skipped"]
    assert set(keys) == good and len(keys) == len(good)
    assert skipped >= 2  # the bit-flipped PNG and the truncated tar
    assert "skipped a corrupt sample" in caplog.text
    # a training stream goes on past them, epoch after epoch
    pos = DataPosition(0)
    it = iter(make_loader(DataConfig(str(tmp_path), batch_size=4, crop_hw=(32, 32), workers=0)))
    for _ in range(6):
        pos.update(next(it))
    assert pos.skipped >= 4 and pos.cursor[0][0] >= 2


def _pass_keys(root, world: int, workers: int, min_epochs: int = 1) -> Counter:
    """Keys of epoch 0 seen over all ranks, each rank through its own DataLoader with `workers` workers."""
    seen = Counter()
    for rank in range(world):
        cfg = DataConfig(str(root), batch_size=2, crop_hw=(32, 32), workers=workers, seed=7, shuffle_buffer=4)
        slot_epoch = {}
        for batch in make_loader(cfg, rank=rank, world_size=world):
            p = batch["_pos"]
            seen.update(k for k, e in zip(batch["key"], batch["epoch"].tolist(), strict=True) if e == 0)
            slot_epoch[p["slot"]] = p["epoch"]
            if len(slot_epoch) == max(workers, 1) and min(slot_epoch.values()) >= min_epochs:
                break
    return seen


@pytest.mark.parametrize("n_shards,per_shard", [(6, 3), (2, 5)])  # uneven shards; fewer shards than readers
def test_two_ranks_two_workers_see_each_sample_exactly_once_per_pass(tmp_path, n_shards, per_shard):
    keys = write_shards(tmp_path, n_shards, per_shard, h=32, w=32)
    seen = _pass_keys(tmp_path, world=2, workers=2)
    assert set(seen) == set(keys)
    assert set(seen.values()) == {1}


def test_resumed_stream_gives_the_same_batches_with_workers(tmp_path):
    write_shards(tmp_path, 4, 3, h=32, w=32)
    cfg = DataConfig(str(tmp_path), batch_size=2, crop_hw=(32, 32), workers=2, seed=3, shuffle_buffer=3)
    straight = []
    it = iter(make_loader(cfg))
    for _ in range(9):
        b = next(it)
        straight.append((b["key"], b["rgb_raw"]))
    del it
    pos = DataPosition(cfg.workers)
    it = iter(make_loader(cfg))
    for _ in range(5):  # an odd count: the resumed loader must start polling the other worker
        pos.update(next(it))
    del it
    it = iter(make_loader(cfg, start=pos.state()))
    for i in range(5, 9):
        b = next(it)
        assert b["key"] == straight[i][0]
        assert torch.equal(b["rgb_raw"], straight[i][1])  # same crop, flip and jitter too


def test_plane_helper_is_a_plane():
    """The fixtures' scenes really are planes (so the plane test above can fail)."""
    K = np.array([[60.0, 0, 40], [0, 60, 30], [0, 0, 1]])
    d = plane_depth(K, 20, 30, (0.2, -0.4, 1.0), 6.0)
    P = backproject(d, K).reshape(-1, 3)
    np.testing.assert_allclose(P @ [0.2, -0.4, 1.0], 6.0, rtol=1e-12)
    assert ShardStream  # imported API
