"""Streaming data for the trainer: WebDataset shards -> augmented, batched tensors.

One pipeline per DataLoader worker, built from small stages that read top to bottom:

    shards of this epoch (shuffled with seed + epoch, same order on every rank)
    -> this worker's share (by shard, or by sample when there are too few shards)
    -> raw tar samples (webdataset) -> shuffle buffer (seeded) -> skip what a resumed run consumed
    -> decode (shared.shard.decode_sample; corrupt samples skipped, counted, logged)
    -> crop / pad to the network frame (K follows) -> flip -> [a new scan, --lidar] -> photometric jitter
    -> batch

A new scan (DataConfig.rescan, `trainer pretrain --lidar`): the sparse input of each training frame is cast
again from the frame's dense pseudo depth and K, after the crop and flip are decided, with the code datagen
wrote the shard's own scan with (shared.scan) and a generator seeded by (seed, epoch, key): every epoch
sees a new scan of each image, and a resumed run the same ones. Only samples with depth.png (unlabelled
shards) can be scanned again; labelled shards keep their real scans.

Splitting, so that each sample is seen exactly once per pass under DDP: the N shards of an epoch are
dealt round-robin to S = world_size x num_workers slots (slot = rank x num_workers + worker), as
webdataset's split_by_node followed by split_by_worker would do. Use N >= S shards (better a multiple
of S, so that every slot gets the same amount of data). With N < S some slots would get nothing and
the run would hang; there every slot reads every shard and keeps the samples whose index in the epoch
is its slot modulo S: still exactly once, at the cost of reading every tar S times.

Determinism and resume: every random choice comes from a numpy Generator seeded by (seed, epoch,
slot) or (seed, epoch, key), never from global state, so a sample's crop, flip and jitter do not
depend on which worker handled it. A training stream never ends (epoch after epoch); every batch
says which slot made it and how far into its epoch that slot is, the trainer records that (the data
position) and a resumed run restarts each slot at its epoch and skips that many raw samples, which
gives exactly the batches the uninterrupted run would have seen. Each slot is rotated onto a worker so
that the DataLoader's round-robin polling continues where it stopped.

Batch (a dict; maps are B x 1 x H x W float32 with 0 = no value):
    key        list of B sample keys
    rgb        B x 3 x H x W float32, normalised as BP-Net expects (trainer.model.normalize_rgb)
    rgb_raw    B x 3 x H x W uint8 (after jitter), for previews
    sparse     LiDAR input, metres          depth    dense pseudo depth (pre-training target), metres
    gt         ground truth, metres         teacher  the monocular teacher's map, to fit (see teacher_map)
    has_sparse, has_depth, has_gt, has_teacher   B bool: whether the shard had the member (else zeros)
    teacher_space  list of B: "disparity" (teacher is a disparity: relative, or 1/m of a metric teacher)
               or "depth" (a relative-depth teacher, affine in depth)
    valid      B x 1 x H x W bool: image content, False on padding
    K          B x 3 x 3 float32, intrinsics of this very frame (crop and flip applied)
    box        B x 4 int64 (top, left, height, width): where the content sits in the original image;
               the content is at [0:height, 0:width] of the frame (padding is bottom/right)
    full_hw    B x 2 int64: the original image size
    epoch      B int64
    _pos       {"slot", "epoch", "pos", "skipped"}: the data position after this batch (for resume)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from shared.camera import crop_K, flip_K
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.spec import ScanSpec
from shared.shard import (
    ReadStats,
    Sample,
    ShardError,
    decode_sample,
    list_shards,
    make_error_handler,
    shard_dataset,
)
from shared.sparsity import Protocol
from shared.sparsity import apply as apply_sparsity
from trainer.model import normalize_rgb  # the model's own helper keeps the input convention in one place

log = logging.getLogger("trainer.data")

MAPS = ("sparse", "depth", "gt", "teacher")
MULTIPLE = 32  # BP-Net's frame must be a multiple of 32 on both sides


@dataclass
class DataConfig:
    shards: str | list
    batch_size: int = 4  # per process
    crop_hw: tuple[int, int] | None = (128, 256)  # train: random crop (padded when the image is smaller)
    train: bool = True
    shuffle_buffer: int = 256
    flip: bool = True
    jitter: float = 0.2  # brightness, contrast, saturation factors drawn in [1 - j, 1 + j]
    workers: int = 2
    seed: int = 0
    max_epochs: int | None = None  # None: endless for training; eval always makes one pass
    strict: bool = False  # raise on the first corrupt sample instead of skipping it
    sparsity: Protocol | str | None = None  # eval only: a protocol of shared.sparsity applied to each frame's input
    # train only: cast each frame's scan again (a ScanSpec, or "shard": each sample's own spec from its meta.json)
    rescan: ScanSpec | str | None = None


def parse_hw(text: str | tuple | list | None) -> tuple[int, int] | str | None:
    """'256x1216' -> (256, 1216); both sides must be positive multiples of 32. A named evaluation frame
    (NAMED_FRAMES, e.g. 'bpnet-nyu') passes through as its name."""
    if text is None or text == "" or text == "none":
        return None
    if isinstance(text, str) and text in NAMED_FRAMES:
        return text
    if isinstance(text, str):
        parts = text.lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"crop must look like HxW, e.g. 256x1216, or name a frame ({', '.join(NAMED_FRAMES)}), "
                             f"got {text!r}")
        text = (int(parts[0]), int(parts[1]))
    h, w = int(text[0]), int(text[1])
    if h <= 0 or w <= 0 or h % MULTIPLE or w % MULTIPLE:
        raise ValueError(f"crop {h}x{w}: both sides must be positive multiples of {MULTIPLE} (BP-Net's frame)")
    return h, w


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode())


# -----------------------------------------------------------------------------
# per-sample transforms (numpy in, numpy out)


TEACHER_OUTPUTS = ("disparity", "depth", "metric")  # what datagen records in meta.teacher.output


def teacher_map(sample: Sample) -> tuple[np.ndarray | None, str]:
    """The teacher's map as the distillation terms fit it, and the space it is affine in.

    datagen records the teacher's kind in meta.json (teacher.output; shards from before say nothing and
    hold disparity): a relative disparity is used as it is ("disparity"); a metric depth map becomes
    its exact disparity 1 / depth in 1/m ("disparity": the fit then finds s ~ 1, b ~ 0); a relative
    depth map is affine in depth and stays depth ("depth")."""
    teacher = sample.teacher
    kind = ((sample.meta or {}).get("teacher") or {}).get("output") or "disparity"
    if kind not in TEACHER_OUTPUTS:
        raise ValueError(f"{sample.key}: meta teacher.output {kind!r} is none of {TEACHER_OUTPUTS}")
    if kind == "metric" and teacher is not None:
        ok = np.isfinite(teacher) & (teacher > 0)
        teacher = np.where(ok, 1.0 / np.where(ok, teacher, 1.0), 0.0).astype(np.float32)
    return teacher, "depth" if kind == "depth" else "disparity"


def _maps_of(sample: Sample) -> dict[str, np.ndarray | None]:
    maps = {name: getattr(sample, name) for name in MAPS}
    maps["teacher"] = teacher_map(sample)[0]
    return maps


def _place(arr: np.ndarray, top: int, left: int, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    """arr[top:top+h, left:left+w] written at the top-left of a zero frame of out_h x out_w."""
    out = np.zeros((out_h, out_w, *arr.shape[2:]), dtype=arr.dtype)
    out[:h, :w] = arr[top:top + h, left:left + w]
    return out


def frame_sample(sample: Sample, out_hw: tuple[int, int], top: int, left: int) -> dict:
    """Cut the window (top, left, out_hw) out of a sample, zero-padding bottom/right where the image is
    smaller, and move K with it (crop_K). Returns numpy arrays plus the bookkeeping of where it came from."""
    H, W = sample.height, sample.width
    oh, ow = out_hw
    h, w = min(oh, H - top), min(ow, W - left)
    out = {"rgb": _place(sample.rgb, top, left, h, w, oh, ow), "K": crop_K(sample.K, top, left)}
    for name, arr in _maps_of(sample).items():
        out["has_" + name] = arr is not None
        out[name] = np.zeros((oh, ow), np.float32) if arr is None else _place(arr, top, left, h, w, oh, ow)
    valid = np.zeros((oh, ow), bool)
    valid[:h, :w] = True
    out.update(valid=valid, box=np.array([top, left, h, w], np.int64), full_hw=np.array([H, W], np.int64),
               teacher_space=teacher_map(sample)[1])
    return out


def hflip(frame: dict) -> dict:
    """Mirror every image member of a frame (the teacher too, which the official code forgets) and K
    with it: cx' = W - 1 - cx, so back-projection gives the same points with x negated."""
    out = dict(frame)
    for name in ("rgb", "valid", *MAPS):
        out[name] = np.ascontiguousarray(frame[name][:, ::-1])
    out["K"] = flip_K(frame["K"], frame["rgb"].shape[1])
    return out


def jitter_rgb(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of a uint8 image (rgb only: depths keep their metres)."""
    if strength <= 0:
        return rgb
    b, c, s = rng.uniform(1 - strength, 1 + strength, 3)
    x = rgb.astype(np.float32) * b
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey.mean()) * c + grey.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey[..., None]) * s + grey[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_frame(sample: Sample, crop_hw: tuple[int, int], rng: np.random.Generator, flip: bool,
                jitter: float, scan=None) -> dict:
    """Random crop (or pad) to crop_hw, random horizontal flip, photometric jitter. scan(frame) -> sparse,
    when given, replaces the sparse input after the crop and flip (it sees the frame's own K and the image
    before the jitter, which is the camera's, not the sensor's)."""
    ch, cw = crop_hw
    top = int(rng.integers(0, max(sample.height - ch, 0) + 1))
    left = int(rng.integers(0, max(sample.width - cw, 0) + 1))
    frame = frame_sample(sample, crop_hw, top, left)
    if flip and rng.random() < 0.5:
        frame = hflip(frame)
    if scan is not None:
        frame["sparse"], frame["has_sparse"] = scan(frame), True
    frame["rgb"] = jitter_rgb(frame["rgb"], jitter, rng)
    return frame


def rescan_frame(frame: dict, spec: ScanSpec, rng: np.random.Generator) -> np.ndarray:
    """A new scan of a frame: its dense pseudo depth and K through shared.scan, as datagen scans a sample
    (float32 H x W, metres, 0 = no point). On a whole, unflipped frame with the sample's own spec and the
    generator of its meta.json seed, this is the shard's own scan, byte for byte."""
    sparse, _ = simulate_sparse_depth(frame["depth"], frame["K"], rng, spec, rgb=frame["rgb"])
    return sparse


def scan_spec_of(sample: Sample, rescan: ScanSpec | str) -> ScanSpec:
    """The spec a sample is scanned again with; refuses a sample that cannot be (no dense pseudo depth)."""
    if sample.depth is None:
        raise ValueError(f"{sample.key}: --lidar casts the scan again from the dense pseudo depth (depth.png), "
                         "and this sample has none: labelled shards (kitti, nyu, synthetic --labelled) keep their "
                         "real scans; train on them without --lidar")
    if not isinstance(rescan, str):
        return rescan
    spec = ((sample.meta or {}).get("lidar") or {}).get("spec")
    if spec is None:
        raise ValueError(f"{sample.key}: --lidar shard uses each sample's own scan settings (meta.json lidar.spec), "
                         "which shards made before they were recorded lack; name the scan, e.g. --lidar random")
    return _spec_from_dict(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _spec_from_dict(text: str) -> ScanSpec:
    return ScanSpec.from_dict(json.loads(text))


def bpnet_nyu_frame(sample: Sample) -> dict:
    """BP-Net's NYUv2 test frame (its datasets/nyu.py in val mode), to reproduce its published protocol.

    The 640 x 480 frame is halved (PIL bilinear, as torchvision's Resize(240) on a PIL image; RGB and GT
    alike), centre-cropped to 228 x 304 (rows 6.., columns 8..), and padded to 256 x 320 (14 rows top and
    bottom, 8 columns left and right; RGB by edge replication, maps with zeros). K is halved without a
    half-pixel shift and moved with the crop and the pad. The sparse input is the resized GT at the same
    500 positions of the crop in every image (numpy's legacy generator, seed 0), zero where GT is missing;
    the sample's own sparse map and teacher are not used. Predictions and GT stay in this 256 x 320 frame
    (box and full_hw say so): they cannot be pasted back onto the 640 x 480 image.
    """
    (H, W), (rh, rw), (ch, cw), (pt, pl) = (480, 640), (240, 320), (228, 304), (14, 8)
    if (sample.height, sample.width) != (H, W):
        raise ValueError(f"{sample.key}: the bpnet-nyu frame expects NYUv2's {W} x {H} frames, "
                         f"got {sample.width} x {sample.height}")
    if sample.gt is None:
        raise ValueError(f"{sample.key}: the bpnet-nyu frame draws its sparse input from gt; the sample has none")
    top, left = int(round((rh - ch) / 2)), int(round((rw - cw) / 2))  # torchvision's CenterCrop rounding

    def halve(arr: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(arr).resize((rw, rh), Image.BILINEAR))[top:top + ch, left:left + cw]

    rgb = np.pad(halve(sample.rgb), ((pt, pt), (pl, pl), (0, 0)), mode="edge")
    gt = halve(sample.gt.astype(np.float32)).copy()
    gt[gt <= 1e-4] = 0.0  # BP-Net's metric counts GT > 1e-4 only
    sparse = np.zeros(ch * cw, np.float32)
    where = np.random.RandomState(0).choice(ch * cw, 500, replace=False)
    sparse[where] = gt.reshape(-1)[where]
    K = np.asarray(sample.K, np.float64).copy()
    K[:2] /= 2
    K[0, 2] += pl - left
    K[1, 2] += pt - top
    oh, ow = ch + 2 * pt, cw + 2 * pl
    out = {"rgb": rgb, "K": K, "box": np.array([0, 0, oh, ow], np.int64), "full_hw": np.array([oh, ow], np.int64)}
    maps = {"gt": gt, "sparse": sparse.reshape(ch, cw)}
    for name in MAPS:
        out["has_" + name] = name in maps
        out[name] = np.pad(maps[name], ((pt, pt), (pl, pl))) if name in maps else np.zeros((oh, ow), np.float32)
    out["valid"] = np.pad(np.ones((ch, cw), bool), ((pt, pt), (pl, pl)))
    out["teacher_space"] = "disparity"  # no teacher in this frame
    return out


def sparsify(frame: dict, sample: Sample, protocol: Protocol | str | None) -> dict:
    """The frame with its sparse input thinned by a protocol of shared.sparsity (--sparsity), after the
    crop: points and keypoints are counted in what the network sees, lines use this frame's K. The GT and
    every other member stay as they are."""
    if protocol is None or not frame["has_sparse"]:
        return frame
    sparse = apply_sparsity(protocol, frame["sparse"], key=sample.key, K=frame["K"], rgb=frame["rgb"],
                            lidar=sample.meta.get("lidar"))
    return {**frame, "sparse": sparse}


# evaluation frames other than a crop, by name (`--crop bpnet-nyu`)
NAMED_FRAMES = {"bpnet-nyu": bpnet_nyu_frame}


def eval_frame(sample: Sample, crop_hw: tuple[int, int] | str | None = None) -> dict:
    """No augmentation. Without crop_hw the whole image, padded bottom/right to a multiple of 32 (the
    padding is cut off again when predictions are pasted back). With crop_hw, BP-Net's test crop:
    bottom rows (where the LiDAR is), centred horizontally. A name from NAMED_FRAMES builds that frame."""
    H, W = sample.height, sample.width
    if isinstance(crop_hw, str):
        return NAMED_FRAMES[crop_hw](sample)
    if crop_hw is None:
        return frame_sample(sample, (-(-H // MULTIPLE) * MULTIPLE, -(-W // MULTIPLE) * MULTIPLE), 0, 0)
    ch, cw = crop_hw
    return frame_sample(sample, crop_hw, max(H - ch, 0), max((W - cw) // 2, 0))


def collate(frames: list[dict], keys: list[str]) -> dict:
    """Stack frames (padding bottom/right to the largest, for eval batches of mixed sizes)."""
    oh = max(f["rgb"].shape[0] for f in frames)
    ow = max(f["rgb"].shape[1] for f in frames)

    def stack(name: str) -> torch.Tensor:
        arrs = [f[name] for f in frames]
        if any(a.shape[:2] != (oh, ow) for a in arrs):
            arrs = [_place(a, 0, 0, a.shape[0], a.shape[1], oh, ow) for a in arrs]
        return torch.from_numpy(np.stack(arrs))

    rgb_raw = stack("rgb").permute(0, 3, 1, 2).contiguous()
    batch = {"key": list(keys), "rgb": normalize_rgb(rgb_raw), "rgb_raw": rgb_raw,
             "valid": stack("valid").unsqueeze(1),
             "K": torch.from_numpy(np.stack([f["K"] for f in frames]).astype(np.float32)),
             "box": torch.from_numpy(np.stack([f["box"] for f in frames])),
             "full_hw": torch.from_numpy(np.stack([f["full_hw"] for f in frames])),
             "teacher_space": [f["teacher_space"] for f in frames]}
    for name in MAPS:
        batch[name] = stack(name).unsqueeze(1)
        batch["has_" + name] = torch.tensor([f["has_" + name] for f in frames])
    return batch


# -----------------------------------------------------------------------------
# the stream


def split_shards(urls: list[str], slot: int, num_slots: int) -> tuple[list[str], int | None]:
    """This slot's shards, and the sample modulo to apply (None when splitting by shard suffices)."""
    if len(urls) >= num_slots:
        return urls[slot::num_slots], None
    return list(urls), slot


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: keep `size` items, emit a random one for each new one, then drain."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(0, size))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def warm_up_scan() -> None:
    """Compile the casters (numba) once here, so that DataLoader workers forked afterwards inherit them
    instead of each compiling its own on its first sample."""
    from shared.camera import make_K

    frame = {"depth": np.full((32, 32), 5.0, np.float32), "K": make_K(30.0, 30.0, 15.5, 15.5),
             "rgb": np.zeros((32, 32, 3), np.uint8)}
    rescan_frame(frame, ScanSpec(mount="kitti"), np.random.default_rng(0))  # an offset mount: the hidden layer too


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards for one process (one DDP rank); see the module docstring.

    start: the data position of a resumed run, {"num_workers", "batches", "cursor": [[epoch, pos], ...]}
    (one entry per slot of this rank), as the trainer records it from the batches' "_pos".
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                 start: dict | None = None):
        super().__init__()
        self.cfg = cfg
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.urls = list_shards(cfg.shards)
        self.num_workers = max(cfg.workers, 1)
        self.start = start if start and start.get("num_workers") == self.num_workers else None
        if start and self.start is None:
            log.warning("data position was recorded with %s workers, now %s: starting the data from epoch 0",
                        start.get("num_workers"), self.num_workers)
        slots = self.world_size * self.num_workers
        if len(self.urls) < slots:
            log.warning("%d shards for %d readers (world size %d x %d workers): every reader reads every "
                        "shard and keeps 1/%d of the samples; write at least %d shards to avoid that",
                        len(self.urls), slots, self.world_size, self.num_workers, slots, slots)
        elif len(self.urls) % slots:
            log.info("%d shards do not split evenly over %d readers: some get one shard more per epoch",
                     len(self.urls), slots)
        if cfg.train and (cfg.crop_hw is None or isinstance(cfg.crop_hw, str)):
            raise ValueError("training needs a crop size (HxW, multiples of 32): frames must stack into batches"
                             + (f"; {cfg.crop_hw!r} is an evaluation frame" if cfg.crop_hw else ""))
        if cfg.rescan is not None:
            if not cfg.train:
                raise ValueError("a new scan per epoch (--lidar) is for training; eval thins the input with --sparsity")
            warm_up_scan()

    def _local_slot(self) -> int:
        """Which of this rank's slots this worker plays: rotated so that round-robin polling resumes in order."""
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        offset = self.start["batches"] % self.num_workers if self.start else 0
        return (worker + offset) % self.num_workers

    def _raw(self, epoch: int, local: int) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) of this rank's slot `local` in this epoch, shuffled; from 0."""
        slot = self.rank * self.num_workers + local  # the reader's place among all ranks' readers
        urls = list(self.urls)
        if self.cfg.train:
            urls = [urls[i] for i in _rng(self.cfg.seed, epoch).permutation(len(urls))]
        num_slots = self.world_size * self.num_workers
        mine, modulo = split_shards(urls, slot, num_slots)
        if not mine:
            return
        ds = shard_dataset(mine, self._handler)  # local paths or object-store URLs alike
        raw = iter(ds) if modulo is None else (s for i, s in enumerate(ds) if i % num_slots == modulo)
        if self.cfg.train:
            raw = shuffle_buffer(raw, self.cfg.shuffle_buffer, _rng(self.cfg.seed, epoch, slot, 1))
        yield from enumerate(raw)

    def _samples(self, local: int) -> Iterator[tuple[int, int, Sample]]:
        """(epoch, position, decoded sample) forever (training) or for one pass (eval)."""
        epoch, skip = (self.start["cursor"][local] if self.start else (0, 0))
        last = self.cfg.max_epochs if self.cfg.train else 1
        while last is None or epoch < last:
            produced = False
            for pos, raw in self._raw(epoch, local):
                produced = True
                if pos < skip:
                    continue
                try:
                    sample = decode_sample(raw)
                except ShardError as exc:
                    self._handler(exc)
                    continue
                self.stats.samples += 1
                yield epoch, pos, sample
            if not produced and skip == 0 and self.cfg.train and last is None:
                raise RuntimeError(f"rank {self.rank} reader {local}: no readable sample in an epoch of "
                                   f"{len(self.urls)} shards; cannot train on nothing")
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        self.stats = ReadStats()
        handler = make_error_handler(self.cfg.strict, self.stats)

        def logged(exn: BaseException) -> bool:
            before = self.stats.skipped
            ok = handler(exn)
            if self.stats.skipped > before and self.stats.skipped <= 20:
                log.warning("skipped a corrupt sample (%d so far): %s", self.stats.skipped, self.stats.reasons[-1])
            return ok

        self._handler = logged
        local = self._local_slot()
        slot = self.rank * self.num_workers + local
        frames, keys, epochs, held = [], [], [], None
        self._reported = 0
        # A finished batch is held until the next one is due (or the stream ends), so that the skips
        # counted in between, including those after the last good sample, are reported with it.
        for epoch, pos, sample in self._samples(local):
            if self.cfg.train:
                rng = _rng(self.cfg.seed, epoch, _key_hash(sample.key), 2)
                scan = None
                if self.cfg.rescan is not None:  # its own stream: the crops and flips stay those without it
                    spec, scan_rng = scan_spec_of(sample, self.cfg.rescan), _rng(self.cfg.seed, epoch,
                                                                                 _key_hash(sample.key), 3)

                    def scan(frame, spec=spec, scan_rng=scan_rng):
                        return rescan_frame(frame, spec, scan_rng)
                frames.append(train_frame(sample, self.cfg.crop_hw, rng, self.cfg.flip, self.cfg.jitter, scan))
            else:
                frames.append(sparsify(eval_frame(sample, self.cfg.crop_hw), sample, self.cfg.sparsity))
            keys.append(sample.key)
            epochs.append(epoch)
            if len(frames) == self.cfg.batch_size:
                if held is not None:
                    yield self._report(held)
                held = self._batch(frames, keys, epochs, local, epoch, pos, slot)
                frames, keys, epochs = [], [], []
        if frames:  # only a finite (eval) stream ends: its last batch may be short
            if held is not None:
                yield self._report(held)
            held = self._batch(frames, keys, epochs, local, epoch, pos, slot)
        if held is not None:
            yield self._report(held)

    def _batch(self, frames, keys, epochs, local, epoch, pos, slot) -> dict:
        batch = collate(frames, keys)
        batch["epoch"] = torch.tensor(epochs, dtype=torch.int64)
        batch["_pos"] = {"slot": local, "epoch": epoch, "pos": pos + 1, "skipped": 0, "reader": slot}
        return batch

    def _report(self, batch: dict) -> dict:
        batch["_pos"]["skipped"] = self.stats.skipped - self._reported
        self._reported = self.stats.skipped
        return batch


class DataPosition:
    """The trainer's record of what it consumed: per slot of this rank, the epoch and raw position
    after its last consumed batch, and how many batches in all (for the round-robin rotation)."""

    def __init__(self, num_workers: int, start: dict | None = None):
        self.num_workers = max(num_workers, 1)
        ok = start and start.get("num_workers") == self.num_workers
        self.batches = int(start["batches"]) if ok else 0
        self.cursor = [list(c) for c in start["cursor"]] if ok else [[0, 0] for _ in range(self.num_workers)]
        self.skipped = int(start.get("skipped", 0)) if ok else 0

    def update(self, batch: dict) -> None:
        p = batch["_pos"]
        self.cursor[int(p["slot"])] = [int(p["epoch"]), int(p["pos"])]
        self.batches += 1
        self.skipped += int(p["skipped"])

    def state(self) -> dict:
        return {"num_workers": self.num_workers, "batches": self.batches, "cursor": self.cursor,
                "skipped": self.skipped}


def make_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                start: dict | None = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ShardStream: batching happens in the workers (batch_size=None here)."""
    ds = ShardStream(cfg, rank, world_size, start)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
        # a private generator: creating the loader must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False, prefetch_factor=2 if cfg.workers > 0 else None,
    )
