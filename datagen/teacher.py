"""The teacher: RGB images in, relative disparity out (Depth Anything V2 through transformers).

It knows nothing about files, shards or Ray. `resolve_teacher` is the cheap check the pipeline runs
before any work, so that missing weights fail in a second instead of after decoding a data set.
`DepthTeacher.predict` reproduces what `pipeline("depth-estimation")` returns for each image, only
batched: images whose processed tensors have the same size share a forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

DEFAULT_TEACHER = "depth-anything/Depth-Anything-V2-Large-hf"  # the paper's; -Small-hf / -Base-hf work too
ORACLE = "oracle"

# any one of these in the cache means the weights were downloaded (sharded checkpoints leave an index)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_NEEDED_FILES = ("config.json", "preprocessor_config.json")


class TeacherUnavailable(RuntimeError):
    """The teacher's weights are neither on disk nor downloadable; the message says how to get them."""


def _how_to_fetch(spec: str) -> str:
    return (
        f"Fetch the weights once with `hf download {spec}` (older clients: `huggingface-cli download {spec}`), "
        f"or download them elsewhere, copy the folder here and pass `--teacher /path/to/local/copy` "
        f"(a folder holding config.json, preprocessor_config.json and the weights)."
    )


def _offline() -> bool:
    # read the variable now: huggingface_hub freezes its own copy at import time
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is meant as a folder
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder holding a complete copy of `repo_id`, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = {}
    for name in _NEEDED_FILES + _WEIGHT_FILES:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):  # None = unknown, a sentinel object = known to be absent
            found[name] = Path(hit)
    if not all(n in found for n in _NEEDED_FILES) or not any(n in found for n in _WEIGHT_FILES):
        return None
    return found["config.json"].parent


def _check_local_dir(path: Path) -> None:
    missing = [n for n in _NEEDED_FILES if not (path / n).is_file()]
    if not any((path / n).is_file() for n in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if missing:
        raise TeacherUnavailable(
            f"teacher folder {path} is not a saved transformers depth model: missing {', '.join(missing)}. "
            f"Point --teacher at a folder made by `hf download <id> --local-dir DIR` or save_pretrained."
        )


def resolve_teacher(spec: str) -> str:
    """Check, before any work, that `spec` (a hub id, a local folder or "oracle") can be loaded.

    Returns the spec to load: "oracle", an absolute folder path, or the hub id. Raises TeacherUnavailable
    with download instructions otherwise. Reaches the network only when the weights are not cached and
    HF_HUB_OFFLINE is not set, and then with a short timeout.
    """
    if spec == ORACLE:
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return str(path.resolve())
    if path.exists() or _looks_like_path(spec):
        raise TeacherUnavailable(f"teacher path {path} is not a folder (it does not exist or is a file). "
                                 + _how_to_fetch(DEFAULT_TEACHER))
    from huggingface_hub.errors import HFValidationError

    try:
        if _cached_snapshot(spec) is not None:
            return spec
    except HFValidationError as e:
        raise TeacherUnavailable(f"--teacher {spec!r} is neither a folder nor a valid hub model id ({e})") from e
    if _offline():
        raise TeacherUnavailable(
            f"teacher {spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. " + _how_to_fetch(spec)
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(spec, timeout=5.0)
    except RepositoryNotFoundError as e:
        raise TeacherUnavailable(
            f"teacher {spec} was not found on the Hugging Face hub (or it is gated: log in with `hf auth login`). "
            + _how_to_fetch(spec)
        ) from e
    except Exception as e:  # connection refused, DNS, timeout, proxy: all mean "cannot download now"
        raise TeacherUnavailable(
            f"teacher {spec} is not cached and the hub is unreachable ({type(e).__name__}). " + _how_to_fetch(spec)
        ) from e
    return spec


def _pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(dtype, device: str):
    import torch

    named = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if isinstance(dtype, str):
        if dtype.lower() not in named:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(named)}")
        return named[dtype.lower()]
    if dtype is not None:
        return dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # half precision on CPU is slow and loses accuracy for nothing


class DepthTeacher:
    """Depth Anything (V2) through transformers, batched; `predict` equals the HF pipeline per image."""

    def __init__(self, spec: str = DEFAULT_TEACHER, device: str | None = None, dtype=None, batch_size: int = 8):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        resolved = resolve_teacher(spec)
        if resolved == ORACLE:
            raise ValueError("the oracle teacher needs true depth; build it with make_teacher('oracle')")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        is_dir = Path(resolved).is_dir()
        snapshot = None if is_dir else _cached_snapshot(resolved)
        # a cached hub model loads without asking the hub again: 64 workers must not each ping it
        load = dict(local_files_only=snapshot is not None)
        self.processor = AutoImageProcessor.from_pretrained(resolved, **load)
        self.model = AutoModelForDepthEstimation.from_pretrained(resolved, dtype=self.dtype, **load)
        self.model.to(self.device).eval()
        self.model_id = resolved
        self.revision = getattr(self.model.config, "_commit_hash", None) or (snapshot.name if snapshot else None)
        self._torch = torch

    def info(self) -> dict:
        return {"model": self.model_id, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "output": "relative_disparity"}

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images -> HxW float32 relative disparity (larger = nearer), one per image.

        The processor resizes keeping aspect ratio to multiples of 14, so images of different sizes give
        tensors of different sizes; those are queued per tensor size and each queue runs when full, which
        keeps memory bounded by (number of distinct sizes) x batch_size processed images.
        """
        out: list[np.ndarray | None] = [None] * len(images)
        pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected HxWx3 uint8, got {image.shape} {image.dtype}")
            pixels = self.processor(images=[image], return_tensors=None, input_data_format="channels_last")
            # the PIL backend hands back a transposed (channels-last) view; a strided input makes every
            # convolution in the model several times slower on CPU
            pixels = np.ascontiguousarray(pixels["pixel_values"][0], dtype=np.float32)
            queue = pending.setdefault(pixels.shape, [])
            queue.append((i, pixels))
            if len(queue) == self.batch_size:
                self._run(queue, images, out)
                queue.clear()
        for queue in pending.values():
            if queue:
                self._run(queue, images, out)
        return out

    def _run(self, queue: list[tuple[int, np.ndarray]], images: list[np.ndarray], out: list) -> None:
        torch = self._torch
        idx = [i for i, _ in queue]
        batch = torch.from_numpy(np.stack([p for _, p in queue])).to(self.device, self.dtype)
        with torch.inference_mode():
            predicted = self.model(pixel_values=batch).predicted_depth
            # upsample in fp32 whatever the model ran in: bicubic in bf16 would quantise the result
            outputs = SimpleNamespace(predicted_depth=predicted.float())
            sizes = [tuple(images[i].shape[:2]) for i in idx]
            results = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        for i, r in zip(idx, results, strict=True):
            out[i] = r["predicted_depth"].cpu().numpy().astype(np.float32, copy=False)


class OracleTeacher:
    """The synthetic world's teacher: a disparity made from the true depth, with teacher-like errors."""

    model_id = ORACLE
    revision = None

    def predict_from_depth(self, depth_m: np.ndarray, rng: np.random.Generator, **scene) -> np.ndarray:
        """scene: rgb, object_id, family of the synthetic scene (see datagen.oracle.oracle_teacher)."""
        from datagen.synthetic import oracle_teacher  # lazy: the synthetic world is not needed for real data

        return oracle_teacher(depth_m, rng, **scene)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise TypeError("the oracle teacher sees true depth, not images: call predict_from_depth(depth_m, rng)")

    def info(self) -> dict:
        return {"model": ORACLE, "revision": None, "dtype": "float32", "device": "cpu",
                "output": "relative_disparity"}


def make_teacher(spec: str = DEFAULT_TEACHER, **kw) -> DepthTeacher | OracleTeacher:
    """"oracle" -> OracleTeacher (device/dtype/batch_size do not apply), anything else -> DepthTeacher."""
    if spec == ORACLE:
        return OracleTeacher()
    return DepthTeacher(spec, **kw)


def save_random_teacher(path: str | Path, seed: int = 0) -> str:
    """Save a tiny, randomly initialised Depth Anything (Dinov2 backbone, V2-style processor at 56 px).

    For tests, benchmarks and offline dry runs of the real loading path: `DepthTeacher(path)` loads it
    exactly as it loads downloaded weights. Its maps mean nothing, but they vary across the image (the
    Hugging Face initialisation gives a tiny net a flat map, so the layers are re-initialised).
    """
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(seed)
    backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=32,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ConvTranspose2d):
                m.reset_parameters()
        model.head.conv3.weight.mul_(10.0)
        model.head.conv3.bias.fill_(2.0)
    # what Depth-Anything-V2-*-hf ship, with a 56 px target instead of 518 to stay fast
    processor = DPTImageProcessorPil(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                     resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False)
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
