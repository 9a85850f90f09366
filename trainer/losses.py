"""Losses of the two training stages: L_pre, and L_sup + L_SSI + L_reg.

Conventions: every map is B x 1 x H x W float; a mask is a bool (or 0/1) tensor of the same shape;
depths are in metres; the network's 6 outputs come coarse -> fine, each already at full size.
Every loss returns a scalar tensor that is finite and keeps its graph to the prediction even when
no pixel is valid (it is then 0), so a batch without labels never puts a NaN into the optimiser.

The distillation terms (L_SSI, L_reg) do two things in two spaces:
- The FIT is done in disparity. Depth Anything predicts relative disparity: its output equals
  a * (1 / depth) + c for unknown a > 0 and c, so an affine map fits it to the truth exactly only in
  disparity. Per image, s and b are fitted so that s t + b matches the prediction's disparity
  1 / D_f (least squares by default, or the L1-optimal fit), with no gradient through the fit.
- The PENALTY acts in metres, the units of L_sup and of the paper's L_SSI: the aligned teacher is
  turned back into depth, D_t = 1 / (s t + b), wherever s t + b is positive and in range
  (min_depth_m <= D_t <= max_depth_m), and L_SSI = mean |D_f - D_t|, L_reg = gradient matching of
  D_f - D_t. A penalty in disparity (1/m) would pull about 100x less than L_sup on street scenes
  (|1/d - 1/d'| = |d - d'| / (d d')), which is what this project did before; it stays available as
  `penalty="disparity"` for comparison.
`space="depth"` fits an affine map in depth instead, for a depth-like teacher (the shards' dense
pseudo depth, depth.png, which labelled shards do not have).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from trainer.model import MULTISCALE_WEIGHTS, multiscale_weights  # noqa: F401 (BP-Net's per-output weights, coarse -> fine)

SPACES = ("disparity", "depth")     # where the teacher is fitted to the prediction
PENALTIES = ("depth", "disparity")  # the units the distillation penalty acts in
FITS = ("lsq", "l1")                # least squares (MiDaS) or the L1-optimal fit (the paper's min)


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
                    weights: tuple[float, ...] | None = None) -> Tensor:
    """L = sum_l w_l * loss(pred_l, target), l over the outputs coarse -> fine.

    kind: "l1" / "l2" (masked_l1 / masked_l2, mean over valid pixels), or "l2_bpnet" (BP-Net's own
    MSMSE: mean over all pixels of the masked squared error). The default weights are BP-Net's,
    2^-10 .. 2^-2, 1: the coarse outputs only guide the early decoder levels (None: multiscale_weights of
    the number of outputs, which are those for 6, and 1 for a network with one output).
    """
    if weights is None:
        weights = multiscale_weights(len(preds))
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
                  weights: tuple[float, ...] | None = None) -> Tensor:
    """The paper's L_pre = |D_f - D_syn|: multiscale masked L1 to the dense pseudo depth.

    mask defaults to pseudo_depth > 0 (the depth PNG's "no value" code).
    """
    if mask is None:
        mask = pseudo_depth > 0
    return multiscale_loss(preds, pseudo_depth, mask, kind="l1", weights=weights)


# -----------------------------------------------------------------------------
# the fine-tuning settings

@dataclass(frozen=True)
class DistillLossConfig:
    """Weights and settings of L = L_sup + lambda_ssi L_SSI + lambda_reg L_reg (see the module docstring).

    lambda_ssi = 1: the paper adds L_SSI unweighted. lambda_reg = 0.5: the paper gives no weight for
    its gradient term; the term is MiDaS's gradient matching (summed over 4 scales) and 0.5 is MiDaS's
    weight for that sum. With the default penalty in metres all three terms pull the final output with
    comparable strength (an L1 in metres pulls each image with a total gradient of 1); `penalty=
    "disparity"` is the earlier 1/m penalty, about 100x weaker on street scenes.
    max_depth_m: the aligned teacher is used only where it puts the surface at most this far (120 m,
    the range of a Velodyne HDL-64E): beyond, a small disparity error is a huge depth error.
    """
    lambda_ssi: float = 1.0
    lambda_reg: float = 0.5
    space: str = "disparity"      # where s, b are fitted: "disparity" (Depth Anything's output) or "depth"
    penalty: str = "depth"        # units of L_SSI and L_reg: "depth" (metres, as L_sup) or "disparity" (1/m)
    fit: str = "lsq"              # "lsq" (closed form, MiDaS) or "l1" (the L1-optimal s, b: robust)
    sup_kind: str = "l1"          # "l1", "l2" or "l2_bpnet", see multiscale_loss
    min_pixels: int = 32          # images with fewer valid teacher pixels skip L_SSI and L_reg
    min_depth_m: float = 0.1      # clamp of the prediction before 1/depth; nearest usable aligned depth
    max_depth_m: float = 120.0    # farthest usable aligned depth
    reg_scales: int = 4

    def __post_init__(self):
        for name, allowed in (("space", SPACES), ("penalty", PENALTIES), ("fit", FITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.penalty == "disparity" and self.space != "disparity":
            raise ValueError("penalty='disparity' needs space='disparity' (a depth-space fit has no disparity)")
        if not 0 < self.min_depth_m < self.max_depth_m:
            raise ValueError(f"need 0 < min_depth_m < max_depth_m, got {self.min_depth_m}, {self.max_depth_m}")


def _with(cfg: DistillLossConfig | None, overrides: dict) -> DistillLossConfig:
    cfg = cfg or DistillLossConfig()
    unknown = set(overrides) - {f.name for f in fields(cfg)}
    if unknown:
        raise TypeError(f"unknown loss settings {sorted(unknown)}")
    return cfg if not overrides else DistillLossConfig(**{**cfg.__dict__, **overrides})


# -----------------------------------------------------------------------------
# scale-and-shift alignment

def to_alignment_space(pred_depth: Tensor, space: str = "disparity", min_depth_m: float = 0.1) -> Tensor:
    """The prediction in the fitting space: 1 / max(depth, min_depth_m) in 1/m, or depth in m.

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


def _per_image(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


@torch.no_grad()
def _fit_lsq(p: Tensor, t: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, argmin_{s >= 0, b} sum w (s t + b - p)^2 for weights w >= 0 (a 0/1 mask or IRLS weights).

    float64 tensors. The 2x2 normal equations are solved in their centred form s = cov(t, p) / var(t),
    b = mean(p) - s mean(t) (weighted), the same solution without the cancellation of
    St2 * n - St^2. Guards:
      - var(t) ~ 0 (constant teacher: var(t) <= 1e-10 * mean(t^2)): s = 0, b = mean(p), an exact
        minimiser (the fit is not unique there);
      - s < 0 (teacher anti-correlated with the prediction, e.g. early in training): the
        constrained optimum s = 0, b = mean(p); a disparity teacher is known to grow with
        1/depth, so a mirrored teacher would be a wrong target;
      - no weight: s = b = 0 (the losses skip such images).
    """
    n = _per_image(w).clamp(min=1e-300)
    mean_p = _per_image(w * p) / n
    mean_t = _per_image(w * t) / n
    dt = t - mean_t.view(-1, 1, 1, 1)
    dp = p - mean_p.view(-1, 1, 1, 1)
    var_t = _per_image(w * dt * dt) / n
    cov = _per_image(w * dt * dp) / n
    mean_t2 = _per_image(w * t * t) / n
    ok = var_t > 1e-10 * mean_t2.clamp(min=1e-300)
    s = torch.where(ok, cov / torch.where(ok, var_t, 1.0), 0.0).clamp(min=0.0)
    return s, mean_p - s * mean_t


@torch.no_grad()
def _fit_l1(p: Tensor, t: Tensor, m: Tensor, iters: int = 40) -> tuple[Tensor, Tensor]:
    """Per image, argmin_{s >= 0, b} sum_m |s t + b - p|: iteratively reweighted least squares from the
    least-squares fit (weights 1 / max(|r|, eps)), then, where s = 0, b = the median of p (the exact
    L1 optimum of a constant). IRLS approaches the optimum from above; 40 iterations put the
    objective within ~1e-4 of it on the cases tested, and a few outliers cannot move the fit."""
    w = m.double()
    s, b = _fit_lsq(p, t, w)
    eps = 1e-9 * (_per_image(w * p.abs()) / _per_image(w).clamp(min=1)).clamp(min=1e-12).view(-1, 1, 1, 1)
    for _ in range(iters):
        r = (s.view(-1, 1, 1, 1) * t + b.view(-1, 1, 1, 1) - p).abs()
        s, b = _fit_lsq(p, t, w / torch.maximum(r, eps))
    median = torch.nanmedian(torch.where(m, p, float("nan")).flatten(1), dim=1).values
    return s, torch.where((s == 0) & (_image_counts(m) > 0), median, b)


class Alignment(NamedTuple):
    """The prediction and the aligned teacher, both in the penalty's units (see align_teacher)."""
    pred: Tensor    # the prediction (with its graph): D_f in m, or 1 / max(D_f, min_depth_m) in 1/m
    target: Tensor  # the aligned teacher, no graph; 0 where not valid
    valid: Tensor   # bool: the teacher is valid there and its aligned value is in range
    scale: Tensor   # s per image (B), in the fitting space
    shift: Tensor   # b per image (B)


def align_teacher(pred_depth: Tensor, teacher: Tensor, mask: Tensor, cfg: DistillLossConfig | None = None,
                  **overrides) -> Alignment:
    """Fit the teacher to the prediction per image and express both in the penalty's units.

    p = to_alignment_space(D_f, cfg.space), detached; t = the teacher (relative disparity for
    space "disparity", a depth-like map for "depth"). Per image (s, b) = argmin_{s >= 0, b} of the
    squared (fit "lsq") or absolute (fit "l1") error of s t + b - p over the mask.
    penalty "depth": target = 1 / (s t + b) (space disparity) or s t + b (space depth), used where
    it is a depth in [min_depth_m, max_depth_m]; pred = D_f.
    penalty "disparity": target = s t + b in 1/m over the whole mask; pred = 1 / max(D_f, min_depth_m).
    Neither s, b nor the target carries a graph: the terms pull the prediction towards the teacher,
    never the teacher or the fit towards the prediction.
    """
    cfg = _with(cfg, overrides)
    m = _as_bool(mask) & torch.isfinite(teacher)
    t = torch.where(m, teacher.detach(), 0.0).double()
    p = torch.where(m, to_alignment_space(pred_depth.detach(), cfg.space, cfg.min_depth_m), 0.0).double()
    s, b = (_fit_lsq(p, t, m.double()) if cfg.fit == "lsq" else _fit_l1(p, t, m))
    aligned = (s.view(-1, 1, 1, 1) * t + b.view(-1, 1, 1, 1)).to(pred_depth.dtype)
    s, b = s.to(pred_depth.dtype), b.to(pred_depth.dtype)
    if cfg.penalty == "disparity":
        pred = to_alignment_space(pred_depth, "disparity", cfg.min_depth_m)
        return Alignment(pred, torch.where(m, aligned, 0.0), m, s, b)
    if cfg.space == "disparity":
        positive = aligned > 0
        depth = torch.where(positive, 1.0 / torch.where(positive, aligned, 1.0), 0.0)
    else:
        depth = aligned
    valid = m & (depth >= cfg.min_depth_m) & (depth <= cfg.max_depth_m)
    return Alignment(pred_depth, torch.where(valid, depth, 0.0), valid, s, b)


# -----------------------------------------------------------------------------
# distillation terms

def _per_image_mean_l1(p: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    m = _as_bool(mask)
    diff = torch.where(m, p - target, torch.zeros_like(p)).abs()
    return diff.flatten(1).sum(1) / _image_counts(m).clamp(min=1)


def _mean_over_images(per_image: Tensor, keep: Tensor, anchor: Tensor) -> Tensor:
    """Mean of per_image over the kept images; 0 (with a graph to anchor) when none is kept."""
    kept = torch.where(keep, per_image, torch.zeros_like(per_image))
    return kept.sum() / keep.sum().clamp(min=1) + 0.0 * anchor.sum()


def ssi_loss(pred_depth: Tensor, teacher: Tensor, mask: Tensor, cfg: DistillLossConfig | None = None,
             alignment: Alignment | None = None, **overrides) -> Tensor:
    """L_SSI = mean over images i of (1/n_i) sum_{valid_i} |p - target| (see align_teacher).

    With the default settings p = D_f and target = 1 / (s t + b) in metres, s and b fitted in
    disparity: the paper's min over (s, b) of an L1 in depth units, with the fit done where the
    teacher is affine. Images with fewer than cfg.min_pixels valid pixels are skipped (left out of
    the mean); if all are, the loss is 0. A constant teacher gives s = 0: the loss then pulls the
    prediction towards flat, which is what such a teacher says. `alignment` reuses a fit already
    made by align_teacher for the same inputs. Gradients reach pred_depth only.
    """
    cfg = _with(cfg, overrides)
    a = alignment if alignment is not None else align_teacher(pred_depth, teacher, mask, cfg)
    keep = _image_counts(a.valid) >= cfg.min_pixels
    return _mean_over_images(_per_image_mean_l1(a.pred, a.target, a.valid), keep, pred_depth)


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
    """Multi-scale gradient matching of the residual R = pred - aligned_teacher (the core of L_reg).

    pred and aligned_teacher must be in the same units (reg_loss passes align_teacher's pair). For
    image i and scale k = 0 .. scales-1, R^k = R[::2^k, ::2^k] and M^k = M[::2^k, ::2^k] (each scale
    halves the resolution), and
        G_ik = ( sum_{x,y} M^k(x,y) M^k(x+1,y) |R^k(x+1,y) - R^k(x,y)|
               + sum_{x,y} M^k(x,y) M^k(x,y+1) |R^k(x,y+1) - R^k(x,y)| ) / sum M^k
    (a difference counts only where both pixels are valid; an empty scale gives 0). Then
        L = mean over images with >= min_pixels valid of sum_k G_ik
    (the paper's sum over its 4 scales, each normalised by its own valid-pixel count, as MiDaS).
    A constant residual (prediction = aligned teacher + c) gives 0: the term asks for the
    teacher's edges, not its values.
    """
    keep = _image_counts(mask) >= min_pixels
    per_image = _per_image_gradient_matching(pred - aligned_teacher.detach(), mask, scales)
    return _mean_over_images(per_image, keep, pred)


def reg_loss(pred_depth: Tensor, teacher: Tensor, mask: Tensor, cfg: DistillLossConfig | None = None,
             alignment: Alignment | None = None, **overrides) -> Tensor:
    """L_reg: gradient_matching_loss of the prediction against the aligned teacher, in the penalty's
    units (metres by default), over cfg.reg_scales scales."""
    cfg = _with(cfg, overrides)
    a = alignment if alignment is not None else align_teacher(pred_depth, teacher, mask, cfg)
    return gradient_matching_loss(a.pred, a.target, a.valid, cfg.reg_scales, cfg.min_pixels)


# -----------------------------------------------------------------------------
# the fine-tuning objective


def distill_terms(preds: list[Tensor], batch: dict[str, Tensor], cfg: DistillLossConfig | None = None
                  ) -> dict[str, Tensor]:
    """The three terms, unweighted: {"sup": L_sup, "ssi": L_SSI, "reg": L_reg}.

    batch: "gt" (depth in m, 0 = no label) and "teacher" (relative disparity, 0 = invalid); for
    space "depth" the teacher is read from "teacher_depth" instead (a depth-like map in m, e.g. the
    dense pseudo depth). Optional "gt_mask" / "teacher_mask" override the masks gt > 0 and
    teacher > 0 (finite).
    L_sup: multiscale_loss over the 6 outputs on the labelled pixels. L_SSI and L_reg: on the
    finest output, over every pixel where the aligned teacher is valid -- labelled pixels included
    (there label and teacher agree after the fit) and the unlabelled ones being the point of
    distilling. One fit serves both terms.
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
    teacher = torch.nan_to_num(teacher)

    finest = preds[-1]
    fit = align_teacher(finest, teacher, t_mask, cfg)
    return {"sup": multiscale_loss(preds, gt, sup_mask, kind=cfg.sup_kind),
            "ssi": ssi_loss(finest, teacher, t_mask, cfg, alignment=fit),
            "reg": reg_loss(finest, teacher, t_mask, cfg, alignment=fit)}


def gradient_pulls(terms: dict[str, Tensor], pred: Tensor, unlabelled: Tensor) -> dict[str, Tensor]:
    """How hard each (weighted) term pulls the prediction: pull_k = sum over pixels of |d term_k / d pred|,
    over the whole batch and over the `unlabelled` pixels only (`pull_k_unlabelled`), and each term's
    share of the summed pull (`share_k`). An L1 term pulls each image with a total of 1, so with
    the default settings pull_sup, pull_ssi ~ 1 on the final output. Needs pred in the graph of the
    terms; the graph is kept for the backward pass that follows."""
    unl = _as_bool(unlabelled)
    out: dict[str, Tensor] = {}
    for name, term in terms.items():
        grad = None
        if term.requires_grad:
            grad = torch.autograd.grad(term, pred, retain_graph=True, allow_unused=True)[0]
        g = torch.zeros_like(pred) if grad is None else grad.abs()
        out[f"pull_{name}"] = g.sum()
        out[f"pull_{name}_unlabelled"] = torch.where(unl, g, 0.0).sum()
    total = sum(out[f"pull_{name}"] for name in terms)
    for name in terms:
        out[f"share_{name}"] = out[f"pull_{name}"] / total.clamp(min=1e-30)
    return out


def distill_loss(preds: list[Tensor], batch: dict[str, Tensor], cfg: DistillLossConfig | None = None,
                 pulls: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Stage-2 loss: (total, {"sup", "ssi", "reg", "total"} as floats: the unweighted terms and the total).

    total = L_sup + lambda_ssi L_SSI + lambda_reg L_reg; see distill_terms for the batch keys.
    pulls=True adds gradient_pulls of the weighted terms on the final output (unlabelled: pixels
    without a label), measured before the backward pass, so a training log shows whether
    distillation pulls at all and where.
    """
    cfg = cfg or DistillLossConfig()
    terms = distill_terms(preds, batch, cfg)
    weighted = {"sup": terms["sup"], "ssi": cfg.lambda_ssi * terms["ssi"], "reg": cfg.lambda_reg * terms["reg"]}
    total = weighted["sup"] + weighted["ssi"] + weighted["reg"]
    named = {**terms, "total": total}
    if pulls and preds[-1].requires_grad:
        unlabelled = ~_as_bool(batch["gt_mask"]) if "gt_mask" in batch else batch["gt"] <= 0
        named.update(gradient_pulls(weighted, preds[-1], unlabelled))
    values = torch.stack([v.detach().float() for v in named.values()]).cpu().tolist()  # one device sync
    return total, dict(zip(named, values, strict=True))
