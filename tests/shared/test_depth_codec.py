"""Round trips of the member codecs: depth PNG, teacher disparity PNG, RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from shared import depth
from shared.depth import (
    MAX_DEPTH_M,
    CodecError,
    decode_depth_png,
    decode_disparity_png,
    decode_rgb,
    encode_depth_png,
    encode_disparity_png,
    encode_rgb,
    uint16_png_pil,
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


def uint16_maps():
    """16-bit maps of every kind the writer meets: dense (the Up filter) and mostly empty (no filter)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = (2000 + 40 * yy + 7 * xx).astype(np.uint16)  # a dense depth-like ramp
    noise = rng.integers(0, 65536, (37, 53), dtype=np.uint16)  # every byte value, high and low
    scan = np.where(rng.random((37, 53)) < 0.05, noise, 0).astype(np.uint16)  # a sparse LiDAR-like map
    return {"smooth": smooth, "noise": noise, "scan": scan, "zeros": np.zeros((4, 6), np.uint16),
            "full": np.full((3, 5), 65535, np.uint16), "pixel": np.array([[513]], np.uint16),
            "row": noise[:1], "column": noise[:, :1], "half": np.where(xx < 26, smooth, 0).astype(np.uint16)}


@pytest.mark.parametrize("name", list(uint16_maps()))
def test_direct_png_writer_decodes_like_the_pil_writer(name):
    # the shards' 16-bit PNGs are written without PIL now; any PNG reader must read the same values as
    # from the PIL-written PNGs of earlier shards (which the reader still gets)
    a = uint16_maps()[name]
    new, old = depth._uint16_png(a), uint16_png_pil(a)
    for data in (new, old):
        img = Image.open(io.BytesIO(data))
        assert img.size == (a.shape[1], a.shape[0])
        assert np.array_equal(np.asarray(img), a)
        assert np.array_equal(depth._read_uint16(data, name), a)


def test_direct_png_writer_picks_the_filter_by_density():
    # filter type bytes, read back from the inflated IDAT: Up (2) for dense maps, None (0) for sparse
    from isal import isal_zlib

    def filters(data):
        idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
        raw = np.frombuffer(isal_zlib.decompress(idat), np.uint8)
        h, w = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return set(raw.reshape(w, 2 * h + 1)[:, 0].tolist())

    maps = uint16_maps()
    assert filters(depth._uint16_png(maps["smooth"])) == {2}
    assert filters(depth._uint16_png(maps["scan"])) == {0}


def test_empty_map_is_refused():
    with pytest.raises(CodecError, match="empty"):
        encode_depth_png(np.zeros((0, 5), np.float32))


def test_depth_codes_do_not_depend_on_input_precision():
    rng = np.random.default_rng(4)
    d = rng.uniform(0, MAX_DEPTH_M, (30, 40)).astype(np.float32)
    d[rng.random(d.shape) < 0.3] = 0
    d[0, :3] = [1e-4, 1 / 512, 3 / 512]  # rounds to 0 (kept valid as code 1), halfway cases
    codes = np.asarray(Image.open(io.BytesIO(encode_depth_png(d))))
    assert np.array_equal(codes, np.asarray(Image.open(io.BytesIO(encode_depth_png(d.astype(np.float64))))))
    expect = np.rint(d.astype(np.float64) * 256)
    expect[(expect == 0) & (d > 0)] = 1
    assert np.array_equal(codes, expect.astype(np.uint16))
