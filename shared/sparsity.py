"""Sparse-input protocols: which pixels of a depth map become a depth-completion network's input.

Researchers report one model at several input densities and patterns, not only at the sensor's own:
KITTI at 64/32/16/8 LiDAR lines, NYUv2 at 500/200/100/50 random points, and keypoints as SfM or VIO
would give them. One protocol is written as a spec:

    full              the sample's own sparse input, untouched (the default)
    lines:N           keep N of the scan's laser rings: every pixel is given to the ring whose elevation,
                      seen from the LiDAR, is nearest to that of its back-projected point (the ring table
                      and the LiDAR's pose come from the sample's meta.json, see `lines`); rings
                      floor(i R / N), i < N, of the R rings are kept, i.e. every (R/N)-th from the top
    lines-uniform:N   the literature's KITTI line subsampling (SpAgNet's sample_lidar_lines, reused by
                      OMNI-DC and Depth Prompting): 64 equal bins of the camera-frame pitch between the
                      frame's lowest and highest point, every (64/N)-th bin kept; needs K only
    points:N          N pixels drawn at random among those with a value (all of them when fewer), with a
                      generator seeded from (the protocol's seed, the sample key): the same input for
                      every model and every run
    keypoints:N       at most N Shi-Tomasi corners of the image (OpenCV's goodFeaturesToTrack) among the
                      pixels with a value, as a feature tracker would give them

Two uses, one code:
- evaluation (`trainer eval|predict --sparsity`, `apply`): the protocol thins the sample's own sparse
  input and only that; the ground truth is never read, so a point of the input is always a measurement.
- pre-training data (`datagen run --lidar points:N|keypoints:N`, `simulate`): the pixels are taken from
  the dense pseudo depth, which is the target world of pre-training, so there a keypoint has a depth
  wherever the pseudo depth has one.

Pure numpy; OpenCV (opencv-python-headless) is imported only for keypoints.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from shared.camera import as_K, backproject

KINDS = ("full", "lines", "lines-uniform", "points", "keypoints")
UNIFORM_BINS = 64  # lines-uniform: the literature bins the pitch of a 64-line scan
KEYPOINT_QUALITY = 0.01  # goodFeaturesToTrack's qualityLevel: corners below 1% of the strongest are not corners


@dataclass(frozen=True)
class Protocol:
    kind: str = "full"
    n: int | None = None
    seed: int = 0  # points: the draws come from (seed, sample key)

    @property
    def name(self) -> str:
        return self.kind if self.n is None else f"{self.kind}:{self.n}"

    def to_dict(self) -> dict:
        return {"protocol": self.name, "seed": self.seed}



def parse_protocol(spec: str | Protocol | None, seed: int = 0) -> Protocol:
    """'full', 'lines:16', 'lines-uniform:16', 'points:500' or 'keypoints:200' (None means full)."""
    if isinstance(spec, Protocol):
        return spec
    text = (spec or "full").strip().lower()
    if text == "full":
        return Protocol("full", None, int(seed))
    m = re.fullmatch(r"([a-z-]+):(\d+)", text)
    if not m or m.group(1) not in KINDS[1:]:
        raise ValueError(f"sparsity protocol {spec!r}: use full, lines:N, lines-uniform:N, points:N or keypoints:N")
    kind, n = m.group(1), int(m.group(2))
    if n < 1:
        raise ValueError(f"sparsity protocol {spec!r}: N must be at least 1")
    if kind == "lines-uniform" and UNIFORM_BINS % n:
        raise ValueError(f"sparsity protocol {spec!r}: N must divide {UNIFORM_BINS} (the bins of a 64-line scan)")
    return Protocol(kind, n, int(seed))


def parse_sweep(specs: str | list[str], seed: int = 0) -> list[Protocol]:
    """Settings of a sweep: 'lines:64,32,16,8' is four; a bare number repeats the kind before it, so
    'full,points:500,200' is three. Several strings (a repeated --sweep) are read in order; repeats drop."""
    out: list[Protocol] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        kind = None
        for token in filter(None, (t.strip() for t in spec.split(","))):
            if token.isdigit():
                if kind is None:
                    raise ValueError(f"sweep {spec!r}: {token!r} has no kind before it (e.g. lines:{token})")
                token = f"{kind}:{token}"
            p = parse_protocol(token, seed)
            kind = p.kind if p.n is not None else None
            if p not in out:
                out.append(p)
    if not out:
        raise ValueError(f"sweep {specs!r}: no setting")
    return out


def key_seed(key: str, extra: int | None = None) -> np.random.SeedSequence:
    """A seed from a sample key (a hash: stable across processes and machines), with an optional number."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.SeedSequence([h] if extra is None else [h, int(extra)])


def protocol_rng(protocol: Protocol, key: str) -> np.random.Generator:
    return np.random.default_rng(key_seed(key, protocol.seed))


# ----------------------------------------------------------------------------------------------------
# The protocols, each a function of a depth map (0 = no value) and what it needs


def random_points(depth_m: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A sparse map holding the depth at n random valid pixels (all of them if fewer are valid)."""
    flat = np.asarray(depth_m).reshape(-1)
    valid = np.flatnonzero(np.isfinite(flat) & (flat > 0))
    pick = rng.choice(valid, size=min(n, valid.size), replace=False)
    out = np.zeros(flat.shape, dtype=np.float32)
    out[pick] = flat[pick]
    return out.reshape(np.shape(depth_m))


def keypoints(rgb: np.ndarray, depth_m: np.ndarray, n: int, quality: float = KEYPOINT_QUALITY) -> np.ndarray:
    """A sparse map holding the depth at up to n Shi-Tomasi corners of the image among the valid pixels.

    OpenCV's goodFeaturesToTrack on the grey image, masked to the pixels with a depth: a corner must be
    a local maximum (3 x 3) of the minimum-eigenvalue response, reach `quality` x the strongest, and lie
    at least d = max(1, sqrt(H W / n) / 2) pixels from any stronger one, so n corners can spread over
    the frame as a tracker's do (VINS-Mono keeps 150 at 30 px on 752 x 480). Fewer than n come back
    from images with few corners; the achieved count is what the density reports.
    """
    import cv2  # lazy: only keypoints:N needs OpenCV (an optional dependency, 0.3 s to import)

    depth = np.asarray(depth_m, dtype=np.float32)
    has = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape, np.float32)
    if not has.any():
        return out
    grey = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    min_distance = max(1.0, 0.5 * math.sqrt(depth.size / n))
    corners = cv2.goodFeaturesToTrack(grey, maxCorners=int(n), qualityLevel=quality, minDistance=min_distance,
                                      mask=has.astype(np.uint8))
    if corners is not None:
        u, v = np.rint(corners.reshape(-1, 2)).astype(np.int64).T  # whole pixels (no sub-pixel refinement)
        out[v, u] = depth[v, u]
    return out


def lidar_elevations(sparse: np.ndarray, K: np.ndarray, R_cam_from_lidar: np.ndarray | None = None,
                     t_cam_from_lidar: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(v, u, elevation in degrees) of every pixel with a value: its back-projected point seen from the
    LiDAR (p_cam = R p_lidar + t; LiDAR frame x right, y down, z forward; elevation positive up)."""
    sparse = np.asarray(sparse, np.float32)
    v, u = np.nonzero(np.isfinite(sparse) & (sparse > 0))
    R = np.eye(3) if R_cam_from_lidar is None else np.asarray(R_cam_from_lidar, np.float64).reshape(3, 3)
    t = np.zeros(3) if t_cam_from_lidar is None else np.asarray(t_cam_from_lidar, np.float64).reshape(3)
    p = (backproject(sparse, K)[v, u] - t) @ R  # R^T (p - t), row vectors
    return v, u, np.degrees(np.arctan2(-p[:, 1], np.hypot(p[:, 0], p[:, 2])))


def assign_rings(el_deg: np.ndarray, ring_elevations_deg: np.ndarray) -> np.ndarray:
    """Index of the nearest ring elevation per point (the table in any order), or -1 for a point outside
    the sensor's field by more than half the spacing of the outermost two rings."""
    table = np.asarray(ring_elevations_deg, np.float64).ravel()
    order = np.argsort(table)
    s = table[order]
    ring = order[np.searchsorted((s[1:] + s[:-1]) / 2, el_deg)]
    below, above = ((s[1] - s[0]) / 2, (s[-1] - s[-2]) / 2) if len(s) > 1 else (0.5, 0.5)
    return np.where((el_deg < s[0] - below) | (el_deg > s[-1] + above), -1, ring)


def kept_rings(n_rings: int, n: int) -> np.ndarray:
    """The n rings of n_rings that lines:n keeps: floor(i n_rings / n), i < n (every n_rings/n-th from the top)."""
    return np.unique(np.arange(min(n, n_rings)) * n_rings // min(n, n_rings))


def lines(sparse: np.ndarray, K: np.ndarray, n: int, ring_elevations_deg, R_cam_from_lidar=None,
          t_cam_from_lidar=None) -> np.ndarray:
    """The sparse map with only the points of the kept rings (all of them when n >= the ring count)."""
    sparse = np.asarray(sparse, np.float32)
    table = np.asarray(ring_elevations_deg, np.float64).ravel()
    if n >= len(table):
        return sparse.copy()
    v, u, el = lidar_elevations(sparse, K, R_cam_from_lidar, t_cam_from_lidar)
    keep = np.isin(assign_rings(el, table), kept_rings(len(table), n))
    out = np.zeros_like(sparse)
    out[v[keep], u[keep]] = sparse[v[keep], u[keep]]
    return out


def lines_uniform(sparse: np.ndarray, K: np.ndarray, n: int, bins: int = UNIFORM_BINS) -> np.ndarray:
    """The literature's line subsampling: pitch = asin(y / |p|) of each back-projected point (camera
    frame), label = round((pitch - min) / ((max - min) / bins)) over this frame's points, keep the labels
    divisible by bins / n. The bins are equal, the rings of a real sensor are not: a 'line' here is a bin."""
    sparse = np.asarray(sparse, np.float32)
    if n >= bins:
        return sparse.copy()
    v, u = np.nonzero(np.isfinite(sparse) & (sparse > 0))
    out = np.zeros_like(sparse)
    if len(v) == 0:
        return out
    p = backproject(sparse, K)[v, u]
    pitch = np.arcsin(p[:, 1] / np.linalg.norm(p, axis=1))
    interval = (pitch.max() - pitch.min()) / bins
    label = np.rint((pitch - pitch.min()) / interval) if interval > 0 else np.zeros(len(v))
    keep = label % (bins // n) == 0
    out[v[keep], u[keep]] = sparse[v[keep], u[keep]]
    return out


# ----------------------------------------------------------------------------------------------------
# The two uses


def ring_table(lidar: dict | None, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ring elevations, R_cam_from_lidar, t_cam_from_lidar) from a sample's meta["lidar"]."""
    pattern, pose = (lidar or {}).get("pattern") or {}, (lidar or {}).get("pose") or {}
    elev = pattern.get("elevations_deg")
    if not elev or "R_cam_from_lidar" not in pose or "t_cam_from_lidar" not in pose:
        raise ValueError(
            f"sample {key}: lines:N needs the ring elevations and the pose of the LiDAR in meta.json "
            "(lidar.pattern.elevations_deg and lidar.pose), which this sample lacks: a sensor without rings, a "
            "data set without a LiDAR, or shards written before datagen recorded them (rebuild them). "
            "lines-uniform:N needs K only")
    return (np.asarray(elev, np.float64), np.asarray(pose["R_cam_from_lidar"], np.float64),
            np.asarray(pose["t_cam_from_lidar"], np.float64))


def apply(protocol: Protocol | str, sparse: np.ndarray, *, key: str, K: np.ndarray | None = None,
          rgb: np.ndarray | None = None, lidar: dict | None = None) -> np.ndarray:
    """Evaluation: the sample's sparse input under the protocol (a subset of its own points, never more).

    key: the sample key (seeds points:N). K: intrinsics of this very frame (lines). rgb: the frame's
    image (keypoints). lidar: the sample's meta["lidar"] (lines: ring elevations and pose).
    """
    p = parse_protocol(protocol)
    sparse = np.asarray(sparse, np.float32)
    if p.kind == "full":
        return sparse
    if p.kind == "points":
        return random_points(sparse, p.n, protocol_rng(p, key))
    if p.kind == "keypoints":
        return keypoints(rgb, sparse, p.n)
    if p.kind == "lines-uniform":
        return lines_uniform(sparse, as_K(K), p.n)
    elev, R, t = ring_table(lidar, key)
    return lines(sparse, as_K(K), p.n, elev, R, t)


def is_pixel_protocol(spec) -> bool:
    """Whether a `datagen run --lidar` spec is one of the protocols that pick pixels (points:N, keypoints:N)."""
    return isinstance(spec, str) and re.fullmatch(r"\s*(points|keypoints):\d+\s*", spec.lower()) is not None


def simulate(spec: str, depth_m: np.ndarray, rng: np.random.Generator, rgb: np.ndarray | None = None
             ) -> tuple[np.ndarray, dict]:
    """Pre-training input: points:N or keypoints:N of the dense pseudo depth, and what was done (the
    pipeline's meta["lidar"]). No sensor is simulated: no mount, ray casting, noise or dropout."""
    p = parse_protocol(spec)
    depth = np.asarray(depth_m, np.float32)
    if p.kind == "points":
        sparse = random_points(depth, p.n, rng)
    elif p.kind == "keypoints":
        if rgb is None:
            raise ValueError(f"{p.name}: keypoints are found in the image, and none was given")
        sparse = keypoints(rgb, depth, p.n)
    else:
        raise ValueError(f"{spec!r} is not a pixel protocol (points:N or keypoints:N)")
    n_px = int(np.count_nonzero(sparse))
    return sparse, {"preset": p.name, "protocol": p.name, "n_points": n_px, "density": n_px / float(depth.size)}
