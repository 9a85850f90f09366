"""Fit a scan pattern to a user's real LiDAR scans, given only their projection into a camera.

Input: sparse depth maps (H x W metres, 0 = none, KITTI-style), the camera's K and, if known, the pose
T_cam_from_lidar (p_cam = R p_lidar + t; the project's LiDAR frame: x right, y down, z forward).

1. Every LiDAR pixel is back-projected through its pixel centre (the projection rounded the true point
   to that pixel, so its direction is known to +-0.5 pixel: at fx ~721 that is +-0.04 deg) and moved
   into the LiDAR frame, where its elevation and azimuth are taken.
2. A spinning sensor fires each laser at one fixed elevation, so in elevation its points pile up in
   tight lines, one per ring, each about one pixel pitch wide, with empty gaps between rings. The
   elevations are histogrammed finely (a quarter pitch), smoothed over 1.25 pitches (which bridges the
   discrete values that pixel rows produce within one ring) and split at empty bins and deep valleys;
   each run is a ring, its elevation the mean of its points. Two rings are resolvable when their spacing
   exceeds about 2.5 pixel pitches (0.2 deg at fx ~721, against HDL-64's 0.33 deg).
3. The azimuth step: within one ring of one frame, consecutive azimuths differ by k steps (k > 1 where
   returns are missing). A first guess is the median difference; then every difference gets its k and
   one step is fitted by least squares to the azimuths against their cumulative index, which cancels
   pixel rounding (a median of rounded differences would be biased towards whole pixels).
4. If no clean ring structure is found (a solid-state or otherwise non-spinning sensor, or a spinning
   one seen with an unknown pose and a real mount offset), the result is an empirical density of
   directions over (azimuth x elevation) cells, from which rays are drawn (shared.scan.patterns.density_pattern).

Why the pose matters: elevations must be measured from the LiDAR's origin. Without the pose (identity),
a sensor mounted dy metres above the camera sees a point at range r at an elevation off by about
atan(dy / r): 0.46 deg at 10 m for KITTI's 8 cm, more than a ring spacing, so near points smear the
rings into one another. Give the pose (a 4x4, or KITTI's calib_velo_to_cam.txt) whenever you have it.
Also only what the camera sees can be fitted: rings outside its vertical field of view are not found.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from shared.camera import as_K, backproject
from shared.depth import decode_depth_png
from shared.scan.patterns import LidarPattern, density_pattern

# ----------------------------------------------------------------------------------------------------
# Angles of the scans' points, seen from the LiDAR


def scan_angles(sparse_maps: list[np.ndarray], K: np.ndarray | list[np.ndarray],
                T_cam_from_lidar: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Azimuth and elevation (deg, LiDAR frame) of every LiDAR pixel, its frame index, and the pixel pitch.

    pitch_az_deg / pitch_el_deg: the angle of one pixel at the image centre (1 / fx, 1 / fy), the
    quantisation of the directions (largest over the frames).
    """
    Ks = [as_K(k) for k in K] if isinstance(K, (list, tuple)) else [as_K(K)] * len(sparse_maps)
    if len(Ks) != len(sparse_maps):
        raise ValueError(f"{len(sparse_maps)} sparse maps but {len(Ks)} intrinsics")
    T = np.eye(4) if T_cam_from_lidar is None else np.asarray(T_cam_from_lidar, np.float64).reshape(4, 4)
    R, t = T[:3, :3], T[:3, 3]
    az, el, frame = [], [], []
    for i, (s, k) in enumerate(zip(sparse_maps, Ks, strict=True)):
        s = np.asarray(s, np.float32)
        valid = np.isfinite(s) & (s > 0)
        p_cam = backproject(np.where(valid, s, 0), k)[valid]
        p_lid = (p_cam - t) @ R  # R^T (p - t), row vectors
        az.append(np.degrees(np.arctan2(p_lid[:, 0], p_lid[:, 2])))
        el.append(np.degrees(np.arctan2(-p_lid[:, 1], np.hypot(p_lid[:, 0], p_lid[:, 2]))))
        frame.append(np.full(len(p_lid), i, np.int32))
    return {"az_deg": np.concatenate(az), "el_deg": np.concatenate(el), "frame": np.concatenate(frame),
            "pitch_az_deg": max(math.degrees(1.0 / k[0, 0]) for k in Ks),
            "pitch_el_deg": max(math.degrees(1.0 / k[1, 1]) for k in Ks)}


# ----------------------------------------------------------------------------------------------------
# Rings: 1-D clustering of elevations

VALLEY_RATIO = 0.2   # a run splits at a valley below this fraction of the lower of its two peaks
REL_FLOOR = 0.01     # bins whose smoothed count is below this fraction of the 99th percentile are empty


def cluster_rings(el_deg: np.ndarray, pitch_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Ring label per point (-1: in no ring) and the ring elevations (deg, mean of members), top first."""
    el = np.asarray(el_deg, np.float64)
    if len(el) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    b = float(np.clip(pitch_deg / 4.0, 0.002, 0.02))
    lo = el.min() - 2.0 * pitch_deg
    idx = ((el - lo) / b).astype(np.int64)
    counts = np.bincount(idx, minlength=idx.max() + 3).astype(np.float64)
    w = max(1, int(math.ceil(1.25 * pitch_deg / b)))
    smooth = np.convolve(counts, np.ones(w), mode="same")
    floor = max(0.5, REL_FLOOR * np.percentile(smooth[smooth > 0], 99))
    occupied = smooth > floor
    # Runs of occupied bins, then split each run at deep valleys of the smoothed histogram.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    bin_label = np.full(len(counts), -1, np.int64)
    n = 0
    for a, e in zip(edges[::2], edges[1::2], strict=True):
        seg = smooth[a:e]
        cuts = [a]
        peak = seg[0]
        valley, valley_at = np.inf, None
        for j in range(1, len(seg)):
            if seg[j] < valley:
                valley, valley_at = seg[j], a + j
            if seg[j] > peak and valley_at is not None and valley < VALLEY_RATIO * min(peak, seg[j]):
                # a real dip between two peaks: close the ring at the valley and start again
                cuts.append(valley_at)
                peak, valley, valley_at = seg[j], np.inf, None
            elif seg[j] >= peak:
                peak, valley, valley_at = seg[j], np.inf, None
        cuts.append(e)
        for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
            bin_label[c0:c1] = n
            n += 1
    label = bin_label[idx]
    # Elevation of each ring; drop those with almost no points (stray returns), renumber top first.
    sizes = np.bincount(label[label >= 0], minlength=n)
    keep = sizes >= max(3, 0.01 * np.median(sizes[sizes > 0])) if n else np.zeros(0, bool)
    centre = np.array([el[label == i].mean() if keep[i] else np.nan for i in range(n)])
    order = [i for i in np.argsort(-np.nan_to_num(centre, nan=-np.inf)) if keep[i]]
    remap = np.full(n + 1, -1, np.int64)
    remap[order] = np.arange(len(order))
    return remap[label], centre[order]


# ----------------------------------------------------------------------------------------------------
# Azimuth step

MAX_GAP_STEPS = 4  # a larger gap (sky, an absorbing surface) ends a run: its step count is uncertain


def azimuth_step(az_deg: np.ndarray, ring: np.ndarray, frame: np.ndarray, pitch_deg: float) -> tuple[float, float]:
    """Azimuth step (deg) and the RMS residual (deg) of the azimuths about the fitted firing grid."""
    groups = []
    for f in np.unique(frame):
        for r in np.unique(ring[(frame == f) & (ring >= 0)]):
            a = np.sort(az_deg[(frame == f) & (ring == r)])
            if len(a) < 3:
                continue
            keep = np.concatenate([[True], np.diff(a) > 0.25 * pitch_deg])  # one point per firing
            groups.append(a[keep])
    diffs = np.concatenate([np.diff(a) for a in groups]) if groups else np.zeros(0)
    if len(diffs) == 0:
        return float("nan"), float("nan")
    s = float(np.median(diffs))
    half = diffs[(diffs > 0.3 * s) & (diffs < 0.7 * s)]
    if len(half) > 0.2 * len(diffs):  # most firings missing: the median sits at two steps
        s = float(np.median(half))
    # Rounded differences take whole-pixel values on both sides of the step (2 or 3 pixels for a
    # 2.5-pixel step), so the median is biased; their mean over the first mode is not.
    s = float(diffs[(diffs > 0.5 * s) & (diffs < 1.75 * s)].mean())
    resid = np.zeros(0)
    for _ in range(3):
        num = den = 0.0
        resid = []
        for a in groups:
            k = np.maximum(1, np.round(np.diff(a) / s))
            # split at large gaps; each piece is one run on the firing grid
            cut = np.flatnonzero(k > MAX_GAP_STEPS) + 1
            pos = np.concatenate([[0.0], np.cumsum(np.where(k > MAX_GAP_STEPS, 0, k))])
            for seg_a, seg_p in zip(np.split(a, cut), np.split(pos, cut), strict=True):
                if len(seg_a) < 2:
                    continue
                pc, ac = seg_p - seg_p.mean(), seg_a - seg_a.mean()
                num += float(pc @ ac)
                den += float(pc @ pc)
                resid.append((ac, pc))
        if den == 0:
            break
        s = num / den
    rms = math.sqrt(np.mean(np.concatenate([(ac - s * pc) ** 2 for ac, pc in resid]))) if resid else float("nan")
    return s, rms


# ----------------------------------------------------------------------------------------------------
# The fit

MIN_ASSIGNED = 0.9        # share of points that must fall in rings for a spinning fit
WIDTH_PITCHES = 3.0       # a ring's 2-98% elevation spread must stay below this many pixel pitches (+0.05 deg)
DENSITY_CELL_DEG = 0.5    # cell of the fallback density


def fit_pattern(sparse_maps: list[np.ndarray], K: np.ndarray | list[np.ndarray],
                T_cam_from_lidar: np.ndarray | None = None, *, max_rings: int = 256,
                density_cell_deg: float = DENSITY_CELL_DEG, name: str = "fitted") -> tuple[LidarPattern, dict]:
    """A pattern (spinning rings + azimuth step, else an empirical direction density) and a fit report."""
    ang = scan_angles(sparse_maps, K, T_cam_from_lidar)
    az, el, frame = ang["az_deg"], ang["el_deg"], ang["frame"]
    report: dict = {"frames": len(sparse_maps), "points": int(len(el)),
                    "pose": "given" if T_cam_from_lidar is not None else "identity (unknown)",
                    "pixel_pitch_deg": {"azimuth": ang["pitch_az_deg"], "elevation": ang["pitch_el_deg"]}}
    if len(el) < 10:
        raise ValueError(f"only {len(el)} LiDAR pixels in {len(sparse_maps)} maps: nothing to fit")
    report["elevation_range_deg"] = [float(el.min()), float(el.max())]
    report["azimuth_range_deg"] = [float(az.min()), float(az.max())]

    ring, elev = cluster_rings(el, ang["pitch_el_deg"])
    n = len(elev)
    assigned = float((ring >= 0).mean())
    widths = np.array([np.subtract(*np.percentile(el[ring == i], [98, 2])) for i in range(n)])
    rms = np.array([el[ring == i].std() for i in range(n)])
    limit = WIDTH_PITCHES * ang["pitch_el_deg"] + 0.05
    reasons = []
    if n == 0 or n > max_rings:
        reasons.append(f"{n} rings found (need 1..{max_rings})")
    if assigned < MIN_ASSIGNED:
        reasons.append(f"only {assigned:.0%} of the points lie on rings (need {MIN_ASSIGNED:.0%})")
    if n and np.percentile(widths, 90) > limit:
        reasons.append(f"rings too wide: 90th percentile spread {np.percentile(widths, 90):.3f} deg > "
                       f"{limit:.3f} deg (not a spinning sensor, or a wrong/unknown pose)")
    report["ring_candidates"] = n
    report["assigned_fraction"] = assigned

    if not reasons:
        step, step_rms = azimuth_step(az, ring, frame, ang["pitch_az_deg"])
        if not np.isfinite(step) or step <= 0:
            reasons.append("no azimuth step could be measured")
    if reasons:
        report.update(mode="density", reason="; ".join(reasons))
        c = float(density_cell_deg)
        az_e = np.arange(math.floor(az.min() / c), math.ceil(az.max() / c) + 1) * c
        el_e = np.arange(math.floor(el.min() / c), math.ceil(el.max() / c) + 1) * c
        counts, _, _ = np.histogram2d(el, az, bins=[el_e, az_e])
        n_rays = int(round(len(el) / max(1, len(sparse_maps))))
        report.update(density_cells=[len(el_e) - 1, len(az_e) - 1], rays_per_scan=n_rays)
        return density_pattern(az_e, el_e, counts, n_rays, seed=0, name=name), report

    report.update(mode="spinning", rings=n, elevations_deg=elev.round(4).tolist(),
                  ring_points=np.bincount(ring[ring >= 0], minlength=n).tolist(),
                  ring_rms_deg=rms.round(4).tolist(), ring_width_deg=widths.round(4).tolist(),
                  elevation_rms_deg=float(np.sqrt(np.mean((el[ring >= 0] - elev[ring[ring >= 0]]) ** 2))),
                  azimuth_step_deg=step, azimuth_rms_deg=step_rms,
                  azimuth_step_resolved=bool(step > 1.5 * ang["pitch_az_deg"]))
    if not report["azimuth_step_resolved"]:
        report["warning"] = ("the azimuth step is below ~1.5 pixel pitches: points merge on pixels and the "
                             "step found is only an upper bound; use a higher-resolution camera")
    return LidarPattern(name, elev, step), report


def format_report(report: dict) -> str:
    """Human-readable summary of fit_pattern's report."""
    lines = [f"frames {report['frames']}, points {report['points']}, pose {report['pose']}",
             f"pixel pitch {report['pixel_pitch_deg']['azimuth']:.4f} x {report['pixel_pitch_deg']['elevation']:.4f} deg"
             f", elevations seen {report['elevation_range_deg'][0]:.2f} .. {report['elevation_range_deg'][1]:.2f} deg"]
    if report["mode"] == "spinning":
        lines += [f"spinning: {report['rings']} rings (only those inside the camera's view), "
                  f"{report['assigned_fraction']:.1%} of points on rings",
                  "ring elevations (deg): " + ", ".join(f"{e:.3f}" for e in report["elevations_deg"]),
                  f"elevation residual rms {report['elevation_rms_deg']:.4f} deg, worst ring rms "
                  f"{max(report['ring_rms_deg']):.4f} deg",
                  f"azimuth step {report['azimuth_step_deg']:.4f} deg (residual rms {report['azimuth_rms_deg']:.4f} deg)"]
        if "warning" in report:
            lines.append("warning: " + report["warning"])
        if report["pose"] != "given":
            lines.append("note: no pose given, so elevations are measured from the camera, not the LiDAR: with a "
                         "real mount offset they are biased by ~atan(offset / range); pass --pose if you can")
    else:
        lines += [f"density: {report['reason']}",
                  f"{report['density_cells'][0]} x {report['density_cells'][1]} cells (elevation x azimuth), "
                  f"{report['rays_per_scan']} rays per scan"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Files: intrinsics, poses and sparse maps as users have them

def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)]


def _K_from_numbers(v: list[float], what: str) -> np.ndarray:
    if len(v) == 4:
        fx, fy, cx, cy = v
        return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float64)
    if len(v) == 9:
        return as_K(v)
    if len(v) == 12:  # a 3x4 projection matrix P = K [R | t]: its left 3x3 (rectified: R = I)
        return as_K(np.asarray(v).reshape(3, 4)[:, :3])
    raise ValueError(f"{what}: expected 4 (fx,fy,cx,cy), 9 (K) or 12 (P) numbers, got {len(v)}")


def read_intrinsics(spec: str, camera: str = "02") -> np.ndarray:
    """K from "fx,fy,cx,cy", 9 numbers, or a file: JSON (a list, {"K": ...} or fx/fy/cx/cy keys), text
    with 4/9/12 numbers (KITTI depth completion's intrinsics/*.txt), or KITTI calib_cam_to_cam.txt
    (P_rect_<camera>)."""
    if os.path.isfile(spec):
        text = Path(spec).read_text()
        if spec.endswith(".json"):
            d = json.loads(text)
            if isinstance(d, dict):
                if "K" in d:
                    return as_K(d["K"])
                return _K_from_numbers([d["fx"], d["fy"], d["cx"], d["cy"]], spec)
            return _K_from_numbers(list(np.ravel(d)), spec)
        m = re.search(rf"^P_rect_{camera}:(.*)$", text, re.M)
        return _K_from_numbers(_numbers(m.group(1) if m else text), spec)
    return _K_from_numbers(_numbers(spec), "intrinsics")


# KITTI's Velodyne frame (and ROS's, and most sensors' native one) is x forward, y left, z up; the
# project's LiDAR frame is x right, y down, z forward: p_flu = FLU_FROM_RDF @ p_rdf.
FLU_FROM_RDF = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def read_pose(path: str | os.PathLike, lidar_frame: str = "flu") -> np.ndarray:
    """T_cam_from_lidar (4x4, the project's LiDAR frame) from a file.

    Formats: KITTI calib_velo_to_cam.txt ("R: 9 numbers", "T: 3 numbers"; always a forward-left-up
    LiDAR); JSON (a 4x4/3x4 list, {"T_cam_from_lidar": ...} or {"R": ..., "t": ...}, optional
    "lidar_frame"); text with 12 or 16 numbers. lidar_frame: "flu" (x forward, y left, z up: KITTI,
    ROS, Velodyne, Ouster, Livox) or "rdf" (x right, y down, z forward: the project's frame).
    KITTI: the velo_to_cam pose is to the unrectified camera 0; a calib_cam_to_cam.txt beside it is used
    to go on to rectified camera 2 (R_rect_00, then P_rect_02's baseline), the frame of KITTI's
    depth-completion maps.
    """
    p = Path(path)
    text = p.read_text()
    T = np.eye(4)
    if re.search(r"^R:", text, re.M) and re.search(r"^T:", text, re.M):
        T[:3, :3] = np.reshape(_numbers(re.search(r"^R:(.*)$", text, re.M).group(1)), (3, 3))
        T[:3, 3] = _numbers(re.search(r"^T:(.*)$", text, re.M).group(1))
        lidar_frame = "flu"
        c2c = p.with_name("calib_cam_to_cam.txt")
        if c2c.is_file():
            cc = c2c.read_text()
            rect = np.eye(4)
            rect[:3, :3] = np.reshape(_numbers(re.search(r"^R_rect_00:(.*)$", cc, re.M).group(1)), (3, 3))
            P = np.reshape(_numbers(re.search(r"^P_rect_02:(.*)$", cc, re.M).group(1)), (3, 4))
            base = np.eye(4)
            base[:3, 3] = np.linalg.solve(P[:, :3], P[:, 3])
            T = base @ rect @ T
    else:
        if p.suffix == ".json":
            d = json.loads(text)
            if isinstance(d, dict):
                lidar_frame = d.get("lidar_frame", lidar_frame)
                if "T_cam_from_lidar" in d:
                    v = list(np.ravel(d["T_cam_from_lidar"]))
                else:
                    v = list(np.ravel(d["R"])) + list(np.ravel(d.get("t", d.get("T"))))
                    v = [*v[0:3], v[9], *v[3:6], v[10], *v[6:9], v[11]]
            else:
                v = list(np.ravel(d))
        else:
            v = _numbers(text)
        if len(v) not in (12, 16):
            raise ValueError(f"{path}: expected a 3x4 or 4x4 pose (12 or 16 numbers), got {len(v)}")
        T[:3, :] = np.reshape(v[:12], (3, 4))
    if lidar_frame == "flu":
        T[:3, :3] = T[:3, :3] @ FLU_FROM_RDF
    elif lidar_frame != "rdf":
        raise ValueError(f"lidar_frame must be 'flu' or 'rdf', got {lidar_frame!r}")
    return T


def read_sparse_dir(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[Path, np.ndarray]]:
    """KITTI-style uint16 depth PNGs under folder (sorted; searched recursively if none at the top)."""
    root = Path(folder)
    files = sorted(root.glob("*.png")) or sorted(root.rglob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png files under {root}")
    files = files[:limit] if limit else files
    return [(f, decode_depth_png(f.read_bytes(), str(f))) for f in files]
