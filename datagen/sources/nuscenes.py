"""nuScenes camera key frames (samples/CAM_*), with the calibrated intrinsics when asked.

Native K follows the devkit's relational tables: sample_data.filename -> calibrated_sensor_token ->
calibrated_sensor.camera_intrinsic (3x3, for the 1600x900 images). Every version folder present
(v1.0-trainval, v1.0-test, v1.0-mini ...) is read, because the blobs of several versions are usually
extracted into the same samples/ folder. The tables are read once, in items(), and K travels in each
Item, so workers never parse the (large) JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import IMAGE_EXTENSIONS, InputError, Item, Record, Source, image_items, image_record


class NuScenesSource(Source):
    name = "nuscenes"
    has_native_intrinsics = True
    layout = """\
<root>/
  samples/CAM_FRONT/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg ...
  samples/CAM_{FRONT_LEFT,FRONT_RIGHT,BACK,BACK_LEFT,BACK_RIGHT}/*.jpg
  sweeps/CAM_*/*.jpg                     (only with sweeps=True)
  v1.0-trainval/sample_data.json         (tables; needed for --intrinsics native only)
  v1.0-trainval/calibrated_sensor.json   (or v1.0-mini/, v1.0-test/ ...; all present are read)"""
    option_defaults = {"cameras": None, "sweeps": False, "version": None}

    def _folders(self) -> list[str]:
        return ["samples", "sweeps"] if self.options["sweeps"] else ["samples"]

    def _camera_dirs(self) -> list[Path]:
        cams = self.options["cameras"]
        if isinstance(cams, str):
            cams = [c.strip() for c in cams.split(",") if c.strip()]
        out = []
        for folder in self._folders():
            base = self.root / folder
            if base.is_dir():
                out += [d for d in sorted(base.iterdir()) if d.is_dir() and d.name.startswith("CAM_")
                        and (cams is None or d.name in cams)]
        return out

    def _version_dirs(self) -> list[Path]:
        if self.options["version"]:
            return [self.root / self.options["version"]]
        return [d for d in sorted(self.root.glob("v1.0-*"))
                if (d / "sample_data.json").is_file() and (d / "calibrated_sensor.json").is_file()]

    def check_layout(self) -> None:
        super().check_layout()
        if not self._camera_dirs():
            raise self.layout_error("no samples/CAM_* folder" + (" for the cameras asked" if self.options["cameras"] else ""))
        if self.intrinsics == "native":
            versions = self._version_dirs()
            if not versions:
                raise self.layout_error("--intrinsics native needs <root>/v1.0-*/sample_data.json and calibrated_sensor.json")
            for v in versions:
                for table in ("sample_data.json", "calibrated_sensor.json"):
                    if not (v / table).is_file():
                        raise self.layout_error(f"{v / table} is missing")

    def _intrinsics_by_filename(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for v in self._version_dirs():
            try:
                calib = {r["token"]: r.get("camera_intrinsic") for r in json.loads((v / "calibrated_sensor.json").read_text())}
                rows = json.loads((v / "sample_data.json").read_text())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise self.layout_error(f"cannot read the tables in {v}: {exc}") from exc
            for r in rows:
                K = calib.get(r.get("calibrated_sensor_token"))
                if K:  # empty for lidar and radar
                    out[r["filename"]] = K
        return out

    def items(self) -> list[Item]:
        self.check_layout()
        paths = [f for d in self._camera_dirs() for f in sorted(d.iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")]
        if not paths:
            raise self.layout_error("no images in samples/CAM_*/")
        extras = None
        if self.intrinsics == "native":
            table = self._intrinsics_by_filename()
            extras = []
            for p in paths:
                K = table.get(p.relative_to(self.root).as_posix())
                extras.append({"K": K} if K is not None else {})
        return image_items(self.name, self.root, paths, extras)

    def load(self, item: Item) -> Record:
        camera = Path(item.path).parent.name
        if self.intrinsics != "native":
            return image_record(item, camera=camera)
        if "K" not in item.extra:
            raise InputError(f"{item.path}: no sample_data row with a camera calibration in the v1.0-* tables")
        K = np.asarray(item.extra["K"], dtype=np.float64)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InputError(f"{item.path}: bad camera_intrinsic {item.extra['K']}")
        return image_record(item, K=K, camera=camera)
