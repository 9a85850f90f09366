"""Which depth models can teach, what their maps mean, and under which licence their authors publish them.

A teacher map is one of three kinds (`OUTPUTS`); the kind decides how the pipeline turns it into pseudo depth
(datagen/pseudo_depth.py) and how the trainer must align it (recorded in meta.json as teacher.output):

- "disparity": relative inverse depth, true = s * map + b for unknown s > 0, b (Depth Anything relative, MiDaS/DPT);
- "depth": relative depth, true = s * map + b (a model without its metric cue, e.g. Prompt Depth Anything
  run without a LiDAR prompt, or Depth Pro without its field-of-view head);
- "metric": depth in metres (Depth Anything metric, ZoeDepth, Depth Pro, GLPN).

The kind comes from the model's config where the config says it (Depth Anything's `depth_estimation_type`,
Depth Pro's `use_fov_model`), else from `MODEL_TYPES`, else from `--teacher-output`. A config that says the kind
cannot be overridden (a mismatch is an error); the table can (e.g. DPT checkpoints fine-tuned for metric depth).

Licences are the ones shown on each checkpoint's model card when this table was written (2025): a run reads
the card (README.md front matter) of the weights it loads when it is on disk, and falls back to this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.licence import NON_COMMERCIAL, is_non_commercial  # noqa: F401 (NON_COMMERCIAL: its old home)

OUTPUTS = ("disparity", "depth", "metric")
SEE_CARD = "see the model card"


class TeacherOutputUnknown(ValueError):
    """The kind of map a model gives cannot be told from its config or the table, and no --teacher-output."""


@dataclass(frozen=True)
class Checkpoint:
    hub_id: str
    license: str  # as on the model card; SEE_CARD where it could not be confirmed
    params_m: float  # millions of parameters (from the card, or the fp32 checkpoint size / 4 bytes)
    note: str = ""


@dataclass(frozen=True)
class ModelType:
    name: str  # config.model_type
    output: str  # the kind; "config" where the config decides
    rule: str  # how the kind is decided, for the listing
    processing: str  # how its pre-/post-processing is done here
    checkpoints: tuple[Checkpoint, ...] = ()


MODEL_TYPES: dict[str, ModelType] = {m.name: m for m in (
    ModelType("depth_anything", "config", "depth_estimation_type: relative -> disparity, metric -> metric",
              "DPT-style: aspect-keeping resize to multiples of 14 (bicubic, antialiased), ImageNet "
              "normalisation; bicubic upsampling to the image",
              (Checkpoint("depth-anything/Depth-Anything-V2-Small-hf", "apache-2.0", 24.8),
               Checkpoint("depth-anything/Depth-Anything-V2-Base-hf", "cc-by-nc-4.0", 97.5),
               Checkpoint("depth-anything/Depth-Anything-V2-Large-hf", "cc-by-nc-4.0", 335.3, "default teacher"),
               Checkpoint("depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf", SEE_CARD, 24.8,
                          "metric, max 20 m (Hypersim)"),
               Checkpoint("depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf", "apache-2.0", 335.3,
                          "metric, max 80 m (Virtual KITTI 2)"),
               Checkpoint("LiheYoung/depth-anything-small-hf", "apache-2.0", 24.8, "Depth Anything V1"),
               Checkpoint("LiheYoung/depth-anything-large-hf", "apache-2.0", 335.3, "Depth Anything V1"))),
    ModelType("dpt", "disparity", "table (MiDaS-trained DPT gives relative inverse depth); DPT heads fine-tuned "
              "for metric depth need --teacher-output metric",
              "DPT: the processor's resize rule (fixed 384 x 384 for dpt-large), normalisation; bicubic upsampling",
              (Checkpoint("Intel/dpt-large", "apache-2.0", 343.0),
               Checkpoint("Intel/dpt-hybrid-midas", "apache-2.0", 122.0))),
    ModelType("zoedepth", "metric", "table", "ZoeDepth: reflect padding, aspect-keeping resize to multiples of "
              "32 (bilinear, align_corners), normalisation; bicubic upsampling, padding removed",
              (Checkpoint("Intel/zoedepth-nyu-kitti", "mit", 345.0),)),
    ModelType("depth_pro", "config", "use_fov_model: true -> metric (depth from the estimated focal length), "
              "false -> depth (scale unknown)", "Depth Pro: 1536 x 1536 bilinear resize, normalisation; focal "
              "length from the field of view, bilinear upsampling of inverse depth",
              (Checkpoint("apple/DepthPro-hf", "apple-amlr", 952.0, "research use only"),)),
    ModelType("prompt_depth_anything", "depth", "table: without a LiDAR prompt its scale comes from nowhere, so "
              "relative depth whatever depth_estimation_type says", "DPT-style as Depth Anything",
              (Checkpoint("depth-anything/prompt-depth-anything-vits-hf", "apache-2.0", 25.0),
               Checkpoint("depth-anything/prompt-depth-anything-vitl-hf", "apache-2.0", 340.0))),
    ModelType("glpn", "metric", "table", "GLPN: resize down to multiples of 32 (bilinear); bicubic upsampling",
              (Checkpoint("vinvino02/glpn-kitti", "apache-2.0", 61.0, "metric, KITTI"),
               Checkpoint("vinvino02/glpn-nyu", SEE_CARD, 61.0, "metric, NYUv2"))),
)}


def _config_output(config) -> str | None:
    """The kind the config itself states, or None."""
    kind = getattr(config, "model_type", None)
    if kind == "depth_anything":
        return {"relative": "disparity", "metric": "metric"}[getattr(config, "depth_estimation_type", "relative")]
    if kind == "depth_pro":
        return "metric" if getattr(config, "use_fov_model", False) else "depth"
    return None


def output_kind(config, override: str | None = None) -> tuple[str, str]:
    """(kind, where it came from: "config" | "table" | "--teacher-output") for a transformers config."""
    if override is not None and override not in OUTPUTS:
        raise TeacherOutputUnknown(f"--teacher-output {override!r}: use one of {', '.join(OUTPUTS)}")
    model_type = getattr(config, "model_type", "?")
    stated = _config_output(config)
    if stated is not None:
        if override is not None and override != stated:
            raise TeacherOutputUnknown(
                f"--teacher-output {override} contradicts the model's config, which makes this {model_type} "
                f"model give {stated} ({MODEL_TYPES[model_type].rule}); drop --teacher-output")
        return stated, "config"
    if override is not None:
        return override, "--teacher-output"
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type].output, "table"
    raise TeacherOutputUnknown(
        f"model type {model_type!r} is not in datagen's table of depth models ({', '.join(MODEL_TYPES)}), so "
        f"what its map means is unknown: pass --teacher-output disparity|depth|metric (see `datagen teachers`)")


def head_max_depth(config) -> float | None:
    """The largest depth a bounded metric head can output (sigmoid x max_depth, or the last bin), or None."""
    if getattr(config, "model_type", None) == "zoedepth":
        bins = getattr(config, "bin_configurations", None) or []
        return max((float(b["max_depth"]) for b in bins), default=None)
    if getattr(config, "model_type", None) in ("depth_anything", "prompt_depth_anything", "glpn"):
        if getattr(config, "depth_estimation_type", "metric") == "metric" and getattr(config, "max_depth", None):
            return float(config.max_depth)
    return None


def _card_license(spec: str) -> str | None:
    """The `license:` of the model card next to the weights (a folder, or the HF cache); never the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    path = Path(spec) / "README.md"
    if not path.is_file():
        try:
            hit = try_to_load_from_cache(spec, "README.md")
        except Exception:  # noqa: BLE001 (a folder path that is not a valid repo id)
            hit = None
        if not isinstance(hit, str):
            return None
        path = Path(hit)
    try:
        meta = metadata_load(path) or {}
    except Exception:  # noqa: BLE001 (a card without YAML front matter)
        return None
    lic = meta.get("license")
    if lic == "other" and meta.get("license_name"):
        lic = f"other ({meta['license_name']})"
    return str(lic) if lic else None


def teacher_license(spec: str) -> dict:
    """{"license", "source", "non_commercial"} for the weights at `spec` (folder or hub id): the card's
    `license:` when the card is on disk (`hf download` fetches it with the weights), else the table's."""
    checkpoints = {c.hub_id: c for m in MODEL_TYPES.values() for c in m.checkpoints}
    lic, source = _card_license(spec), "model card"
    if lic is None:
        known = checkpoints.get(spec)
        if known is not None and known.license != SEE_CARD:
            lic, source = known.license, f"datagen's table ({known.hub_id})"
        else:
            lic, source = "unknown", "no model card on disk: see the model card where the weights come from"
    return {"license": lic, "source": source, "non_commercial": is_non_commercial(lic)}


def license_line(model: str, lic: dict) -> str:
    text = f"teacher {model}: licence {lic['license']} ({lic['source']})"
    if lic["non_commercial"]:
        text += ("; NOT for commercial use: data made with it inherits the restriction. "
                 "depth-anything/Depth-Anything-V2-Small-hf is Apache-2.0")
    return text


def format_table() -> str:
    """`datagen teachers`: the model types, their output kind, and example checkpoints with licence and size."""
    lines = ["| model type | output | decided by | checkpoint | licence (model card) | params (M) | note |",
             "|---|---|---|---|---|---:|---|"]
    for m in MODEL_TYPES.values():
        for i, c in enumerate(m.checkpoints):
            first = i == 0
            lines.append(f"| {m.name if first else ''} | {m.output if first else ''} | {m.rule if first else ''} "
                         f"| {c.hub_id} | {c.license} | {c.params_m:g} | {c.note} |")
    lines += ["", "Output kinds: disparity = relative inverse depth, depth = relative depth, metric = metres.",
              "Any other model that AutoModelForDepthEstimation loads works with --teacher-output and its own "
              "transformers processor.",
              "Licences as shown on each model card when this table was written; `datagen run` prints the one of "
              "the weights it loads. Base/Large Depth Anything V2 are non-commercial (CC-BY-NC-4.0)."]
    return "\n".join(lines)
