"""The oracle teacher's error modes, each on a scene where what it must do is known exactly."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from datagen.disparity import disparity_to_depth
from datagen.teachers.oracle import (
    MODES,
    ORACLE_ERRORS,
    REFERENCE_SHORT_SIDE_PX,
    REFERENCES,
    TeacherErrors,
    footprint_width,
    oracle_teacher,
)
from datagen.world.scenes import FAMILIES, MAX_DEPTH_M, render_scene
from shared.relative_depth import relative_depth_errors

W, H = 96, 64
PX = min(W, H) / REFERENCE_SHORT_SIDE_PX  # the oracle's px knobs are at a 518 px shorter side
IDENTITY = {"scale_range": (1.0, 1.0), "shift_range": (0.0, 0.0)}  # no affine map: the output is the disparity


def errors(*modes, **knobs) -> TeacherErrors:
    """Only these modes, no affine map, knobs given in px of this image."""
    px_knobs = {k: v / PX for k, v in knobs.items() if k.endswith("_px")}
    other = {k: v for k, v in knobs.items() if not k.endswith("_px")}
    return replace(TeacherErrors(), **IDENTITY, **px_knobs, **other).only(*modes)


def teach(depth, err, rgb=None, ids=None, seed=0):
    return oracle_teacher(depth, np.random.default_rng(seed), rgb=rgb, object_id=ids, errors=err).astype(np.float64)


def gray(value=128, shape=(H, W)):
    return np.full((*shape, 3), value, np.uint8)


@pytest.fixture(scope="module")
def street():
    return render_scene(2, "street", W, H)


@pytest.fixture(scope="module")
def room():
    return render_scene(1, "room", W, H)


def test_no_error_mode_is_the_true_disparity_up_to_the_affine_map(street):
    sky = street.depth_m == 0
    true = np.where(sky, 0, 1 / np.where(sky, 1, street.depth_m.astype(np.float64)))
    t = teach(street.depth_m, errors(), street.rgb, street.object_id)
    np.testing.assert_allclose(t, true / true.max(), rtol=1e-6)
    with_affine = oracle_teacher(street.depth_m, np.random.default_rng(3), rgb=street.rgb, object_id=street.object_id,
                                 errors=TeacherErrors().only())
    r = relative_depth_errors(with_affine, street.depth_m, 80.0)
    assert r["absrel"] < 1e-5 and r["delta1"] == 1.0 and (with_affine[sky] == 0).all()


def test_bend_is_low_frequency_and_as_large_as_set(room):
    base = teach(room.depth_m, errors(), room.rgb, room.object_id)
    e = errors("bend", bend=0.3, strength=1.0)
    diff = teach(room.depth_m, e, room.rgb, room.object_id) - base
    d = base[room.depth_m > 0]
    spread = np.mean(np.abs(d - np.median(d)))
    np.testing.assert_allclose(np.abs(diff).max(), 0.3 * spread, rtol=1e-4)  # the field's peak is the knob
    # at most 1.5 cycles across the image: a 2 px Gaussian leaves it almost unchanged (noise would not survive)
    smooth = ndimage.gaussian_filter(diff, 2.0, mode="nearest")
    assert np.abs(diff - smooth)[4:-4, 4:-4].max() < 0.03 * np.abs(diff).max()


def test_object_errors_are_one_affine_map_per_object_and_spare_the_layout(street):
    base = teach(street.depth_m, errors(), street.rgb, street.object_id)
    e = errors("objects", object_scale=0.2, object_offset=0.1, strength=1.0)
    out = teach(street.depth_m, e, street.rgb, street.object_id)
    ids, counts = np.unique(street.object_id[street.object_id >= 0], return_counts=True)
    fitted = []
    for i, n in zip(ids, counts, strict=True):
        m = street.object_id == i
        if n > e.layout_fraction * street.object_id.size:
            np.testing.assert_allclose(out[m], base[m], rtol=1e-6)  # the road: the layout, left to the bends
        elif n > 1 and (out[m] > 0).all():  # (an object pushed beyond the sky is floored at 0)
            A = np.stack([base[m], np.ones(m.sum())], 1)
            coef, *_ = np.linalg.lstsq(A, out[m], rcond=None)
            np.testing.assert_allclose(A @ coef, out[m], atol=1e-6)  # one scale and offset within the object
            fitted.append(coef)
    fitted = np.array(fitted)
    assert len(fitted) >= 3 and fitted[:, 0].std() > 0.05 and fitted[:, 1].std() > 0  # that differ between objects


def pole_scene(pole_cols=(30, 33), sky_rows=10):
    """A wall 10 m away (id 0), sky above row sky_rows, a 4 m pole (id 1) in columns [a, b) through both, and
    a 12 px wide box (id 2) at 5 m that is not thin."""
    depth = np.full((H, W), 10.0, np.float32)
    ids = np.zeros((H, W), np.int32)
    depth[:sky_rows], ids[:sky_rows] = 0.0, -1
    a, b = pole_cols
    depth[:, a:b], ids[:, a:b] = 4.0, 1
    depth[30:50, 60:72], ids[30:50, 60:72] = 5.0, 2
    return depth, ids


def test_footprint_width_measures_thinness():
    depth, ids = pole_scene(pole_cols=(30, 33))
    w = footprint_width(ids)
    assert w[1] == 3.0 and w[2] >= 11.0 and w[0] > 20
    assert footprint_width(pole_scene(pole_cols=(30, 31))[1])[1] == 1.0


def test_thin_structures_lost_into_what_is_behind():
    depth, ids = pole_scene()
    base = teach(depth, errors(), gray(), ids)
    lost = teach(depth, errors("thin", thin_width_px=4, thin_lost=1.0, thin_fat=0.0), gray(), ids)
    np.testing.assert_array_equal(lost[:10, 30:33], 0.0)      # against the sky it becomes sky
    np.testing.assert_allclose(lost[10:, 30:33], base[20, 10])  # against the wall it becomes wall
    keep = ids != 1
    np.testing.assert_array_equal(lost[keep], base[keep])      # the rest, the 12 px box too, is kept
    kept = teach(depth, errors("thin", thin_width_px=2, thin_lost=1.0, thin_fat=0.0), gray(), ids)
    np.testing.assert_array_equal(kept, teach(depth, errors(), gray(), ids))  # a 3 px pole is not thinner than 2 px


def test_thin_structures_fattened_over_what_is_behind():
    depth, ids = pole_scene()
    base = teach(depth, errors(), gray(), ids)
    fat = teach(depth, errors("thin", thin_width_px=4, thin_lost=0.0, thin_fat=1.0, fat_px=3), gray(), ids)
    pole = base[20, 31]
    np.testing.assert_allclose(fat[10:, 27:36], pole)          # 3 px more on each side, over the wall
    np.testing.assert_allclose(fat[10:, :27], base[10:, :27])  # and no further
    np.testing.assert_allclose(fat[10:, 36:60], base[10:, 36:60])
    np.testing.assert_array_equal(fat[:10, :30], 0.0)          # not into the sky (that is the halo's job)


def test_texture_leaks_follow_image_edges_and_vanish_without_texture():
    depth = np.full((H, W), 6.0, np.float32)
    depth[:, 40:] = 3.0  # a depth edge that the image does not show
    ids = np.zeros((H, W), np.int32)
    ids[:, 40:] = 1
    checker = ((np.arange(H)[:, None] // 16 + np.arange(W)[None] // 16) % 2).astype(np.uint8)
    rgb = np.repeat((60 + 140 * checker)[..., None], 3, -1).astype(np.uint8)
    e = errors("texture", texture=0.05, texture_px=2)
    base = teach(depth, errors(), rgb, ids)
    leak = teach(depth, e, rgb, ids) / base - 1
    edge = np.zeros((H, W), bool)  # within 4 px of a checker edge
    edge[:, [c + d for c in (16, 32, 48, 64, 80) for d in range(-4, 4)]] = True
    edge[[r + d for r in (16, 32, 48) for d in range(-4, 4)], :] = True
    assert np.abs(leak[edge]).max() > 0.01                    # the checker's edges show up in the disparity
    assert np.abs(leak[~edge]).max() < 0.05 * np.abs(leak[edge]).max()
    assert ((leak > 0) == (checker == 1))[edge & (np.abs(leak) > 1e-3)].mean() > 0.95  # bright comes nearer
    flat = teach(depth, e, gray(), ids)
    np.testing.assert_allclose(flat, base, rtol=1e-12)        # a textureless scene: no leak, not at the depth edge


def test_edge_aware_blur_smooths_only_the_depth_edges_the_image_hides():
    depth = np.full((H, W), 2.0, np.float32)
    depth[:, 48:] = 4.0
    ids = np.zeros((H, W), np.int32)
    ids[:, 48:] = 1
    e = errors("edge_blur", edge_blur_px=2.0)
    hidden = teach(depth, e, gray(), ids)
    near, far = 1.0, 0.5  # the normalised disparity of both sides
    assert near - 0.05 > hidden[30, 47] > hidden[30, 48] > far + 0.05  # a ramp across the edge
    np.testing.assert_allclose(hidden[:, :40], near, rtol=1e-9)        # flat far from it
    rgb = gray(40)
    rgb[:, 48:] = 220
    shown = teach(depth, e, rgb, ids)
    np.testing.assert_allclose(shown[:, :48], near, rtol=1e-4)          # the image's edge keeps the depth edge
    np.testing.assert_allclose(shown[:, 48:], far, rtol=1e-4)


def test_sky_halo_only_near_surfaces(street):
    depth, rgb, ids = street.depth_m, street.rgb, street.object_id
    k = 3.0
    out = teach(depth, errors("sky_halo", halo=0.5, halo_px=k), rgb, ids)
    base = teach(depth, errors(), rgb, ids)
    sky = depth == 0
    dist, (iv, iu) = ndimage.distance_transform_edt(sky, return_indices=True)
    np.testing.assert_array_equal(out[~sky], base[~sky])          # surfaces untouched
    assert (out[sky & (dist > k)] == 0).all()                     # far sky stays exactly 0
    assert (out[sky & (dist <= k)] > 0).all()
    touching = sky & (dist == 1)
    np.testing.assert_allclose(out[touching], 0.5 * base[iv[touching], iu[touching]], rtol=1e-6)
    assert (out[sky] <= 0.5 * base.max() + 1e-9).all()


def test_same_seed_same_bytes(street):
    kw = {"rgb": street.rgb, "object_id": street.object_id, "family": "street"}
    a = oracle_teacher(street.depth_m, np.random.default_rng(7), **kw)
    b = oracle_teacher(street.depth_m, np.random.default_rng(7), **kw)
    c = oracle_teacher(street.depth_m, np.random.default_rng(8), **kw)
    assert a.dtype == np.float32 and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_modes_draw_from_their_own_streams(room):
    """Turning one mode off leaves the others' draws as they were: objects then bend is the sum of the two
    alone (d k + c + a f), which needs the bend to draw the same field with or without the objects."""
    def alone(*modes):
        return teach(room.depth_m, errors(*modes, strength=1.0), room.rgb, room.object_id, seed=7)

    base, both = alone(), alone("objects", "bend")
    assert np.abs(alone("bend") - base).max() > 1e-3 and np.abs(alone("objects") - base).max() > 1e-3
    np.testing.assert_allclose(both - alone("objects"), alone("bend") - base, atol=1e-6)
    no_ids = teach(room.depth_m, errors("bend", strength=1.0), room.rgb, None, seed=7)  # no objects to draw for
    np.testing.assert_array_equal(no_ids, alone("bend"))


def test_defaults_cover_every_family_and_the_output_contract(street):
    assert set(ORACLE_ERRORS) == set(REFERENCES) == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown error modes"):
        TeacherErrors().only("blur")
    assert set(MODES) == {"objects", "bend", "thin", "texture", "edge_blur", "sky_halo"}
    sky = street.depth_m == 0
    t = oracle_teacher(street.depth_m, np.random.default_rng(1), rgb=street.rgb, object_id=street.object_id,
                       family="street")
    assert t.dtype == np.float32 and (t >= 0).all() and np.isfinite(t).all()
    dist = ndimage.distance_transform_edt(sky)
    assert (t[sky & (dist > ORACLE_ERRORS["street"].halo_px * PX)] == 0).all()  # sky is 0 beyond the halo
    r = relative_depth_errors(t, street.depth_m, MAX_DEPTH_M["street"])
    assert 0.01 < r["absrel"] < 0.3 and r["delta1"] > 0.7  # a teacher, not the truth, not noise
    with pytest.raises(ValueError, match="family"):
        oracle_teacher(street.depth_m, np.random.default_rng(1), family="forest")
    with pytest.raises(ValueError, match="object_id"):
        oracle_teacher(street.depth_m, np.random.default_rng(1), object_id=street.object_id[:, :-1])


def test_depth_only_still_works_and_keeps_the_sky(street):
    """Without rgb and ids (e.g. a pipeline warm-up): no texture, object or thin errors; the sky stays the sky."""
    sky = street.depth_m == 0
    t = oracle_teacher(street.depth_m, np.random.default_rng(2), errors=ORACLE_ERRORS["street"].without("sky_halo"))
    assert (t[sky] == 0).all() and (t[~sky] > 0).all()
    depth, info = disparity_to_depth(t, np.random.default_rng(3), scene="outdoor")
    np.testing.assert_array_equal(depth == 0, sky)


def test_oracle_teacher_class_passes_the_scene_through(street):
    from datagen.teachers.runner import OracleTeacher

    kw = {"rgb": street.rgb, "object_id": street.object_id, "family": "street"}
    a = OracleTeacher().predict_from_depth(street.depth_m, np.random.default_rng(4), **kw)
    b = oracle_teacher(street.depth_m, np.random.default_rng(4), **kw)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != oracle_teacher(street.depth_m, np.random.default_rng(4)).tobytes()  # the scene matters


def test_calibration_fit_recovers_a_known_strength():
    """bench/teacher_calibration.py --fit: bisect the strength to a target AbsRel. Aimed at the AbsRel that
    strength 1.5 gives on the same scenes, it must find 1.5."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "teacher_calibration.py"
    spec = importlib.util.spec_from_file_location("teacher_calibration", path)
    calib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calib)
    scenes = [render_scene(s, "street", W, H) for s in range(3)]
    target = calib.mean_absrel(scenes, replace(ORACLE_ERRORS["street"], strength=1.5))
    strength, reached = calib.fit_strength("street", scenes, target)
    assert strength == pytest.approx(1.5, abs=0.01) and reached == pytest.approx(target, rel=1e-3)
