import numpy as np
import pytest

from shared.relative_depth import depth_cap_for, fit_scale_shift, mean_interval, relative_depth_errors


def test_an_affine_teacher_scores_perfectly():
    depth = np.array([[1.0, 2.0, 4.0], [8.0, 0.0, 20.0]])  # 0: sky, not scored
    teacher = np.where(depth > 0, 3.0 / np.where(depth > 0, depth, 1) + 0.7, 0.0)
    r = relative_depth_errors(teacher, depth, 80.0)
    assert r["absrel"] == pytest.approx(0.0, abs=1e-12) and r["delta1"] == 1.0 and r["pixels"] == 5
    assert r["scale"] == pytest.approx(1 / 3) and r["shift"] == pytest.approx(-0.7 / 3)


def test_hand_computed_case():
    """t = (0, 1, 2), true disparity (1, 1, 2): the least-squares line is 0.5 t + 5/6, so the aligned depths
    are (6/5, 3/4, 6/11) against (1, 1, 1/2): AbsRel = (0.2 + 0.25 + 1/11) / 3, delta1 = 2/3 (3/4 is off by
    4/3 > 1.25)."""
    depth = np.array([1.0, 1.0, 0.5])
    teacher = np.array([0.0, 1.0, 2.0])
    assert fit_scale_shift(teacher, depth, np.ones(3, bool)) == pytest.approx((0.5, 5 / 6))
    r = relative_depth_errors(teacher, depth, 80.0)
    assert r["absrel"] == pytest.approx((0.2 + 0.25 + 1 / 11) / 3)
    assert r["delta1"] == pytest.approx(2 / 3)


def test_the_cap_bounds_a_surface_called_sky():
    """A teacher that puts a surface at 0 (sky) gets its aligned disparity clamped at 1 / cap: depth <= cap."""
    depth = np.array([2.0, 4.0, 8.0, 10.0])
    teacher = np.array([0.5, 0.25, 0.125, 0.0])
    r10 = relative_depth_errors(teacher, depth, 10.0)
    r80 = relative_depth_errors(teacher, depth, 80.0)
    assert np.isfinite(r10["absrel"]) and r10["absrel"] < r80["absrel"]
    assert relative_depth_errors(teacher, np.array([2.0, 4.0, 90.0, 0.0]), 80.0)["pixels"] == 2  # beyond the cap
    assert relative_depth_errors(teacher, np.zeros(4), 80.0) is None
    with pytest.raises(ValueError, match="shape"):
        relative_depth_errors(teacher, depth[:3], 80.0)


def test_depth_cap_for():
    assert depth_cap_for(np.array([0.0, 3.0, 9.9])) == 10.0
    assert depth_cap_for(np.array([0.0, 3.0, 25.0])) == 80.0


def test_mean_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(0.07, 0.02, 200)
    mean, lo, hi = mean_interval(x)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-theory width, for normal data
    assert mean_interval(x) == mean_interval(x)  # seeded
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        mean_interval([])
