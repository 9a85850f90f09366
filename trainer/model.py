"""BP-Net (Tang et al., CVPR 2024, "Bilateral Propagation Network for Depth Completion") in plain PyTorch.

The module names and the order of operations follow the public code (kakaxi314/BP-Net) so that its
checkpoints, and DMD3C's, load with strict=True and give the same outputs. Its two CUDA ops live in
trainer/ops.py.

Inputs, as the original's data loaders prepare them:
  rgb    B x 3 x H x W float32, (rgb_uint8 - KITTI_RGB_MEAN) / KITTI_RGB_STD per channel (see normalize_rgb);
  sparse B x 1 x H x W float32 depth in metres (KITTI png / 256), 0 = no point; a pixel counts as a
         point when its depth is > 1e-3. (The original's NYU models take metres x 10 instead.)
  K      B x 3 x 3 intrinsics in pixels of this very image (crop and flip already applied).
H and W must be multiples of 32. forward returns 6 maps B x 1 x H x W, from the 1/32 level to full size.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer.ops import VALID_DEPTH, knn4, knn4_offset, propagate

KITTI_RGB_MEAN = (90.9950, 96.2278, 94.3213)  # on the 0..255 scale, from the original's KITTI config
KITTI_RGB_STD = (79.2382, 80.5267, 82.1483)
# How a network's inputs and outputs are scaled. Ours and BP-Net's KITTI models: KITTI mean/std on the
# 0..255 scale, depth in metres. BP-Net's NYU models (configs/data/NYU.yaml, datasets/nyu.py): ImageNet
# mean/std (torchvision's Normalize on 0..1) and depth in metres x 10 (mul_factor 10), in and out.
INPUT_CONVENTIONS = {
    "kitti": {"rgb_mean": KITTI_RGB_MEAN, "rgb_std": KITTI_RGB_STD, "depth_scale": 1.0},
    "nyu": {"rgb_mean": (123.675, 116.28, 103.53), "rgb_std": (58.395, 57.12, 57.375), "depth_scale": 10.0},
}
# Loss weight of each output, coarse (1/32) to fine (full), from the original's MSMSE criterion.
MULTISCALE_WEIGHTS = (2**-10, 2**-8, 2**-6, 2**-4, 2**-2, 1.0)


def multiscale_weights(n: int) -> tuple[float, ...]:
    """Loss weights of n outputs, coarse to fine: 4^-(n-1) .. 4^-1, 1 (MULTISCALE_WEIGHTS for BP-Net's 6; the
    finest output alone for a network that gives one)."""
    return tuple(4.0 ** -(n - 1 - i) for i in range(n))
NUM_LEVELS = 6


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "bpnet"
    widths: tuple[int, ...] = (32, 64, 128, 256, 256, 256)  # channels at scales 1, 1/2, ..., 1/32
    encoder_blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2)  # residual blocks per image-encoder scale
    fuse_blocks: int = 2  # residual blocks per scale inside each level's depth-fusion U-Net
    fuse_max_width: int = 256  # channel cap of those U-Nets
    cspn_iters: tuple[int, ...] = (12, 10, 8, 6, 4, 2)  # propagation steps at levels 0 (full) .. 5
    drop_path: float = 0.1
    pool_drift: float = 1e6  # offset of the masked max in the learned pooling (changes rounding!)

    def __post_init__(self):
        if not len(self.widths) == len(self.encoder_blocks) == len(self.cspn_iters) == NUM_LEVELS:
            raise ValueError(f"widths, encoder_blocks and cspn_iters need {NUM_LEVELS} entries each")
        # the CSPN blends the input, a midway and the final state: it needs at least 2 steps
        if any(w % 2 for w in self.widths) or min(self.cspn_iters) < 2:
            raise ValueError("widths must be even and cspn_iters >= 2")


MODEL_PRESETS: dict[str, ModelConfig] = {
    "bpnet": ModelConfig(),
    "bpnet-s": ModelConfig(
        widths=(16, 32, 64, 128, 128, 128), encoder_blocks=(1, 1, 1, 1, 1, 1), fuse_blocks=1,
        fuse_max_width=64, cspn_iters=(6, 6, 4, 4, 2, 2), drop_path=0.05),  # ~5.5x fewer FLOPs
    "tiny": ModelConfig(
        widths=(8, 8, 8, 8, 8, 8), encoder_blocks=(1, 1, 1, 1, 1, 1), fuse_blocks=1,
        fuse_max_width=8, cspn_iters=(2, 2, 2, 2, 2, 2), drop_path=0.0),
}


def normalize_rgb(rgb: Tensor, mean=KITTI_RGB_MEAN, std=KITTI_RGB_STD) -> Tensor:
    """uint8 (or 0..255 float) RGB, channels at dim -3, to the network's float32 input.

    Computed in float64 and rounded once, as the original's numpy pipeline does.
    """
    shape = (3, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float64, device=rgb.device).view(shape)
    std = torch.tensor(std, dtype=torch.float64, device=rgb.device).view(shape)
    return ((rgb.to(torch.float64) - mean) / std).to(torch.float32)


def resolve_convention(requested: str | None, recorded: str | None, source: str) -> str:
    """The input convention to use with a network: the one its checkpoint records (ours write it), else
    the requested one, else "kitti". Asking for another than the recorded one is an error: the weights
    were trained for that scaling."""
    for name in (requested, recorded):
        if name is not None and name not in INPUT_CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(INPUT_CONVENTIONS)}, got {name!r}")
    if requested and recorded and requested != recorded:
        raise ValueError(f"{source} was trained with the {recorded!r} input convention, not {requested!r}; "
                         "leave out --convention")
    return requested or recorded or "kitti"


def network_inputs(rgb_raw: Tensor, sparse: Tensor, convention: str = "kitti") -> tuple[Tensor, Tensor, float]:
    """(rgb, sparse) as a network of this convention takes them, and the factor its outputs are in
    (divide by it for metres)."""
    conv = INPUT_CONVENTIONS[convention]
    scale = float(conv["depth_scale"])
    return normalize_rgb(rgb_raw, conv["rgb_mean"], conv["rgb_std"]), sparse * scale, scale


# -----------------------------------------------------------------------------
# building blocks (attribute names are the original's: they are the checkpoint's keys)


class DropPath(nn.Module):
    """Stochastic depth per sample, scaled by 1 / keep (timm's behaviour)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class ConvBNAct(nn.Module):
    """conv -> BatchNorm -> activation; without a norm the conv gets a bias (the original's Basic2d)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1, norm: bool = True,
                 act: nn.Module | None = None):
        super().__init__()
        layers = [("conv", nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=not norm))]
        if norm:
            layers.append(("bn", nn.BatchNorm2d(cout)))
        layers.append(("relu", act if act is not None else nn.ReLU(inplace=True)))
        self.conv = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class BasicBlock(nn.Module):
    """ResNet basic block with drop-path on the residual branch."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.drop_path(out) + identity)


def make_stage(cin: int, cout: int, blocks: int, stride: int, drop_rates) -> nn.Sequential:
    """`blocks` basic blocks, the first one striding; drop_rates is an iterator shared across stages."""
    return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, next(drop_rates))
                           for i in range(blocks)])


class UpConvBNAct(nn.Module):
    """x2 transposed conv (k4 s2 p1) -> BN -> ReLU (the original's Basic2dTrans)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class UpSkip(nn.Module):
    """Upsample the coarse features, concatenate the skip, 3x3 conv (the original's UpCC)."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.upf = UpConvBNAct(cin, cout)
        self.conv = ConvBNAct(cskip + cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.upf(x), skip], dim=1))


class UpWithDepth(nn.Module):
    """Decoder entry of a level: upsample [features, depth] of the coarser level, fuse the image skip
    (the original's UpCat)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upf = UpConvBNAct(cin + 1, cout)
        self.conv = ConvBNAct(cout * 2, cout)

    def forward(self, skip: Tensor, feat: Tensor, depth: Tensor) -> Tensor:
        up = self.upf(_like(torch.cat([feat, depth], dim=1), feat))
        return self.conv(torch.cat([up, skip], dim=1))


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """x in the channels-last layout when ref is in it (the CPU inference network of `for_inference`),
    else x itself: torch.cat of a channels-last map and a 1-channel one comes out in the plain layout."""
    if ref.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def in_float32(fn, *tensors: Tensor) -> Tensor:
    """fn(*tensors) in float32 with autocast off, when autocast is on. Depths of tens of metres, the
    pool's 1e6 drift and exp() do not survive bfloat16 (w + 1e6 rounds to a grid 4096 apart, exp()
    overflows and every pooled cell becomes NaN); the original runs all of this in float32."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return fn(*tensors)
    with torch.autocast(device_type=device, enabled=False):
        return fn(*(t.float() if t.is_floating_point() else t for t in tensors))


class WeightedPool(nn.Module):
    """Pool the sparse depth into 2^level cells with a per-pixel learned softmax weight over the valid
    pixels of each cell (the original's WPool). The weights are predicted at the coarse level and laid
    out at full resolution by a pixel shuffle."""

    def __init__(self, cin: int, level: int, drift: float):
        super().__init__()
        self.level = level
        self.drift = drift
        self.permute = nn.Module()
        self.permute.conv = nn.Sequential(
            ConvBNAct(cin, cin, 1, 0), ConvBNAct(cin, cin, 1, 0),
            nn.Conv2d(cin, 4**level, 1, bias=True), nn.PixelShuffle(2**level))

    def forward(self, sparse: Tensor, feat: Tensor) -> Tensor:
        return in_float32(self._forward, sparse, feat)

    def _forward(self, sparse: Tensor, feat: Tensor) -> Tensor:
        w = self.permute.conv(feat)
        size = 2**self.level
        valid = (sparse > VALID_DEPTH).float()
        with torch.no_grad():
            # masked max per cell; the drift keeps it above the zeros of invalid pixels (and rounds it)
            w_max = F.max_pool2d((w + self.drift) * valid, size, stride=size) - self.drift
            w_max = F.interpolate(w_max, scale_factor=size, mode="nearest") * valid
        exp_w = torch.exp(w * valid - w_max) * valid
        num = F.avg_pool2d(sparse * exp_w, size, stride=size)
        den = F.avg_pool2d(exp_w, size, stride=size)
        return num / (den + 1e-6)


def backproject(depth: Tensor, K: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """B x 1 x h x w depth -> B x 3 x (h*w) points, at integer pixel coordinates xx, yy."""
    fx, fy, cx, cy = K[:, 0:1, 0:1], K[:, 1:2, 1:2], K[:, 0:1, 2:3], K[:, 1:2, 2:3]
    z = depth.reshape(depth.shape[0], 1, -1)
    xx = xx.reshape(1, 1, -1)
    yy = yy.reshape(1, 1, -1)
    return torch.cat([z * (xx - cx) / fx, z * (yy - cy) / fy, z], dim=1).contiguous()


class BilateralPropagation(nn.Module):
    """Depth of every pixel from its 4 nearest sparse points: an MLP on [own feature, neighbour
    feature, neighbour 3D point, pixel offset] gives (alpha, beta, omega) per neighbour, and
    depth = sum_k softmax_k(omega) * ((1 + alpha_k) * Z_k + beta_k) (the original's Prop)."""

    def __init__(self, c: int, cpoint: int = 3, coffset: int = 2):
        super().__init__()
        gelu = nn.GELU
        self.convXF = nn.Sequential(
            ConvBNAct(2 * c + cpoint + coffset, c, 1, 0, act=gelu()), ConvBNAct(c, c, 1, 0, act=gelu()))
        self.convXL = nn.Sequential(
            ConvBNAct(c, c, 1, 0, act=gelu()), ConvBNAct(c, c, 1, 0, act=nn.Identity()))
        self.act = gelu()
        self.coef = nn.Module()
        self.coef.conv = nn.Conv2d(c, 3, 1, bias=True)

    def forward(self, feat: Tensor, points: Tensor, offset: Tensor, idx: Tensor) -> Tensor:
        # float32: the neighbours' 3D points (tens of metres) would keep 3 significant digits in bf16
        return in_float32(self._forward, feat, points, offset, idx)

    def _forward(self, feat: Tensor, points: Tensor, offset: Tensor, idx: Tensor) -> Tensor:
        # tensors are laid out B x C x neighbours x pixels so that 1x1 convs act as the per-neighbour MLP
        B, C, H, W = feat.shape
        num, N = idx.shape[1], H * W
        gather_idx = idx.reshape(B, 1, num * N)
        nbr_pts = torch.gather(points, 2, gather_idx.expand(B, points.shape[1], num * N)).view(B, -1, num, N)
        # The MLP's first 1x1 conv is linear in its input [own feature, neighbour feature, neighbour point,
        # offset]. Its feature parts are applied to the N pixels once, the neighbour part gathered after
        # (a 1x1 conv commutes with the gather), instead of to 4 x N gathered copies: the same sums in
        # another order, about 3x fewer multiplies at bpnet-s widths, and no (2C + 5)-channel copy.
        first = self.convXF[0].conv
        w = first.conv.weight
        own_nbr = F.conv2d(feat, torch.cat([w[:, :C], w[:, C:2 * C]])).reshape(B, 2 * C, N)
        nbr = torch.gather(own_nbr[:, C:], 2, gather_idx.expand(B, C, num * N)).view(B, C, num, N)
        # (a bias exists only once fold_batchnorm has merged the norm into the conv)
        x = F.conv2d(torch.cat([nbr_pts, offset], dim=1), w[:, 2 * C:], first.conv.bias) + nbr + own_nbr[:, :C, None]
        x = self.convXF[1](first.relu(first.bn(x)))
        x = self.act(x + self.convXL(x))
        alpha, beta, omega = torch.split(self.coef.conv(x), 1, dim=1)
        omega = torch.softmax(omega, dim=2)
        depth = torch.sum(((alpha + 1) * nbr_pts[:, -1:] + beta) * omega, dim=2, keepdim=True)
        return depth.view(B, 1, H, W)


class FuseUNet(nn.Module):
    """U-Net over [features, back-projected points] that refines a level's features (the original's
    UBNet); depth = number of x2 downsamplings."""

    def __init__(self, c: int, cpoint: int, blocks: int, depth: int, max_width: int, drop_path: float):
        super().__init__()
        rates = iter(np.linspace(0, drop_path, blocks * (1 + depth)).tolist())
        self.encoder = nn.ModuleList([nn.Sequential(ConvBNAct(c + cpoint, c), make_stage(c, c, blocks, 1, rates))])
        self.decoder = nn.ModuleList()
        cin = c
        for _ in range(depth):
            cout = min(cin * 2, max_width)
            self.encoder.append(make_stage(cin, cout, blocks, 2, rates))
            self.decoder.append(UpSkip(cout, cin, cin))
            cin = cout

    def forward(self, feat: Tensor, points: Tensor) -> Tensor:
        x = _like(torch.cat([feat, points], dim=1), feat)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips[-1]
        for i in range(len(skips) - 2, -1, -1):
            x = self.decoder[i](x, skips[i])
        return x


class KernelHead(nn.Module):
    """Per-pixel k x k affinity: k*k-1 predicted weights normalised by their absolute sum, the centre
    weight set to 1 - their sum (the original's GenKernel)."""

    def __init__(self, c: int, k: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.conv = nn.Sequential(ConvBNAct(c, c), ConvBNAct(c, k * k - 1, act=nn.Identity()))

    def raw(self, feat: Tensor) -> Tensor:
        """The k*k-1 weights before the normalisation (trainer.ops.propagate normalises them itself)."""
        return self.conv(feat)

    def forward(self, feat: Tensor) -> Tensor:
        w = self.raw(feat)
        w = w / (w.abs().sum(dim=1, keepdim=True) + self.eps)
        centre = 1 - w.sum(dim=1, keepdim=True)
        half = w.shape[1] // 2
        return torch.cat([w[:, :half], centre, w[:, half:]], dim=1).contiguous()


class CSPN(nn.Module):
    """CSPN++-style refinement: 3x3, 5x5 and 7x7 propagations, each re-injecting the pooled sparse depth
    where it exists, blended by predicted confidences; a last head blends the start, midway and final
    states. Runs in float32 under autocast, as the original forces."""

    def __init__(self, c: int, iters: int):
        super().__init__()
        self.iters = iters
        self.weight3x3 = KernelHead(c, 3)
        self.weight5x5 = KernelHead(c, 5)
        self.weight7x7 = KernelHead(c, 7)
        self.convmask = nn.Sequential(ConvBNAct(c, c), ConvBNAct(c, 3, norm=False, act=nn.Sigmoid()))
        self.convck = nn.Sequential(ConvBNAct(c, c), ConvBNAct(c, 3, norm=False, act=nn.Softmax(dim=1)))
        self.convct = nn.Sequential(ConvBNAct(c + 3, c), ConvBNAct(c, 3, norm=False, act=nn.Softmax(dim=1)))

    def forward(self, feat: Tensor, depth: Tensor, sparse: Tensor) -> Tensor:
        return in_float32(self._forward, feat, depth, sparse)

    def _forward(self, feat: Tensor, h: Tensor, h0: Tensor) -> Tensor:
        heads = [self.weight3x3, self.weight5x5, self.weight7x7]
        masks = torch.split(self.convmask(feat) * (h0 > VALID_DEPTH).float(), 1, dim=1)
        confs = torch.split(self.convck(feat), 1, dim=1)
        # each kernel's chain of steps x <- (1 - m) * local_conv(x, kernel) + m * h0, as one op
        mid, end = zip(*[propagate(h, h0, head.raw(feat), m, self.iters, head.eps)
                         for head, m in zip(heads, masks, strict=True)], strict=True)
        states = [h, confs[0] * mid[0] + confs[1] * mid[1] + confs[2] * mid[2],
                  confs[0] * end[0] + confs[1] * end[1] + confs[2] * end[2]]
        states = torch.cat(states, dim=1)
        blend = self.convct(_like(torch.cat([feat, states], dim=1), feat))
        return torch.sum(blend * states, dim=1, keepdim=True)


class Level(nn.Module):
    """One decoder level l (scale 1/2^l): pre (pool + bilateral propagation), mid (fusion U-Net
    with the back-projected depth, residual depth), post (CSPN). The original's PMP."""

    def __init__(self, level: int, cin: int, c: int, cfg: ModelConfig):
        super().__init__()
        self.level = level
        self.upcat = UpWithDepth(cin, c) if level < NUM_LEVELS - 1 else None
        self.wpool = WeightedPool(c, level, cfg.pool_drift) if level > 0 else None
        self.prop = BilateralPropagation(c)
        self.fuse = FuseUNet(c, 3, cfg.fuse_blocks, NUM_LEVELS - 1 - level, cfg.fuse_max_width, cfg.drop_path)
        self.conv = nn.Conv2d(c, 1, 3, padding=1, bias=True)
        self.cspn = CSPN(c, cfg.cspn_iters[level])

    def forward(self, feat: Tensor | None, depth: Tensor | None, skip: Tensor, sparse: Tensor, K: Tensor,
                idx: Tensor | None = None):
        """idx: this level's 4-NN indices (B x 4 x h*w) when the caller has them (an ONNX graph: knn4's
        data-dependent search runs outside it, trainer.onnx_export.neighbours), else computed here."""
        feat = skip if self.upcat is None else self.upcat(skip, feat, depth)
        sparse = sparse if self.wpool is None else self.wpool(sparse, feat)
        K = K.clone()
        K[:, :2] = K[:, :2] / 2**self.level
        B, _, h, w = sparse.shape
        xx, yy = torch.meshgrid(torch.arange(w, device=sparse.device), torch.arange(h, device=sparse.device),
                                indexing="xy")
        # pre
        points = backproject(sparse, K, xx, yy)
        if idx is None:
            idx, offset = knn4(sparse.detach())
        else:
            offset = knn4_offset(idx, xx.reshape(-1), yy.reshape(-1), sparse.dtype)
        depth = self.prop(feat, points, offset, idx)
        # mid
        points = backproject(depth, K, xx, yy).view(B, 3, h, w)
        feat = self.fuse(feat, points)
        depth = depth + self.conv(feat)
        # post
        depth = self.cspn(feat, depth, sparse)
        return feat, depth


class BPNet(nn.Module):
    """Image encoder (ResNet, 6 scales) and a coarse-to-fine decoder of 6 levels."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.channels_last = False  # set by for_inference on a CPU
        w, nb = cfg.widths, cfg.encoder_blocks
        rates = iter(np.linspace(0, cfg.drop_path, sum(nb)).tolist())
        self.conv_img = nn.Sequential(ConvBNAct(3, w[0]), make_stage(w[0], w[0], nb[0], 1, rates))
        for lv in range(1, NUM_LEVELS):
            setattr(self, f"layer{lv}_img", make_stage(w[lv - 1], w[lv], nb[lv], 2, rates))
        for lv in range(NUM_LEVELS):
            cin = w[lv + 1] if lv + 1 < NUM_LEVELS else w[lv]
            setattr(self, f"pred{lv}", Level(lv, cin, w[lv], cfg))
        self._init_weights()

    def _init_weights(self):
        """The original's init: truncated normal (Glorot std) on plain convs, zero biases, and zero BN
        scale in the last layer of each kernel head so propagation starts as the identity-ish kernel."""
        for m in self.modules():
            if type(m) is nn.Conv2d:  # the original skips ConvTranspose2d (its class-name test misses it)
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
                nn.init.trunc_normal_(m.weight, mean=0.0, std=(2.0 / (fan_in + fan_out)) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, KernelHead):
                nn.init.zeros_(m.conv[1].conv.bn.weight)

    def forward(self, rgb: Tensor, sparse: Tensor, K: Tensor, neighbours: list[Tensor] | None = None) -> list[Tensor]:
        """Outputs coarse to fine. neighbours: the 4-NN indices of each level (0 = full resolution), as
        trainer.onnx_export.neighbours computes them outside an exported graph; by default searched here."""
        H, W = rgb.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"height and width must be multiples of 32, got {H}x{W}")
        K = K.to(sparse.dtype)
        if self.channels_last:
            rgb = rgb.contiguous(memory_format=torch.channels_last)
        skips = [self.conv_img(rgb)]
        for lv in range(1, NUM_LEVELS):
            skips.append(getattr(self, f"layer{lv}_img")(skips[-1]))
        outputs = []
        feat = depth = None
        for lv in range(NUM_LEVELS - 1, -1, -1):
            idx = None if neighbours is None else neighbours[lv]
            feat, depth = getattr(self, f"pred{lv}")(feat, depth, skips[lv], sparse, K, idx)
            up = depth if lv == 0 else F.interpolate(depth, scale_factor=2**lv, mode="bilinear", align_corners=True)
            outputs.append(up)
        return outputs


# -----------------------------------------------------------------------------
# inference


@torch.no_grad()
def _fold(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv(.)) with bn's running statistics: the weights scaled per output channel, a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # ConvTranspose2d: in x out x k x k
    shape = [1] * conv.weight.dim()
    shape[out_dim] = -1
    conv.weight.mul_(scale.view(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def for_inference(model: BPNet) -> BPNet:
    """The network as eval and predict run it (trainer.evaluate.iter_predictions, on a copy), in place:
    fold_batchnorm, and on a CPU the channels-last layout for its convolutions (oneDNN's run 1.2-1.6x
    faster in it at BP-Net's widths; the propagation ops take their inputs in the plain layout). Training
    keeps the plain layout: PyTorch's CPU batch norm in channels-last computes its batch statistics about
    1000x less precisely (measured: 1e-3 against 1e-6 with 98k values per channel), and oneDNN's weight
    gradient of a channels-last 1x1 stride-2 convolution with 8 channels crashed (torch 2.13)."""
    fold_batchnorm(model)
    model.channels_last = next(model.parameters()).device.type == "cpu"
    return model


def fold_batchnorm(model: BPNet) -> BPNet:
    """The network for inference, in place: eval mode, no gradients, and every batch norm merged into the
    convolution before it (in eval mode a norm is a per-channel affine map, so conv + norm is one conv with
    scaled weights and a bias). The outputs are those of model.eval() up to float rounding, without a pass
    over every feature map per norm. Its state_dict is no longer a checkpoint's (biases, no norms): fold a
    copy, as trainer.evaluate does."""
    model.eval().requires_grad_(False)
    for m in list(model.modules()):
        pairs = []
        if isinstance(m, ConvBNAct) and "bn" in m.conv._modules:  # a norm-free ConvBNAct has a bias instead
            pairs.append((m.conv, "conv", "bn"))
        elif isinstance(m, BasicBlock):
            pairs += [(m, "conv1", "bn1"), (m, "conv2", "bn2")]
            if m.downsample is not None:
                pairs.append((m.downsample, "0", "1"))
        elif isinstance(m, UpConvBNAct):
            pairs.append((m, "conv", "bn"))
        for parent, conv, bn in pairs:
            if isinstance(parent._modules[bn], nn.BatchNorm2d):  # (a second call finds them folded)
                _fold(parent._modules[conv], parent._modules[bn])
                parent._modules[bn] = nn.Identity()
    return model


# -----------------------------------------------------------------------------
# building, checkpoints


def config_from_dict(d: dict) -> ModelConfig:
    unknown = set(d) - {f.name for f in fields(ModelConfig)}
    if unknown:  # a config written by a newer version: refuse rather than build a different net
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    return ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def model_config_dict(model_or_config: nn.Module | ModelConfig) -> dict:
    """JSON-friendly config (tuples as lists) that `build_model` accepts back. A plugin network's is
    {"arch": "plugin", "class": "pkg.module:Class", "kwargs": {...}}."""
    plugin = getattr(model_or_config, PLUGIN_ATTR, None)
    if plugin is not None:
        return {"arch": "plugin", "class": plugin["class"], "kwargs": dict(plugin["kwargs"])}
    cfg = getattr(model_or_config, "config", model_or_config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


# -----------------------------------------------------------------------------
# plugin networks: `--model pkg.module:Class` (docs/trainer.md, "Any network")

PLUGIN_ATTR = "_dmd3c_plugin"  # set on a plugin network: its import path and constructor kwargs
PLUGIN_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def is_plugin_name(name: str | None) -> bool:
    """True for a `pkg.module:Class` import path (a preset name has no colon)."""
    return isinstance(name, str) and ":" in name


def build_plugin(path: str, kwargs: dict | None = None) -> nn.Module:
    """`pkg.module:Class(**kwargs)`: IMPORTS that module (runs its code) and builds the network. Used when the
    user names a class (--model) and when a checkpoint that records one is loaded; kwargs must be JSON (they
    are stored in the checkpoint to rebuild it)."""
    if not PLUGIN_RE.match(path):
        raise ValueError(f"--model {path!r}: a plugin network is named pkg.module:Class")
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise ValueError(f"{path}: constructor kwargs must be JSON values (they are stored in the checkpoint): "
                         f"{exc}") from exc
    module_name, cls_name = path.split(":")
    logging.getLogger("trainer").info("network %s: importing %s (plugin code runs)", path, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {path}: cannot import {module_name} ({exc}); install it or put it on "
                         "PYTHONPATH") from exc
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--model {path}: {module_name} has no nn.Module subclass {cls_name}")
    model = cls(**kwargs)
    setattr(model, PLUGIN_ATTR, {"class": path, "kwargs": kwargs})
    return model


def output_list(outputs) -> list[Tensor]:
    """A network's outputs as a list coarse to fine: BP-Net's 6 maps, or a plugin's list or single map."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, Tensor) for o in outputs):
        return list(outputs)
    raise TypeError(f"a network must return a B x 1 x H x W depth tensor or a non-empty list of them, coarse to "
                    f"fine; got {type(outputs).__name__}")


def build_model(name_or_config: str | ModelConfig | dict, kwargs: dict | None = None) -> nn.Module:
    """The network of a preset name, a plugin path (pkg.module:Class, with `kwargs`), a ModelConfig, or a
    config dict as stored in our checkpoints."""
    if is_plugin_name(name_or_config):
        return build_plugin(name_or_config, kwargs)
    if isinstance(name_or_config, dict) and name_or_config.get("arch") == "plugin":
        return build_plugin(name_or_config["class"], name_or_config.get("kwargs"))
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_PRESETS:
            raise KeyError(f"unknown model {name_or_config!r}; presets: {sorted(MODEL_PRESETS)}")
        cfg = MODEL_PRESETS[name_or_config]
    elif isinstance(name_or_config, dict):
        cfg = config_from_dict(name_or_config)
    else:
        cfg = name_or_config
    if cfg.arch != "bpnet":  # the one network there is; `arch` is recorded so that another can be told apart
        raise ValueError(f"unknown architecture {cfg.arch!r}; this trainer builds 'bpnet'")
    return BPNet(cfg)


def load_original_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load original BP-Net / DMD3C weights: a raw state_dict or a dict holding it under "net" (the
    original's result_ema.pth), "state_dict" or "model"; DDP's "module." prefix is dropped. Strict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("net", "state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    model.load_state_dict(state, strict=True)
    return model
