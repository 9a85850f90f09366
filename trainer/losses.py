"""Losses of the two training stages (PAPER.md): L_pre, and L_sup + L_SSI + L_reg.

Conventions: every map is B x 1 x H x W float; a mask is a bool (or 0/1) tensor of the same shape;
depths are in metres; the network's 6 outputs come coarse -> fine, each already at full size.
Every loss returns a scalar tensor that is finite and keeps its graph to the prediction even when
no pixel is valid (it is then 0), so a batch without labels never puts a NaN into the optimiser.

Alignment space of the distillation terms (L_SSI, L_reg). Depth Anything predicts relative
*disparity*: its output equals a * (1 / depth) + c for unknown a > 0 and c. An affine map therefore
fits it to the truth exactly only in disparity space, so that is the default: the prediction is
turned into disparity 1 / max(depth, min_depth_m) (units 1/m) and compared there with s * t + b.
"depth" space compares metres with metres and is only meaningful for a teacher that is already
depth-like (e.g. the dense pseudo depth of the shards), where the affine fit is an approximation.
A side benefit of disparity: the teacher's sky (disparity ~0) maps to "very far" without blowing up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.model import MULTISCALE_WEIGHTS  # BP-Net's per-output weights, coarse (1/32) -> fine

SPACES = ("disparity", "depth")


# -----------------------------------------------------------------------------
# supervised terms

def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 = sum_{valid} |pred - target| / n_valid, pooled over the whole batch.

    Pixels of all images are pooled (an image with more labels weighs more), as pixel losses in
    depth completion usually are. n_valid = 0 gives 0 with a graph to `pred`. Invalid pixels are
    selected away before the abs / square (torch.where), so NaN or inf there in `target` leaks into
    neither the value nor the gradient.
    """
    m = _as_bool(mask)
    diff = torch.where(m, pred - target, torch.zeros_like(pred)).abs()
    return diff.sum() / m.sum().clamp(min=1)


def masked_l2(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L2 = sum_{valid} (pred - target)^2 / n_valid, pooled over the batch (see masked_l1)."""
    m = _as_bool(mask)
    diff = torch.where(m, pred - target, torch.zeros_like(pred)) ** 2
    return diff.sum() / m.sum().clamp(min=1)


def bpnet_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """BP-Net's per-scale term (criteria.py, MSMSE.mse): mean over ALL B*H*W pixels of
    (mask * pred - mask * target)^2 -- the invalid pixels count in the denominator as zeros, so
    the scale of the loss follows the label density. BP-Net's mask is gt > 1e-3."""
    m = _as_bool(mask)
    diff = torch.where(m, pred - target, torch.zeros_like(pred))
    return (diff**2).mean()


_PIXEL_LOSSES = {"l1": masked_l1, "l2": masked_l2, "l2_bpnet": bpnet_mse}


def multiscale_loss(preds: list[Tensor], target: Tensor, mask: Tensor, kind: str = "l1",
                    weights: tuple[float, ...] = MULTISCALE_WEIGHTS) -> Tensor:
    """L = sum_l w_l * loss(pred_l, target), l over the outputs coarse -> fine.

    kind: "l1" / "l2" (masked_l1 / masked_l2, mean over valid pixels), or "l2_bpnet" (BP-Net's own
    MSMSE: mean over all pixels of the masked squared error). The default weights are BP-Net's,
    2^-10 .. 2^-2, 1: the coarse outputs only guide the early decoder levels.
    """
    if kind not in _PIXEL_LOSSES:
        raise ValueError(f"kind must be one of {sorted(_PIXEL_LOSSES)}, got {kind!r}")
    if len(preds) != len(weights):
        raise ValueError(f"{len(preds)} predictions but {len(weights)} weights")
    fn = _PIXEL_LOSSES[kind]
    total = target.new_zeros(())
    for w, p in zip(weights, preds, strict=True):
        if p.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(target.shape)}; "
                             "every output must be upsampled to full size")
        total = total + w * fn(p, target, mask)
    return total


def pretrain_loss(preds: list[Tensor], pseudo_depth: Tensor, mask: Tensor | None = None,
                  weights: tuple[float, ...] = MULTISCALE_WEIGHTS) -> Tensor:
    """The paper's L_pre = |D_f - D_syn|: multiscale masked L1 to the dense pseudo depth.

    mask defaults to pseudo_depth > 0 (the depth PNG's "no value" code).
    """
    if mask is None:
        mask = pseudo_depth > 0
    return multiscale_loss(preds, pseudo_depth, mask, kind="l1", weights=weights)


# -----------------------------------------------------------------------------
# scale-and-shift alignment

def to_alignment_space(pred_depth: Tensor, space: str = "disparity", min_depth_m: float = 0.1) -> Tensor:
    """The prediction in the alignment space: 1 / max(depth, min_depth_m) in 1/m, or depth in m.

    The clamp keeps 1/depth and its gradient (-1/depth^2) bounded when an untrained network
    outputs ~0 or negative depth; the L_sup term pushes such pixels back into range.
    """
    if space == "disparity":
        return 1.0 / pred_depth.clamp(min=min_depth_m)
    if space == "depth":
        return pred_depth
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def _image_counts(mask: Tensor) -> Tensor:
    return _as_bool(mask).flatten(1).sum(1)


@torch.no_grad()
def _solve_scale_shift(p: Tensor, t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, argmin_{s >= 0, b} sum_m (s t + b - p)^2, in float64, no graph.

    The 2x2 normal equations [[St2, St], [St, n]] [s, b] = [Stp, Sp] are solved in their centred
    form s = cov(t, p) / var(t), b = mean(p) - s mean(t) (det = n^2 var(t)), which is the same
    solution without the cancellation of St2 * n - St^2. Guards:
      - det ~ 0 (constant teacher: var(t) <= 1e-10 * mean(t^2)): s = 0, b = mean(p), which is an
        exact minimiser (the fit is not unique there);
      - s < 0 (teacher anti-correlated with the prediction, e.g. early in training): the
        constrained optimum s = 0, b = mean(p); a disparity teacher is known to grow with
        1/depth, so a mirrored teacher would be a wrong target;
      - n = 0: s = b = 0 (the caller skips such images).
    """
    m = m.double()
    p = torch.where(m > 0, p.double(), 0.0)
    t = torch.where(m > 0, t.double(), 0.0)
    n = m.flatten(1).sum(1)
    nn = n.clamp(min=1)
    mean_p = p.flatten(1).sum(1) / nn
    mean_t = t.flatten(1).sum(1) / nn
    dt = (t - mean_t.view(-1, 1, 1, 1)) * m
    dp = (p - mean_p.view(-1, 1, 1, 1)) * m
    var_t = (dt * dt).flatten(1).sum(1) / nn
    cov = (dt * dp).flatten(1).sum(1) / nn
    mean_t2 = (t * t).flatten(1).sum(1) / nn
    ok = var_t > 1e-10 * mean_t2.clamp(min=1e-300)
    s = torch.where(ok, cov / torch.where(ok, var_t, 1.0), 0.0).clamp(min=0.0)
    b = mean_p - s * mean_t
    return s, b


def align_scale_shift(pred_depth: Tensor, teacher: Tensor, mask: Tensor, space: str = "disparity",
                      min_depth_m: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Fit the teacher to the prediction per image; return (aligned, s, b).

    p = to_alignment_space(pred_depth, space) (1/m for "disparity", m for "depth"), t = teacher as
    given (relative disparity for "disparity"; a depth-like map for "depth"). Per image
        s, b = argmin_{s >= 0, b} sum_{mask} (s t + b - p)^2        (closed form, see _solve_scale_shift)
        aligned = s t + b                                            (B x 1 x H x W, units of p)
    s and b are fitted on a detached p and returned without a graph (shape B), and `aligned` has
    no graph either: a loss built on it pulls the prediction towards the teacher, never the
    teacher or the fit towards the prediction. Images with no valid pixel get s = b = 0; the losses
    skip images with fewer than min_pixels (see ssi_loss).
    """
    p = to_alignment_space(pred_depth, space, min_depth_m)
    t = teacher.detach()
    s, b = _solve_scale_shift(p.detach(), t, _as_bool(mask))
    aligned = s.to(p.dtype).view(-1, 1, 1, 1) * t.to(p.dtype) + b.to(p.dtype).view(-1, 1, 1, 1)
    return aligned, s.to(p.dtype), b.to(p.dtype)


# -----------------------------------------------------------------------------
# distillation terms

def _per_image_mean_l1(p: Tensor, aligned: Tensor, mask: Tensor) -> Tensor:
    m = _as_bool(mask)
    diff = torch.where(m, p - aligned, torch.zeros_like(p)).abs()
    return diff.flatten(1).sum(1) / _image_counts(m).clamp(min=1)


def _mean_over_images(per_image: Tensor, keep: Tensor, anchor: Tensor) -> Tensor:
    """Mean of per_image over the kept images; 0 (with a graph to anchor) when none is kept."""
    kept = torch.where(keep, per_image, torch.zeros_like(per_image))
    return kept.sum() / keep.sum().clamp(min=1) + 0.0 * anchor.sum()


def ssi_loss(pred_depth: Tensor, teacher: Tensor, mask: Tensor, space: str = "disparity",
             min_pixels: int = 32, min_depth_m: float = 0.1) -> Tensor:
    """L_SSI = mean over images i of (1/n_i) sum_{mask_i} |p - (s_i t + b_i)|.

    p and the fit as in align_scale_shift: in "disparity" space (the default, see the module
    docstring) p = 1 / max(pred_depth, min_depth_m) and the loss is in 1/m -- values are small
    (KITTI: 0.01 .. 0.2 1/m) and weight near pixels more, since |1/d - 1/d'| = |d - d'| / (d d');
    in "depth" space p = pred_depth and the loss is in metres. The paper's min over (s, b) of the
    L1 is taken with the least-squares (s, b) (MiDaS), which has a closed form. Images with fewer
    than min_pixels valid pixels are skipped (left out of the mean); if all are, the loss is 0.
    A constant teacher gives s = 0, b = mean(p): the loss then pulls p towards flat, which is what
    such a teacher says. Gradients reach pred_depth only.
    """
    aligned, _, _ = align_scale_shift(pred_depth, teacher, mask, space, min_depth_m)
    p = to_alignment_space(pred_depth, space, min_depth_m)
    keep = _image_counts(mask) >= min_pixels
    return _mean_over_images(_per_image_mean_l1(p, aligned, mask), keep, pred_depth)


def _per_image_gradient_matching(residual: Tensor, mask: Tensor, scales: int) -> Tensor:
    m = _as_bool(mask)
    r = torch.where(m, residual, torch.zeros_like(residual))
    per_scale = []
    for k in range(scales):
        step = 2**k  # stride-2 subsampling per scale, as MiDaS: each halves the resolution
        rk, mk = r[..., ::step, ::step], m[..., ::step, ::step]
        gx = (rk[..., :, 1:] - rk[..., :, :-1]).abs() * (mk[..., :, 1:] & mk[..., :, :-1])
        gy = (rk[..., 1:, :] - rk[..., :-1, :]).abs() * (mk[..., 1:, :] & mk[..., :-1, :])
        total = gx.flatten(1).sum(1) + gy.flatten(1).sum(1)
        per_scale.append(total / _image_counts(mk).clamp(min=1))
    return torch.stack(per_scale, 0).sum(0)


def gradient_matching_loss(pred: Tensor, aligned_teacher: Tensor, mask: Tensor, scales: int = 4,
                           min_pixels: int = 32) -> Tensor:
    """L_reg: multi-scale gradient matching of the residual R = pred - aligned_teacher.

    pred and aligned_teacher must be in the same space (distill_loss passes the prediction in the
    alignment space and align_scale_shift's output). For image i and scale k = 0 .. scales-1,
    R^k = R[::2^k, ::2^k] and M^k = M[::2^k, ::2^k] (each scale halves the resolution), and
        G_ik = ( sum_{x,y} M^k(x,y) M^k(x+1,y) |R^k(x+1,y) - R^k(x,y)|
               + sum_{x,y} M^k(x,y) M^k(x,y+1) |R^k(x,y+1) - R^k(x,y)| ) / sum M^k
    (a difference counts only where both pixels are valid; an empty scale gives 0). Then
        L_reg = mean over images with >= min_pixels valid of sum_k G_ik
    (the paper's sum over its 4 scales, each normalised by its own valid-pixel count, as MiDaS).
    A constant residual (prediction = aligned teacher + c) gives 0: the term asks for the
    teacher's edges, not its values. Units those of pred (1/m in disparity space).
    """
    keep = _image_counts(mask) >= min_pixels
    per_image = _per_image_gradient_matching(pred - aligned_teacher.detach(), mask, scales)
    return _mean_over_images(per_image, keep, pred)


# -----------------------------------------------------------------------------
# the fine-tuning objective

@dataclass
class DistillLossConfig:
    """Weights and settings of L = L_sup + lambda_ssi L_SSI + lambda_reg L_reg.

    lambda_ssi = 1: the paper adds L_SSI unweighted. lambda_reg = 0.5: the paper gives no weight
    for its gradient term; the term is MiDaS's gradient matching (summed over 4 scales) and 0.5 is
    MiDaS's weight for that sum.
    Both are in disparity units (1/m) by default, so they are numerically ~10-100x smaller than
    L_sup in metres on KITTI: the labels set the metric scale, the teacher adds structure.
    """
    lambda_ssi: float = 1.0
    lambda_reg: float = 0.5
    space: str = "disparity"      # alignment space of L_SSI and L_reg, see the module docstring
    sup_kind: str = "l1"          # "l1", "l2" or "l2_bpnet", see multiscale_loss
    min_pixels: int = 32          # images with fewer teacher-valid pixels skip L_SSI and L_reg
    min_depth_m: float = 0.1      # clamp of the prediction before 1/depth
    reg_scales: int = 4


def distill_loss(preds: list[Tensor], batch: dict[str, Tensor], cfg: DistillLossConfig | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
    """Stage-2 loss: (total, {"sup", "ssi", "reg", "total"} as floats).

    batch: "gt" (depth in m, 0 = no label) and "teacher" (relative disparity, 0 = invalid); for
    space "depth" the teacher is read from "teacher_depth" instead (a depth-like map in m, e.g. the
    dense pseudo depth). Optional "gt_mask" / "teacher_mask" override the masks gt > 0 and
    teacher > 0 (finite).
    L_sup: multiscale_loss over the 6 outputs on the labelled pixels. L_SSI and L_reg: on the
    finest output, over every pixel where the teacher is valid -- labelled pixels included (there
    label and teacher agree after the fit) and the unlabelled ones being the point of distilling.
    """
    cfg = cfg or DistillLossConfig()
    gt = batch["gt"]
    sup_mask = batch.get("gt_mask")
    sup_mask = gt > 0 if sup_mask is None else sup_mask
    if cfg.space == "depth":
        if "teacher_depth" not in batch:
            raise KeyError("space='depth' needs batch['teacher_depth'] (a depth-like teacher in metres); "
                           "the disparity teacher cannot be fitted by an affine map in depth")
        teacher = batch["teacher_depth"]
    else:
        teacher = batch["teacher"]
    t_mask = batch.get("teacher_mask")
    t_mask = (teacher > 0) & torch.isfinite(teacher) if t_mask is None else _as_bool(t_mask)

    l_sup = multiscale_loss(preds, gt, sup_mask, kind=cfg.sup_kind)
    finest = preds[-1]
    aligned, _, _ = align_scale_shift(finest, torch.nan_to_num(teacher), t_mask, cfg.space, cfg.min_depth_m)
    p = to_alignment_space(finest, cfg.space, cfg.min_depth_m)
    keep = _image_counts(t_mask) >= cfg.min_pixels
    l_ssi = _mean_over_images(_per_image_mean_l1(p, aligned, t_mask), keep, finest)
    l_reg = _mean_over_images(_per_image_gradient_matching(p - aligned, t_mask, cfg.reg_scales), keep, finest)
    total = l_sup + cfg.lambda_ssi * l_ssi + cfg.lambda_reg * l_reg
    parts = torch.stack([l_sup, l_ssi, l_reg, total]).detach().cpu().tolist()  # one device sync
    return total, dict(zip(("sup", "ssi", "reg", "total"), parts, strict=True))

