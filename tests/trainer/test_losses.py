"""Losses: exact zeros, invariances, equality with plain numpy references, gradients, degenerate cases."""

import numpy as np
import pytest
import torch

from trainer.losses import (
    MULTISCALE_WEIGHTS,
    DistillLossConfig,
    align_scale_shift,
    distill_loss,
    gradient_matching_loss,
    masked_l1,
    masked_l2,
    multiscale_loss,
    pretrain_loss,
    ssi_loss,
)

B, H, W = 3, 12, 17


def _rand(seed, shape=(B, 1, H, W), lo=0.0, hi=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g)).to(dtype)


def _mask(seed, p=0.7, shape=(B, 1, H, W)):
    return _rand(seed, shape) < p


# ----------------------------------------------------------------------------- numpy references

def np_ssi(pred_depth, teacher, mask, space, min_pixels, min_depth_m=0.1):
    """Per image: lstsq of [t, 1] -> p with s >= 0, then mean |p - (s t + b)|; mean over kept images."""
    losses = []
    for i in range(pred_depth.shape[0]):
        m = mask[i, 0]
        if m.sum() < min_pixels:
            continue
        d = pred_depth[i, 0][m].astype(np.float64)
        p = 1.0 / np.maximum(d, min_depth_m) if space == "disparity" else d
        t = teacher[i, 0][m].astype(np.float64)
        (s, b), *_ = np.linalg.lstsq(np.stack([t, np.ones_like(t)], 1), p, rcond=None)
        if s < 0:
            s, b = 0.0, p.mean()
        losses.append(np.abs(p - (s * t + b)).mean())
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

@pytest.mark.parametrize("space", ["disparity", "depth"])
@pytest.mark.parametrize("s,b", [(0.3, 0.05), (2.0, -0.1), (7.5, 1.3)])
def test_ssi_zero_for_affine_teacher(space, s, b):
    teacher = _rand(0, lo=0.1, hi=1.0, dtype=torch.float32)
    mask = _mask(1)
    p = s * teacher + b  # the prediction in the alignment space
    pred_depth = 1.0 / p if space == "disparity" else p
    loss = ssi_loss(pred_depth, teacher, mask, space=space)
    assert abs(loss.item()) < 1e-6
    _, s_fit, b_fit = align_scale_shift(pred_depth, teacher, mask, space=space)
    assert torch.allclose(s_fit, torch.full((B,), s), rtol=1e-4)
    assert torch.allclose(b_fit, torch.full((B,), b), atol=1e-4)


@pytest.mark.parametrize("space", ["disparity", "depth"])
def test_ssi_invariant_to_teacher_scale_and_shift(space):
    teacher = _rand(0, lo=0.1, hi=1.0)
    pred_depth = 1.0 / (0.5 * teacher + 0.2 + 0.05 * _rand(5))  # correlated, not affine
    mask = _mask(1)
    base = ssi_loss(pred_depth, teacher, mask, space=space).item()
    assert base > 1e-4
    for a, c in [(3.0, -0.7), (0.01, 40.0), (250.0, 0.0)]:
        assert ssi_loss(pred_depth, a * teacher + c, mask, space=space).item() == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("space", ["disparity", "depth"])
def test_ssi_matches_numpy(space):
    teacher = _rand(0, (4, 1, H, W), lo=0.0, hi=2.0)
    noise = _rand(2, (4, 1, H, W))
    pred_depth = 1.0 / (0.4 * teacher + 0.1 + 0.3 * noise)
    pred_depth[2] = 1.0 / (2.5 - teacher[2] + 0.3 * noise[2])  # anti-correlated: fit clamps s to 0
    pred_depth[0, 0, 0, :5] = -1.0  # non-positive prediction: clamped to min_depth_m
    mask = _mask(3, shape=(4, 1, H, W))
    mask[3] = False
    mask[3, 0, 0, :10] = True  # 10 valid pixels < min_pixels: skipped
    ref = np_ssi(pred_depth.numpy(), teacher.numpy(), mask.numpy(), space, min_pixels=32)
    got = ssi_loss(pred_depth, teacher, mask, space=space, min_pixels=32).item()
    assert got == pytest.approx(ref, rel=1e-9)
    assert got != pytest.approx(np_ssi(pred_depth.numpy(), teacher.numpy(), mask.numpy(), space, 1), rel=1e-3)
    s = align_scale_shift(pred_depth, teacher, mask, space=space)[1]
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
    loss = ssi_loss(pred_depth, const, mask)
    _, s, b = align_scale_shift(pred_depth, const, mask)
    assert torch.isfinite(loss) and (s == 0).all()
    ref = np_ssi(pred_depth.detach().numpy(), const.numpy(), mask.numpy(), "disparity", 32)
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
    assert parts["sup"] == 0 and parts["ssi"] < 1e-6 and parts["reg"] < 1e-6  # the truth is optimal
    preds = [depth + 1.0 for _ in range(6)]
    cfg = DistillLossConfig(lambda_ssi=2.0, lambda_reg=3.0)
    total, parts = distill_loss(preds, batch, cfg)
    assert parts["sup"] == pytest.approx(sum(MULTISCALE_WEIGHTS), rel=1e-6)
    assert parts["ssi"] > 0 and parts["reg"] > 0
    assert total.item() == pytest.approx(parts["sup"] + 2.0 * parts["ssi"] + 3.0 * parts["reg"], rel=1e-6)
    _, parts_d = distill_loss(preds, batch, DistillLossConfig(space="depth"))
    assert parts_d["ssi"] < 1e-5  # depth + 1 is affine in the depth-like teacher
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
