"""Any tree of images: every file with an image extension, recursively, sorted by relative path. The root may
be a local folder or an object-store prefix (s3://bucket/photos)."""

from __future__ import annotations

from shared import storage

from .base import IMAGE_EXTENSIONS, Item, Record, Source, image_items, image_record, list_images


class FolderSource(Source):
    name = "folder"
    layout = f"""\
<root>/
  **/<name>.<ext>   any depth; ext one of {' '.join(IMAGE_EXTENSIONS)} (any case)
Hidden files and folders (starting with '.') are skipped. Keys come from the relative path."""
    option_defaults = {}
    object_storage = True

    def check_layout(self) -> None:
        super().check_layout()
        if storage.is_url(self.root):
            return  # a prefix is listed once, in items(), which says so when it holds no image
        # stop at the first image: a huge tree is listed once, in items(), not twice
        for p in self.root.rglob("*"):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                return
        raise self.layout_error("no image files below --root")

    def items(self) -> list[Item]:
        self.check_layout()
        paths = list_images(self.root)
        if not paths:
            raise self.layout_error("no image files below --root")
        return image_items(self.name, self.root, paths)

    def load(self, item: Item) -> Record:
        return image_record(item)
