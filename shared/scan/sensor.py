"""What a LiDAR does to the geometry it scans: range noise, lost returns, mixed returns at edges.

A `SensorModel` is a set of seeded knobs applied to each ray's first hit (shared.scan.lidar.simulate_scan).
Each knob changes one statistic and is 0 (off) in the `ideal` model:

- noise_std_m, noise_rel: Gaussian range noise along the ray, sigma = noise_std_m + noise_rel * range
  (noise that grows with range: timing jitter plus a spot that spreads with distance).
- dropout: each return is lost with this probability, whatever it hit.
- incidence_dropout: lost with probability incidence_dropout * (1 - cos theta)^2, theta the angle
  between the ray and the surface normal (grazing surfaces send little light back).
- range_dropout: lost with probability range_dropout * (range / max_range)^2 (the return's power
  falls with the square of the range).
- dark_dropout: lost with probability dark_dropout * (1 - brightness)^3, brightness in [0, 1] the luma
  (0.299 R + 0.587 G + 0.114 B) / 255 of the camera pixel the return lands on: the image is the only
  reflectance cue there is. It is a proxy: shadows look dark but reflect, a black car's paint is
  bright in the near infrared, and a see-through return lands on the foreground's pixel.
- beam_divergence_mrad, mixed_returns: a beam is a cone of this full angle, sampled by its centre
  and four rays on its rim (along and across the scan line). Where those ranges differ by more than
  MIXED_EDGE_REL (a depth edge inside the footprint), the sensor reports, with probability
  mixed_returns, the mean of the ranges the five rays hit (a "mixed pixel" floating between the two
  surfaces) instead of the centre's range. Rim rays are cast only for beams next to a range jump in
  the scan (neighbours in azimuth and ring for spinning patterns; every beam for other patterns).

The lost-return probabilities combine as independent causes: keep = prod(1 - p_i).
Draw order on the scan's rng, each only when its knob is on: the mixed-return choice (one uniform per
edge beam), the noise (one normal per ray), the uniform dropout (one uniform per ray), then one
uniform per ray for the incidence, range and dark dropouts together. With every new knob at 0 the
draws are those of the plain noise_std_m / dropout scan, so its bytes do not change.

Presets (SENSOR_PRESETS): `ideal` (everything 0: the geometry's first hits, the pre-training default)
and `realistic`, an HDL-64E-like sensor: about 2 cm range noise at 25 m (the datasheet's < 2 cm,
1 sigma), noise and lost returns growing with range (its datasheet range is 50 m on ~10% reflective
pavement, 120 m on cars and foliage), lost returns at grazing incidence and on dark surfaces, and
a 2 mrad beam (an assumption: a typical figure for spinning 905 nm sensors) with mixed returns at
half the edge beams. The dropout strengths are set so that about 10% of the ideal returns are lost on
the synthetic KITTI-like street scenes (exact world, KITTI mount), mostly on grazing ground and dark
surfaces: a real HDL-64E at 10 Hz returns about 120k points of ~133k firings, sky included. Plausible
numbers, not a fit to real scans.

`get_sensor(spec)` reads `--sensor`: a preset, PRESET:key=value,..., or a JSON file (docs/own_sensor.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass

import numpy as np

MIXED_EDGE_REL = 0.05  # rim ranges differing by more than this (relative) mean an edge in the footprint


@dataclass(frozen=True)
class SensorModel:
    """Seeded sensor effects on a scan; see the module docstring for each knob's formula."""

    name: str = "ideal"
    noise_std_m: float = 0.0
    noise_rel: float = 0.0
    dropout: float = 0.0
    incidence_dropout: float = 0.0
    range_dropout: float = 0.0
    dark_dropout: float = 0.0
    beam_divergence_mrad: float = 0.0
    mixed_returns: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"sensor {self.name!r}: {f.name} must be a number >= 0, got {v!r}")
            if f.name.endswith(("dropout", "returns")) and v > 1:
                raise ValueError(f"sensor {self.name!r}: {f.name} is a probability, got {v}")

    @property
    def needs_normals(self) -> bool:
        return self.incidence_dropout > 0

    @property
    def needs_brightness(self) -> bool:
        return self.dark_dropout > 0

    @property
    def mixes(self) -> bool:
        return self.beam_divergence_mrad > 0 and self.mixed_returns > 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: dict) -> SensorModel:
        known = {f.name for f in dataclasses.fields(SensorModel)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"sensor: unknown keys {sorted(unknown)} (use {', '.join(sorted(known))})")
        return SensorModel(**{k: (str(v) if k == "name" else float(v)) for k, v in d.items()})


SENSOR_PRESETS: dict[str, SensorModel] = {
    "ideal": SensorModel("ideal"),
    "realistic": SensorModel("realistic", noise_std_m=0.01, noise_rel=0.0004, dropout=0.01, incidence_dropout=0.12,
                             range_dropout=0.3, dark_dropout=0.08, beam_divergence_mrad=2.0, mixed_returns=0.5),
}


def brightness(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] of an H x W x 3 uint8 image (H x W float32)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"brightness needs an H x W x 3 image, got shape {rgb.shape}")
    return (rgb[..., 0] * np.float32(0.299 / 255) + rgb[..., 1] * np.float32(0.587 / 255)
            + rgb[..., 2] * np.float32(0.114 / 255)).astype(np.float32)


def keep_probability(sensor: SensorModel, range_m: np.ndarray, max_range_m: float, cos_incidence: np.ndarray | None,
                     bright: np.ndarray | None) -> np.ndarray:
    """Probability that each return survives the incidence, range and dark-surface dropouts."""
    keep = np.ones(len(range_m))
    if sensor.incidence_dropout > 0:
        keep *= 1.0 - sensor.incidence_dropout * (1.0 - np.clip(cos_incidence, 0.0, 1.0)) ** 2
    if sensor.range_dropout > 0:
        keep *= 1.0 - sensor.range_dropout * np.clip(range_m / max_range_m, 0.0, 1.0) ** 2
    if sensor.dark_dropout > 0:
        keep *= 1.0 - sensor.dark_dropout * (1.0 - np.clip(bright, 0.0, 1.0)) ** 3
    return keep


def noise_sigma(sensor: SensorModel, range_m: np.ndarray) -> np.ndarray:
    """Range noise sigma per ray (misses, range inf, get 0)."""
    r = np.where(np.isfinite(range_m), range_m, 0.0)
    return sensor.noise_std_m + sensor.noise_rel * r


def rim_directions(d: np.ndarray, divergence_mrad: float) -> np.ndarray:
    """Four rays on the rim of each beam (N x 4 x 3, unit): +-half the divergence along and across the
    scan line (the horizontal direction perpendicular to the ray, and the one perpendicular to both)."""
    d = np.asarray(d, np.float64).reshape(-1, 3)
    side = np.cross(d, np.array([0.0, -1.0, 0.0]))  # horizontal, perpendicular to the ray
    n = np.linalg.norm(side, axis=1, keepdims=True)
    side = np.where(n > 1e-9, side / np.maximum(n, 1e-12), np.array([1.0, 0.0, 0.0]))
    up = np.cross(side, d)
    tan = np.tan(0.5e-3 * divergence_mrad)
    rim = np.stack([d + tan * side, d - tan * side, d + tan * up, d - tan * up], axis=1)
    return rim / np.linalg.norm(rim, axis=2, keepdims=True)


def edge_beams(range_m: np.ndarray, grid_shape: tuple[int, int] | None) -> np.ndarray:
    """Beams that hit something and whose scan neighbours' ranges differ by more than MIXED_EDGE_REL.

    grid_shape: (rings, azimuths) when the rays are a ring-major grid of a spinning pattern; None:
    no neighbour structure, every beam with a hit is a candidate.
    """
    hit = np.isfinite(range_m)
    if grid_shape is None:
        return hit
    r = range_m.reshape(grid_shape)
    cand = np.zeros(grid_shape, bool)
    for axis in (0, 1):
        a = np.moveaxis(r, axis, 0)
        lo = np.minimum(a[1:], a[:-1])
        hi = np.maximum(a[1:], a[:-1])
        with np.errstate(invalid="ignore"):
            jump = (hi > lo * (1.0 + MIXED_EDGE_REL)) & np.isfinite(lo)
        c = np.moveaxis(cand, axis, 0)
        c[1:] |= jump
        c[:-1] |= jump
    return cand.ravel() & hit


def mixed_ranges(centre_m: np.ndarray, rim_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each beam straddles an edge (its five ranges differ by more than MIXED_EDGE_REL) and the
    mean of the ranges its rays hit. centre_m: N, rim_m: N x 4 (inf = miss)."""
    allr = np.concatenate([centre_m[:, None], rim_m], axis=1)
    hit = np.isfinite(allr)
    lo = np.where(hit, allr, np.inf).min(1)
    hi = np.where(hit, allr, -np.inf).max(1)
    straddle = hit[:, 0] & (hi > lo * (1.0 + MIXED_EDGE_REL))
    mean = np.where(hit, allr, 0.0).sum(1) / np.maximum(hit.sum(1), 1)
    return straddle, mean


# ----------------------------------------------------------------------------------------------------
# Specs: what --sensor (and --lidar's key=value parts and pattern files) are made of


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
        d = read_json(os.path.abspath(spec), st.st_mtime_ns, st.st_size)
        return get_sensor(d["sensor"] if "sensor" in d else d)
    name, _, body = spec.partition(":")
    if "=" in name:  # overrides of the ideal sensor
        name, body = "ideal", spec
    if name not in SENSOR_PRESETS:
        raise ValueError(f"unknown sensor {name!r}: use {sorted(SENSOR_PRESETS)}, PRESET:key=value,... or a .json file")
    base = SENSOR_PRESETS[name]
    keys = {f for f in base.to_dict() if f != "name"}
    kv = parse_kv(body, keys, "sensor")
    if not kv:
        return base
    try:
        over = {k: float(v) for k, v in kv.items()}
    except ValueError as exc:
        raise ValueError(f"sensor {spec!r}: values must be numbers ({exc})") from exc
    return SensorModel.from_dict({**base.to_dict(), **over, "name": spec})


def parse_kv(body: str, allowed: set[str], what: str) -> dict[str, str]:
    """'a=1,b=x' -> {"a": "1", "b": "x"}; a part without '=' or a key outside `allowed` is a ValueError
    naming `what` (the spec being read: "sensor", "livox lidar", ...)."""
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


@functools.lru_cache(maxsize=8)
def read_json(path: str, mtime_ns: int, size: int) -> dict:
    """The JSON of a sensor or pattern file, parsed once per version of the file (its mtime and size are
    part of the key): the pipeline asks for the pattern and the sensor once per sample."""
    with open(path) as f:
        return json.load(f)
