"""Provenance that travels with the weights: which shards, sources and teachers a network was trained on.

A training run records, under the checkpoint metadata key `provenance`, one entry per shard folder it read:

    {"shards": "shards/coco", "source": "coco",
     "teacher": {"id": "depth-anything/Depth-Anything-V2-Large-hf", "revision": "...", "licence": "cc-by-nc-4.0",
                 "non_commercial": true},
     "stage": "pretrain"}

collected when training starts from each folder's job.json (written by `datagen run`: source, teacher id,
teacher licence) and the first sample's meta.json (teacher revision; source and teacher id where there is no
job.json). A run started with --init carries its parent's entries over and appends its own; --resume keeps
the checkpoint's. `trainer export` copies them into the export; `trainer export` and `trainer complete` log
a warning when a teacher's licence forbids commercial use (shared.licence).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared import storage
from shared.licence import is_non_commercial

log = logging.getLogger("trainer")

JOB_FILE = "job.json"  # datagen.job.pipeline.JOB_FILE (the trainer never imports datagen)
UNKNOWN = "unknown"


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if storage.is_url(url) else str(Path(url).parent)


def _first_meta(url: str) -> dict:
    from shared.shard import iter_samples

    try:
        return next(iter(iter_samples(url)), None).meta or {}
    except Exception as exc:  # provenance is a record, not a reason to stop training
        log.warning("provenance: could not read a sample of %s (%s)", url, exc)
        return {}


def _job(folder: str) -> dict:
    path = storage.join(folder, JOB_FILE)
    try:
        if storage.is_file(path):
            job = json.loads(storage.read_bytes(path))
            return job if isinstance(job, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("provenance: could not read %s (%s)", path, exc)
    return {}


def folder_provenance(folder: str, first_shard: str) -> dict:
    """One entry (module docstring) for a shard folder: job.json first, the first sample's meta.json after."""
    job, meta = _job(folder), _first_meta(first_shard)
    teacher_meta = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else {}
    lic = ((job.get("teacher_about") or {}).get("license") or {})
    licence = lic.get("license") if isinstance(lic, dict) else None
    licence = licence or UNKNOWN
    non_commercial = lic.get("non_commercial") if isinstance(lic, dict) and "non_commercial" in lic else None
    if non_commercial is None:
        non_commercial = is_non_commercial(licence)
    return {"shards": folder, "source": job.get("source") or meta.get("source"),
            "teacher": {"id": job.get("teacher") or teacher_meta.get("model"),
                        "revision": teacher_meta.get("revision"), "licence": licence,
                        "non_commercial": bool(non_commercial)}}


def collect(shards, stage: str | None = None) -> list[dict]:
    """Entries for every folder of a shard spec (anything shared.shard.list_shards takes)."""
    from shared.shard import list_shards

    try:
        urls = list_shards(shards)
    except (OSError, ValueError) as exc:
        log.warning("provenance: could not list %s (%s)", shards, exc)
        return []
    first: dict[str, str] = {}
    for u in urls:
        first.setdefault(_folder(u), u)
    entries = [folder_provenance(folder, url) for folder, url in first.items()]
    if stage:
        for e in entries:
            e["stage"] = stage
    return entries


def run_provenance(parent: list | None, shards, stage: str) -> list[dict]:
    """A new run's provenance: its parent's entries (--init), then those of the shards it trains on."""
    return [*(parent or []), *collect(shards, stage)]


def non_commercial(provenance) -> list[dict]:
    """The entries whose teacher licence forbids commercial use."""
    return [e for e in provenance or [] if isinstance(e, dict) and (
        (e.get("teacher") or {}).get("non_commercial")
        or is_non_commercial((e.get("teacher") or {}).get("licence") or ""))]


def warn_noncommercial(meta: dict, what: str) -> list[dict]:
    """logging.warning for each teacher whose licence forbids commercial use; returns those entries."""
    found = non_commercial(meta.get("provenance"))
    for e in found:
        t = e.get("teacher") or {}
        log.warning("%s was trained on shards of %s whose teacher %s has the non-commercial licence %s: the "
                    "weights may not be usable in a product", what, e.get("shards"), t.get("id"), t.get("licence"))
    return found


def most_restrictive(provenance) -> str:
    """The licence a model card should carry: a non-commercial teacher licence if there is one, else "other"
    when a teacher's licence is unknown or not an SPDX-like id, else the one permissive licence (several
    different ones: "other")."""
    nc = non_commercial(provenance)
    if nc:
        return nc[0]["teacher"]["licence"].lower()
    lics = {((e.get("teacher") or {}).get("licence") or UNKNOWN).lower() for e in provenance or []}
    lics.discard("n/a")  # the synthetic world's oracle teacher: no licence of its own
    if not lics:
        return "other"
    if len(lics) == 1:
        lic = lics.pop()
        return lic if lic not in (UNKNOWN, "see the model card") and " " not in lic else "other"
    return "other"
