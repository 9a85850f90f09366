"""A teacher's pre- and post-processing as array and tensor operations, so that it runs outside the model process.

The model process (a Ray actor holding the weights, usually on a GPU) should only run the network. Each
architecture's transformers image processor is therefore split into three steps:

- `resize` (in the shard task, on its own CPU, numpy/PIL): the processor's size rule and resampling. Returns
  3 x h x w pixels in 0..255 units, uint8 where the processor itself resizes uint8 images (DPT family: PIL's
  antialiased bicubic, byte for byte what the PIL processor computes), float32 where it resizes floats.
- `normalise` (where the batch is: on the accelerator, or in the task when the model runs on the CPU):
  pixel_values = x * a + b per channel (rescale and mean/std folded into one multiply-add), then the
  processor's padding.
- `finish` (on the accelerator; in the task when the model runs on the CPU): the processor's
  `post_process_depth_estimation`, i.e. the upsampling to the image size and, for Depth Pro, the focal
  length and the inversion to metric depth.

Which steps a checkpoint gets is read from its preprocessor_config.json (`load_transforms`); `spec()` is a
JSON-able dict from which `transforms_from_spec` rebuilds them anywhere, so a CPU node never needs the files.
Families: "dpt" (Depth Anything V1/V2 relative and metric, DPT, Prompt Depth Anything), "glpn", "zoedepth",
"depth_pro", and "processor": any other model, through its own transformers processor (in the task, not in
the actor) and its own post-processing.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import numpy as np
from PIL import Image

# PIL resampling codes (as saved in preprocessor_config.json) -> torch interpolation modes
_TORCH_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _size_hw(size) -> tuple[int, int]:
    if size is None:
        return (0, 0)
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return int(size.height), int(size.width)


def _affine(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean, std) -> tuple[list, list]:
    """(a, b) per channel such that pixel_values = x * a + b for x in 0..255 units."""
    r = float(rescale_factor) if do_rescale else 1.0
    if not do_normalize:
        return [r] * 3, [0.0] * 3
    mean = [float(v) for v in (mean if np.ndim(mean) else [mean] * 3)]
    std = [float(v) for v in (std if np.ndim(std) else [std] * 3)]
    return [r / s for s in std], [-m / s for m, s in zip(mean, std, strict=True)]


def _constrain(value: float, multiple: float) -> int:
    """Round to the nearest multiple (Python's round, half to even, as the processors do)."""
    return int(round(value / multiple) * multiple)


def _aspect_size(h: int, w: int, out_h: int, out_w: int, keep_aspect: bool, multiple: float) -> tuple[int, int]:
    """The DPT / ZoeDepth output size: scale as little as possible when keeping the aspect ratio."""
    sh, sw = out_h / h, out_w / w
    if keep_aspect:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return _constrain(sh * h, multiple), _constrain(sw * w, multiple)


def _pil_resize(image: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """HxWx3 uint8 -> 3xhxw uint8 with PIL, exactly as the PIL processors resize (uint8 in, uint8 out)."""
    out = Image.fromarray(image).resize((hw[1], hw[0]), resample=resample)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))


def _torch_resize(x: np.ndarray, hw: tuple[int, int], mode: str, align_corners: bool | None) -> np.ndarray:
    """3xhxw float32 -> 3xHxW float32 with torch's interpolate (no antialiasing, as the processors call it)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    ac = None if mode == "nearest" else align_corners
    return torch.nn.functional.interpolate(t, size=hw, mode=mode, align_corners=ac)[0].numpy()


def _upsample(depth, hw: tuple[int, int], mode: str):
    """One predicted map (h x w tensor) to the image size, as post_process_depth_estimation does."""
    import torch

    ac = None if mode == "nearest" else False
    return torch.nn.functional.interpolate(depth[None, None], size=hw, mode=mode, align_corners=ac)[0, 0]


class Transforms:
    """The common part: the per-channel multiply-add; subclasses give the size rule, resize and finish."""

    family = ""
    extra_outputs: tuple[str, ...] = ()  # model outputs besides predicted_depth that `finish` needs

    def __init__(self, **settings):
        self.settings = settings
        self.scale, self.offset = _affine(settings.get("do_rescale", True), settings.get("rescale_factor", 1 / 255),
                                          settings.get("do_normalize", True), settings.get("image_mean", 0.0),
                                          settings.get("image_std", 1.0))
        self._ab: dict = {}

    def spec(self) -> dict:
        return {"family": self.family, **self.settings}

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        raise NotImplementedError

    def resize(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def normalise(self, x):
        """B x 3 x h x w pixels (uint8 or float, 0..255 units; any device) -> float32 pixel_values."""
        import torch

        if x.device not in self._ab:  # made once per device: no small host-to-device copy per batch
            self._ab[x.device] = tuple(torch.tensor(v, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
                                       for v in (self.scale, self.offset))
        a, b = self._ab[x.device]
        return self._pad(torch.addcmul(b, x.to(torch.float32), a))

    def _pad(self, x):
        return x

    def finish(self, predicted, extras: dict, sizes: list[tuple[int, int]]) -> tuple[list, list[dict]]:
        """B x h x w float32 predictions -> one map per image at its size (tensors on the same device), and
        per-image facts for meta.json."""
        return [_upsample(predicted[i], hw, "bicubic") for i, hw in enumerate(sizes)], [{} for _ in sizes]


class DPTTransforms(Transforms):
    """DPT's processor (Depth Anything, DPT/MiDaS, Prompt Depth Anything): resize uint8 with PIL, then
    rescale + normalise, then optional centre padding to a multiple of size_divisor."""

    family = "dpt"

    def input_size(self, h, w):
        s = self.settings
        if not s["do_resize"]:
            return h, w
        out_h, out_w = s["size"]
        return _aspect_size(h, w, out_h, out_w, s["keep_aspect_ratio"], s["ensure_multiple_of"] or 1)

    def resize(self, image):
        if not self.settings["do_resize"]:
            return np.ascontiguousarray(image.transpose(2, 0, 1))
        return _pil_resize(image, self.input_size(*image.shape[:2]), self.settings["resample"])

    def _pad(self, x):
        import torch

        div = self.settings.get("size_divisor")
        if not self.settings.get("do_pad") or not div:
            return x
        pads = []
        for n in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            extra = math.ceil(n / div) * div - n
            pads += [extra // 2, extra - extra // 2]
        return torch.nn.functional.pad(x, pads, value=0.0)


class GLPNTransforms(DPTTransforms):
    """GLPN's processor: both sides rounded down to a multiple of size_divisor, no aspect rule."""

    family = "glpn"

    def input_size(self, h, w):
        d = self.settings["size_divisor"]
        return (h // d * d, w // d * d) if self.settings["do_resize"] else (h, w)


class ZoeDepthTransforms(Transforms):
    """ZoeDepth's processor: rescale, reflect-pad by int(sqrt(side / 2) * 3), resize the padded float image
    (align_corners=True), normalise; its post-processing upsamples to the padded size and crops the padding."""

    family = "zoedepth"

    @staticmethod
    def pads(h: int, w: int) -> tuple[int, int]:
        return int(np.sqrt(h / 2) * 3), int(np.sqrt(w / 2) * 3)

    def input_size(self, h, w):
        s = self.settings
        if s["do_pad"]:
            ph, pw = self.pads(h, w)
            h, w = h + 2 * ph, w + 2 * pw
        if not s["do_resize"]:
            return h, w
        out_h, out_w = s["size"]
        return _aspect_size(h, w, out_h, out_w, s["keep_aspect_ratio"], s["ensure_multiple_of"] or 1)

    def resize(self, image):
        s = self.settings
        x = image.transpose(2, 0, 1).astype(np.float32)
        if s["do_pad"]:
            ph, pw = self.pads(*image.shape[:2])
            x = np.pad(x, ((0, 0), (ph, ph), (pw, pw)), mode="reflect")
        if s["do_resize"]:  # linear: resizing 0..255 values and rescaling afterwards equals the processor's order
            x = _torch_resize(x, self.input_size(*image.shape[:2]), _TORCH_MODE[s["resample"]], True)
        return np.ascontiguousarray(x)

    def finish(self, predicted, extras, sizes):
        maps = []
        for i, (h, w) in enumerate(sizes):
            ph, pw = self.pads(h, w) if self.settings["do_pad"] else (0, 0)
            d = _upsample(predicted[i], (h + 2 * ph, w + 2 * pw), "bicubic")
            maps.append(d[ph:ph + h, pw:pw + w])
        return maps, [{} for _ in sizes]


class DepthProTransforms(Transforms):
    """Depth Pro's processor: rescale + normalise, then a resize to a fixed square without antialiasing
    (done here in the other order: the resize is linear). Its post-processing turns the predicted canonical
    inverse depth into metric depth with the focal length from the predicted field of view."""

    family = "depth_pro"
    extra_outputs = ("field_of_view",)

    def input_size(self, h, w):
        return tuple(self.settings["size"]) if self.settings["do_resize"] else (h, w)

    def resize(self, image):
        x = image.transpose(2, 0, 1).astype(np.float32)
        if self.settings["do_resize"]:
            x = _torch_resize(x, self.input_size(*image.shape[:2]), _TORCH_MODE[self.settings["resample"]], False)
        return np.ascontiguousarray(x)

    def finish(self, predicted, extras, sizes):
        import torch

        fov = extras.get("field_of_view")
        maps, infos = [], []
        for i, (h, w) in enumerate(sizes):
            inv, info = predicted[i], {}
            if fov is not None:
                focal = 0.5 * w / torch.tan(0.5 * torch.deg2rad(fov[i]))
                inv = inv * w / focal
                info = {"fov_deg": float(fov[i]), "focal_px": float(focal)}
            inv = _upsample(inv, (h, w), _TORCH_MODE[self.settings["resample"]])
            maps.append(1.0 / torch.clamp(inv, min=1e-4, max=1e4))
            infos.append(info)
        return maps, infos


class ProcessorTransforms(Transforms):
    """Any other depth model: its own transformers processor in the shard task (already normalised
    pixel_values), its own post_process_depth_estimation where the batch is."""

    family = "processor"

    def __init__(self, **settings):
        super().__init__(**{**settings, "do_rescale": False, "do_normalize": False})
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self.settings["path"],
                                                                 local_files_only=self.settings["local_files_only"])
        return self._processor

    def input_size(self, h, w):
        return tuple(self.resize(np.zeros((h, w, 3), np.uint8)).shape[1:])

    def resize(self, image):
        px = self.processor(images=[image], return_tensors=None, input_data_format="channels_last")["pixel_values"][0]
        return np.ascontiguousarray(px, dtype=np.float32)

    def finish(self, predicted, extras, sizes):
        out = self.processor.post_process_depth_estimation(SimpleNamespace(predicted_depth=predicted, **extras),
                                                          target_sizes=sizes)
        return [r["predicted_depth"] for r in out], [{} for _ in sizes]


FAMILIES = {c.family: c for c in (DPTTransforms, GLPNTransforms, ZoeDepthTransforms, DepthProTransforms,
                                  ProcessorTransforms)}
_BY_PROCESSOR = {"DPT": "dpt", "PromptDepthAnything": "dpt", "GLPN": "glpn", "ZoeDepth": "zoedepth",
                 "DepthPro": "depth_pro"}
# Depth Pro's processor class needs torchvision; its defaults (DepthProImageProcessor) are written down here
_DEPTH_PRO_DEFAULTS = dict(do_resize=True, size={"height": 1536, "width": 1536}, resample=2, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def transforms_from_spec(spec: dict) -> Transforms:
    spec = dict(spec)
    return FAMILIES[spec.pop("family")](**spec)


def _pil_processor_settings(name: str, saved: dict) -> dict:
    """The effective settings of a PIL processor class built from the saved dict (its class defaults fill gaps)."""
    module = {"DPT": "dpt", "PromptDepthAnything": "prompt_depth_anything", "GLPN": "glpn",
              "ZoeDepth": "zoedepth"}[name]
    mod = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
    proc = getattr(mod, f"{name}ImageProcessorPil").from_dict(saved)
    keys = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "keep_aspect_ratio", "ensure_multiple_of", "do_pad", "size_divisor")
    out = {k: getattr(proc, k, None) for k in keys}
    out["size"] = _size_hw(out["size"])
    out["resample"] = int(out["resample"]) if out["resample"] is not None else 2
    for k in ("do_resize", "do_rescale", "do_normalize", "keep_aspect_ratio", "do_pad"):
        out[k] = bool(out[k])
    for k in ("image_mean", "image_std"):
        out[k] = [float(v) for v in out[k]] if out[k] is not None else None
    return out


def load_transforms(path: str, local_files_only: bool) -> Transforms:
    """The transforms for the checkpoint at `path` (folder or hub id), from its preprocessor_config.json."""
    from transformers.image_processing_base import ImageProcessingMixin

    saved, _ = ImageProcessingMixin.get_image_processor_dict(path, local_files_only=local_files_only)
    kind = str(saved.get("image_processor_type") or saved.get("feature_extractor_type") or "")
    name = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
    name = name.removesuffix("ImageProcessor")
    family = _BY_PROCESSOR.get(name)
    if family == "depth_pro":
        s = {**_DEPTH_PRO_DEFAULTS, **{k: v for k, v in saved.items() if k in _DEPTH_PRO_DEFAULTS}}
        return DepthProTransforms(**{**s, "size": _size_hw(s["size"]), "resample": int(s["resample"])})
    if family is not None:
        return FAMILIES[family](**_pil_processor_settings(name, saved))
    return ProcessorTransforms(path=path, local_files_only=local_files_only)
