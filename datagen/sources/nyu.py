"""NYU Depth v2 as Ma & Karaman's HDF5 files (the `nyudepthv2` folder BP-Net and others read).

Shards keep the full 640x480 frame: BP-Net's resize to 240 rows and 228x304 centre crop is training
pre-processing and belongs to the trainer (it must update K with it), so other crops stay possible.

Sparse input: `points` pixels (default 500) drawn without replacement from the pixels with valid
GT. The draw is seeded from the sample key (a hash, stable across processes and machines), so the
same key always gets the same points: a fixed benchmark for val, and reproducible shards for train.
For train only, the option `seed` is mixed in, so a new --seed gives new draws.

K is the Kinect's (scaled to the file's size), unless the file holds its own 3 x 3 'K' dataset, as the
files `datagen export --format nyu-h5` writes do (Ma & Karaman's have none).
"""

from __future__ import annotations

import numpy as np

from shared.camera import make_K, scale_K
from shared.sparsity import key_seed, random_points

from .base import InputError, Item, Record, Source, assign_keys

# Kinect intrinsics of the 640x480 NYUv2 frames (the values BP-Net and CompletionFormer use)
NYU_K = make_K(5.1885790117450188e02, 5.1946961112127485e02, 3.2558244941119034e02, 2.5373616633400465e02)
NYU_SIZE = (640, 480)  # W, H
SPLITS = ("train", "val")


class NyuSource(Source):
    name = "nyu"
    labelled = True
    has_native_intrinsics = True
    layout = """\
<root>/                                   (Ma & Karaman's nyudepthv2/)
  train/<scene>/<frame>.h5                (e.g. train/basement_0001a/00001.h5)
  val/official/<frame>.h5                 (e.g. val/official/00001.h5)
Each .h5 holds 'rgb' (3 x 480 x 640 uint8) and 'depth' (480 x 640 float, metres).
A 3 x 3 'K' in the file (`datagen export --format nyu-h5` writes one) replaces the Kinect K.
Options: split (train | val, default train), points (default 500), seed (train draws only, default 0)."""
    option_defaults = {"split": "train", "points": 500, "seed": 0}

    def __init__(self, root, intrinsics: str = "native", **options):
        if intrinsics not in ("random", "native"):
            raise ValueError(f"--intrinsics must be 'random' or 'native', got {intrinsics!r}")
        super().__init__(root, "native", **options)  # NYU is calibrated: always its Kinect K
        self.requested_intrinsics = intrinsics
        if self.options["split"] not in SPLITS:
            raise ValueError(f"nyu: split must be one of {SPLITS}, got {self.options['split']!r}")
        if int(self.options["points"]) <= 0:
            raise ValueError(f"nyu: points must be positive, got {self.options['points']}")

    def check_layout(self) -> None:
        super().check_layout()
        d = self.root / self.options["split"]
        if not d.is_dir():
            raise self.layout_error(f"{d} is missing")

    def items(self) -> list[Item]:
        self.check_layout()
        split_dir = self.root / self.options["split"]
        paths = sorted(split_dir.glob("*/*.h5"), key=lambda p: p.relative_to(self.root).as_posix())
        if not paths:
            raise self.layout_error(f"no <scene>/<frame>.h5 files under {split_dir}")
        keys = assign_keys(self.name, [p.relative_to(self.root).as_posix() for p in paths])
        return [Item(k, self.name, str(p)) for k, p in zip(keys, paths, strict=True)]

    def load(self, item: Item) -> Record:
        import h5py  # lazy: only NYU reads HDF5, and importing it costs every datagen process 0.2 s

        try:
            with h5py.File(item.path, "r") as f:
                rgb = np.asarray(f["rgb"][()])
                depth = np.asarray(f["depth"][()], dtype=np.float32)
                file_K = np.asarray(f["K"][()], dtype=np.float64) if "K" in f else None
        except KeyError as exc:
            raise InputError(f"{item.path}: HDF5 file lacks dataset {exc}") from exc
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{item.path}: not a readable HDF5 file ({exc})") from exc
        if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[2] != 3:
            rgb = rgb.transpose(1, 2, 0)  # Ma's files store channels first
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"{item.path}: 'rgb' must be 3 x H x W uint8, got {rgb.shape} {rgb.dtype}")
        if depth.shape != rgb.shape[:2]:
            raise InputError(f"{item.path}: 'depth' is {depth.shape}, 'rgb' is {rgb.shape[:2]}")
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
        if not (depth > 0).any():
            raise InputError(f"{item.path}: no valid depth")
        h, w = depth.shape
        K = NYU_K.copy()
        meta = {"split": self.options["split"], "intrinsics": "native"}
        if file_K is not None:  # a file `datagen export --format nyu-h5` wrote: its frame's own K
            if file_K.shape != (3, 3) or not (np.all(np.isfinite(file_K)) and file_K[0, 0] > 0 and file_K[1, 1] > 0):
                raise InputError(f"{item.path}: 'K' must be a 3 x 3 pinhole matrix, got {file_K.tolist()}")
            K, meta["K_from"] = file_K, "file"
        elif (w, h) != NYU_SIZE:  # a resized copy of the data set: the Kinect K follows the resize
            K = scale_K(K, w / NYU_SIZE[0], h / NYU_SIZE[1])
            meta["K_scaled_from"] = list(NYU_SIZE)
        train = self.options["split"] == "train"
        rng = np.random.default_rng(key_seed(item.key, int(self.options["seed"]) if train else None))
        sparse = random_points(depth, int(self.options["points"]), rng)
        meta["points"] = int((sparse > 0).sum())
        return Record(item.key, self.name, item.path, np.ascontiguousarray(rgb), K=K, sparse=sparse,
                      gt=depth, meta=meta)
