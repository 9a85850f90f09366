"""LiDAR scan patterns: which rays a sensor fires, in the LiDAR frame. `get_pattern(spec)` reads `--lidar`.

LiDAR frame: x right, y down, z forward, like the camera (shared.scan.lidar has the mount between the two). A
ray of elevation e (degrees, positive = up = -y) and azimuth a (degrees about the vertical axis,
0 = forward = +z, positive towards +x = right) has the direction
    (cos e sin a, -sin e, cos e cos a).

Patterns, all a `LidarPattern` and all reached through get_pattern:
- spinning sensors: rings at fixed elevations, each sampled every azimuth step around 360 degrees; the
  presets of LIDAR_PRESETS (hdl64, vlp32, vlp16, os128), `random` (drawn per sample) and
  `custom:rings=32,vfov=10:-30,az=0.2`;
- `livox:...`: the non-repetitive rosette of a Risley prism pair (solid-state sensors);
- `lines:...`: a few scan lines over a limited field (line scanners);
- a JSON pattern file: explicit directions, spinning rings, or an empirical direction density (e.g. one
  fitted from real scans by shared.scan.fit), optionally with the sensor's effects ("sensor" entry).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from shared import sparsity
from shared.scan.sensor import SensorModel, get_sensor, parse_kv, read_json

# ----------------------------------------------------------------------------------------------------
# The pattern, and spinning sensors


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
            az, el = azimuth_deg(d), elevation_deg(d)
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


def azimuth_deg(d: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(d[..., 0], d[..., 2]))


def elevation_deg(d: np.ndarray) -> np.ndarray:
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
    kv = parse_kv(body, {"rings", "vfov", "az", "elev"}, "custom lidar")
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
    az, el = azimuth_deg(directions), elevation_deg(directions)
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
    kv = parse_kv(body, {"t", "points", "fov", "rate", "start"}, "livox lidar")
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
    kv = parse_kv(body, {"n", "vfov", "az", "hfov"}, "line-scan lidar")
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


def load_pattern(path: str | os.PathLike, rng: np.random.Generator | None = None) -> LidarPattern:
    p = os.fspath(path)
    st = os.stat(p)
    stem = os.path.splitext(os.path.basename(p))[0]
    return pattern_from_json(read_json(os.path.abspath(p), st.st_mtime_ns, st.st_size), rng, stem)


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
