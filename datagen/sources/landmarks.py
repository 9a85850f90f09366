"""Google Landmarks Dataset v2: images nested by the first three characters of their id.

The tree on disk is the source of truth: every image below <root>/<split>/ is an input. The CSV
(<split>.csv, columns id,url,landmark_id for train) only filters, and only when asked (csv=True or a
path): the mere presence of a metadata file should not silently change which images a job reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import Item, Record, Source, image_items, image_record, list_images

SPLITS = ("train", "index", "test")


class LandmarksSource(Source):
    name = "landmarks"
    layout = """\
<root>/
  train/0/0/0/000015f76534add3.jpg ...   (<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg)
  train.csv                              (id,url,landmark_id; read only with csv=True)
  index/..., test/...                    (same nesting; option split)
Option csv: False (default: every image on disk), True (keep ids listed in <root>/<split>.csv),
or a path to a CSV with an 'id' column (e.g. a cleaned subset)."""
    option_defaults = {"split": "train", "csv": False}

    def _csv_path(self) -> Path | None:
        opt = self.options["csv"]
        if opt is False or opt is None or (isinstance(opt, str) and opt.lower() in ("", "0", "false", "no")):
            return None
        if opt is True or (isinstance(opt, str) and opt.lower() in ("1", "true", "yes")):
            return self.root / f"{self.options['split']}.csv"
        return Path(opt)

    def check_layout(self) -> None:
        super().check_layout()
        split = self.options["split"]
        if split not in SPLITS:
            raise ValueError(f"landmarks: split must be one of {SPLITS}, got {split!r}")
        if not (self.root / split).is_dir():
            raise self.layout_error(f"{self.root / split} is missing")
        path = self._csv_path()
        if path is not None and not path.is_file():
            raise self.layout_error(f"csv filter {path} is missing")

    def _csv_ids(self, path: Path) -> set[str]:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "id" not in reader.fieldnames:
                raise self.layout_error(f"{path} has no 'id' column (columns: {reader.fieldnames})")
            return {row["id"] for row in reader}

    def items(self) -> list[Item]:
        self.check_layout()
        split_dir = self.root / self.options["split"]
        paths = list_images(split_dir)
        csv_path = self._csv_path()
        if csv_path is not None:
            ids = self._csv_ids(csv_path)
            paths = [p for p in paths if p.stem in ids]
        if not paths:
            raise self.layout_error(f"no images under {split_dir}/a/b/c/" + (" listed in the csv" if csv_path else ""))
        return image_items(self.name, self.root, paths)

    def load(self, item: Item) -> Record:
        return image_record(item, image_id=Path(item.path).stem)
