"""DAVIS video frames (2016/2017 share the layout): every frame of every sequence."""

from __future__ import annotations

from .base import IMAGE_EXTENSIONS, Item, Record, Source, image_items, image_record

RESOLUTIONS = ("480p", "Full-Resolution")


class DavisSource(Source):
    name = "davis"
    layout = """\
<root>/
  JPEGImages/
    480p/<sequence>/00000.jpg ...             (e.g. JPEGImages/480p/bear/00000.jpg)
    Full-Resolution/<sequence>/00000.jpg ...
  ImageSets/2017/train.txt                     (only read with the option imageset="2017/train")
Option resolution: 480p (default when present) or Full-Resolution."""
    option_defaults = {"resolution": None, "imageset": None}

    def resolution(self) -> str:
        res = self.options["resolution"]
        if res is None:
            present = [r for r in RESOLUTIONS if (self.root / "JPEGImages" / r).is_dir()]
            if not present:
                raise self.layout_error(f"no JPEGImages/{{{','.join(RESOLUTIONS)}}} folder")
            return present[0]
        if res not in RESOLUTIONS:
            raise ValueError(f"davis: resolution must be one of {RESOLUTIONS}, got {res!r}")
        return res

    def check_layout(self) -> None:
        super().check_layout()
        res_dir = self.root / "JPEGImages" / self.resolution()
        if not res_dir.is_dir():
            raise self.layout_error(f"{res_dir} is missing")
        if self.options["imageset"] and not self._imageset_file().is_file():
            raise self.layout_error(f"{self._imageset_file()} is missing")

    def _imageset_file(self):
        return self.root / "ImageSets" / f"{self.options['imageset']}.txt"

    def items(self) -> list[Item]:
        self.check_layout()
        res_dir = self.root / "JPEGImages" / self.resolution()
        seqs = sorted(p for p in res_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.options["imageset"]:
            keep = set(self._imageset_file().read_text().split())
            seqs = [s for s in seqs if s.name in keep]
        paths = [f for s in seqs for f in sorted(s.iterdir())
                 if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")]
        if not paths:
            raise self.layout_error(f"no frames under {res_dir}/<sequence>/")
        return image_items(self.name, self.root, paths)

    def load(self, item: Item) -> Record:
        parts = item.path.replace("\\", "/").split("/")
        return image_record(item, sequence=parts[-2], frame=parts[-1].rsplit(".", 1)[0])
