"""Losses: exact zeros, invariances, equality with plain numpy references, gradients, degenerate cases."""

import numpy as np
import pytest
import torch

from trainer import losses
from trainer.losses import (
    MULTISCALE_WEIGHTS,
    DistillLossConfig,
    align_teacher,
    distill_loss,
    gradient_matching_loss,
    masked_l1,
    masked_l2,
    multiscale_loss,
    pretrain_loss,
    reg_loss,
    ssi_loss,
)

B, H, W = 3, 12, 17


def _rand(seed, shape=(B, 1, H, W), lo=0.0, hi=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g)).to(dtype)


def _mask(seed, p=0.7, shape=(B, 1, H, W)):
    return _rand(seed, shape) < p


# ----------------------------------------------------------------------------- numpy references

def np_ssi(pred_depth, teacher, mask, space, min_pixels, min_depth_m=0.1, penalty=None, max_depth_m=120.0):
    """Per image: lstsq of [t, 1] -> p (p in the fitting space) with s >= 0, then the mean absolute error
    in the penalty's units: |p - (s t + b)| (penalty = space), or |d - 1 / (s t + b)| in metres over
    the pixels where that depth lies in [min_depth_m, max_depth_m] (space disparity, penalty depth);
    mean over the images with >= min_pixels such pixels."""
    penalty = penalty or space
    losses = []
    for i in range(pred_depth.shape[0]):
        m = mask[i, 0]
        d = pred_depth[i, 0][m].astype(np.float64)
        p = 1.0 / np.maximum(d, min_depth_m) if space == "disparity" else d
        t = teacher[i, 0][m].astype(np.float64)
        if len(t) == 0:
            continue
        (s, b), *_ = np.linalg.lstsq(np.stack([t, np.ones_like(t)], 1), p, rcond=None)
        if s < 0:
            s, b = 0.0, p.mean()
        fitted = s * t + b
        if penalty == space == "depth":
            ok = (fitted >= min_depth_m) & (fitted <= max_depth_m)
            err = np.abs(d - fitted)[ok]
        elif penalty == "depth":
            with np.errstate(divide="ignore"):
                target = np.where(fitted > 0, 1.0 / np.where(fitted > 0, fitted, 1), 0)
            ok = (fitted > 0) & (target >= min_depth_m) & (target <= max_depth_m)
            err = np.abs(d - target)[ok]
        else:
            err = np.abs(p - fitted)
        if len(err) >= min_pixels:
            losses.append(err.mean())
    return float(np.mean(losses)) if losses else 0.0


def np_grad_match(residual, mask, scales, min_pixels):
    """Literal loops over pixel pairs, per image and scale."""
    out = []
    for i in range(residual.shape[0]):
        if mask[i, 0].sum() < min_pixels:
            continue
        per_scale = []
        for k in range(scales):
            r, m = residual[i, 0][:: 2**k, :: 2**k], mask[i, 0][:: 2**k, :: 2**k]
            total = 0.0
            for y in range(r.shape[0]):
                for x in range(r.shape[1]):
                    if x + 1 < r.shape[1] and m[y, x] and m[y, x + 1]:
                        total += abs(r[y, x + 1] - r[y, x])
                    if y + 1 < r.shape[0] and m[y, x] and m[y + 1, x]:
                        total += abs(r[y + 1, x] - r[y, x])
            per_scale.append(total / m.sum() if m.sum() else 0.0)
        out.append(np.sum(per_scale))  # the paper's sum over scales k = 1..4 (as MiDaS's GradientLoss)
    return float(np.mean(out)) if out else 0.0


# ----------------------------------------------------------------------------- L_sup

def test_weights_are_bpnet():
    assert MULTISCALE_WEIGHTS == (2**-10, 2**-8, 2**-6, 2**-4, 2**-2, 1.0)


def test_multiscale_matches_numpy_all_kinds():
    preds = [_rand(10 + i, lo=1, hi=10) for i in range(6)]
    gt = torch.where(_mask(3, 0.3), _rand(4, lo=1, hi=10), torch.zeros(()))
    mask = gt > 0
    g, m = gt.numpy(), mask.numpy()
    for kind in ("l1", "l2", "l2_bpnet"):
        ref = 0.0
        for w, p in zip(MULTISCALE_WEIGHTS, preds, strict=True):
            e = p.numpy() - g
            if kind == "l1":
                ref += w * np.abs(e)[m].mean()
            elif kind == "l2":
                ref += w * (e**2)[m].mean()
            else:  # BP-Net's MSMSE: masked squared error averaged over ALL pixels
                ref += w * ((p.numpy() * m - g * m) ** 2).mean()
        assert multiscale_loss(preds, gt, mask, kind=kind).item() == pytest.approx(ref, rel=1e-12)
    assert pretrain_loss(preds, gt).item() == pytest.approx(multiscale_loss(preds, gt, mask).item())


def test_masked_losses_without_valid_pixels_are_zero_with_gradient():
    pred = _rand(1).requires_grad_()
    target = torch.full_like(pred, float("nan"))  # invalid pixels may hold anything
    mask = torch.zeros_like(pred, dtype=torch.bool)
    for fn in (masked_l1, masked_l2):
        loss = fn(pred, target, mask)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()
        pred.grad = None


# ----------------------------------------------------------------------------- L_SSI

# (space, penalty) pairs: fit in disparity and penalise in metres (the default), the earlier penalty in
# disparity, and a depth-like teacher fitted and penalised in depth
SETTINGS = [("disparity", "depth"), ("disparity", "disparity"), ("depth", "depth")]


@pytest.mark.parametrize("space,penalty", SETTINGS)
@pytest.mark.parametrize("fit", ["lsq", "l1"])
@pytest.mark.parametrize("s,b", [(0.3, 0.05), (2.0, -0.1), (7.5, 1.3)])
def test_ssi_zero_for_affine_teacher(space, penalty, fit, s, b):
    teacher = _rand(0, lo=0.1, hi=1.0, dtype=torch.float32)
    mask = _mask(1)
    p = s * teacher + b  # the prediction in the fitting space
    pred_depth = 1.0 / p if space == "disparity" else p
    cfg = DistillLossConfig(space=space, penalty=penalty, fit=fit)
    assert abs(ssi_loss(pred_depth, teacher, mask, cfg).item()) < 1e-5
    fit_ = align_teacher(pred_depth, teacher, mask, cfg)
    assert torch.allclose(fit_.scale, torch.full((B,), s), rtol=1e-4)
    assert torch.allclose(fit_.shift, torch.full((B,), b), atol=1e-4)


@pytest.mark.parametrize("space,penalty", SETTINGS)
def test_ssi_invariant_to_teacher_scale_and_shift(space, penalty):
    teacher = _rand(0, lo=0.1, hi=1.0)
    pred_depth = 1.0 / (0.5 * teacher + 0.2 + 0.05 * _rand(5))  # correlated, not affine
    mask = _mask(1)
    base = ssi_loss(pred_depth, teacher, mask, space=space, penalty=penalty).item()
    assert base > 1e-4
    for a, c in [(3.0, -0.7), (0.01, 40.0), (250.0, 0.0)]:
        got = ssi_loss(pred_depth, a * teacher + c, mask, space=space, penalty=penalty).item()
        assert got == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("space,penalty", SETTINGS)
def test_ssi_matches_numpy(space, penalty):
    teacher = _rand(0, (4, 1, H, W), lo=0.0, hi=2.0)
    noise = _rand(2, (4, 1, H, W))
    pred_depth = 1.0 / (0.4 * teacher + 0.1 + 0.3 * noise)
    pred_depth[2] = 1.0 / (2.5 - teacher[2] + 0.3 * noise[2])  # anti-correlated: fit clamps s to 0
    pred_depth[0, 0, 0, :5] = -1.0  # non-positive prediction: clamped to min_depth_m
    mask = _mask(3, shape=(4, 1, H, W))
    mask[3] = False
    mask[3, 0, 0, :10] = True  # 10 valid pixels < min_pixels: skipped
    args = (pred_depth.numpy(), teacher.numpy(), mask.numpy(), space)
    for max_depth_m in (120.0, 3.0):  # 3 m: part of the aligned teacher is out of range and left out
        cfg = DistillLossConfig(space=space, penalty=penalty, min_pixels=32, max_depth_m=max_depth_m)
        ref = np_ssi(*args, min_pixels=32, penalty=penalty, max_depth_m=max_depth_m)
        assert ssi_loss(pred_depth, teacher, mask, cfg).item() == pytest.approx(ref, rel=1e-9)
    got = ssi_loss(pred_depth, teacher, mask, space=space, penalty=penalty, min_pixels=32).item()
    assert got != pytest.approx(np_ssi(*args, min_pixels=1, penalty=penalty), rel=1e-3)
    s = align_teacher(pred_depth, teacher, mask, space=space, penalty=penalty).scale
    assert (s == 0).any() and (s > 0).any()  # both the free fit and the s >= 0 clamp are exercised


def test_ssi_gradient_reaches_prediction_only():
    teacher = _rand(0, lo=0.1, hi=1.0, dtype=torch.float32).requires_grad_()
    pred_depth = (1.0 / (0.5 * teacher.detach() + 0.1 + 0.2 * _rand(2, dtype=torch.float32))).requires_grad_()
    loss = ssi_loss(pred_depth, teacher, _mask(1))
    loss.backward()
    assert teacher.grad is None or not teacher.grad.any()
    assert torch.isfinite(pred_depth.grad).all() and pred_depth.grad.abs().sum() > 0


def test_ssi_degenerate_cases_are_finite():
    pred_depth = _rand(0, lo=1, hi=20).requires_grad_()
    teacher = _rand(1, lo=0.1, hi=1.0)
    # no valid pixel at all: 0, with a (zero) gradient
    loss = ssi_loss(pred_depth, teacher, torch.zeros_like(teacher, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred_depth.grad).all()
    # constant teacher: s = 0, b = mean(p), so the loss is the mean absolute deviation of p
    mask = _mask(2)
    const = torch.full_like(teacher, 0.37)
    for penalty in ("depth", "disparity"):
        loss = ssi_loss(pred_depth, const, mask, penalty=penalty)
        s = align_teacher(pred_depth, const, mask, penalty=penalty).scale
        assert torch.isfinite(loss) and (s == 0).all()
        ref = np_ssi(pred_depth.detach().numpy(), const.numpy(), mask.numpy(), "disparity", 32, penalty=penalty)
        assert loss.item() == pytest.approx(ref, rel=1e-9)
    # zero and negative predictions
    bad = torch.zeros_like(pred_depth)
    bad[0] = -3.0
    assert torch.isfinite(ssi_loss(bad, teacher, mask))


# ----------------------------------------------------------------------------- L_reg

def test_reg_zero_for_constant_residual():
    aligned = _rand(0, lo=0.0, hi=5.0, dtype=torch.float32)
    mask = _mask(1)
    assert gradient_matching_loss(aligned + 0.3, aligned, mask).item() < 1e-6
    assert gradient_matching_loss(aligned + 0.3 + 0.1 * _rand(4, dtype=torch.float32), aligned, mask).item() > 1e-3


def test_reg_matches_numpy_loops():
    shape = (3, 1, 19, 23)  # odd sizes: the subsampled grids are ragged
    pred, aligned = _rand(0, shape), _rand(1, shape)
    mask = _mask(2, 0.8, shape)
    mask[1] = False
    mask[1, 0, :2, :5] = True  # 10 valid pixels: skipped at min_pixels = 16
    got = gradient_matching_loss(pred, aligned, mask, scales=4, min_pixels=16).item()
    ref = np_grad_match((pred - aligned).numpy(), mask.numpy(), 4, 16)
    assert got == pytest.approx(ref, rel=1e-12)


def test_reg_gradient_reaches_prediction_only():
    aligned = _rand(0).requires_grad_()
    pred = _rand(1).requires_grad_()
    gradient_matching_loss(pred, aligned, _mask(2)).backward()
    assert aligned.grad is None or not aligned.grad.any()
    assert pred.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- total

def _scene(seed=0, b=2, h=32, w=40):
    """A smooth depth scene with an edge, sparse GT and an affine disparity teacher."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    depth = (5.0 + 10.0 * yy + 8.0 * (xx > 0.5)).expand(b, 1, h, w).clone()
    gt = torch.where(torch.rand(depth.shape, generator=g) < 0.2, depth, torch.zeros(()))
    teacher = 3.0 / depth + 0.05
    return depth, {"gt": gt, "teacher": teacher, "teacher_depth": 2.0 * depth + 1.0}


def test_distill_loss_components():
    depth, batch = _scene()
    preds = [depth.clone() for _ in range(6)]
    total, parts = distill_loss(preds, batch)
    assert set(parts) == {"sup", "ssi", "reg", "total"}
    assert parts["sup"] == 0 and parts["ssi"] < 1e-5 and parts["reg"] < 1e-4  # the truth is optimal (float32, m)
    preds = [depth + 1.0 for _ in range(6)]
    cfg = DistillLossConfig(lambda_ssi=2.0, lambda_reg=3.0)
    total, parts = distill_loss(preds, batch, cfg)
    assert parts["sup"] == pytest.approx(sum(MULTISCALE_WEIGHTS), rel=1e-6)
    assert parts["ssi"] > 0 and parts["reg"] > 0
    assert total.item() == pytest.approx(parts["sup"] + 2.0 * parts["ssi"] + 3.0 * parts["reg"], rel=1e-6)
    _, parts_d = distill_loss(preds, batch, DistillLossConfig(space="depth"))
    assert parts_d["ssi"] < 1e-4  # depth + 1 is affine in the depth-like teacher
    with pytest.raises(KeyError, match="teacher_depth"):
        distill_loss(preds, {"gt": batch["gt"], "teacher": batch["teacher"]}, DistillLossConfig(space="depth"))


def test_distill_loss_goes_down():
    depth, batch = _scene(seed=1)
    torch.manual_seed(0)
    log_d = [torch.full_like(depth, float(np.log(8.0))).add_(0.1 * torch.randn_like(depth)).requires_grad_()
             for _ in range(6)]
    opt = torch.optim.Adam(log_d, lr=0.05)
    history = []
    for _ in range(80):
        total, parts = distill_loss([x.exp() for x in log_d], batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(parts)
    assert history[-1]["total"] < 0.1 * history[0]["total"]
    assert history[-1]["ssi"] < 0.2 * history[0]["ssi"]
    assert all(np.isfinite(h["total"]) for h in history)


# ----------------------------------------------------------------------------- strength, one implementation, L1 fit

def _street_batch(seed=0, b=4, h=48, w=96):
    """A street-like labelled batch: depth 5-60 m, LiDAR-like labels on 30% of the pixels below the top
    40% of rows (none above, as KITTI's GT), and an affine disparity teacher."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    depth = (60.0 / (1 + 11 * yy) + 4.0 * (xx > 0.6)).expand(b, 1, h, w).clone()
    labelled_rows = (yy > 0.4).expand_as(depth)
    gt = torch.where((torch.rand(depth.shape, generator=g) < 0.3) & labelled_rows, depth, torch.zeros(()))
    pred = depth * (1 + 0.1 * torch.randn(depth.shape, generator=g))
    return pred, {"gt": gt, "teacher": 2.0 / depth + 0.03}, ~labelled_rows


def test_distillation_pulls_the_prediction_as_hard_as_the_labels():
    """Each term's gradient on the final output, sum over pixels of |d term / d prediction|: with the
    penalty in metres the teacher pulls with the strength of L_sup overall, and alone (as it must) in the
    rows without labels; the earlier penalty in disparity pulled ~100x less there."""
    pred, batch, unlabelled_rows = _street_batch()
    preds = [(pred * (1 + 0.01 * k)).requires_grad_() for k in (5, 4, 3, 2, 1, 0)]  # six outputs, as the network's
    _, new = distill_loss(preds, batch, pulls=True)
    _, old = distill_loss(preds, batch, DistillLossConfig(penalty="disparity"), pulls=True)
    assert new["pull_sup"] == pytest.approx(1.0, rel=1e-6)  # an L1 in metres pulls with a total of 1
    assert new["pull_ssi"] == pytest.approx(1.0, rel=1e-6)  # lambda_ssi = 1, every image kept
    assert new["pull_sup_unlabelled"] == 0.0
    teacher_unlabelled = new["pull_ssi_unlabelled"] + new["pull_reg_unlabelled"]
    assert teacher_unlabelled > 0.5 * new["pull_sup"]
    assert new["share_ssi"] + new["share_reg"] > 0.4
    assert new["share_sup"] + new["share_ssi"] + new["share_reg"] == pytest.approx(1.0)
    old_unlabelled = old["pull_ssi_unlabelled"] + old["pull_reg_unlabelled"]
    assert old_unlabelled < 0.05 * old["pull_sup"] and teacher_unlabelled > 20 * old_unlabelled
    # the terms' gradients add up to the total's (so no pull is missed), and only L_sup acts on coarser outputs
    total, _ = distill_loss(preds, batch)
    g = torch.autograd.grad(total, preds)
    assert g[-1].abs().sum().item() <= new["pull_sup"] + new["pull_ssi"] + new["pull_reg"] + 1e-5
    assert g[-1].abs().sum().item() > 0.5 * (new["pull_sup"] + new["pull_ssi"])
    unl = unlabelled_rows.expand_as(pred)
    assert 0 < g[-1][unl].abs().sum().item() <= teacher_unlabelled + 1e-5
    assert g[0][unl].abs().sum().item() == 0.0


def test_distill_loss_runs_the_tested_terms(monkeypatch):
    """Training's loss calls ssi_loss and reg_loss (the functions these tests check), not a copy."""
    pred, batch, _ = _street_batch(b=2)
    calls = []
    for name in ("ssi_loss", "reg_loss", "gradient_matching_loss"):
        fn = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    _, parts = distill_loss([pred] * 6, batch)
    assert sorted(calls) == ["gradient_matching_loss", "reg_loss", "ssi_loss"]
    cfg = DistillLossConfig()
    mask = batch["teacher"] > 0
    assert parts["ssi"] == pytest.approx(ssi_loss(pred, batch["teacher"], mask, cfg).item(), rel=1e-6)
    assert parts["reg"] == pytest.approx(reg_loss(pred, batch["teacher"], mask, cfg).item(), rel=1e-6)


def test_reg_in_metres_matches_numpy_loops_on_the_aligned_teacher():
    pred, batch, _ = _street_batch(b=2, h=19, w=23)
    mask = batch["teacher"] > 0
    fit = align_teacher(pred, batch["teacher"], mask)
    ref = np_grad_match((pred - fit.target).numpy(), fit.valid.numpy(), 4, 32)
    assert reg_loss(pred, batch["teacher"], mask).item() == pytest.approx(ref, rel=1e-5)
    assert ref > 0.1  # metres: the 10% noise of the prediction, not 1/m


def _l1_objective(p, t, s, b):
    return np.abs(s * t + b - p).sum()


def test_l1_fit_reaches_the_l1_optimum_and_ignores_outliers():
    from scipy.optimize import linprog

    rng = np.random.default_rng(0)
    n = 400
    t = rng.uniform(0.1, 1.0, (3, 1, 1, n))
    p = 0.8 * t + 0.05 + rng.normal(0, 0.002, t.shape)
    p[0, ..., :60] += rng.uniform(0.2, 1.0, 60)  # 15% gross outliers (a wrong object in the teacher)
    p[2] = 0.9 - 0.5 * t[2] + rng.normal(0, 0.01, n)  # anti-correlated: s clamps to 0, b = median
    pred_depth = torch.tensor(1.0 / p)
    mask = torch.ones_like(pred_depth, dtype=torch.bool)
    l1 = align_teacher(pred_depth, torch.tensor(t), mask, fit="l1", penalty="disparity")
    lsq = align_teacher(pred_depth, torch.tensor(t), mask, fit="lsq", penalty="disparity")
    for i in range(3):  # the LP form of min_{s >= 0, b} sum |s t + b - p|: variables s, b, e_1..e_n
        A = np.block([[t[i].reshape(n, 1), np.ones((n, 1)), -np.eye(n)],
                      [-t[i].reshape(n, 1), -np.ones((n, 1)), -np.eye(n)]])
        rhs = np.concatenate([p[i].ravel(), -p[i].ravel()])
        lp = linprog(np.r_[0, 0, np.ones(n)], A_ub=A, b_ub=rhs, bounds=[(0, None), (None, None)] + [(0, None)] * n)
        best = lp.fun
        got = _l1_objective(p[i].ravel(), t[i].ravel(), l1.scale[i].item(), l1.shift[i].item())
        assert got <= best * (1 + 1e-4) + 1e-9, (i, got, best)
    assert l1.scale[0].item() == pytest.approx(0.8, rel=0.01) and l1.shift[0].item() == pytest.approx(0.05, abs=0.005)
    assert abs(lsq.shift[0].item() - 0.05) > 0.03  # least squares is dragged by the outliers
    lo, hi = np.sort(p[2].ravel())[n // 2 - 1: n // 2 + 1]  # any b between the middle two is L1-optimal
    assert l1.scale[2].item() == 0 and lo - 1e-12 <= l1.shift[2].item() <= hi + 1e-12


def test_loss_settings_are_checked():
    with pytest.raises(ValueError, match="penalty"):
        DistillLossConfig(penalty="metres")
    with pytest.raises(ValueError, match="space='disparity'"):
        DistillLossConfig(space="depth", penalty="disparity")
    with pytest.raises(ValueError, match="fit"):
        DistillLossConfig(fit="median")
