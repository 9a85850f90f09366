"""COCO 2017 images (no annotations are read: the teacher labels the pixels). The root may be a local folder or
an object-store prefix (s3://bucket/coco)."""

from __future__ import annotations

from shared import storage

from .base import Item, Record, Source, image_items, image_record, is_image_name

SPLITS = ("train2017", "val2017", "test2017", "unlabeled2017")


class CocoSource(Source):
    name = "coco"
    layout = """\
<root>/
  train2017/000000000009.jpg ...      (118,287 images)
  val2017/000000000139.jpg ...        (5,000)
  test2017/000000000001.jpg ...       (40,670)
  unlabeled2017/000000000008.jpg ...  (123,403)
At least one split folder must exist; annotations/ is not read."""
    option_defaults = {"splits": None}  # None = every split folder present; or a list / "a,b"
    object_storage = True

    def splits(self) -> list[str]:
        want = self.options["splits"]
        if want is None:
            return [s for s in SPLITS if self.is_dir(s)]
        if isinstance(want, str):
            want = [s.strip() for s in want.split(",") if s.strip()]
        bad = [s for s in want if s not in SPLITS]
        if bad:
            raise ValueError(f"coco: unknown split(s) {bad}; valid: {', '.join(SPLITS)}")
        return list(want)

    def check_layout(self) -> None:
        super().check_layout()
        splits = self.splits()
        if not splits:
            raise self.layout_error(f"no COCO split folder ({', '.join(SPLITS)}) under --root")
        missing = [s for s in splits if not self.is_dir(s)]
        if missing:
            raise self.layout_error(f"split folder(s) {missing} missing")

    def items(self) -> list[Item]:
        self.check_layout()
        # split folders are flat; any image extension is taken so a stray PNG is loaded, not lost
        paths = [p for s in self.splits() for p in self.files_in(s)
                 if is_image_name(str(p)) and not storage.basename(p).startswith(".")]
        if not paths:
            raise self.layout_error("no images in the split folders")
        return image_items(self.name, self.root, paths)

    def load(self, item: Item) -> Record:
        return image_record(item, split=item.path.replace("\\", "/").split("/")[-2])
