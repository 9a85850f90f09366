"""Evaluation, prediction and export: what `trainer eval|predict|export` run (`score`: trainer.metrics).

A checkpoint says which network it holds (trainer.checkpoint.load_model), so --ckpt is all these need;
original BP-Net / DMD3C .pth files work too (with --model, default bpnet). The EMA weights are used
unless asked otherwise. Frames are the whole image padded bottom/right to a multiple of 32 (or an
explicit crop, BP-Net's bottom-centre test crop); predictions are cut back to the image and pasted
into a full-size frame, so prediction PNGs have the sample's own size.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.depth import MAX_DEPTH_M, encode_depth_png
from shared.fsutil import write_json
from shared.preview import colorize, depth_limits
from shared.shard import check_key
from shared.sparsity import Protocol, parse_protocol
from trainer.checkpoint import export_weights, load_model, resolve
from trainer.data import DataConfig, make_loader, parse_hw
from trainer.metrics import MetricAccumulator
from trainer.model import INPUT_CONVENTIONS, for_inference, network_inputs, output_list, resolve_convention

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class InferenceOptions:
    """How `eval`, `eval --sweep` and `predict` run a checkpoint over shards (the options they share)."""

    model_name: str | None = None  # the network of an original .pth (ours record theirs)
    which: str = "ema"  # "ema" or "model" (the trained weights)
    crop: str | None = None  # None: the whole image padded to x32; "HxW": bottom-centre crop; "bpnet-nyu"
    batch_size: int = 1
    workers: int = 0
    device: str = "auto"
    convention: str | None = None  # input convention of an original .pth; None: recorded, else kitti
    steps: int | None = None  # at most this many batches
    sparsity: Protocol | str | None = None  # the input protocol (shared.sparsity); None: the full input

    def load(self, ckpt: str) -> tuple[torch.nn.Module, dict]:
        """The checkpoint's model in eval mode on the device, and its info (load_for_inference)."""
        return load_for_inference(ckpt, self.model_name, self.which, self.device, self.convention)

    def predictions(self, model: torch.nn.Module, info: dict, shards, target: str = "gt",
                    sparsity: Protocol | str | None = None) -> Iterator[Prediction]:
        """iter_predictions of a loaded model (info: from load) with these options; `sparsity`, when given,
        replaces self.sparsity (a sweep's rows)."""
        return iter_predictions(model, shards, self.crop, self.batch_size, self.workers, self.steps, target,
                                convention=info["convention"], sparsity=self.sparsity if sparsity is None else sparsity)


@dataclass
class Prediction:
    """One sample's prediction, cut to the image content (h x w), and where that sits in the full frame."""

    key: str
    depth_m: np.ndarray  # h x w float32
    box: tuple[int, int, int, int]  # top, left, h, w in the original image
    full_hw: tuple[int, int]
    gt: np.ndarray | None  # h x w, None when the sample has no such member
    sparse: np.ndarray | None
    rgb: np.ndarray  # h x w x 3 uint8
    density: float | None = None  # fraction of the frame's content pixels that had an input value

    def full_size(self) -> np.ndarray:
        """The prediction pasted into a zero frame of the original size (0 = outside an eval crop)."""
        out = np.zeros(self.full_hw, np.float32)
        top, left, h, w = self.box
        out[top:top + h, left:left + w] = self.depth_m
        return out


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def load_for_inference(ckpt: str, model_name: str | None = None, which: str = "ema", device: str = "auto",
                       convention: str | None = None):
    """(model in eval mode on the device, info dict) from any checkpoint the project knows. info
    ["convention"] is the input convention to feed it: the recorded one, else `convention`, else kitti."""
    model, info = load_model(ckpt, model_name, which)
    info = {**info, "convention": resolve_convention(convention, info.get("convention"), str(ckpt))}
    return model.to(pick_device(device)).eval(), info


@torch.no_grad()
def iter_predictions(model: torch.nn.Module, shards, crop: str | None = None, batch_size: int = 1,
                     workers: int = 0, max_batches: int | None = None, target: str = "gt",
                     amp: bool = False, convention: str = "kitti",
                     sparsity: Protocol | str | None = None) -> Iterator[Prediction]:
    """Run the finest output of the model over every sample of the shards (one pass, no augmentation).

    A model in eval mode runs as trainer.model.for_inference makes it (a copy: norms folded into the
    convolutions, channels-last on a CPU), which gives eval mode's outputs to float rounding, faster.

    `sparsity`: a protocol of shared.sparsity applied to each frame's sparse input (never to the GT),
    e.g. "lines:16" or "points:200"; None or "full" leaves the input as it is.

    `convention` names how the network expects its inputs (trainer.model.INPUT_CONVENTIONS): "kitti"
    for ours and the original KITTI checkpoints, "nyu" for the original BP-Net NYU checkpoints (ImageNet
    normalisation, depth in metres x 10 in and out). Predictions come back in metres either way.
    """
    if convention not in INPUT_CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(INPUT_CONVENTIONS)}, got {convention!r}")
    if not model.training:  # a copy with the norms folded, channels-last on a CPU; the caller's model stays
        model = for_inference(copy.deepcopy(model))
    # amp (bf16 autocast) is off by default: the original evaluates in float32, and metrics should not
    # carry bf16 rounding
    cfg = DataConfig(shards=shards, batch_size=batch_size, crop_hw=parse_hw(crop), train=False, workers=workers,
                     sparsity=sparsity)
    for i, batch in enumerate(make_loader(cfg, rank=0, world_size=1)):
        if max_batches is not None and i >= max_batches:
            break
        out = run_network(model, batch, convention, amp)
        valid = batch["valid"][:, 0].flatten(1)
        density = ((batch["sparse"][:, 0].flatten(1) > 0) & valid).sum(1) / valid.sum(1).clamp(min=1)
        for b, key in enumerate(batch["key"]):
            top, left, h, w = (int(x) for x in batch["box"][b])
            has_t = bool(batch[f"has_{target}"][b])
            yield Prediction(
                key=key, depth_m=out[b, :h, :w].copy(), box=(top, left, h, w),
                full_hw=tuple(int(x) for x in batch["full_hw"][b]),
                gt=batch[target][b, 0, :h, :w].numpy() if has_t else None,
                sparse=batch["sparse"][b, 0, :h, :w].numpy() if bool(batch["has_sparse"][b]) else None,
                rgb=batch["rgb_raw"][b, :, :h, :w].permute(1, 2, 0).numpy(), density=float(density[b]))


def finest(outputs) -> torch.Tensor:
    """The finest depth map of a network's outputs: the last of a list (coarse to fine) or the one tensor."""
    return output_list(outputs)[-1]


def run_network(model: torch.nn.Module, batch: dict, convention: str = "kitti", amp: bool = False) -> np.ndarray:
    """B x H x W float32 metres: the finest output of `model` on a collated batch (trainer.data.collate:
    rgb_raw, sparse in metres, K), fed in the input convention and scaled back to metres. What eval, predict
    and trainer.complete run."""
    device = next(model.parameters()).device
    rgb, sparse, scale = network_inputs(batch["rgb_raw"], batch["sparse"], convention)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = finest(model(rgb.to(device), sparse.to(device), batch["K"].to(device)))
    return out.float().cpu().numpy()[:, 0] / scale


def metrics_of(predictions: Iterator[Prediction], kind: str = "kitti") -> dict:
    """MetricAccumulator.result() over predictions, plus per_image and the mean input density (percent of
    the content pixels that had an input value)."""
    acc, density = MetricAccumulator(kind), []
    for p in predictions:
        acc.add(p.depth_m, p.gt if p.gt is not None else np.zeros_like(p.depth_m), name=p.key)
        density.append(p.density)
    result = acc.result()
    result.update(input_density_percent=100 * float(np.mean(density)) if density else None, per_image=acc.per_image)
    return result


def evaluate(ckpt: str, shards, kind: str = "kitti", opts: InferenceOptions = InferenceOptions(),
             target: str = "gt", json_path: str | None = None) -> dict:
    """Metrics of a checkpoint on shards (per image on valid GT pixels, then mean over images).

    target: the member scored against, "gt" (labelled sets) or "depth" (the pseudo depth of unlabelled
    shards). Samples without it are counted as skipped. The input protocol (opts.sparsity) is recorded
    with its seed under "sparsity".
    """
    protocol = parse_protocol(opts.sparsity)
    model, info = opts.load(ckpt)
    result = metrics_of(opts.predictions(model, info, shards, target), kind)
    result.update(checkpoint=str(info.get("path", ckpt)), model=info.get("model_name"), step=info.get("step"),
                  weights=opts.which, target=target, shards=str(shards), convention=info["convention"],
                  sparsity=protocol.to_dict())
    if json_path:
        write_json(json_path, result)
    return result


def preview_image(p: Prediction) -> np.ndarray:
    """rgb | prediction | GT (or LiDAR) side by side, depths on one colour scale."""
    ref = p.gt if p.gt is not None else p.sparse
    vmin, vmax = depth_limits(p.depth_m, ref)
    panels = [p.rgb, colorize(p.depth_m, vmin, vmax)]
    if ref is not None:
        panels.append(colorize(ref, vmin, vmax))
    return np.concatenate(panels, axis=1)


def predict(ckpt: str, shards, out: str, previews: int = 16, opts: InferenceOptions = InferenceOptions()) -> dict:
    """KITTI-submission PNGs (uint16, depth x 256) at each sample's full size as <out>/<key>.png, and
    colourised previews of the first `previews` samples under <out>/preview/, under the input protocol
    opts.sparsity."""
    protocol = parse_protocol(opts.sparsity)
    model, info = opts.load(ckpt)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in opts.predictions(model, info, shards):
        name = check_key(p.key)  # keys are letters, digits, '_' and '-': never a path
        full = p.full_size()
        top, left, h, w = p.box
        # a submission needs a value everywhere: clamp into the PNG's range (0 would read as "no value")
        full[top:top + h, left:left + w] = np.clip(np.nan_to_num(full[top:top + h, left:left + w]),
                                                   1.0 / 256, MAX_DEPTH_M)
        (out_dir / f"{name}.png").write_bytes(encode_depth_png(full))
        if n < previews:
            (out_dir / "preview").mkdir(exist_ok=True)
            Image.fromarray(preview_image(p)).save(out_dir / "preview" / f"{name}.png")
        n += 1
    return {"written": n, "out": str(out_dir), "checkpoint": str(info.get("path", ckpt)),
            "model": info.get("model_name"), "weights": opts.which, "sparsity": protocol.to_dict()}


def export(ckpt: str, out: str, which: str = "ema") -> str:
    """One plain safetensors file with the (EMA) weights and the network config."""
    return str(export_weights(resolve(ckpt), out, which))
