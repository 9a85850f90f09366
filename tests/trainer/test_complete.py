"""`trainer complete` and load_completer: the network on a user's own files gives what `trainer predict` gives
on the same frame, and each bad input is refused with a message naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_shards
from PIL import Image
from typer.testing import CliRunner

from shared.depth import decode_depth_png, encode_depth_png
from shared.shard import iter_samples
from trainer import checkpoint as ckpt
from trainer.cli import app
from trainer.complete import InputError, load_completer, read_calib
from trainer.evaluate import iter_predictions, load_for_inference
from trainer.model import build_model, model_config_dict

runner = CliRunner()


def save_tiny(out, meta_extra: dict | None = None, seed: int = 0):
    """A tiny BP-Net through the real checkpoint writer, with batch-norm statistics that are not the identity
    (so folding them for inference matters)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    sd = model.state_dict()
    ema = {k: v.clone() for k, v in sd.items()}
    meta = {"model_name": "tiny", "model_config": model_config_dict(model), "stage": "finetune",
            "convention": "kitti", **(meta_extra or {})}
    return ckpt.save_checkpoint(out, 1, sd, ema, meta, state={"step": 1})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("complete")
    # 70 x 90: not a multiple of 32, so the padding and the crop back are exercised
    write_shards(root / "shards", 1, 2, seed=3, h=70, w=90)
    save_tiny(root / "run")
    samples = list(iter_samples(str(root / "shards")))
    files = root / "files"
    for d in ("rgb", "sparse", "K"):
        (files / d).mkdir(parents=True)
    for i, s in enumerate(samples):
        Image.fromarray(s.rgb).save(files / "rgb" / f"{s.key}.png")
        if i == 0:
            (files / "sparse" / f"{s.key}.png").write_bytes(encode_depth_png(s.sparse))
        else:  # the other as float metres
            np.save(files / "sparse" / f"{s.key}.npy", s.sparse)
        np.savetxt(files / "K" / f"{s.key}.txt", s.K)
    return root, samples


def invoke(*args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_load_completer_equals_predict(setup):
    root, samples = setup
    model, info = load_for_inference(str(root / "run"), device="cpu")
    preds = {p.key: p.depth_m for p in iter_predictions(model, str(root / "shards"), convention=info["convention"])}
    complete = load_completer(root / "run")
    for s in samples:
        depth = complete(s.rgb, s.sparse, s.K)
        assert depth.shape == s.sparse.shape and depth.dtype == np.float32
        np.testing.assert_allclose(depth, preds[s.key], rtol=1e-5, atol=1e-5)
    import trainer

    assert trainer.load_completer is load_completer
    # max_depth clamps
    clamped = complete(samples[0].rgb, samples[0].sparse, samples[0].K, max_depth=0.5)
    assert clamped.max() <= 0.5 and clamped.min() >= 1 / 256


def test_cli_one_frame_and_folders_match_predict(setup):
    root, samples = setup
    invoke("predict", "--ckpt", root / "run", "--shards", root / "shards", "--out", root / "pred", "--previews", "0")
    files = root / "files"
    s = samples[0]
    out = invoke("complete", "--ckpt", root / "run", "--rgb", files / "rgb" / f"{s.key}.png",
                 "--sparse", files / "sparse" / f"{s.key}.png", "--K", files / "K" / f"{s.key}.txt",
                 "--out", root / "one" / "depth.png")
    assert json.loads(out.strip().splitlines()[-1])["written"] == 1
    got = decode_depth_png((root / "one" / "depth.png").read_bytes())
    ref = decode_depth_png((root / "pred" / f"{s.key}.png").read_bytes())
    assert np.abs(got - ref).max() <= 1 / 256 + 1e-6  # at most one PNG code apart (float rounding)
    pv = np.asarray(Image.open(root / "one" / "depth.preview.png"))
    assert pv.shape == (70, 3 * 90, 3)

    invoke("complete", "--ckpt", root / "run" / "latest", "--rgb", files / "rgb", "--sparse", files / "sparse",
           "--K", files / "K", "--out", root / "many")
    for s in samples:  # the .png and the .npy scan both
        got = decode_depth_png((root / "many" / f"{s.key}.png").read_bytes())
        ref = decode_depth_png((root / "pred" / f"{s.key}.png").read_bytes())
        assert np.abs(got - ref).max() <= 1 / 256 + 1e-6
        assert (root / "many" / "preview" / f"{s.key}.png").is_file()


def test_kitti_calib_gives_P_rect_02(tmp_path):
    calib = tmp_path / "calib_cam_to_cam.txt"
    calib.write_text("calib_time: 09-Jan-2012 13:57:47\n"
                     "P_rect_00: 7.215377e+02 0 6.095593e+02 0 0 7.215377e+02 1.728540e+02 0 0 0 1 0\n"
                     "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
                     "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n")
    np.testing.assert_allclose(read_calib(calib), [[721.5377, 0, 609.5593], [0, 721.5377, 172.854], [0, 0, 1]])
    (tmp_path / "bad.txt").write_text("P_rect_00: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(InputError, match=r"bad\.txt: no P_rect_02"):
        read_calib(tmp_path / "bad.txt")


def _one(setup, tmp_path, rgb=None, sparse_png=None, sparse_npy=None, K=None):
    """Write one frame (the first sample unless replaced) and run the CLI on it; returns its stderr+stdout."""
    root, samples = setup
    s = samples[0]
    Image.fromarray(s.rgb if rgb is None else rgb).save(tmp_path / "rgb.png")
    if sparse_npy is not None:
        sp = tmp_path / "scan.npy"
        np.save(sp, sparse_npy)
    else:
        sp = tmp_path / "scan.png"
        sp.write_bytes(sparse_png if sparse_png is not None else encode_depth_png(s.sparse))
    (tmp_path / "K.txt").write_text(" ".join(str(x) for x in np.ravel(s.K if K is None else K)))
    return invoke("complete", "--ckpt", root / "run", "--rgb", tmp_path / "rgb.png", "--sparse", sp,
                  "--K", tmp_path / "K.txt", "--out", tmp_path / "d.png", code=2)


def _uint16_png(codes: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(codes.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_exit_2_with_a_message_naming_the_file(setup, tmp_path):
    root, samples = setup
    s = samples[0]
    out = _one(setup, tmp_path, rgb=s.rgb[:64])
    assert "scan.png" in out and "same height and width" in out and "Traceback" not in out
    # metres written straight into a uint16 PNG (values 0..~8): looks like the wrong unit
    out = _one(setup, tmp_path, sparse_png=_uint16_png(np.rint(s.sparse)))
    assert "scan.png" in out and "metres x 256" in out
    # millimetres in a .npy
    out = _one(setup, tmp_path, sparse_npy=s.sparse * 1000)
    assert "scan.npy" in out and "millimetres" in out
    out = _one(setup, tmp_path, sparse_npy=np.zeros_like(s.sparse))
    assert "scan.npy" in out and "no points" in out
    out = _one(setup, tmp_path, sparse_png=_uint16_png(np.zeros(s.sparse.shape)))
    assert "scan.png" in out and "no points" in out
    K = s.K.copy()
    K[0, 2] = 500  # the principal point of another, larger image
    out = _one(setup, tmp_path, K=K)
    assert "K.txt" in out and "principal point" in out
    K = s.K.copy()
    K[1, 1] = -1
    out = _one(setup, tmp_path, K=K)
    assert "K.txt" in out and "focal" in out
    out = _one(setup, tmp_path, K=s.K[:2])
    assert "K.txt" in out and "9 numbers" in out
    assert not (tmp_path / "d.png").exists()


def test_python_call_checks_its_arrays(setup):
    root, samples = setup
    s = samples[0]
    complete = load_completer(root / "run")
    with pytest.raises(InputError, match="same height and width"):
        complete(s.rgb, s.sparse[:, :50], s.K)
    with pytest.raises(InputError, match="millimetres"):
        complete(s.rgb, s.sparse * 1000, s.K)
    with pytest.raises(InputError, match="no points"):
        complete(s.rgb, np.zeros_like(s.sparse), s.K)
    with pytest.raises(InputError, match="3 x 3"):
        complete(s.rgb, s.sparse, np.eye(4))
    with pytest.raises(ValueError, match="principal point"):  # InputError is a ValueError
        complete(s.rgb, s.sparse, np.array([[50, 0, -5], [0, 50, 30], [0, 0, 1.0]]))


def test_folders_need_a_scan_per_image(setup, tmp_path):
    root, samples = setup
    (tmp_path / "rgb").mkdir()
    (tmp_path / "sparse").mkdir()
    Image.fromarray(samples[0].rgb).save(tmp_path / "rgb" / "a.png")
    Image.fromarray(samples[0].rgb).save(tmp_path / "rgb" / "b.png")
    (tmp_path / "sparse" / "a.png").write_bytes(encode_depth_png(samples[0].sparse))
    (tmp_path / "K.txt").write_text(" ".join(str(x) for x in np.ravel(samples[0].K)))
    out = invoke("complete", "--ckpt", root / "run", "--rgb", tmp_path / "rgb", "--sparse", tmp_path / "sparse",
                 "--K", tmp_path / "K.txt", "--out", tmp_path / "out", code=2)
    assert "b.png or .npy" in out and "Traceback" not in out
