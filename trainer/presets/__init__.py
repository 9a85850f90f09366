"""Training presets: plain Python files, each holding a PRETRAIN and a FINETUNE TrainConfig.

    laptop  (the default)  bpnet-s, crop 192x256, batch 4: a few hours on a laptop CPU
    paper                  bpnet, batch 16, crop 256x1216, the paper's / BP-Net's optimiser settings

A new preset is a new file here; the CLI's options override any field of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from trainer.train import TrainConfig


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get_preset(name: str, stage: str) -> TrainConfig:
    """A fresh copy of preset `name`'s config for `stage` ("pretrain" or "finetune")."""
    if name not in names():
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(names())}")
    cfg = getattr(importlib.import_module(f"{__name__}.{name}"), stage.upper())
    return dataclasses.replace(cfg)
