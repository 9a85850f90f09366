"""Data set readers: one file per data set, each yielding `Item`s and `Record`s (see base.py).

    src = get_source("coco", "/data/coco", intrinsics="random", splits=["val2017"])
    src.check_layout()            # LayoutError at once for a wrong --root, naming the layout expected
    for item in src.items():      # stable sorted order, unique stable keys
        record = src.load(item)   # may raise InputError (-> failures.parquet)
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    IMAGE_EXTENSIONS,
    InputError,
    Item,
    LayoutError,
    Record,
    Source,
    load_rgb,
    make_key,
)
from .cityscapes import CityscapesSource
from .coco import CocoSource
from .davis import DavisSource
from .folder import FolderSource
from .kitti import KittiSource
from .landmarks import LandmarksSource
from .nuscenes import NuScenesSource
from .nyu import NyuSource
from .synthetic import SyntheticSource

SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (
    SyntheticSource, CocoSource, LandmarksSource, NuScenesSource, CityscapesSource, DavisSource, FolderSource,
    KittiSource, NyuSource,
)}

__all__ = ["SOURCES", "get_source", "Source", "Item", "Record", "LayoutError", "InputError", "load_rgb",
           "make_key", "IMAGE_EXTENSIONS"]


def get_source(name: str, root: str | Path | None = None, intrinsics: str = "random", **options) -> Source:
    """The source `name` reading `root`. Unknown names and options raise ValueError listing the valid ones."""
    try:
        cls = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; valid: {', '.join(SOURCES)}") from None
    return cls(root, intrinsics=intrinsics, **options)
