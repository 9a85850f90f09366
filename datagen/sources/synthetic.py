"""The procedural world (datagen.world.scenes) as a source: no files, exact depth, exact K.

Unlabelled (default): RGB + the scene's K + its exact depth (the `oracle` teacher reads it).
Labelled (labelled=True): a KITTI-like sample: a simulated HDL-64 scan from KITTI's rig (LiDAR 0.08 m
above, 0.27 m behind, 0.06 m right of the camera) with range noise and dropout as the sparse input,
and the exact depth as GT: everywhere for gt="dense" (evaluation); for gt="semi" only where
accumulated-LiDAR GT would have it: no labels above a row drawn in 30-40% of the height, and random
elliptic holes below it; for gt="accumulated" where the scans of the frame and 5 frames either side
land (datagen.world.rig.accumulated_gt, as KITTI builds its GT). Sky (depth 0) never has a label.
rig="kitti" is the benchmark's target rig (datagen.world.rig): the KITTI camera scaled to the frame and an
hdl64 scaled with it, so the scan covers ~4% of the pixels as on full KITTI frames; rig="native"
(default) casts the full hdl64 into whatever frame is asked for.
meta["lidar"] keeps the scan's ring table (pattern.elevations_deg) and pose, which `trainer eval
--sparsity lines:N` reads to find each point's ring.

Intrinsics: the image was rendered through the scene's K, so that K is the only true one; the
source always reports it and forces self.intrinsics = "native" (--intrinsics random is ignored for
synthetic; a resampled K would no longer match the pixels). camera="random" renders each unlabelled
scene through its own random K instead (horizontal field of view 45-100 degrees, principal point
within 5% of the centre), as photos from many cameras; labelled scenes keep the family's camera.

Scene i of a job uses the seed SeedSequence([seed, i]) -> 63 bits, so --seed gives a new world and
--limit N (count) takes scenes 0..N-1. Everything below is a pure function of that scene seed.
"""

from __future__ import annotations

import numpy as np

from datagen.world.rig import accumulated_gt, kitti_pattern
from datagen.world.scenes import FAMILIES, render_scene
from shared.camera import make_K
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.mesh import Mesh
from shared.scan.patterns import get_pattern
from shared.scan.spec import ScanSpec

from .base import InputError, Item, Record, Source, make_key

# W, H: multiples of 32; KITTI-like, NYU-like (4:3), a photo's 3:2, a phone's 4:3
DEFAULT_SIZE = {"street": (608, 192), "room": (256, 192), "nature": (384, 256), "tabletop": (256, 192)}
SEMI_TOP_FRACTION = (0.30, 0.40)  # no GT above this fraction of the height (KITTI: LiDAR sees no higher)
SEMI_HOLES = (3, 8)               # elliptic holes per image, inclusive
SEMI_HOLE_AXES = (0.03, 0.10)     # hole semi-axes as fractions of the image height
LIDAR_NOISE_STD_M = 0.02
LIDAR_DROPOUT = 0.05
RANDOM_HFOV_DEG = (45.0, 100.0)   # camera="random": phones (~65-75 deg) to wide-angle action cameras
RANDOM_CENTRE_FRACTION = 0.05     # principal point within 5% of the image centre
GT_KINDS = ("semi", "dense", "accumulated")
RIGS = ("native", "kitti")
CAMERAS = ("default", "random")


def random_K(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random pinhole camera for a width x height frame: square pixels, horizontal field of view
    uniform in RANDOM_HFOV_DEG, principal point within RANDOM_CENTRE_FRACTION of the centre."""
    hfov = np.radians(rng.uniform(*RANDOM_HFOV_DEG))
    f = (width / 2.0) / np.tan(hfov / 2.0)
    cx = (width - 1) / 2.0 + rng.uniform(-1, 1) * RANDOM_CENTRE_FRACTION * width
    cy = (height - 1) / 2.0 + rng.uniform(-1, 1) * RANDOM_CENTRE_FRACTION * height
    return make_K(f, f, cx, cy)


def scene_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def semi_dense_mask(depth_m: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Where a semi-dense (accumulated-LiDAR-like) GT has labels: below a top row, outside holes, not sky."""
    h, w = depth_m.shape
    top = int(round(h * rng.uniform(*SEMI_TOP_FRACTION)))
    mask = depth_m > 0
    mask[:top] = False
    v, u = np.mgrid[0:h, 0:w]
    n_holes = int(rng.integers(SEMI_HOLES[0], SEMI_HOLES[1] + 1))
    for _ in range(n_holes):
        cv, cu = rng.uniform(top, h), rng.uniform(0, w)
        av, au = rng.uniform(*SEMI_HOLE_AXES, size=2) * h
        mask &= ((v - cv) / av) ** 2 + ((u - cu) / au) ** 2 > 1.0
    return mask, {"gt_top_row": top, "gt_holes": n_holes}


class SyntheticSource(Source):
    name = "synthetic"
    has_native_intrinsics = True
    layout = """\
(no files: --root is ignored) items are synthetic://<family>/<scene seed>, scenes 0..count-1.
Options: family street|room|nature|tabletop|mixed (default street; mixed takes each family in turn),
width/height (default 608x192 for street, 256x192 for room and tabletop, 384x256 for nature), count
(default 1000), seed (default 0), labelled (default False), gt semi|dense|accumulated (labelled only,
default semi), rig native|kitti (labelled only, default native), camera default|random (unlabelled
only, default default)."""
    option_defaults = {"family": "street", "width": None, "height": None, "count": 1000, "seed": 0,
                       "labelled": False, "gt": "semi", "rig": "native", "camera": "default"}

    def __init__(self, root=None, intrinsics: str = "random", **options):
        if intrinsics not in ("random", "native"):
            raise ValueError(f"--intrinsics must be 'random' or 'native', got {intrinsics!r}")
        super().__init__(None, "native", **options)
        self.requested_intrinsics = intrinsics
        o = self.options
        if o["family"] not in (*FAMILIES, "mixed"):
            raise ValueError(f"synthetic: family must be one of {', '.join(FAMILIES)} or mixed, got {o['family']!r}")
        for name, allowed in (("gt", GT_KINDS), ("rig", RIGS), ("camera", CAMERAS)):
            if o[name] not in allowed:
                raise ValueError(f"synthetic: {name} must be one of {', '.join(allowed)}, got {o[name]!r}")
        if int(o["count"]) < 0:
            raise ValueError(f"synthetic: count must be >= 0, got {o['count']}")
        for side in ("width", "height"):
            if o[side] is not None and int(o[side]) < 32:
                raise ValueError(f"synthetic: {side} must be >= 32, got {o[side]}")
        self.labelled = bool(o["labelled"])

    def check_layout(self) -> None:  # nothing on disk to check
        return None

    def family(self, index: int) -> str:
        f = self.options["family"]
        return FAMILIES[index % len(FAMILIES)] if f == "mixed" else f  # mixed: each family in turn

    def size(self, family: str) -> tuple[int, int]:
        w0, h0 = DEFAULT_SIZE[family]
        w, h = self.options["width"], self.options["height"]
        return int(w) if w is not None else w0, int(h) if h is not None else h0

    def items(self) -> list[Item]:
        out = []
        for i in range(int(self.options["count"])):
            fam, s = self.family(i), scene_seed(self.options["seed"], i)
            out.append(Item(make_key(self.name, f"{fam}/{s}"), self.name, f"synthetic://{fam}/{s}",
                            {"family": fam, "scene_seed": s, "index": i}))
        return out

    def load(self, item: Item) -> Record:
        fam, s = item.extra["family"], int(item.extra["scene_seed"])
        w, h = self.size(fam)
        K = None
        if self.options["camera"] == "random" and not self.labelled:
            K = random_K(np.random.default_rng(np.random.SeedSequence([s, 2])), w, h)
        try:
            scene = render_scene(s, family=fam, width=w, height=h, K=K)
        except ValueError as exc:
            raise InputError(f"{item.path}: cannot render ({exc})") from exc
        depth = np.asarray(scene.depth_m, dtype=np.float32)
        meta = {"family": fam, "scene_seed": s, "index": item.extra.get("index"), "intrinsics": "native"}
        rec = Record(item.key, self.name, item.path, np.asarray(scene.rgb, dtype=np.uint8),
                     K=np.asarray(scene.K, dtype=np.float64), true_depth=depth, meta=meta,
                     true_object_id=scene.object_id)
        if self.labelled:
            self._label(rec, scene, s)
        return rec

    def _label(self, rec: Record, scene, seed: int) -> None:
        lidar_rng, mask_rng = (np.random.default_rng(q) for q in np.random.SeedSequence([seed, 1]).spawn(2))
        mesh = scene.mesh if isinstance(getattr(scene, "mesh", None), Mesh) else None  # None: the grid surface
        if self.options["rig"] == "kitti":  # the benchmark's target: scaled hdl64, an HDL-64E-like sensor
            pattern, scan = kitti_pattern(rec.K), ScanSpec(mount="kitti", sensor="realistic")
        else:
            pattern, scan = get_pattern("hdl64"), ScanSpec(mount="kitti", noise_std_m=LIDAR_NOISE_STD_M,
                                                           dropout=LIDAR_DROPOUT)
        rec.sparse, info = simulate_sparse_depth(rec.true_depth, rec.K, lidar_rng, scan, rgb=rec.rgb, pattern=pattern,
                                                 surface=mesh)
        rec.sparse = np.asarray(rec.sparse, dtype=np.float32)
        rec.meta["rig"] = self.options["rig"]
        if self.options["gt"] == "dense":
            rec.gt = rec.true_depth.copy()
            rec.meta.update(gt="dense", gt_top_row=0)
        elif self.options["gt"] == "accumulated":
            if not isinstance(mesh, Mesh):
                raise InputError(f"{rec.source_path}: gt=accumulated needs the scene's exact mesh")
            mask = accumulated_gt(mesh, rec.true_depth, rec.K, pattern, mask_rng)
            rec.gt = np.where(mask, rec.true_depth, 0).astype(np.float32)
            rows = np.flatnonzero(mask.any(axis=1))
            rec.meta.update(gt="accumulated", gt_top_row=int(rows[0]) if len(rows) else rec.true_depth.shape[0])
        else:
            mask, m = semi_dense_mask(rec.true_depth, mask_rng)
            rec.gt = np.where(mask, rec.true_depth, 0).astype(np.float32)
            rec.meta.update(gt="semi", **m)
        rec.meta["lidar"] = {k: info[k] for k in ("preset", "rings", "pattern", "pose", "noise_std_m", "dropout",
                                                   "sensor", "n_points")
                             if k in info}
