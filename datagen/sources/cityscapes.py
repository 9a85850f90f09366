"""Cityscapes left images, with the per-image calibration from camera/ when asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.camera import make_K

from .base import InputError, Item, Record, Source, image_items, image_record

SPLITS = ("train", "val", "test", "train_extra")
SUFFIX = "_leftImg8bit.png"


class CityscapesSource(Source):
    name = "cityscapes"
    has_native_intrinsics = True
    layout = """\
<root>/
  leftImg8bit/{train,val,test,train_extra}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      (e.g. leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png)
  camera/<split>/<city>/<city>_<seq>_<frame>_camera.json
      ({"intrinsic": {"fx", "fy", "u0", "v0"}, ...}; needed for --intrinsics native only)
Option splits: default every split folder present."""
    option_defaults = {"splits": None}

    def splits(self) -> list[str]:
        want = self.options["splits"]
        if want is None:
            return [s for s in SPLITS if (self.root / "leftImg8bit" / s).is_dir()]
        if isinstance(want, str):
            want = [s.strip() for s in want.split(",") if s.strip()]
        bad = [s for s in want if s not in SPLITS]
        if bad:
            raise ValueError(f"cityscapes: unknown split(s) {bad}; valid: {', '.join(SPLITS)}")
        return list(want)

    def check_layout(self) -> None:
        super().check_layout()
        splits = self.splits()
        if not splits:
            raise self.layout_error("no leftImg8bit/<split>/ folder")
        for s in splits:
            if not (self.root / "leftImg8bit" / s).is_dir():
                raise self.layout_error(f"leftImg8bit/{s}/ is missing")
            if self.intrinsics == "native" and not (self.root / "camera" / s).is_dir():
                raise self.layout_error(f"--intrinsics native needs camera/{s}/ (camera_trainvaltest.zip)")

    def items(self) -> list[Item]:
        self.check_layout()
        paths = sorted(p for s in self.splits() for p in (self.root / "leftImg8bit" / s).glob(f"*/*{SUFFIX}")
                       if p.is_file())
        if not paths:
            raise self.layout_error("no *_leftImg8bit.png images under leftImg8bit/<split>/<city>/")
        return image_items(self.name, self.root, paths)

    def camera_json(self, image_path: str | Path) -> Path:
        rel = Path(image_path).relative_to(self.root / "leftImg8bit")
        return self.root / "camera" / rel.parent / (rel.name[: -len(SUFFIX)] + "_camera.json")

    def load(self, item: Item) -> Record:
        city = Path(item.path).parent.name
        if self.intrinsics != "native":
            return image_record(item, city=city)
        path = self.camera_json(item.path)
        try:
            c = json.loads(path.read_text())["intrinsic"]
            K = make_K(float(c["fx"]), float(c["fy"]), float(c["u0"]), float(c["v0"]))
        except FileNotFoundError as exc:
            raise InputError(f"{item.path}: calibration {path} is missing") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{item.path}: bad calibration {path} ({exc!r})") from exc
        if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InputError(f"{item.path}: bad intrinsics in {path}")
        return image_record(item, K=K, city=city)
