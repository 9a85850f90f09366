"""The classical baselines (trainer/baselines.py): IP-Basic against known answers and against a plain numpy
re-statement of its published pipeline, and `trainer baseline` -> `trainer score` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_shards
from scipy.ndimage import distance_transform_edt
from typer.testing import CliRunner

from shared.depth import decode_depth_png, encode_depth_png
from shared.shard import iter_samples
from trainer import baselines as B
from trainer.cli import app
from trainer.metrics import fill_invalid_like_devkit, kitti_metrics

runner = CliRunner()


# ---------------------------------------------------------------------------------------------------------
# an independent re-statement of fill_in_fast: numpy windows, float64, OpenCV's border rules written out
# (dilation/erosion ignore the outside, the median replicates the edge, the Gaussian reflects without
# repeating the edge pixel)


def windows(a: np.ndarray, k: int, mode: str, **kw) -> np.ndarray:
    r = k // 2
    p = np.pad(a, r, mode=mode, **kw)
    h, w = a.shape
    return np.stack([p[i:i + h, j:j + w] for i in range(k) for j in range(k)])


def grey(a: np.ndarray, kernel: np.ndarray, op, fill: float) -> np.ndarray:
    win = windows(a.astype(np.float64), kernel.shape[0], "constant", constant_values=fill)
    return op(win[kernel.reshape(-1).astype(bool)], axis=0)


def bilateral(a: np.ndarray, d: int = 5, sigma_colour: float = 1.5, sigma_space: float = 2.0) -> np.ndarray:
    r = d // 2
    win = windows(a.astype(np.float64), d, "reflect")
    offsets = [(i - r, j - r) for i in range(d) for j in range(d)]
    disc = [k for k, (i, j) in enumerate(offsets) if i * i + j * j <= r * r]
    w_space = np.array([np.exp(-(offsets[k][0] ** 2 + offsets[k][1] ** 2) / (2 * sigma_space**2)) for k in disc])
    win = win[disc]
    weight = w_space[:, None, None] * np.exp(-((win - a[None]) ** 2) / (2 * sigma_colour**2))
    return (weight * win).sum(0) / weight.sum(0)


def ip_basic_restated(sparse: np.ndarray, blur: str, max_depth: float = 100.0) -> np.ndarray:
    d = sparse.astype(np.float64)
    inv = np.where(d > 0.1, max_depth - d, d)
    diamond = np.array([[abs(i - 2) + abs(j - 2) <= 2 for j in range(5)] for i in range(5)])
    inv = grey(inv, diamond, np.max, -np.inf)
    full5 = np.ones((5, 5), bool)
    inv = grey(grey(inv, full5, np.max, -np.inf), full5, np.min, np.inf)
    inv = np.where(inv < 0.1, grey(inv, np.ones((7, 7), bool), np.max, -np.inf), inv)
    top = np.argmax(inv > 0.1, axis=0)
    for c in range(inv.shape[1]):
        inv[: top[c], c] = inv[top[c], c]
    inv = np.where(inv < 0.1, grey(inv, np.ones((31, 31), bool), np.max, -np.inf), inv)
    inv = np.median(windows(inv, 5, "edge"), axis=0)
    if blur == "gaussian":
        g = np.array([1, 4, 6, 4, 1]) / 16.0  # OpenCV's 5-tap kernel for sigma 0
        inv = np.where(inv > 0.1, np.tensordot(np.outer(g, g).reshape(-1), windows(inv, 5, "reflect"), 1), inv)
    else:
        inv = bilateral(inv)
    return np.where(inv > 0.1, max_depth - inv, inv)


@pytest.mark.parametrize("blur", ["gaussian", "bilateral"])
def test_ip_basic_equals_a_plain_restatement_of_the_published_pipeline(blur):
    rng = np.random.default_rng(3)
    for _ in range(3):
        sparse = np.where(rng.random((40, 60)) < 0.07, rng.uniform(2, 80, (40, 60)), 0).astype(np.float32)
        sparse[:10] = 0  # no points near the top: the extension to the top of the frame has work to do
        got = B.ip_basic(sparse, blur=blur)
        np.testing.assert_allclose(got, ip_basic_restated(sparse, blur), atol=1e-4, rtol=0)
        assert got.dtype == np.float32 and (got > 0).all()


def test_the_kernels_are_the_published_ones():
    assert B.DIAMOND_KERNEL_5.tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                                           [0, 0, 1, 0, 0]]
    assert B.CROSS_KERNEL_7.sum() == 13 and B.DIAMOND_KERNEL_7.sum() == 25 and B.FULL_KERNEL_31.sum() == 31 * 31


@pytest.mark.parametrize("blur", ["gaussian", "bilateral"])
def test_a_constant_scan_fills_to_that_constant_everywhere(blur):
    sparse = np.zeros((64, 96), np.float32)
    sparse[20::3, ::4] = 12.5  # the lower two thirds only
    np.testing.assert_allclose(B.ip_basic(sparse, blur=blur), 12.5, atol=1e-5)
    # without the extension to the top, the rows far above the first scan line keep no value
    no_ext = B.ip_basic(sparse, blur=blur, extrapolate=False)
    assert (no_ext[:10] == 0).all()
    np.testing.assert_allclose(no_ext[20:], 12.5, atol=1e-5)


@pytest.mark.parametrize("blur", ["gaussian", "bilateral"])
def test_a_near_object_keeps_its_depth_inside_and_the_background_outside_beyond_the_kernels(blur):
    h, w = 64, 96
    depth = np.full((h, w), 40.0, np.float32)
    obj = np.zeros((h, w), bool)
    obj[20:45, 30:66] = True
    depth[obj] = 5.0
    sparse = np.zeros_like(depth)
    sparse[::3, ::4] = depth[::3, ::4]
    got = B.ip_basic(sparse, blur=blur)
    margin = 5  # the 5x5 median and final blur reach 2 px each, plus the scan's spacing
    np.testing.assert_allclose(got[distance_transform_edt(obj) >= margin], 5.0, atol=1e-4)
    np.testing.assert_allclose(got[distance_transform_edt(~obj) >= margin], 40.0, atol=1e-4)


def test_dilation_prefers_the_nearer_point_which_is_why_the_depth_is_inverted():
    sparse = np.zeros((9, 9), np.float32)
    sparse[4, 3], sparse[4, 5] = 5.0, 40.0  # the pixel between them is within the diamond of both
    out = B.invert(B.dilate(B.invert(sparse), B.DIAMOND_KERNEL_5))
    assert out[4, 4] == 5.0
    assert out[4, 6] == 40.0 and out[4, 7] == 40.0  # only the far point reaches there
    assert out[2, 3] == 5.0 and out[1, 3] == 0.0  # the diamond: 2 rows up, not 3
    assert out[3, 2] == 5.0 and out[2, 2] == 0.0  # and not its corners


def test_extension_to_the_top_copies_each_columns_topmost_value_upward():
    inv = np.array([[0, 0, 0, 0],
                    [0, 7, 0, 0],
                    [3, 2, 0, 0],
                    [4, 0, 0, 9]], np.float32)
    want = np.array([[3, 7, 0, 9],
                     [3, 7, 0, 9],
                     [3, 2, 0, 9],
                     [4, 0, 0, 9]], np.float32)
    np.testing.assert_array_equal(B.extend_to_top(inv), want)


def test_points_beyond_max_depth_are_lost():
    """The release inverts about max_depth (100 m): a farther point becomes negative and counts as empty, so
    a far wall above a near street takes the street's depth (extended to the top); with a farther pivot
    it keeps its own."""
    sparse = np.zeros((64, 64), np.float32)
    sparse[0:30:3, ::4] = 150.0  # a far wall in the upper half
    sparse[33::3, ::4] = 10.0  # the street below
    lost = B.ip_basic(sparse)
    np.testing.assert_allclose(lost, 10.0, atol=1e-5)
    kept = B.ip_basic(sparse, max_depth=200.0)
    np.testing.assert_allclose(kept[:20], 150.0, atol=1e-3)
    np.testing.assert_allclose(kept[40:], 10.0, atol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="blur"):
        B.ip_basic(np.zeros((8, 8), np.float32), blur="box")
    with pytest.raises(ValueError, match="H x W"):
        B.ip_basic(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="method"):
        B.complete("linear", np.zeros((8, 8), np.float32))


# ---------------------------------------------------------------------------------------------------------
# the command


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("method", ["ip-basic", "nearest"])
def test_baseline_command_writes_pngs_that_trainer_score_scores(tmp_path, method):
    write_shards(tmp_path / "s", 1, 3, seed=4)
    samples = list(iter_samples(tmp_path / "s"))
    gt_dir, sparse_dir = tmp_path / "gt", tmp_path / "sparse"
    gt_dir.mkdir()
    sparse_dir.mkdir()
    for s in samples:
        (gt_dir / f"{s.key}.png").write_bytes(encode_depth_png(s.gt))
        (sparse_dir / f"{s.key}.png").write_bytes(encode_depth_png(s.sparse))
    summary = json.loads(invoke("baseline", "--method", method, "--shards", tmp_path / "s", "--out", tmp_path / "p"))
    assert summary["written"] == 3
    invoke("score", "--pred", tmp_path / "p", "--gt", gt_dir, "--json", tmp_path / "score.json")
    scored = json.loads((tmp_path / "score.json").read_text())
    assert scored["count"] == 3 and scored["unused_predictions"] == []
    # the same numbers straight from the function, up to the PNG's 1/256 m
    for s, row in zip(samples, scored["per_image"], strict=True):
        want = kitti_metrics(fill_invalid_like_devkit(B.complete(method, s.sparse)), s.gt)
        assert row["name"] == f"{s.key}.png"
        assert row["rmse_mm"] == pytest.approx(want["rmse_mm"], abs=1000 / 256)
    # a folder of sparse PNGs gives the same files as the shards
    invoke("baseline", "--method", method, "--sparse-dir", sparse_dir, "--out", tmp_path / "p2")
    for s in samples:
        assert (tmp_path / "p2" / f"{s.key}.png").read_bytes() == (tmp_path / "p" / f"{s.key}.png").read_bytes()
    assert decode_depth_png((tmp_path / "p" / f"{samples[0].key}.png").read_bytes()).shape == samples[0].gt.shape


def test_baseline_command_names_the_file_it_cannot_read(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "scan-8bit.png")  # not a 16-bit depth PNG
    result = runner.invoke(app, ["baseline", "--method", "nearest", "--sparse-dir", str(folder), "--out",
                                 str(tmp_path / "p")])
    assert result.exit_code != 0 and "scan-8bit.png" in str(result.exception)
    with pytest.raises(ValueError, match="exactly one"):
        B.run_baseline("nearest", str(tmp_path / "p"))
    with pytest.raises(FileNotFoundError, match="no .png"):
        B.run_baseline("nearest", str(tmp_path / "p"), sparse_dir=str(tmp_path / "p"))
