"""Which scan: one frozen value for the choice `datagen run` and `trainer pretrain --lidar` make.

A ScanSpec holds the command-line spellings of a simulated scan (the pattern, the mount, the surface, the
camera occlusion test, the sensor and its overrides), checked once when it is made, so a bad spelling
fails before any work and every later step takes the same value: `simulate_sparse_depth(depth_m, K, rng,
spec)` turns a dense depth map into that scan. Its random parts (a 'random' pattern or mount, the azimuth
phase, the sensor's noise and dropouts) are drawn from the generator given with it, so (spec, depth, K,
seed) fixes the scan's bytes.

    ScanSpec.from_cli(lidar="hdl64", mount="random", ...)   the `datagen run` options, with their defaults
    spec.to_dict() / ScanSpec.from_dict(d)                  JSON, as recorded with the data
    spec.cli_fields()                                       the option names and values (a job's fingerprint)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from shared import sparsity
from shared.scan.patterns import get_pattern
from shared.scan.sensor import get_sensor

MOUNTS = ("random", "kitti", "none")
MESHES = ("grid", "poisson")
OCCLUSIONS = ("none", "zbuffer")


class ScanSpecError(ValueError):
    """A spelling that names no scan; the message names the option and what it accepts."""


@dataclass(frozen=True)
class ScanSpec:
    """The settings of one simulated scan, as spelled on the command line.

    lidar: a pattern (a preset such as hdl64, 'random', 'custom:...', 'livox:...', 'lines:...', a pattern
        .json) or a pixel protocol ('points:N', 'keypoints:N': N pixels of the depth map, no scan).
    mount: where the sensor sits: 'random' (a rig drawn per scan), 'kitti' or 'none' (the camera centre).
    mesh: the surface the rays hit: 'grid' (the depth map's own, exact) or 'poisson'.
    occlusion: 'none' (keep the points the camera cannot see, as real scans do) or 'zbuffer'.
    noise_std_m, dropout: when set, replace the sensor's uniform range noise and dropout.
    hidden: the background behind occluding edges as a second layer; None: on for an offset mount with
        the grid mesh.
    sensor: the sensor's effects: 'ideal', 'realistic', 'PRESET:key=value,...' or a sensor .json; None:
        the pattern file's own sensor when it names one, else 'ideal' (for any other pattern None is
        stored as 'ideal').
    """

    lidar: str = "hdl64"
    mount: str = "random"
    mesh: str = "grid"
    occlusion: str = "none"
    noise_std_m: float | None = None
    dropout: float | None = None
    hidden: bool | None = None
    sensor: str | None = None

    def __post_init__(self) -> None:
        if self.mount is None:  # older settings spelled the camera centre as None
            object.__setattr__(self, "mount", "none")
        if self.sensor is None and not _is_pattern_file(self.lidar):  # only a pattern file can name a sensor
            object.__setattr__(self, "sensor", "ideal")
        _choice("--mount", self.mount, MOUNTS)
        _choice("--mesh", self.mesh, MESHES)
        _choice("--occlusion", self.occlusion, OCCLUSIONS)
        if self.noise_std_m is not None and not self.noise_std_m >= 0:
            raise ScanSpecError(f"--lidar-noise-m must be >= 0, got {self.noise_std_m}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ScanSpecError(f"--lidar-dropout must be in [0, 1), got {self.dropout}")
        if self.hidden and self.mesh != "grid":
            raise ScanSpecError(f"--hidden-geometry applies to --mesh grid, not {self.mesh!r}")
        try:
            get_sensor(self.sensor)  # None: ideal, or the file's own (checked with the file below)
        except (ValueError, KeyError) as exc:
            raise ScanSpecError(f"--sensor {self.sensor!r}: {exc}") from exc
        if sparsity.is_pixel_protocol(self.lidar):
            return
        try:  # a throwaway generator: only whether the spelling names a pattern is asked here
            get_pattern(self.lidar, np.random.default_rng(0))
        except (ValueError, KeyError, OSError) as exc:
            raise ScanSpecError(f"--lidar {self.lidar!r}: {exc}") from exc

    @classmethod
    def from_cli(cls, lidar: str = "hdl64", mount: str | None = "random", mesh: str = "grid",
                 occlusion: str = "none", lidar_noise_m: float = 0.0, lidar_dropout: float = 0.0,
                 hidden_geometry: bool | None = None, sensor: str | None = None) -> ScanSpec:
        """From `datagen run`'s options, where a noise or dropout of 0 means "the sensor's own"."""
        return cls(lidar=lidar, mount=mount, mesh=mesh, occlusion=occlusion,
                   noise_std_m=float(lidar_noise_m) if lidar_noise_m else None,
                   dropout=float(lidar_dropout) if lidar_dropout else None, hidden=hidden_geometry, sensor=sensor)

    def cli_fields(self) -> dict:
        """The `datagen run` option names and values of this spec (what a job.json has always held)."""
        return {"lidar": self.lidar, "mesh": self.mesh, "occlusion": self.occlusion, "mount": self.mount,
                "lidar_noise_m": self.noise_std_m or 0.0, "lidar_dropout": self.dropout or 0.0,
                "hidden_geometry": self.hidden, "sensor": self.sensor}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScanSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ScanSpecError(f"scan spec has unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @property
    def pixel_protocol(self) -> bool:
        """points:N / keypoints:N: pixels of the depth map, no surface, mount or sensor."""
        return sparsity.is_pixel_protocol(self.lidar)


def _is_pattern_file(lidar: str) -> bool:
    return lidar.strip().lower().endswith(".json") or os.path.isfile(lidar.strip())


def _choice(option: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ScanSpecError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
