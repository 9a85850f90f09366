"""The teacher: RGB images in, a depth map out, from any depth model of transformers (default: Depth Anything V2).

It knows nothing about files, shards or Ray. `resolve_teacher` and `teacher_profile` are the cheap checks the
pipeline runs before any work, so that missing weights or a model whose output kind is unknown fail in a
second instead of after decoding a data set. `DepthTeacher.predict` reproduces what
`pipeline("depth-estimation")` returns for each image, only batched: images whose processed tensors have the
same size share a forward pass. The work is split so that a model process does only the network: a
`TeacherFeed` (in the shard tasks) resizes the images and finishes the maps of a CPU model, `DepthTeacher.run`
(in the model process) transfers, normalises and post-processes on an accelerator (see datagen/teachers/prep.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datagen.teachers.oracle import oracle_teacher
from datagen.teachers.prep import load_transforms, transforms_from_spec
from datagen.teachers.tiny import save as save_tiny_teacher
from datagen.teachers.zoo import head_max_depth, output_kind, teacher_license

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


def accelerated(device: str) -> bool:
    """Whether a teacher on `device` normalises and post-processes its batches itself (an accelerator), or
    leaves both to the shard tasks (a CPU model process is one process: the tasks are many)."""
    return not str(device).startswith("cpu")


def teacher_profile(spec: str, output: str | None = None, config=None) -> dict:
    """What the pipeline must know about a teacher before any work: model type, output kind (see
    datagen/teachers/zoo.py), the largest depth a bounded metric head gives, and the licence of its weights.

    `spec` is what resolve_teacher returned. Reads config.json (never remote code, never the network when
    the weights are cached); raises TeacherOutputUnknown when the kind cannot be told.
    """
    if spec == ORACLE:
        return {"model_type": ORACLE, "output": "disparity", "output_source": "oracle", "ceiling_m": None,
                "license": {"license": "n/a", "source": "the synthetic world's own teacher", "non_commercial": False}}
    if config is None:
        from transformers import AutoConfig

        cached = not Path(spec).is_dir() and _cached_snapshot(spec) is not None
        try:
            config = AutoConfig.from_pretrained(spec, local_files_only=cached or Path(spec).is_dir())
        except (OSError, ValueError, KeyError) as exc:
            raise TeacherUnavailable(f"teacher {spec}: its config.json cannot be read by transformers "
                                     f"({type(exc).__name__}: {exc})") from exc
    kind, source = output_kind(config, output)
    return {"model_type": config.model_type, "output": kind, "output_source": source,
            "ceiling_m": head_max_depth(config) if kind == "metric" else None, "license": teacher_license(spec)}


@dataclass
class Packed:
    """One chunk of images ready for the model process: stacked per tensor size, with each image's size.

    pixels are uint8 or float32 in 0..255 units (`normalised` False: the model process normalises them) or
    pixel values (`normalised` True, done by the shard task for a CPU model). errors: images that could not
    be prepared (index -> reason); they have no group.
    """

    sizes: list[tuple[int, int]]
    groups: list[tuple[list[int], np.ndarray]]
    normalised: bool
    errors: dict[int, str] = field(default_factory=dict)

    def only(self, i: int) -> Packed:
        """Image i alone (to find which image of a chunk the model rejects)."""
        for idx, pixels in self.groups:
            if i in idx:
                return Packed(self.sizes, [([i], pixels[idx.index(i)][None])], self.normalised)
        return Packed(self.sizes, [], self.normalised, {i: self.errors.get(i, "not prepared")})


class TeacherFeed:
    """The shard task's half of a teacher: prepares images for the model process and finishes its answers.

    Built from DepthTeacher.info() (the transforms' settings and the device), so a CPU node needs neither
    the weights nor the processor files. `pack` resizes (and, for a CPU model, normalises) on the task's own
    core; `unpack` post-processes the raw maps a CPU model returns (an accelerator returns finished maps).
    """

    def __init__(self, info: dict, batch_size: int = 8):
        self.transforms = transforms_from_spec(info["transforms"])
        self.on_device = accelerated(info["device"])
        self.batch_size = max(1, int(batch_size))

    def pack(self, images: list[np.ndarray]) -> Packed:
        prepared: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        errors = {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                errors[i] = f"image {i}: expected HxWx3 uint8, got {image.shape} {image.dtype}"
                continue
            try:
                pixels = self.transforms.resize(image)
            except Exception as exc:  # noqa: BLE001 (one odd image must not stop its chunk)
                errors[i] = f"image {i} ({image.shape[0]}x{image.shape[1]}): {type(exc).__name__}: {exc}"
                continue
            prepared.setdefault((pixels.dtype.str, pixels.shape), []).append((i, pixels))
        groups = []
        for members in prepared.values():
            for k in range(0, len(members), self.batch_size):
                part = members[k:k + self.batch_size]
                batch = np.stack([p for _, p in part])
                if not self.on_device:  # a CPU model process runs the network only
                    import torch

                    batch = self.transforms.normalise(torch.from_numpy(batch)).numpy()
                groups.append(([i for i, _ in part], batch))
        return Packed([tuple(im.shape[:2]) for im in images], groups, not self.on_device, errors)

    def unpack(self, packed: Packed, answer: list) -> list:
        """One (map, info) per image, or a ValueError in the slot of an image that could not be prepared."""
        import torch

        out: list = [ValueError(packed.errors[i]) if i in packed.errors else None for i in range(len(packed.sizes))]
        for idx, maps, infos, extras in answer:
            if extras is not None:  # raw predictions of a CPU model process: finish them here
                done, infos = self.transforms.finish(torch.from_numpy(maps),
                                                     {k: torch.from_numpy(v) for k, v in extras.items()},
                                                     [packed.sizes[i] for i in idx])
                maps = [m.numpy() for m in done]
            for i, m, info in zip(idx, maps, infos, strict=True):
                out[i] = (np.asarray(m, dtype=np.float32), info)
        return out


class DepthTeacher:
    """Any depth model of transformers (AutoModelForDepthEstimation), batched; `predict` equals the HF
    pipeline per image. In the Ray pipeline this object lives in the model process and only `run` is called
    there: the shard tasks prepare and finish the maps with a TeacherFeed (see datagen/teachers/prep.py)."""

    def __init__(self, spec: str = DEFAULT_TEACHER, device: str | None = None, dtype=None, batch_size: int = 8,
                 output: str | None = None):
        import torch
        from transformers import AutoModelForDepthEstimation

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
        local = snapshot is not None or is_dir
        self.model = AutoModelForDepthEstimation.from_pretrained(resolved, dtype=self.dtype, local_files_only=local)
        self.model.to(self.device).eval()
        self.profile = teacher_profile(resolved, output, config=self.model.config)
        self.transforms = load_transforms(resolved, local_files_only=local)
        self.model_id = resolved
        self.revision = getattr(self.model.config, "_commit_hash", None) or (snapshot.name if snapshot else None)
        self._torch = torch

    def info(self) -> dict:
        p = self.profile
        return {"model": self.model_id, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "output": p["output"], "output_source": p["output_source"],
                "model_type": p["model_type"], "ceiling_m": p["ceiling_m"], "license": p["license"],
                "transforms": self.transforms.spec()}

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images -> one HxW float32 map per image (its kind: info()["output"])."""
        return [m for m, _ in self.predict_with_info(images)]

    def predict_with_info(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, dict]]:
        """As predict, with each image's facts from the post-processing (Depth Pro: fov_deg, focal_px).

        Images whose tensors have the same size share a forward pass, in batches of batch_size.
        """
        feed = TeacherFeed(self.info(), self.batch_size)
        packed = feed.pack(images)
        if packed.errors:
            raise ValueError(next(iter(packed.errors.values())))
        return feed.unpack(packed, self.run(packed))

    def run(self, packed: Packed) -> list:
        """The model process's part: one transfer per batch, normalisation and post-processing on the device
        when it is an accelerator, the network. Returns per batch (indices, maps, infos, None) when finished
        here, or (indices, raw B x h x w predictions, None, extras) for the shard task to finish."""
        torch = self._torch
        answer = []
        with torch.inference_mode(), warnings.catch_warnings():
            # Ray hands the pixels over as read-only shared memory; the network never writes its input
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for idx, pixels in packed.groups:
                x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
                if not packed.normalised:
                    x = self.transforms.normalise(x)
                out = self.model(pixel_values=x.to(self.dtype))
                # post-process in fp32 whatever the model ran in: bicubic in bf16 would quantise the result
                predicted = out.predicted_depth.float()
                extras = {k: getattr(out, k).float() for k in self.transforms.extra_outputs
                          if getattr(out, k, None) is not None}
                if not accelerated(self.device):
                    answer.append((idx, predicted.numpy(), None, {k: v.numpy() for k, v in extras.items()}))
                    continue
                maps, infos = self.transforms.finish(predicted, extras, [packed.sizes[i] for i in idx])
                flat = torch.cat([m.reshape(-1) for m in maps]).cpu().numpy()  # one transfer back per batch
                cuts = np.cumsum([m.numel() for m in maps])[:-1]
                answer.append((idx, [f.reshape(tuple(m.shape)) for f, m in zip(np.split(flat, cuts), maps,
                                                                                strict=True)], infos, None))
        return answer


class OracleTeacher:
    """The synthetic world's teacher: a disparity made from the true depth, with teacher-like errors."""

    model_id = ORACLE
    revision = None

    def predict_from_depth(self, depth_m: np.ndarray, rng: np.random.Generator, **scene) -> np.ndarray:
        """scene: rgb, object_id, family of the synthetic scene (see datagen.teachers.oracle.oracle_teacher)."""
        return oracle_teacher(depth_m, rng, **scene)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise TypeError("the oracle teacher sees true depth, not images: call predict_from_depth(depth_m, rng)")

    def info(self) -> dict:
        return {"model": ORACLE, "revision": None, "dtype": "float32", "device": "cpu", "output": "disparity",
                "output_source": "oracle", "model_type": ORACLE, "ceiling_m": None,
                "license": teacher_profile(ORACLE)["license"]}


def make_teacher(spec: str = DEFAULT_TEACHER, **kw) -> DepthTeacher | OracleTeacher:
    """"oracle" -> OracleTeacher (device/dtype/batch_size do not apply), anything else -> DepthTeacher."""
    if spec == ORACLE:
        return OracleTeacher()
    return DepthTeacher(spec, **kw)


def save_random_teacher(path: str | Path, seed: int = 0, arch: str = "depth_anything") -> str:
    """Save a tiny, randomly initialised depth model (default: Depth Anything V2 with a 56 px processor).

    For tests, benchmarks and offline dry runs of the real loading path: `DepthTeacher(path)` loads it
    exactly as it loads downloaded weights. `arch`: any key of datagen.teachers.tiny.ARCHS
    (depth_anything, depth_anything_metric, prompt_depth_anything, dpt, zoedepth, depth_pro, glpn).
    """
    return save_tiny_teacher(path, arch=arch, seed=seed)
