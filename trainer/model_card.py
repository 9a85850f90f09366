"""`trainer export --model-card DIR`: a Hugging Face hub-style folder, written offline.

    DIR/model.safetensors   the export (trainer.checkpoint.export_weights: the weights, config and provenance
                            in its metadata; loadable by eval/predict/complete/--init)
    DIR/config.json         the network: model_name, model_config, convention (trainer.model.INPUT_CONVENTIONS)
    DIR/README.md           YAML front matter (license: the most restrictive teacher licence, library_name,
                            tags, pipeline_tag), then how to run it, its provenance and, when the checkpoint
                            recorded one, its validation

Nothing is uploaded; `huggingface-cli upload` (or the hub's web page) takes the folder as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.fsutil import atomic_write_bytes
from trainer.checkpoint import export_weights, read_metadata, resolve
from trainer.provenance import most_restrictive, non_commercial

LIBRARY_NAME = "dmd3c"
TAGS = ("depth-completion", "depth-estimation", "lidar", "knowledge-distillation", "dmd3c")


def _front_matter(licence: str, model_name: str | None) -> str:
    tags = [*TAGS, *([model_name] if model_name else [])]
    lines = ["---", f"license: {licence}", f"library_name: {LIBRARY_NAME}", "pipeline_tag: depth-estimation",
             "tags:", *(f"- {t}" for t in tags), "---"]
    return "\n".join(lines) + "\n"


def _cell(x) -> str:
    return "" if x is None else str(x).replace("|", "\\|")


def card_text(meta: dict) -> str:
    """README.md of the card from a checkpoint's (or an export's) metadata."""
    prov = meta.get("provenance") or []
    licence = most_restrictive(prov)
    name = meta.get("model_name")
    out = [_front_matter(licence, name), f"# {name or 'depth completion'} (dmd3c)", "",
           f"A depth-completion network ({name}, input convention `{meta.get('convention', 'kitti')}`) trained "
           f"with the dmd3c trainer, stage `{meta.get('stage')}`, step {meta.get('step')}.", "",
           "```python", "from trainer import load_completer", "",
           "complete = load_completer(\"model.safetensors\")", "depth = complete(rgb, sparse, K)  "
           "# H x W x 3 uint8, H x W metres (0 = no point), 3 x 3 -> H x W metres", "```", "",
           "or `trainer complete --ckpt model.safetensors --rgb img.png --sparse scan.png --K K.txt "
           "--out depth.png`.", "", "## Provenance", ""]
    if prov:
        out += ["| stage | shards | source | teacher | revision | licence |", "|---|---|---|---|---|---|"]
        for e in prov:
            t = e.get("teacher") or {}
            out.append(f"| {_cell(e.get('stage'))} | {_cell(e.get('shards') or e.get('init'))} | "
                       f"{_cell(e.get('source'))} | {_cell(t.get('id'))} | {_cell(t.get('revision'))} | "
                       f"{_cell(t.get('licence'))} |")
        notes = [e["note"] for e in prov if e.get("note")]
        out += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    else:
        out += ["Not recorded: the checkpoint was written before the trainer recorded provenance.", ""]
    nc = non_commercial(prov)
    if nc:
        out += [f"**Licence:** trained on pseudo labels of a teacher under a non-commercial licence "
                f"({', '.join(sorted({e['teacher']['licence'] for e in nc}))}); this card carries the most "
                "restrictive licence of its teachers.", ""]
    val = meta.get("val")
    if isinstance(val, dict) and val:
        out += ["## Validation", "", f"On `{val.get('shards')}` ({val.get('images')} images), at this step:", "",
                "| metric | value |", "|---|---|"]
        for k in ("rmse_m", "mae_m", "top_rmse_m", "top_mae_m"):
            if val.get(k) is not None:
                out.append(f"| {k} | {val[k]:.4f} |")
        out.append("")
    return "\n".join(out)


def write_model_card(ckpt: str | os.PathLike, out_dir: str | os.PathLike, which: str = "ema") -> Path:
    """The folder of the module docstring; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = export_weights(resolve(ckpt), out / "model.safetensors", which)
    meta = read_metadata(weights)
    config = {"library_name": LIBRARY_NAME, "model_name": meta.get("model_name"),
              "model_config": meta.get("model_config"), "convention": meta.get("convention", "kitti"),
              "weights": which}
    atomic_write_bytes(out / "config.json", (json.dumps(config, indent=1) + "\n").encode())
    atomic_write_bytes(out / "README.md", card_text(meta).encode())
    return out
