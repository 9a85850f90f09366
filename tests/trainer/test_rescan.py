"""New scans in the loader (`trainer pretrain --lidar`): cast from each frame's dense pseudo depth and K after
the crop and flip, new every epoch, deterministic and exact on resume; refused where there is no depth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import H, W, make_sample, write_shards
from test_resume import weights
from typer.testing import CliRunner

from shared.scan.spec import ScanSpec
from shared.shard import ShardWriter
from trainer.cli import app
from trainer.data import DataConfig, ShardStream, frame_sample, hflip, rescan_frame
from trainer.train import TrainConfig, train

SPEC = ScanSpec(lidar="hdl64", mount="none")  # at the camera centre, ideal sensor: points lie on the depth map


def stream(root, rescan, crop_hw=(32, 64), **kw) -> ShardStream:
    cfg = DataConfig(shards=str(root), batch_size=2, crop_hw=crop_hw, train=True, shuffle_buffer=1, workers=0,
                     seed=3, rescan=rescan, **kw)
    return ShardStream(cfg, rank=0, world_size=1)


def first_epochs(root, rescan, n_batches) -> list[dict]:
    it = iter(stream(root, rescan))
    return [next(it) for _ in range(n_batches)]


def test_each_epoch_scans_each_image_anew_and_reruns_repeat_it(tmp_path):
    write_shards(tmp_path / "s", 1, 4)  # 4 samples: 2 batches an epoch
    stored = first_epochs(tmp_path / "s", None, 4)
    a = first_epochs(tmp_path / "s", SPEC, 4)
    b = first_epochs(tmp_path / "s", SPEC, 4)
    for x, y, s in zip(a, b, stored, strict=True):
        assert x["key"] == y["key"] == s["key"]
        assert torch.equal(x["sparse"], y["sparse"])  # deterministic: (seed, epoch, key)
        # the scan has its own random stream: crops, flips and jitter are those of a run without it
        for name in ("rgb_raw", "depth", "K", "box"):
            assert torch.equal(x[name], s[name]), name
        assert not torch.equal(x["sparse"], s["sparse"]) and x["has_sparse"].all()
    # the same whole image, unflipped, in epoch 0 and epoch 1: another scan (the azimuth phase is drawn anew)
    it = iter(stream(tmp_path / "s", SPEC, crop_hw=(H, W), flip=False))
    by_epoch = {}
    for batch in (next(it) for _ in range(4)):
        for i, (k, e) in enumerate(zip(batch["key"], batch["epoch"].tolist(), strict=True)):
            by_epoch.setdefault(e, {})[k] = batch["sparse"][i]
    assert by_epoch[0].keys() == by_epoch[1].keys()
    for k in by_epoch[0]:
        assert not torch.equal(by_epoch[0][k], by_epoch[1][k]), k


def test_new_scans_follow_the_crop_and_flip():
    """A new scan of a cropped (and mirrored) frame is the scan of the whole image cut (and mirrored) the same
    way: the frame's K moved with the crop and the flip, so the rays meet the same 3D surface. A line scanner
    with azimuths symmetric about the axis fires the same rays in the mirrored world."""
    sample = make_sample(3)
    spec = ScanSpec(lidar="lines:n=24,vfov=-30:30,az=0.5,hfov=140", mount="none")
    whole = rescan_frame({"depth": sample.depth, "K": sample.K, "rgb": sample.rgb}, spec, np.random.default_rng(0))
    for top, left, flip in ((0, 0, False), (32, 32, False), (16, 8, True), (32, 0, True)):
        frame = frame_sample(sample, (32, 64), top, left)
        frame = hflip(frame) if flip else frame
        want = whole[top:top + 32, left:left + 64]
        want = want[:, ::-1] if flip else want
        assert agreement(rescan_frame(frame, spec, np.random.default_rng(0)), want) > 0.99, (top, left, flip)
        # the control: the uncropped, unflipped K on the same frame casts other rays at another surface
        if (top, left) != (0, 0) or flip:
            wrong = rescan_frame({**frame, "K": sample.K}, spec, np.random.default_rng(0))
            assert agreement(wrong, want) < 0.5


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the pixels inside a 1-pixel border where either map has a point that both have, at the same
    depth (1e-4 relative: the same hit computed in other pixel coordinates)."""
    a, b = a[1:-1, 1:-1], b[1:-1, 1:-1]
    either = (a > 0) | (b > 0)
    assert either.sum() > 50
    same = (a > 0) & (b > 0) & (np.abs(a - b) <= 1e-4 * np.maximum(a, b))
    return float(same.sum() / either.sum())


def test_resume_with_new_scans_gives_the_weights_of_a_straight_run(tmp_path):
    write_shards(tmp_path / "s", 3, 3)
    cfg = TrainConfig(shards=str(tmp_path / "s"), model="tiny", steps=6, batch_size=2, crop="32x64", workers=2,
                      lr=3e-3, seed=11, shuffle_buffer=4, ema_decay=0.9, log_every=1, ckpt_every=100,
                      progress=False, lidar="random", mount="random", sensor="realistic")
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "a")))
    train(dataclasses.replace(cfg, out=str(tmp_path / "b"), stop_at=3))
    resumed = train(dataclasses.replace(cfg, out=str(tmp_path / "b"), resume=True))
    a, b = weights(straight["checkpoint"]), weights(resumed["checkpoint"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    stored = train(dataclasses.replace(cfg, out=str(tmp_path / "c"), lidar=None, mount=None, sensor=None))
    c = weights(stored["checkpoint"])
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the new scans were what it trained on


def test_samples_without_dense_depth_are_refused_by_name(tmp_path):
    (tmp_path / "s").mkdir()
    with ShardWriter(tmp_path / "s" / "kitti-000000.tar", rgb_format="png") as wr:
        for i in range(2):
            wr.write(dataclasses.replace(make_sample(i, prefix="kitti"), depth=None))
    with pytest.raises(ValueError, match=r"kitti-00-0000.*depth\.png.*real scans"):
        next(iter(stream(tmp_path / "s", SPEC)))
    # --lidar shard needs the spec each sample records; these test shards have none
    write_shards(tmp_path / "t", 1, 2)
    with pytest.raises(ValueError, match="lidar.spec"):
        next(iter(stream(tmp_path / "t", "shard")))


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--mount", "kitti"], "without --lidar"),
    (["pretrain", "--lidar", "hdl6"], "--lidar"),
    (["pretrain", "--lidar", "hdl64", "--mount", "roof"], "--mount"),
    (["pretrain", "--lidar", "shard", "--sensor", "realistic"], "--lidar shard"),
    (["finetune", "--lidar", "hdl64"], "pretrain"),
])
def test_cli_refuses_scans_that_cannot_be_made(tmp_path, args, message):
    write_shards(tmp_path / "s", 1, 2)
    res = CliRunner().invoke(app, [*args, "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_frame_of_a_whole_image_needs_no_crop(tmp_path):
    """rescan_frame on the whole frame: the scan covers the image, not only a crop's window."""
    sample = make_sample(0)
    frame = {"depth": sample.depth, "K": sample.K, "rgb": sample.rgb}
    sparse = rescan_frame(frame, SPEC, np.random.default_rng(0))
    assert sparse.shape == (H, W) and (sparse > 0).sum() > 50
