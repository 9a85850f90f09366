"""Simulated LiDAR: scan patterns, the sensor mount, ray casting against a mesh, projection to sparse depth.

LiDAR frame: x right, y down, z forward, like the camera, so the identity mount means a sensor at the
camera centre, aligned with it. A ray of elevation e (degrees, positive = up = -y) and azimuth a
(degrees about the vertical axis, 0 = forward = +z, positive towards +x = right) has the direction
    (cos e sin a, -sin e, cos e cos a).
A spinning sensor sweeps 360 degrees, but only what the camera sees can become sparse depth, so only
azimuths inside the camera's horizontal field of view (as seen from the LiDAR, plus a parallax margin)
are cast: the rest would be thrown away by the projection anyway.

Mount: p_cam = R_cam_from_lidar @ p_lidar + t_cam_from_lidar; t is the LiDAR origin in camera
coordinates (metres). KITTI's Velodyne sits ~0.08 m above and ~0.27 m behind colour camera 2 and
~0.06 m to its right, so t ~ (0.06, -0.08, -0.27).

Two casters. The grid mesh of a depth map (and its hidden-geometry layer, datagen.hidden) is a
height field in the image grid: `simulate_scan` given a GridSurface walks each ray's projection across
the pixel grid (datagen.heightfield), exact for that mesh and with no BVH to build. Any other mesh
(Poisson, the synthetic world's exact geometry) goes to Open3D's RaycastingScene, as below.

Speed of the Open3D path: the cost of Open3D's RaycastingScene is its BVH build, linear in the
triangles (docs/own_sensor.md has the times), while the rays are cheap. A spinning pattern hits
only triangles whose angular extent, seen from the sensor, contains one of its ring elevations and one
of its azimuth samples, so `simulate_scan` builds the BVH over those alone (`cull=True`). The test is
exact for azimuth (the azimuths of a triangle's points lie between its vertices' azimuths) and for
elevation up to a small great-circle bulge (< 0.005 deg on triangles under 2 deg, covered by a 0.01 deg
margin); triangles larger than 2 deg are always kept.

Beyond spinning sensors (see the section "Solid-state, line-scan and file patterns" below): `livox:...`
(non-repetitive rosette of a Risley prism pair), `lines:...` (a few scan lines over a limited field) and
a JSON file (explicit directions, spinning rings, or an empirical direction density, e.g. one fitted
from real scans by datagen.lidar_fit). All of them go through get_pattern, so `--lidar` takes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from datagen.heightfield import GridSurface, cast_surface, grid_surface
from datagen.hidden import hidden_layer
from datagen.mesh import Mesh, build_mesh
from datagen.sensor import (
    SENSOR_PRESETS,
    SensorModel,
    brightness,
    edge_beams,
    keep_probability,
    mixed_ranges,
    noise_sigma,
    rim_directions,
)
from shared import sparsity
from shared.camera import as_K, project, rotation_from_rotvec

# ----------------------------------------------------------------------------------------------------
# Scan patterns


@dataclass
class LidarPattern:
    """A scan pattern in the LiDAR frame.

    Spinning sensors: one ring per entry of elevations_deg (ring index = position in that array), each
    sampled every azimuth_step_deg. Other sensors (solid-state, line scan, a measured pattern) give
    `directions` instead: unit vectors N x 3 in the LiDAR frame, with an optional label per direction
    in `direction_ring` (e.g. the scan line); elevations_deg is then informative only.
    """

    name: str
    elevations_deg: np.ndarray
    azimuth_step_deg: float
    directions: np.ndarray | None = None
    direction_ring: np.ndarray | None = None
    # What the pattern was built from when that is smaller than its rays (a density to sample from);
    # save_pattern writes it instead of the directions. None: the rays themselves are the definition.
    source: dict | None = None
    # The sensor effects that go with the pattern (a pattern file's "sensor" entry); None: the caller's.
    sensor: SensorModel | None = None

    def __post_init__(self) -> None:
        self.elevations_deg = np.asarray(self.elevations_deg, dtype=np.float64).ravel()
        if self.directions is not None:
            d = np.asarray(self.directions, dtype=np.float64).reshape(-1, 3)
            # Rows that are already unit length are left alone: normalising again can move the last bit,
            # and a saved-then-loaded pattern must give exactly the same rays.
            n = np.linalg.norm(d, axis=1, keepdims=True)
            self.directions = np.where(np.abs(n - 1.0) > 1e-12, d / n, d)
            if self.direction_ring is None:
                self.direction_ring = np.full(len(d), -1, np.int32)
            self.direction_ring = np.asarray(self.direction_ring, dtype=np.int32).ravel()
        elif self.azimuth_step_deg <= 0 or len(self.elevations_deg) == 0:
            raise ValueError(f"pattern {self.name!r}: need rings and an azimuth step > 0")

    @property
    def n_rings(self) -> int:
        return len(self.elevations_deg)

    @property
    def spinning(self) -> bool:
        return self.directions is None

    def rays(self, az_lo_deg: float, az_hi_deg: float, phase_deg: float = 0.0,
             el_lo_deg: float = -90.0, el_hi_deg: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
        """Unit directions (N x 3, LiDAR frame) and ring index (N,) of the rays inside an angular window.

        Spinning patterns fire at azimuths phase + k * step (the phase is where the sweep happens to
        start relative to the image; it is random per scan in a real rig).
        """
        if not self.spinning:
            d = self.directions
            az, el = _azimuth_deg(d), _elevation_deg(d)
            m = (az >= az_lo_deg) & (az <= az_hi_deg) & (el >= el_lo_deg) & (el <= el_hi_deg)
            return d[m], self.direction_ring[m]
        step = self.azimuth_step_deg
        k = np.arange(math.ceil((az_lo_deg - phase_deg) / step), math.floor((az_hi_deg - phase_deg) / step) + 1)
        az = np.radians(phase_deg + k * step)
        rings = np.flatnonzero((self.elevations_deg >= el_lo_deg) & (self.elevations_deg <= el_hi_deg))
        el = np.radians(self.elevations_deg[rings])
        ce, se = np.cos(el)[:, None], np.sin(el)[:, None]
        d = np.stack(np.broadcast_arrays(ce * np.sin(az)[None], -se, ce * np.cos(az)[None]), -1).reshape(-1, 3)
        ring = np.repeat(rings.astype(np.int32), len(az))
        return d, ring

    def to_dict(self) -> dict:
        out = {"name": self.name, "rings": self.n_rings, "elevations_deg": self.elevations_deg.round(4).tolist(),
               "azimuth_step_deg": float(self.azimuth_step_deg)}
        if not self.spinning:
            out["n_directions"] = len(self.directions)
        return out


def _azimuth_deg(d: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(d[..., 0], d[..., 2]))


def _elevation_deg(d: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(-d[..., 1], np.hypot(d[..., 0], d[..., 2])))


# Velodyne HDL-64E S2 (KITTI): two blocks of 32 lasers. Upper block +2.0 to -8.33 deg (1/3 deg apart),
# lower block -8.83 to -24.8 deg (~1/2 deg apart): the datasheet's "+2 to -24.8, ~0.4 deg". Azimuth:
# the datasheet gives 0.08-0.35 deg for 5-20 Hz; at KITTI's 10 Hz, ~1.33 M points/s over 64 lasers is
# ~2080 firings per turn, 0.173 deg (and KITTI scans hold ~120k points, 64 x 2080 minus no-returns).
_HDL64_ELEV = np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.8, 32)])
# Velodyne VLP-32C (Ultra Puck): +15 to -25 deg, dense around the horizon (0.333 deg steps between about
# +1.7 and -4.7 deg), sparse at the ends; values from the VLP-32C manual. 0.2 deg azimuth at 10 Hz.
_VLP32_ELEV = np.array([15.0, 10.333, 7.0, 4.667, 3.333, 2.333, 1.667, 1.333, 1.0, 0.667, 0.333, 0.0,
                        -0.333, -0.667, -1.0, -1.333, -1.667, -2.0, -2.333, -2.667, -3.0, -3.333, -3.667,
                        -4.0, -4.667, -5.333, -6.148, -7.254, -8.843, -11.31, -15.639, -25.0])
# Velodyne VLP-16 (Puck): +-15 deg every 2 deg, 0.2 deg azimuth at 10 Hz.
_VLP16_ELEV = np.linspace(15.0, -15.0, 16)
# Ouster OS1-128: 45 deg vertical field (+-22.5), uniform; 2048 columns per turn at 10 Hz (0.176 deg).
_OS128_ELEV = np.linspace(22.5, -22.5, 128)

LIDAR_PRESETS: dict[str, LidarPattern] = {
    "hdl64": LidarPattern("hdl64", _HDL64_ELEV, 360.0 / 2083),
    "vlp32": LidarPattern("vlp32", _VLP32_ELEV, 0.2),
    "vlp16": LidarPattern("vlp16", _VLP16_ELEV, 0.2),
    "os128": LidarPattern("os128", _OS128_ELEV, 360.0 / 2048),
}

# "random": drawn per sample for diversity of ring count, vertical coverage and density.
RANDOM_RINGS = (8, 128)            # ring count, inclusive
RANDOM_TOP_DEG = (0.0, 15.0)       # elevation of the top ring
RANDOM_SPAN_DEG = (15.0, 45.0)     # top minus bottom ring
RANDOM_GAMMA = (1.0, 1.6)          # > 1 packs rings towards the top, as real sensors do near the horizon
RANDOM_AZ_STEP_DEG = (0.1, 0.4)    # azimuth resolution


def random_pattern(rng: np.random.Generator) -> LidarPattern:
    """A spinning pattern with ring count, vertical range, spacing and azimuth step drawn from rng."""
    n = int(rng.integers(RANDOM_RINGS[0], RANDOM_RINGS[1] + 1))
    top = rng.uniform(*RANDOM_TOP_DEG)
    span = rng.uniform(*RANDOM_SPAN_DEG)
    gamma = rng.uniform(*RANDOM_GAMMA)
    step = rng.uniform(*RANDOM_AZ_STEP_DEG)
    elev = top - span * np.linspace(0.0, 1.0, n) ** gamma
    return LidarPattern("random", elev, float(step))


def _parse_custom(body: str) -> LidarPattern:
    """'rings=32,vfov=10:-30,az=0.2' (uniform rings from top to bottom) or 'elev=2:0:-2.5,az=0.2'."""
    kv = _parse_kv(body, {"rings", "vfov", "az", "elev"}, "custom lidar")
    az = float(kv.get("az", 0.2))
    if "elev" in kv:
        elev = np.array([float(x) for x in kv["elev"].split(":")])
    else:
        top, bottom = (float(x) for x in kv.get("vfov", "2:-24.8").split(":"))
        elev = np.linspace(top, bottom, int(kv.get("rings", 32)))
    return LidarPattern("custom", elev, az)


# ----------------------------------------------------------------------------------------------------
# Solid-state, line-scan and file patterns


def directions_from_angles(az_deg: np.ndarray, el_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (N x 3, LiDAR frame) of rays at these azimuths and elevations (module docstring)."""
    a, e = np.radians(np.asarray(az_deg, np.float64)), np.radians(np.asarray(el_deg, np.float64))
    return np.stack([np.cos(e) * np.sin(a), -np.sin(e), np.cos(e) * np.cos(a)], -1).reshape(-1, 3)


def _parse_kv(body: str, allowed: set[str], what: str) -> dict[str, str]:
    kv = {}
    for part in filter(None, body.split(",")):
        if "=" not in part:
            raise ValueError(f"{what}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        kv[k.strip()] = v.strip()
    unknown = set(kv) - allowed
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)} (use {', '.join(sorted(allowed))})")
    return kv


# Livox-style non-repetitive scanning. A Risley prism pair: two wedge prisms spinning at different rates
# (opposite senses) deflect one beam by the sum of two rotating vectors, which traces a rose curve whose
# petals precess, so the pattern never repeats and covers more of the field the longer one integrates.
# Figures (Livox datasheets and user manuals):
#   Avia: non-repetitive mode 70.4 x 77.2 deg (h x v), 240,000 points/s (first return), 10 Hz frames;
#         its repetitive mode is a line scan of 70.4 x 4.5 deg;
#   Mid-70: 70.4 deg circular, 100,000 points/s;  Mid-40: 38.4 deg circular, 100,000 points/s;
#   coverage grows with integration time: ~20% of the FOV at 0.1 s, > 90% at 1 s (Livox's coverage
#   curves; "coverage" = fraction of the FOV illuminated).
# The prism rates are those reported for the Mid-40 (7294 and -4664 rpm, e.g. in the Livox-LOAM paper).
# With them, 240k points/s and the Avia's field, this model covers (0.5 deg cells of the elliptic field,
# fov_coverage): 10.6% at 0.05 s, 19.8% at 0.1 s, 36% at 0.2 s, 70% at 0.5 s, 93% at 1 s, i.e. the
# datasheet's curve. The field is an ellipse in (azimuth, elevation) of the stated extents; a single
# beam (the Avia's 6 beams sit side by side and mainly raise the point rate, which `rate` models).
LIVOX_FOV_DEG = (70.4, 77.2)
LIVOX_RATE_HZ = 240_000.0
LIVOX_PRISM_HZ = (7294.0 / 60.0, -4664.0 / 60.0)
LIVOX_PERIOD_S = 30.0  # 7294 and 4664 rpm share a factor of 2: the curve repeats after 60 / 2 s


def rosette_pattern(t_s: float | None = 0.1, n_points: int | None = None, fov_deg: tuple[float, float] = LIVOX_FOV_DEG,
                    rate_hz: float = LIVOX_RATE_HZ, start_s: float = 0.0,
                    prism_hz: tuple[float, float] = LIVOX_PRISM_HZ) -> LidarPattern:
    """Rays of a Risley-prism rosette integrated over t_s seconds (or n_points firings) from start_s.

    Deflection (normalised to the unit disc): z(t) = (exp(i 2 pi f1 t) + exp(i 2 pi f2 t)) / 2, mapped to
    azimuth = hfov/2 Re z and elevation = vfov/2 Im z, so every ray lies inside the stated ellipse.
    """
    n = int(n_points) if n_points is not None else int(round(float(t_s) * rate_hz))
    if n <= 0:
        raise ValueError("rosette: need t > 0 or points > 0")
    hfov, vfov = fov_deg
    t = start_s + np.arange(n) / rate_hz
    z = 0.5 * (np.exp(2j * np.pi * prism_hz[0] * t) + np.exp(2j * np.pi * prism_hz[1] * t))
    az, el = 0.5 * hfov * z.real, 0.5 * vfov * z.imag
    name = f"livox:points={n},fov={hfov:g}x{vfov:g}"
    # No rings: elevations_deg stays empty (meta then says rings = 0); the step is the first prism's
    # turn per firing, for information only.
    return LidarPattern(name, np.zeros(0), 360.0 * abs(prism_hz[0]) / rate_hz,
                        directions=directions_from_angles(az, el))


def fov_coverage(directions: np.ndarray, fov_deg: tuple[float, float], cell_deg: float = 0.5) -> float:
    """Fraction of the elliptic field's (azimuth x elevation) cells of cell_deg that hold at least one ray.

    A cell belongs to the field when its centre is inside the ellipse of the stated extents.
    """
    hfov, vfov = fov_deg
    az, el = _azimuth_deg(directions), _elevation_deg(directions)
    na, ne = int(math.ceil(hfov / cell_deg)), int(math.ceil(vfov / cell_deg))
    ac = -0.5 * hfov + (np.arange(na) + 0.5) * cell_deg
    ec = -0.5 * vfov + (np.arange(ne) + 0.5) * cell_deg
    inside = (ac[None, :] / (0.5 * hfov)) ** 2 + (ec[:, None] / (0.5 * vfov)) ** 2 <= 1.0
    ia = np.floor((az + 0.5 * hfov) / cell_deg).astype(np.int64)
    ie = np.floor((el + 0.5 * vfov) / cell_deg).astype(np.int64)
    ok = (ia >= 0) & (ia < na) & (ie >= 0) & (ie < ne)
    hit = np.zeros((ne, na), bool)
    hit[ie[ok], ia[ok]] = True
    return float((hit & inside).sum() / inside.sum())


def _parse_fov(text: str) -> tuple[float, float]:
    h, _, v = text.lower().partition("x")
    return float(h), float(v or h)


def _parse_livox(body: str, rng: np.random.Generator | None) -> LidarPattern:
    """'t=0.1' | 'points=24000', optional fov=HxV (deg), rate (points/s), start (s, or 'random').

    start defaults to a random point of the curve's period when an rng is given (each scan of a
    non-repetitive sensor differs, as in the pipeline, which passes one) and to 0 otherwise.
    """
    kv = _parse_kv(body, {"t", "points", "fov", "rate", "start"}, "livox lidar")
    if "t" in kv and "points" in kv:
        raise ValueError("livox lidar: give t (integration time, s) or points, not both")
    fov = _parse_fov(kv["fov"]) if "fov" in kv else LIVOX_FOV_DEG
    start = kv.get("start", "random" if rng is not None else "0")
    start_s = float(rng.uniform(0.0, LIVOX_PERIOD_S)) if start == "random" and rng is not None else float(
        0.0 if start == "random" else start)
    return rosette_pattern(float(kv.get("t", 0.1)), int(kv["points"]) if "points" in kv else None, fov,
                           float(kv.get("rate", LIVOX_RATE_HZ)), start_s)


def linescan_pattern(n_lines: int = 4, vfov_deg: tuple[float, float] = (-10.0, 10.0), az_step_deg: float = 0.1,
                     hfov_deg: float = 120.0) -> LidarPattern:
    """n_lines horizontal scan lines evenly spread over vfov (bottom, top), sampled every az_step_deg over
    hfov centred on the forward axis. Ring (line) 0 is the top line, as for the spinning presets.

    Line scanners (polygon-mirror or MEMS sensors, the Avia's repetitive mode: 70.4 x 4.5 deg; the
    Livox HAP: 120 x 25 deg) sweep a few beams across a wide but limited horizontal field.
    """
    lo, hi = min(vfov_deg), max(vfov_deg)
    if n_lines < 1 or az_step_deg <= 0 or hfov_deg <= 0:
        raise ValueError("line scan: need n >= 1, az > 0, hfov > 0")
    el = np.linspace(hi, lo, n_lines) if n_lines > 1 else np.array([0.5 * (lo + hi)])
    k = np.arange(int(math.floor(0.5 * hfov_deg / az_step_deg + 1e-9)) + 1)
    az = np.concatenate([-k[:0:-1], k]) * az_step_deg
    ring = np.repeat(np.arange(n_lines, dtype=np.int32), len(az))
    d = directions_from_angles(np.tile(az, n_lines), np.repeat(el, len(az)))
    name = f"lines:n={n_lines},vfov={lo:g}:{hi:g},az={az_step_deg:g},hfov={hfov_deg:g}"
    return LidarPattern(name, el, az_step_deg, directions=d, direction_ring=ring)


def _parse_lines(body: str) -> LidarPattern:
    """'n=4,vfov=-10:10,az=0.1,hfov=120' (any subset; these are the defaults)."""
    kv = _parse_kv(body, {"n", "vfov", "az", "hfov"}, "line-scan lidar")
    lo, hi = (float(x) for x in kv.get("vfov", "-10:10").split(":"))
    return linescan_pattern(int(kv.get("n", 4)), (lo, hi), float(kv.get("az", 0.1)), float(kv.get("hfov", 120.0)))


# Density patterns: an empirical distribution of ray directions over (azimuth x elevation) cells, e.g.
# measured from real scans of a sensor whose rings could not be resolved. Rays are drawn from it with
# the seed stored beside it, so the same file always gives the same rays.


def density_pattern(az_edges_deg: np.ndarray, el_edges_deg: np.ndarray, counts: np.ndarray, n_rays: int,
                    seed: int = 0, name: str = "density", rng: np.random.Generator | None = None) -> LidarPattern:
    """n_rays directions drawn cell by cell in proportion to counts (n_el x n_az), uniform inside a cell.

    rng: draw from it instead of the stored seed (a fresh pattern per scan).
    """
    az_e, el_e = np.asarray(az_edges_deg, np.float64), np.asarray(el_edges_deg, np.float64)
    c = np.asarray(counts, np.float64).reshape(len(el_e) - 1, len(az_e) - 1)
    if c.sum() <= 0 or n_rays <= 0:
        raise ValueError("density pattern: need positive counts and n_rays")
    g = rng if rng is not None else np.random.default_rng(seed)
    cell = g.choice(c.size, size=int(n_rays), p=(c / c.sum()).ravel())
    ie, ia = np.divmod(cell, c.shape[1])
    u = g.random((int(n_rays), 2))
    az = az_e[ia] + u[:, 0] * (az_e[ia + 1] - az_e[ia])
    el = el_e[ie] + u[:, 1] * (el_e[ie + 1] - el_e[ie])
    source = {"type": "density", "name": name, "az_edges_deg": az_e.tolist(), "el_edges_deg": el_e.tolist(),
              "counts": c.tolist(), "n_rays": int(n_rays), "seed": int(seed)}
    return LidarPattern(name, np.zeros(0), float(np.median(np.diff(az_e))),
                        directions=directions_from_angles(az, el), source=source)


def pattern_to_json(pattern: LidarPattern) -> dict:
    """The pattern as a pattern-file dict (full precision: json writes floats as repr, which round-trips)."""
    if pattern.source is not None:
        out = dict(pattern.source)
    elif pattern.spinning:
        out = {"type": "spinning", "name": pattern.name, "elevations_deg": pattern.elevations_deg.tolist(),
               "azimuth_step_deg": float(pattern.azimuth_step_deg)}
    else:
        out = {"type": "directions", "name": pattern.name, "elevations_deg": pattern.elevations_deg.tolist(),
               "azimuth_step_deg": float(pattern.azimuth_step_deg), "directions": pattern.directions.tolist(),
               "direction_ring": pattern.direction_ring.tolist()}
    if pattern.sensor is not None:
        out["sensor"] = pattern.sensor.to_dict()
    return out


def pattern_from_json(d: dict, rng: np.random.Generator | None = None, name: str = "file") -> LidarPattern:
    """Inverse of pattern_to_json. Keys other than the type's own (e.g. a fit report) are ignored.

    'density' files with "resample": true draw fresh rays from rng when one is given. A "sensor" entry
    (a SensorModel dict, a preset name or a sensor spec) becomes the pattern's sensor.
    """
    kind = d.get("type")
    name = str(d.get("name", name))
    if kind == "spinning":
        pat = LidarPattern(name, np.asarray(d["elevations_deg"], np.float64), float(d["azimuth_step_deg"]))
    elif kind == "directions":
        dirs = np.asarray(d["directions"], np.float64).reshape(-1, 3)
        ring = d.get("direction_ring")
        pat = LidarPattern(name, np.asarray(d.get("elevations_deg", []), np.float64), float(d.get("azimuth_step_deg", 0.0)), directions=dirs,
                           direction_ring=None if ring is None else np.asarray(ring, np.int32))
    elif kind == "density":
        pat = density_pattern(d["az_edges_deg"], d["el_edges_deg"], d["counts"], int(d["n_rays"]),
                              int(d.get("seed", 0)), name, rng if d.get("resample") else None)
    else:
        raise ValueError(f"pattern file: unknown type {kind!r} (use spinning, directions or density)")
    if d.get("sensor") is not None:
        pat.sensor = get_sensor(d["sensor"])
    return pat


def save_pattern(pattern: LidarPattern, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write a pattern file; extra keys (e.g. the fit report) go beside the pattern and are ignored on load."""
    d = pattern_to_json(pattern)
    if extra:
        d.update({k: v for k, v in extra.items() if k not in d})
    with open(path, "w") as f:
        json.dump(d, f)


@functools.lru_cache(maxsize=8)
def _read_json(path: str, mtime_ns: int, size: int) -> dict:
    # The pipeline asks for the pattern once per sample: parse the file once (keyed by its mtime and size).
    with open(path) as f:
        return json.load(f)


def load_pattern(path: str | os.PathLike, rng: np.random.Generator | None = None) -> LidarPattern:
    p = os.fspath(path)
    st = os.stat(p)
    stem = os.path.splitext(os.path.basename(p))[0]
    return pattern_from_json(_read_json(os.path.abspath(p), st.st_mtime_ns, st.st_size), rng, stem)


def get_pattern(spec: str | LidarPattern, rng: np.random.Generator | None = None) -> LidarPattern:
    """A pattern from a preset name, 'random' (needs rng), 'custom:...' (see _parse_custom), 'livox:...'
    (rosette, _parse_livox), 'lines:...' (_parse_lines) or the path of a pattern file (.json)."""
    if isinstance(spec, LidarPattern):
        return spec
    if sparsity.is_pixel_protocol(spec):
        raise ValueError(f"{spec!r} picks pixels of the depth map, it has no rays: simulate_sparse_depth takes it")
    spec = spec.strip()
    if spec in LIDAR_PRESETS:
        p = LIDAR_PRESETS[spec]
        return LidarPattern(p.name, p.elevations_deg.copy(), p.azimuth_step_deg)
    if spec == "random":
        if rng is None:
            raise ValueError("lidar pattern 'random' needs an rng")
        return random_pattern(rng)
    m = re.fullmatch(r"(custom|livox|rosette|lines)(?::(.*))?", spec)
    if m and m.group(1) == "custom" and m.group(2) is not None:
        return _parse_custom(m.group(2))
    if m and m.group(1) in ("livox", "rosette"):
        return _parse_livox(m.group(2) or "", rng)
    if m and m.group(1) == "lines":
        return _parse_lines(m.group(2) or "")
    if spec.lower().endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"lidar pattern file {spec!r} not found")
        return load_pattern(spec, rng)
    raise ValueError(f"unknown lidar pattern {spec!r}: use {sorted(LIDAR_PRESETS)}, 'random', 'custom:...', "
                     "'livox:...', 'lines:...' or a pattern .json file")


def get_sensor(spec: str | dict | SensorModel | None) -> SensorModel:
    """A SensorModel from a preset name ('ideal', 'realistic'), a preset with overrides
    ('realistic:mixed_returns=0,dark_dropout=0.1'), overrides of 'ideal' alone ('noise_rel=0.001'), a dict
    (SensorModel.to_dict), a JSON file holding such a dict (or a pattern file with a "sensor" entry), or None
    (ideal)."""
    if spec is None:
        return SENSOR_PRESETS["ideal"]
    if isinstance(spec, SensorModel):
        return spec
    if isinstance(spec, dict):
        return SensorModel.from_dict(spec)
    spec = spec.strip()
    if spec.lower().endswith(".json"):
        if not os.path.isfile(spec):
            raise ValueError(f"sensor file {spec!r} not found")
        st = os.stat(spec)
        d = _read_json(os.path.abspath(spec), st.st_mtime_ns, st.st_size)
        return get_sensor(d["sensor"] if "sensor" in d else d)
    name, _, body = spec.partition(":")
    if "=" in name:  # overrides of the ideal sensor
        name, body = "ideal", spec
    if name not in SENSOR_PRESETS:
        raise ValueError(f"unknown sensor {name!r}: use {sorted(SENSOR_PRESETS)}, PRESET:key=value,... or a .json file")
    base = SENSOR_PRESETS[name]
    keys = {f for f in base.to_dict() if f != "name"}
    kv = _parse_kv(body, keys, "sensor")
    if not kv:
        return base
    try:
        over = {k: float(v) for k, v in kv.items()}
    except ValueError as exc:
        raise ValueError(f"sensor {spec!r}: values must be numbers ({exc})") from exc
    return SensorModel.from_dict({**base.to_dict(), **over, "name": spec})


# ----------------------------------------------------------------------------------------------------
# Mount


@dataclass
class Mount:
    """Pose of the LiDAR in the camera frame: p_cam = R_cam_from_lidar @ p_lidar + t_cam_from_lidar."""

    R_cam_from_lidar: np.ndarray = field(default_factory=lambda: np.eye(3))
    t_cam_from_lidar: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        self.R_cam_from_lidar = np.asarray(self.R_cam_from_lidar, dtype=np.float64).reshape(3, 3)
        self.t_cam_from_lidar = np.asarray(self.t_cam_from_lidar, dtype=np.float64).reshape(3)

    def to_dict(self) -> dict:
        return {"R_cam_from_lidar": self.R_cam_from_lidar.tolist(), "t_cam_from_lidar": self.t_cam_from_lidar.tolist()}


KITTI_MOUNT = Mount(np.eye(3), np.array([0.06, -0.08, -0.27]))


def sample_mount(rng: np.random.Generator, max_rot_deg: float = 1.0, p_above: float = 0.8) -> Mount:
    """A plausible rig: the LiDAR 2-30 cm above the camera (below with probability 1 - p_above), up to
    10 cm to either side and 30 cm behind to 5 cm ahead, rotated by up to max_rot_deg about each axis
    (mounting and calibration error). Draw order: side, up/down, height, depth, rotation."""
    above = rng.random() < p_above
    height = rng.uniform(0.02, 0.30)
    tx = rng.uniform(-0.10, 0.10)
    tz = rng.uniform(-0.30, 0.05)
    ty = -height if above else height
    rotvec = np.radians(rng.uniform(-max_rot_deg, max_rot_deg, size=3))
    return Mount(rotation_from_rotvec(rotvec), np.array([tx, ty, tz]))


# ----------------------------------------------------------------------------------------------------
# Ray casting


def make_scene(mesh: Mesh, triangles: np.ndarray | None = None, nthreads: int = 1):
    """An Open3D RaycastingScene over the mesh (or over a subset of its triangles)."""
    import open3d as o3d

    tris = mesh.triangles if triangles is None else triangles
    scene = o3d.t.geometry.RaycastingScene(nthreads=nthreads)
    if len(tris):
        scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, np.float32)),
                            o3d.core.Tensor(np.ascontiguousarray(tris, np.uint32)))
    return scene


def cast_rays(mesh, origins: np.ndarray, directions: np.ndarray, nthreads: int = 1) -> np.ndarray:
    """Distance along each ray to the first hit (float64, inf on a miss), in units of |direction|.

    mesh: a Mesh or a scene from make_scene (to reuse one BVH across calls). origins: 3 or N x 3.
    nthreads=1 by default: the pipeline runs one image per core; pass 0 for all cores.
    """
    return _cast_o3d(mesh, origins, directions, nthreads)[0]


def _cast_o3d(mesh, origins: np.ndarray, directions: np.ndarray, nthreads: int = 1,
              normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """cast_rays, and with normals=True also the unit normal of each triangle hit, facing the ray (N x 3)."""
    import open3d as o3d

    scene = make_scene(mesh, nthreads=nthreads) if isinstance(mesh, Mesh) else mesh
    d = np.asarray(directions, dtype=np.float32).reshape(-1, 3)
    o = np.broadcast_to(np.asarray(origins, dtype=np.float32).reshape(-1, 3), d.shape)
    if len(d) == 0:
        return np.zeros(0), (np.zeros((0, 3)) if normals else None)
    rays = o3d.core.Tensor(np.ascontiguousarray(np.concatenate([o, d], axis=1)))
    hit = scene.cast_rays(rays, nthreads=nthreads)
    t = hit["t_hit"].numpy().astype(np.float64)
    if not normals:
        return t, None
    n = hit["primitive_normals"].numpy().astype(np.float64)
    n[np.einsum("ij,ij->i", n, d) > 0] *= -1.0
    return t, n


@dataclass
class ScanResult:
    """Returns of one simulated scan, camera frame. All arrays have one row per returned point."""

    points_cam: np.ndarray      # N x 3 float64
    ring: np.ndarray            # N int32, index into the pattern's rings (-1 for unlabelled directions)
    range_m: np.ndarray         # N float64, measured range (noise included)
    directions_cam: np.ndarray  # N x 3 float64, unit ray directions
    origin_cam: np.ndarray      # 3, the LiDAR origin
    n_rays: int                 # rays cast
    n_triangles: int            # triangles in the BVH after culling (the surface's, for a GridSurface)
    ray_index: np.ndarray | None = None  # N int64, index of each return among the rays cast


def _camera_azimuth_window(K: np.ndarray, width: int, height: int, R: np.ndarray) -> tuple[float, float, float]:
    """Azimuth range (degrees, LiDAR frame) of the image border's viewing directions, and the axis azimuth.

    Angles are unwrapped around the optical axis's azimuth so a window never splits at +-180.
    """
    Kinv = np.linalg.inv(K)
    us = np.linspace(-0.5, width - 0.5, 65)
    vs = np.linspace(-0.5, height - 0.5, 65)
    border = np.concatenate([np.stack([us, np.full_like(us, vs[0])], 1), np.stack([us, np.full_like(us, vs[-1])], 1),
                             np.stack([np.full_like(vs, us[0]), vs], 1), np.stack([np.full_like(vs, us[-1]), vs], 1)])
    d_cam = np.concatenate([border, np.ones((len(border), 1))], 1) @ Kinv.T
    d_lid = d_cam @ R  # R^T d for row vectors
    axis = (Kinv @ np.array([K[0, 2], K[1, 2], 1.0])) @ R
    az0 = float(_azimuth_deg(axis))
    rel = (_azimuth_deg(d_lid) - az0 + 180.0) % 360.0 - 180.0
    return az0 + float(rel.min()), az0 + float(rel.max()), az0


def scan_window(mount: Mount, K: np.ndarray, width: int, height: int, min_range_m: float = 0.5,
                az_margin_deg: float | None = None) -> tuple[float, float, float]:
    """Azimuth window (lo, hi, degrees, LiDAR frame) of the rays a scan casts, and the camera axis's azimuth:
    the camera's horizontal view widened by az_margin_deg (default: see simulate_scan)."""
    t = mount.t_cam_from_lidar
    lo, hi, az0 = _camera_azimuth_window(as_K(K), width, height, mount.R_cam_from_lidar)
    if az_margin_deg is None:
        az_margin_deg = math.degrees(math.asin(min(1.0, float(np.linalg.norm(t)) / min_range_m))) + 0.5
    return lo - az_margin_deg, hi + az_margin_deg, az0


EL_EPS_DEG = 0.01   # covers the great-circle bulge of triangles under BIG_DEG (see module docstring)
BIG_DEG = 2.0       # triangles with a larger angular extent are never culled


def simulate_scan(mesh: Mesh | GridSurface, pattern: LidarPattern, mount: Mount, K: np.ndarray, width: int,
                  height: int, rng: np.random.Generator, *, min_range_m: float = 0.5, max_range_m: float = 120.0,
                  noise_std_m: float | None = None, dropout: float | None = None, az_margin_deg: float | None = None,
                  cull: bool = True, nthreads: int = 1, sensor: SensorModel | str | None = None,
                  rgb: np.ndarray | None = None) -> ScanResult:
    """Cast the pattern's rays (inside the camera's horizontal view) from the mount against the surface.

    mesh: a GridSurface (datagen.heightfield: the exact height-field walk, no BVH) or any Mesh (Open3D,
    with the triangle culling of the module docstring; cull=False builds the BVH over every triangle).
    A return needs a first hit with min_range_m <= range <= max_range_m (before noise). The sensor
    (datagen.sensor; default ideal) adds its effects; noise_std_m (Gaussian range noise along the ray)
    and dropout (each return lost with that probability), when given, replace the sensor's own.
    rgb (H x W x 3 uint8, the camera image) is needed by the sensor's dark-surface dropout.
    az_margin_deg widens the camera's azimuth window: by default the largest angle a point at
    min_range_m can be displaced by the mount offset, asin(|t| / min_range), + 0.5 deg.
    Draw order (same rng, same scan): azimuth phase, then the sensor's draws (datagen.sensor).
    """
    sensor = _with_overrides(get_sensor(sensor), noise_std_m, dropout)
    if sensor.needs_brightness and rgb is None:
        raise ValueError(f"sensor {sensor.name!r} has dark_dropout > 0: it needs the camera image (rgb=)")
    K = as_K(K)
    R, t = mount.R_cam_from_lidar, mount.t_cam_from_lidar
    empty = ScanResult(np.zeros((0, 3)), np.zeros(0, np.int32), np.zeros(0), np.zeros((0, 3)), t.copy(), 0, 0)
    phase = float(rng.uniform(0.0, pattern.azimuth_step_deg)) if pattern.spinning else 0.0
    lo, hi, az0 = scan_window(mount, K, width, height, min_range_m, az_margin_deg)
    if mesh.n_triangles == 0:
        return empty
    if isinstance(mesh, GridSurface):
        # The walk rejects a ray that cannot reach the surface in a few operations: no culling needed.
        d_lid, ring = pattern.rays(lo, hi, phase)
        n_triangles = mesh.n_triangles

        def cast(d: np.ndarray, normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
            return cast_surface(mesh, t, d, t_max=max_range_m)
    else:
        tris, (lo, hi, el_lo, el_hi) = _cull(mesh, pattern, R, t, phase, lo, hi, az0, cull)
        if len(tris) == 0:
            return empty
        d_lid, ring = pattern.rays(lo, hi, phase, el_lo, el_hi)
        n_triangles = len(tris)
        scene = make_scene(mesh, tris, nthreads=nthreads) if len(d_lid) else None

        def cast(d: np.ndarray, normals: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
            return _cast_o3d(scene, t, d, nthreads=nthreads, normals=normals)
    if len(d_lid) == 0:
        return empty
    d_cam = d_lid @ R.T
    r, nrm = cast(d_cam, sensor.needs_normals)

    ok = np.isfinite(r) & (r >= min_range_m) & (r <= max_range_m)
    if sensor.mixes:
        grid = (len(np.unique(ring)), len(ring) // len(np.unique(ring))) if pattern.spinning else None
        _mix_edge_beams(r, ok, d_cam, ring, grid, cast, sensor, max_range_m, rng)
    if sensor.noise_std_m > 0 or sensor.noise_rel > 0:
        r = r + rng.normal(0.0, noise_sigma(sensor, r))
    if sensor.dropout > 0:
        ok &= rng.random(len(r)) >= sensor.dropout
    if sensor.incidence_dropout > 0 or sensor.range_dropout > 0 or sensor.dark_dropout > 0:
        cos_inc = np.abs(np.einsum("ij,ij->i", nrm, d_cam)) if sensor.needs_normals else None
        bright = _brightness_at(rgb, K, t, r, d_cam) if sensor.needs_brightness else None
        ok &= rng.random(len(r)) < keep_probability(sensor, r, max_range_m, cos_inc, bright)
    ok &= r > 0
    pts = t + r[ok, None] * d_cam[ok]
    return ScanResult(pts, ring[ok], r[ok], d_cam[ok], t.copy(), len(d_cam), n_triangles, np.flatnonzero(ok))


def _with_overrides(sensor: SensorModel, noise_std_m: float | None, dropout: float | None) -> SensorModel:
    """The sensor with its uniform noise and dropout replaced by the explicit knobs that are given."""
    over = {k: float(v) for k, v in (("noise_std_m", noise_std_m), ("dropout", dropout)) if v is not None}
    return dataclasses.replace(sensor, **over) if over else sensor


def _cull(mesh: Mesh, pattern: LidarPattern, R: np.ndarray, t: np.ndarray, phase: float, lo: float, hi: float,
          az0: float, cull: bool) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The triangles a spinning pattern's rays can reach (all of them when not cull) and the ray window
    (azimuth lo, hi, elevation lo, hi) that covers them; see the module docstring."""
    lo0, hi0 = lo, hi
    # Angles of every vertex seen from the sensor, azimuth unwrapped around the camera's axis.
    v_lid = (mesh.vertices.astype(np.float64) - t) @ R
    v_az = ((_azimuth_deg(v_lid) - az0 + 180.0) % 360.0 - 180.0 + az0).astype(np.float32)
    v_el = _elevation_deg(v_lid).astype(np.float32)
    tris = mesh.triangles
    # Column by column: numpy's min/max over a length-3 axis is several times slower.
    cols = [np.ascontiguousarray(tris[:, i]) for i in range(3)]
    a0, a1, a2 = (v_az[c] for c in cols)
    az_min, az_max = np.minimum(np.minimum(a0, a1), a2), np.maximum(np.maximum(a0, a1), a2)
    e0, e1, e2 = (v_el[c] for c in cols)
    el_min, el_max = np.minimum(np.minimum(e0, e1), e2), np.maximum(np.maximum(e0, e1), e2)
    big = (az_max - az_min > BIG_DEG) | (el_max - el_min > BIG_DEG)
    if cull:
        keep = (az_max >= lo) & (az_min <= hi)
        if pattern.spinning:
            ring_el = np.sort(pattern.elevations_deg)
            has_ring = (np.searchsorted(ring_el, el_min - EL_EPS_DEG, "left")
                        < np.searchsorted(ring_el, el_max + EL_EPS_DEG, "right"))
            step = pattern.azimuth_step_deg
            has_az = (np.floor((az_max + EL_EPS_DEG - phase) / step)
                      >= np.ceil((az_min - EL_EPS_DEG - phase) / step))
            keep &= has_ring & has_az
        else:
            d_el = _elevation_deg(pattern.directions)
            keep &= (el_max >= d_el.min() - EL_EPS_DEG) & (el_min <= d_el.max() + EL_EPS_DEG)
        keep |= big
        tris = tris[keep]
        if len(tris) == 0:
            return tris, (lo, hi, -90.0, 90.0)
        az_min, az_max, el_min, el_max, big = az_min[keep], az_max[keep], el_min[keep], el_max[keep], big[keep]
    # No ray outside the angular extent of the geometry can hit anything. The vertices' angles bound a
    # triangle's only when it is small: a large floor quad's corners can sit at -4 deg while the floor
    # below the sensor is at -90, so with any large triangle the elevation window stays open.
    lo, hi = max(lo, float(az_min.min()) - EL_EPS_DEG), min(hi, float(az_max.max()) + EL_EPS_DEG)
    el_lo, el_hi = float(el_min.min()) - EL_EPS_DEG, float(el_max.max()) + EL_EPS_DEG
    if big.any():
        lo, hi, el_lo, el_hi = lo0, hi0, -90.0, 90.0
    return tris, (lo, hi, el_lo, el_hi)


def _mix_edge_beams(r: np.ndarray, ok: np.ndarray, d_cam: np.ndarray, ring: np.ndarray, grid, cast,
                    sensor: SensorModel, max_range_m: float, rng: np.random.Generator) -> None:
    """Mixed returns (datagen.sensor): rim rays for the beams next to a range jump; where a beam's
    footprint straddles an edge, with probability mixed_returns its range becomes the footprint's mean.
    Changes r in place (only returns inside ok)."""
    idx = np.flatnonzero(edge_beams(np.where(ok, r, np.inf), grid))
    if len(idx) == 0:
        return
    rim_r, _ = cast(rim_directions(d_cam[idx], sensor.beam_divergence_mrad).reshape(-1, 3))
    rim_r = np.where(rim_r <= max_range_m, rim_r, np.inf).reshape(-1, 4)
    straddle, mean = mixed_ranges(r[idx], rim_r)
    mix = straddle & (rng.random(len(idx)) < sensor.mixed_returns)
    r[idx[mix]] = mean[mix]


def _brightness_at(rgb: np.ndarray, K: np.ndarray, origin: np.ndarray, r: np.ndarray, d_cam: np.ndarray) -> np.ndarray:
    """Brightness of the camera pixel (nearest, clamped to the image) each ray's hit projects to; 1 on a miss."""
    b = brightness(rgb)
    h, w = b.shape
    out = np.ones(len(r))
    hit = np.isfinite(r)
    uv, z = project(origin + r[hit, None] * d_cam[hit], K)
    with np.errstate(invalid="ignore"):
        u = np.clip(np.nan_to_num(np.floor(uv[:, 0] + 0.5)), 0, w - 1).astype(np.int64)
        v = np.clip(np.nan_to_num(np.floor(uv[:, 1] + 0.5)), 0, h - 1).astype(np.int64)
    out[hit] = b[v, u]
    return out


# ----------------------------------------------------------------------------------------------------
# Projection to a sparse depth map


def project_scan(points_cam: np.ndarray, K: np.ndarray, width: int, height: int, occlusion: str = "none", *,
                 mesh: Mesh | None = None, depth_m: np.ndarray | None = None, tol_m: float = 0.05,
                 tol_rel: float = 0.01, nthreads: int = 1) -> np.ndarray:
    """Sparse depth (H x W float32, 0 = no point) from camera-frame points; each goes to its nearest pixel.

    occlusion="none": no reasoning about what the camera can see. Points the LiDAR sees but the camera
        does not (behind a foreground edge, because the sensors sit apart) are kept, as in real KITTI
        scans. Only when two points land on one pixel is the nearer kept: a depth image holds one value.
    occlusion="zbuffer": additionally drop points hidden from the camera: with `mesh`, a ray from the
        camera centre towards each point that hits the mesh more than tol_m + tol_rel * distance before
        it (exact); else with `depth_m`, the camera-visible depth map, a point deeper than the map at its
        pixel by more than tol_m + tol_rel * map depth (pixels where the map is 0 keep their point).
    """
    K = as_K(K)
    pts = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    out = np.zeros((height, width), np.float32)
    if len(pts) == 0:
        return out
    uv, z = project(pts, K)
    with np.errstate(invalid="ignore"):
        u = np.floor(uv[:, 0] + 0.5)
        v = np.floor(uv[:, 1] + 0.5)
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    pts, z = pts[inside], z[inside]
    u, v = u[inside].astype(np.int64), v[inside].astype(np.int64)

    if occlusion == "zbuffer":
        if mesh is not None:
            dist = np.linalg.norm(pts, axis=1)
            frac = cast_rays(mesh, np.zeros(3), pts, nthreads=nthreads)  # in units of the point's distance
            visible = frac * dist >= dist - (tol_m + tol_rel * dist)
        elif depth_m is not None:
            d = np.asarray(depth_m, dtype=np.float64)[v, u]
            visible = (d <= 0) | ~np.isfinite(d) | (z <= d + tol_m + tol_rel * d)
        else:
            raise ValueError("occlusion='zbuffer' needs mesh= or depth_m=")
        z, u, v = z[visible], u[visible], v[visible]
    elif occlusion != "none":
        raise ValueError(f"occlusion must be 'none' or 'zbuffer', got {occlusion!r}")

    pix = v * width + u
    order = np.lexsort((z, pix))  # by pixel, nearest first
    pix, z = pix[order], z[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    out.ravel()[pix[first]] = z[first]
    return out


# ----------------------------------------------------------------------------------------------------
# The one call the pipeline makes per image


def simulate_sparse_depth(depth_m: np.ndarray, K: np.ndarray, rng: np.random.Generator, *,
                          pattern: str | LidarPattern = "hdl64", mount: Mount | str | None = None,
                          mesh: str | Mesh = "grid", occlusion: str = "none", noise_std_m: float | None = None,
                          dropout: float | None = None, min_range_m: float = 0.5, max_range_m: float = 120.0,
                          mesh_kwargs: dict | None = None, nthreads: int = 1, hidden: bool | None = None,
                          sensor: str | dict | SensorModel | None = None, rgb: np.ndarray | None = None,
                          caster: str = "heightfield") -> tuple[np.ndarray, dict]:
    """Dense depth -> mesh -> scan -> sparse depth (H x W float32, 0 = none), and what was drawn.

    pattern 'points:N' / 'keypoints:N' (keypoints of `rgb`) scans nothing: N pixels of depth_m, picked
    by shared.sparsity.simulate, the code `trainer eval --sparsity` uses.

    pattern: a preset name, 'random', 'custom:...' or a LidarPattern. mount: None (identity), 'random'
    (sample_mount), 'kitti' (KITTI_MOUNT) or a Mount. mesh: 'grid', 'poisson' or a ready Mesh (e.g. the
    synthetic world's exact geometry). occlusion='zbuffer' judges camera visibility by depth_m.
    hidden: add the background hidden behind occluding edges (datagen.hidden) as a second grid layer;
    None (default) = on when the mount is offset from the camera centre and mesh='grid' (it applies
    to the grid mesh only). sensor: a SensorModel, preset name or spec (get_sensor); None = the
    pattern's own (a pattern file's "sensor") or 'ideal'. noise_std_m and dropout, when given, replace
    the sensor's. rgb: the camera image (the sensor's dark-surface dropout reads it).
    caster: 'heightfield' (the exact grid walk, fast) or 'open3d' (the same grid triangles in a BVH:
    the reference; with hidden off, byte-identical to the scans before the height-field caster).
    Draw order: pattern (if random), mount (if random), then the scan's own draws.
    """
    depth_m = np.asarray(depth_m, dtype=np.float32)
    if sparsity.is_pixel_protocol(pattern):
        return sparsity.simulate(pattern, depth_m, rng, rgb)
    height, width = depth_m.shape
    pat = get_pattern(pattern, rng)
    if mount is None:
        mnt = Mount()  # the LiDAR at the camera centre, axes aligned
    elif isinstance(mount, Mount):
        mnt = mount
    elif mount == "random":
        mnt = sample_mount(rng)
    elif mount == "kitti":
        mnt = KITTI_MOUNT
    else:
        raise ValueError(f"mount must be None, a Mount, 'random' or 'kitti', got {mount!r}")
    sens = _with_overrides(get_sensor(sensor if sensor is not None else pat.sensor), noise_std_m, dropout)
    if caster not in ("heightfield", "open3d"):
        raise ValueError(f"caster must be 'heightfield' or 'open3d', got {caster!r}")
    mesh_kwargs = dict(mesh_kwargs or {})
    use_hidden = False
    if isinstance(mesh, Mesh):
        m, method = mesh, "given"
    elif mesh == "grid":
        method = mesh
        use_hidden = bool(np.any(mnt.t_cam_from_lidar != 0)) if hidden is None else bool(hidden)
        layer1 = (hidden_layer(depth_m, K, mnt.t_cam_from_lidar, max_rel_jump=mesh_kwargs.get("max_rel_jump", 0.1))
                  if use_hidden else None)
        m = grid_surface(depth_m, K, layer1, **mesh_kwargs)
        if caster == "open3d":
            m = m.to_mesh()
    else:
        m, method = build_mesh(depth_m, K, mesh, **mesh_kwargs), mesh
    if hidden and not use_hidden:
        raise ValueError(f"hidden geometry applies to the grid mesh, not to mesh={method!r}")
    scan = simulate_scan(m, pat, mnt, K, width, height, rng, min_range_m=min_range_m, max_range_m=max_range_m,
                         nthreads=nthreads, sensor=sens, rgb=rgb)
    sparse = project_scan(scan.points_cam, K, width, height, occlusion, depth_m=depth_m)
    n_px = int(np.count_nonzero(sparse))
    info = {"preset": pat.name, "rings": pat.n_rings, "azimuth_step_deg": float(pat.azimuth_step_deg),
            "pattern": pat.to_dict(), "pose": mnt.to_dict(), "noise_std_m": float(sens.noise_std_m),
            "dropout": float(sens.dropout), "min_range_m": float(min_range_m), "max_range_m": float(max_range_m),
            "mesh": method, "n_triangles": int(m.n_triangles), "n_rays": int(scan.n_rays),
            "n_hits": int(len(scan.range_m)), "n_points": n_px, "density": n_px / float(width * height),
            "occlusion": occlusion, "hidden_geometry": use_hidden, "sensor": sens.to_dict(),
            "caster": caster if method == "grid" else "open3d"}
    return sparse, info
