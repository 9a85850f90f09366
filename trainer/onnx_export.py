"""ONNX export of a trained BP-Net, and running the export with onnxruntime.

    trainer export --ckpt runs/finetune/best --onnx bpnet.onnx

    from trainer.onnx_export import load_onnx_completer
    complete = load_onnx_completer("bpnet.onnx")
    depth = complete(rgb, sparse, K)        # as trainer.complete.load_completer's, without PyTorch's network

The graph (opset: the installed exporter's default) takes

    rgb     B x 3 x H x W float32, 0..255 (RGB order)
    sparse  B x 1 x H x W float32, metres, 0 where there is no point
    K       B x 3 x 3 float32, the intrinsics of this H x W frame
    n0..n5  B x 4 x (H/2^l * W/2^l) int64: at each decoder level l (0 = full resolution), the flat index
            (row * w + col) of each pixel's 4 nearest valid sparse pixels, nearest first (`neighbours`)

and returns `depth`, B x 1 x H x W float32 metres (the finest output, in the network's input convention
undone: the graph normalises the image and scales the depth itself). H and W are dynamic: any multiples of
32 (pad bottom/right first, as trainer.data.eval_frame does; load_onnx_completer does it for you); B is 1.

Why the 4-NN search is outside the graph: it is a data-dependent search (how many points a frame has, where
they are) that PyTorch runs with SciPy's KD-tree on a CPU; traced into a graph it would either freeze the
exporting frame's point count or become an exhaustive H*W x points comparison (1e10 pairs on a KITTI
frame). `neighbours` computes the six inputs from the sparse map alone, with the KD-tree; outside Python
any exact 4-NN (nanoflann, FLANN, faiss) with knn4's tie rule (trainer.ops) does. A level's valid pixels
are the 2^l x 2^l cells holding at least one valid input pixel: the learned pooling (WeightedPool) gives
those cells a depth between their points' smallest and largest and the others 0, so this is the network's
own mask (it could differ only for a point within a micrometre of VALID_DEPTH, 1 mm in the network's units).
Everything else, the propagation steps included, is plain tensor ops in the graph (trainer.ops.
_propagate_graph: one one-hot convolution per step gathers the k*k shifted states).

The export is checked with onnxruntime against PyTorch on frames of three sizes before it is kept
(`max_rel_err`: the largest |onnx - torch| over the largest |torch|, at most MAX_REL_ERR); the checkpoint's
model config, input convention and provenance travel in the model's metadata_props.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model import INPUT_CONVENTIONS, NUM_LEVELS, BPNet, fold_batchnorm, network_inputs
from trainer.ops import VALID_DEPTH, knn4

log = logging.getLogger("trainer")

MULTIPLE = 2 ** (NUM_LEVELS - 1)  # H and W of the graph's inputs: multiples of 32
INPUT_NAMES = ("rgb", "sparse", "K", *(f"n{lv}" for lv in range(NUM_LEVELS)))
OUTPUT_NAME = "depth"
MAX_REL_ERR = 1e-4
CHECK_SIZES = ((64, 96), (128, 384), (96, 160))  # H x W of the frames the export is checked on
METADATA_KEYS = ("model_name", "model_config", "step", "stage", "convention", "provenance")


class OnnxExportError(RuntimeError):
    """The network cannot be exported, or the export does not match PyTorch."""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise OnnxExportError(f"ONNX export needs the {module!r} package: pip install 'dmd3c[onnx]' "
                              "(onnx, onnxruntime, onnxscript)") from exc


def neighbours(sparse: Tensor | np.ndarray, depth_scale: float = 1.0) -> list[Tensor]:
    """The graph's n0..n5 for a B x 1 x H x W (or H x W) sparse map in metres: knn4 of each level's valid
    cells (module docstring). H and W: multiples of 32. depth_scale: the network's input convention's
    (INPUT_CONVENTIONS; 10 for the original NYU networks), which the validity threshold applies after."""
    sparse = torch.as_tensor(np.asarray(sparse, dtype=np.float32) if isinstance(sparse, np.ndarray) else sparse)
    if sparse.dim() == 2:
        sparse = sparse[None, None]
    H, W = sparse.shape[-2:]
    if H % MULTIPLE or W % MULTIPLE:
        raise ValueError(f"height and width must be multiples of {MULTIPLE}, got {H}x{W}")
    valid = (sparse.float() * depth_scale > VALID_DEPTH).float()
    return [knn4(valid if lv == 0 else F.max_pool2d(valid, 2**lv))[0] for lv in range(NUM_LEVELS)]


class _Graph(nn.Module):
    """What is exported: raw inputs in, metres out (the input convention applied inside)."""

    def __init__(self, model: BPNet, convention: str):
        super().__init__()
        self.model, self.convention = model, convention
        self.depth_scale = float(INPUT_CONVENTIONS[convention]["depth_scale"])

    def forward(self, rgb: Tensor, sparse: Tensor, K: Tensor, *nbrs: Tensor) -> Tensor:
        x, s, scale = network_inputs(rgb, sparse, self.convention)
        return self.model(x, s, K, list(nbrs))[-1] / scale


def example_inputs(height: int, width: int, seed: int = 0, density: float = 0.05,
                   depth_scale: float = 1.0) -> tuple[Tensor, ...]:
    """A random frame (rgb 0..255, 5% of pixels with a point at 2-80 m, a plausible K) and its neighbours."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(1, 3, height, width, generator=g) * 255
    hit = torch.rand(1, 1, height, width, generator=g) < density
    sparse = torch.where(hit, 2 + 78 * torch.rand(1, 1, height, width, generator=g), torch.zeros(()))
    f = 0.8 * width
    K = torch.tensor([[[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]])
    return (rgb, sparse, K, *neighbours(sparse, depth_scale))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, frames: int = 3, hw: tuple[int, int] = (64, 128)) -> nn.Module:
    """In place, for checks and benchmarks on untrained networks: every batch norm gets the average
    statistics of `frames` random frames (example_inputs), as a trained network's norms hold its data's.
    With a fresh network's identity statistics BP-Net's outputs reach +-20 km on such frames, where the
    rounding differences of two runtimes grow beyond any tolerance. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the frames
    model.train()
    for s in range(frames):
        rgb, sparse, K, *_ = example_inputs(*hw, seed=100 + s)
        x, s_, _ = network_inputs(rgb, sparse)
        model(x, s_, K)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    return model.eval()


def graph_module(model: nn.Module, convention: str = "kitti") -> _Graph:
    """The exportable module of a BP-Net: a folded copy (batch norms merged into the convolutions)."""
    import copy

    if not isinstance(model, BPNet):
        raise OnnxExportError(f"ONNX export supports BP-Net networks; this is a {type(model).__name__} (a "
                              "--model plugin: export it with torch.onnx.export yourself, or use the "
                              "safetensors export)")
    if convention not in INPUT_CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r}")
    net = fold_batchnorm(copy.deepcopy(model).float().cpu())
    net.channels_last = False
    return _Graph(net, convention).eval()


@torch.no_grad()
def export_graph(model: nn.Module, out: str | os.PathLike, convention: str = "kitti", metadata: dict | None = None,
                 check: bool = True, optimize: bool = True) -> dict:
    """Export `model` (a BPNet) to `out` (.onnx, one file) with dynamic height and width; then, with
    `check`, run it in onnxruntime on CHECK_SIZES frames against PyTorch. Returns a report (export_s,
    max_rel_err, sizes, opset); raises OnnxExportError when an error exceeds MAX_REL_ERR. optimize: the
    exporter's graph clean-up (onnxscript's; about 40% of the export time; onnxruntime optimises the graph
    again when it loads it)."""
    _need("onnxscript")
    onnx = _need("onnx")
    graph = graph_module(model, convention)
    scale = float(INPUT_CONVENTIONS[convention]["depth_scale"])
    args = example_inputs(64, 96, depth_scale=scale)
    h, w = torch.export.Dim("h32", min=1, max=1024), torch.export.Dim("w32", min=1, max=1024)
    dims = {"rgb": {2: MULTIPLE * h, 3: MULTIPLE * w}, "sparse": {2: MULTIPLE * h, 3: MULTIPLE * w}, "K": None,
            "nbrs": tuple({2: torch.export.Dim.AUTO} for _ in range(NUM_LEVELS))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dims, input_names=list(INPUT_NAMES),
                                output_names=[OUTPUT_NAME], external_data=False, verbose=False, optimize=optimize)
    proto = program.model_proto
    for k, v in {"dmd3c": json.dumps({"graph_inputs": list(INPUT_NAMES), "multiple": MULTIPLE}),
                 **{k: json.dumps(v) for k, v in (metadata or {}).items()}}.items():
        proto.metadata_props.add(key=k, value=v)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    report = {"path": str(out), "export_s": time.perf_counter() - t0,
              "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
              "nodes": len(proto.graph.node)}
    if check:
        report.update(check_graph(graph, tmp))
    os.replace(tmp, out)
    return report


@torch.no_grad()
def check_graph(graph: _Graph, path: str | os.PathLike, sizes=CHECK_SIZES) -> dict:
    """max |onnxruntime - PyTorch| / max |PyTorch| per frame size; OnnxExportError above MAX_REL_ERR."""
    session = _session(path)
    errors = {}
    for i, (hh, ww) in enumerate(sizes):
        args = example_inputs(hh, ww, seed=1 + i, depth_scale=graph.depth_scale)
        ref = graph(*args).numpy()
        got = session.run(None, {n: a.numpy() for n, a in zip(INPUT_NAMES, args, strict=True)})[0]
        errors[f"{hh}x{ww}"] = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    worst = max(errors.values())
    if not worst <= MAX_REL_ERR:
        raise OnnxExportError(f"{path}: onnxruntime differs from PyTorch by {worst:.2e} (relative to the largest "
                              f"depth; allowed {MAX_REL_ERR:.0e}) on {errors}")
    return {"max_rel_err": worst, "rel_err_by_size": errors}


def _session(path: str | os.PathLike, threads: int | None = None):
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(ckpt: str, out: str | os.PathLike, which: str = "ema", check: bool = True,
                optimize: bool = True) -> dict:
    """`trainer export --onnx`: the checkpoint's (EMA) network as one .onnx file, checked (export_graph)."""
    from trainer.evaluate import load_for_inference

    model, info = load_for_inference(str(ckpt), which=which, device="cpu")  # info: the checkpoint's metadata
    metadata = {k: info[k] for k in METADATA_KEYS if k in info}
    metadata.update(convention=info["convention"], weights=which)
    return export_graph(model, out, info["convention"], metadata, check, optimize)


def _metadata(session) -> dict:
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata_props of an export, JSON-decoded (model_config, convention, provenance, ...)."""
    return _metadata(_session(path))


@dataclass
class OnnxRunner:
    """Runs an export on collated batches as trainer.evaluate.run_network runs a network (metres out)."""

    session: object
    info: dict

    def __call__(self, batch: dict) -> np.ndarray:
        rgb = batch["rgb_raw"].float()
        sparse = batch["sparse"].float()
        scale = float(INPUT_CONVENTIONS[self.info.get("convention", "kitti")]["depth_scale"])
        feeds = dict(zip(INPUT_NAMES, (rgb, sparse, batch["K"].float(), *neighbours(sparse, scale)), strict=True))
        return self.session.run(None, {k: v.numpy() for k, v in feeds.items()})[0][:, 0]


def load_onnx_completer(path: str | os.PathLike, threads: int | None = None):
    """A trainer.complete.Completer that runs an ONNX export in onnxruntime: the same checks, padding and
    output as load_completer's, no PyTorch network."""
    from trainer.complete import Completer
    from trainer.provenance import warn_noncommercial

    session = _session(path, threads)
    info = _metadata(session)
    if "dmd3c" not in info:
        raise OnnxExportError(f"{path}: not an export of `trainer export --onnx` (no dmd3c metadata)")
    warn_noncommercial(info, str(path))
    return Completer(None, info, runner=OnnxRunner(session, info))
