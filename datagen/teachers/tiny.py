"""Tiny, randomly initialised depth models of every architecture datagen supports, saved like real weights.

For tests, benchmarks and offline dry runs of the real loading path: `DepthTeacher(path)` loads what `save`
writes exactly as it loads downloaded weights (config.json, model.safetensors, preprocessor_config.json).
Their maps mean nothing, but they vary across the image: Hugging Face's initialisation gives a tiny network
a flat map, so the convolutions and linear layers are re-initialised. Shapes follow the tiny test
configurations of transformers' own model tests; the processors keep each architecture's rules (aspect,
multiples, padding, resampling) at a small target size.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _dinov2(image_size: int, patch: int, hidden: int = 32, layers: int = 4, **kw):
    from transformers import Dinov2Config

    return Dinov2Config(image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, reshape_hidden_states=False, **kw)


def _depth_anything(metric: bool, prompt: bool = False):
    """Depth Anything V2 (relative or metric) or Prompt Depth Anything, with a V2-style processor at 56 px."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        PromptDepthAnythingConfig,
        PromptDepthAnythingForDepthEstimation,
    )
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
    from transformers.models.prompt_depth_anything.image_processing_pil_prompt_depth_anything import (
        PromptDepthAnythingImageProcessorPil,
    )

    config_cls, model_cls, proc_cls = ((PromptDepthAnythingConfig, PromptDepthAnythingForDepthEstimation,
                                        PromptDepthAnythingImageProcessorPil) if prompt else
                                       (DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessorPil))
    kind = dict(depth_estimation_type="metric", max_depth=20) if metric else {}
    config = config_cls(backbone_config=_dinov2(56, 14, out_indices=[1, 2, 3, 4]), patch_size=14,
                        reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                        head_hidden_size=8, **kind)
    # what Depth-Anything-V2-*-hf ship, with a 56 px target instead of 518 to stay fast
    processor = proc_cls(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
                         do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=False, **IMAGENET)
    return model_cls(config), processor


def _dpt():
    """DPT with a ViT backbone, fixed square input (as Intel/dpt-large: no aspect keeping)."""
    from transformers import DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    config = DPTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                       fusion_hidden_size=16)
    processor = DPTImageProcessorPil(size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=1,
                                     resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return DPTForDepthEstimation(config), processor


def _zoedepth():
    from transformers import ZoeDepthConfig, ZoeDepthForDepthEstimation
    from transformers.models.zoedepth.image_processing_pil_zoedepth import ZoeDepthImageProcessorPil

    backbone = _dinov2(32, 16, hidden=8, layers=2, out_features=["stage1", "stage2"])
    config = ZoeDepthConfig(backbone_config=backbone, backbone=None, neck_hidden_sizes=[2, 2], fusion_hidden_size=6,
                            bottleneck_features=6, num_out_features=[6, 6, 6, 6])
    processor = ZoeDepthImageProcessorPil(size={"height": 48, "width": 64}, keep_aspect_ratio=True,
                                          ensure_multiple_of=16, resample=2, do_pad=True, do_rescale=True,
                                          rescale_factor=1 / 255, do_normalize=True, **IMAGENET)
    return ZoeDepthForDepthEstimation(config), processor


def _depth_pro():
    """Depth Pro with its field-of-view head (metric). Its processor class needs torchvision, so the settings
    are written as the JSON DepthProImageProcessor saves."""
    from transformers import DepthProConfig, DepthProForDepthEstimation

    config = DepthProConfig(
        patch_size=16, fusion_hidden_size=16, intermediate_hook_ids=[1, 0], intermediate_feature_dims=[10, 8],
        scaled_images_ratios=[0.5, 1.0], scaled_images_overlap_ratios=[0.0, 0.2], scaled_images_feature_dims=[12, 12],
        use_fov_model=True,
        image_model_config={"model_type": "dinov2", "num_hidden_layers": 2, "hidden_size": 16,
                            "num_attention_heads": 1, "patch_size": 4},
        patch_model_config={"model_type": "vit", "num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                            "patch_size": 6},
        fov_model_config={"model_type": "vit", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                          "patch_size": 8})
    processor = {"image_processor_type": "DepthProImageProcessor", "do_resize": True,
                 "size": {"height": 64, "width": 64}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return DepthProForDepthEstimation(config), processor


def _glpn():
    from transformers import GLPNConfig, GLPNForDepthEstimation
    from transformers.models.glpn.image_processing_pil_glpn import GLPNImageProcessorPil

    config = GLPNConfig(num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 8, 16, 16],
                        patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 1, 1, 1],
                        decoder_hidden_size=8, max_depth=10)
    return GLPNForDepthEstimation(config), GLPNImageProcessorPil(size_divisor=32, resample=2, do_rescale=True)


def _liven(model, arch: str) -> None:
    """Make a tiny random net's map vary across the image and stay in its head's working range: a ReLU head
    is otherwise nearly flat or dead, ZoeDepth's bins nearly equal, Depth Pro's field of view negative."""
    def gain(layer, weight: float, bias: float | None = None) -> None:
        layer.weight.mul_(weight)
        if bias is not None:
            layer.bias.fill_(bias)

    if arch in ("depth_anything", "prompt_depth_anything"):
        gain(model.head.conv3, 10.0, 2.0)
    elif arch == "depth_anything_metric":
        gain(model.head.conv3, 5.0)
    elif arch == "dpt":
        gain(model.head.head[4], 10.0, 2.0)
    elif arch == "zoedepth":
        gain(model.metric_head.seed_bin_regressor.conv2, 30.0)
        gain(model.metric_head.conditional_log_binomial.mlp[2], 30.0)
    elif arch == "depth_pro":
        gain(model.head.layers[4], 10.0, 1.0)
        gain(model.fov_model.head.layers[-1], 0.1, 50.0)  # degrees


ARCHS = {
    "depth_anything": lambda: _depth_anything(metric=False),
    "depth_anything_metric": lambda: _depth_anything(metric=True),
    "prompt_depth_anything": lambda: _depth_anything(metric=False, prompt=True),
    "dpt": _dpt,
    "zoedepth": _zoedepth,
    "depth_pro": _depth_pro,
    "glpn": _glpn,
}


def save(path: str | Path, arch: str = "depth_anything", seed: int = 0) -> str:
    """Build the tiny `arch` (a key of ARCHS) with weights drawn from `seed`, save it to `path`, return the path."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny teacher {arch!r}; choose from {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    model, processor = ARCHS[arch]()
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ConvTranspose2d):
                m.reset_parameters()
        _liven(model, arch)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if isinstance(processor, dict):
        (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    else:
        processor.save_pretrained(path)
    return str(path)
