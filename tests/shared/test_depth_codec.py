"""Round trips of the member codecs: depth PNG, teacher disparity PNG, RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from shared.depth import (
    MAX_DEPTH_M,
    CodecError,
    decode_depth_png,
    decode_disparity_png,
    decode_rgb,
    encode_depth_png,
    encode_disparity_png,
    encode_rgb,
)


def test_depth_round_trip_within_half_a_step_over_full_range():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.01, MAX_DEPTH_M, size=(64, 80)).astype(np.float32)
    d[rng.random(d.shape) < 0.3] = 0
    back = decode_depth_png(encode_depth_png(d))
    assert back.dtype == np.float32 and back.shape == d.shape
    assert np.max(np.abs(back - d)) <= 0.5 / 256 + 1e-6  # round(m * 256): half a step at most
    assert np.array_equal(back == 0, d == 0)  # zeros stay zeros, valid stays valid


def test_depth_png_is_kitti_uint16():
    d = np.array([[0.0, 1.0], [10.5, 255.0]], dtype=np.float32)
    img = Image.open(io.BytesIO(encode_depth_png(d)))
    raw = np.asarray(img)
    assert raw.dtype == np.uint16
    assert raw.tolist() == [[0, 256], [2688, 65280]]


def test_tiny_positive_depth_is_not_turned_into_no_value():
    back = decode_depth_png(encode_depth_png(np.array([[0.0, 0.0001]])))
    assert back[0, 0] == 0 and back[0, 1] == pytest.approx(1 / 256)


@pytest.mark.parametrize("bad", [-0.1, 256.5, np.nan, np.inf])
def test_depth_out_of_range_raises(bad):
    d = np.ones((4, 4), dtype=np.float32)
    d[1, 2] = bad
    with pytest.raises(CodecError):
        encode_depth_png(d)


def test_depth_decode_rejects_non_png_and_8bit():
    with pytest.raises(CodecError, match="not a PNG"):
        decode_depth_png(b"\xff\xd8\xff\xe0 this is a jpeg")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    with pytest.raises(CodecError, match="16-bit"):
        decode_depth_png(buf.getvalue())


def test_teacher_keeps_16_bit_precision():
    rng = np.random.default_rng(1)
    disp = rng.uniform(0.3, 7.0, size=(50, 70))
    disp[:10] = 0  # sky
    data, scaling = encode_disparity_png(disp)
    back = decode_disparity_png(data, scaling)
    step = (disp[disp > 0].max() - disp[disp > 0].min()) / 65534
    assert np.max(np.abs(back - disp)) <= 0.5 * step * (1 + 1e-6) + 1e-6
    assert np.all(back[:10] == 0) and np.all(back[10:] > 0)
    # 16 bits: far finer than an 8-bit map could be
    assert step < (disp.max() - disp.min()) / 255 / 200


def test_teacher_constant_and_empty_maps():
    data, scaling = encode_disparity_png(np.full((3, 3), 2.5))
    assert np.allclose(decode_disparity_png(data, scaling), 2.5)
    data, scaling = encode_disparity_png(np.zeros((3, 3)))
    assert np.all(decode_disparity_png(data, scaling) == 0)
    with pytest.raises(CodecError, match="teacher_scaling"):
        decode_disparity_png(data, None)


def test_rgb_png_is_lossless_and_jpeg_is_close():
    rng = np.random.default_rng(2)
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (40, 60, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(decode_rgb(encode_rgb(smooth, "png")), smooth)
    jpg = decode_rgb(encode_rgb(smooth, "jpg"))
    assert jpg.shape == smooth.shape and np.mean(np.abs(jpg.astype(int) - smooth)) < 3
    with pytest.raises(CodecError):
        encode_rgb(smooth[..., 0])
