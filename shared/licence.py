"""Which model licences forbid commercial use: one list for datagen (teacher licences, job.json) and the
trainer (provenance of weights, model cards)."""

from __future__ import annotations

NON_COMMERCIAL = ("cc-by-nc", "apple-amlr", "apple-ascl")  # prefixes of licences that forbid product use


def is_non_commercial(licence: str) -> bool:
    """True for a licence id such as cc-by-nc-4.0 or cc-by-nc-sa-4.0 (any case)."""
    return str(licence).strip().lower().startswith(NON_COMMERCIAL)
