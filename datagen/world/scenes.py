"""A synthetic world with exact depth: procedural scenes from a seed, rendered by ray casting.

Why: every other source only has the teacher's guess of depth. Here the truth is known, so the whole
chain (teacher -> depth -> mesh -> LiDAR) can be checked end to end, and the `oracle` teacher
(datagen/teachers/oracle.py: the true depth with a monocular model's errors, calibrated to Depth Anything V2)
stands in for Depth Anything in tests and offline runs.

A scene is a list of primitives (ground and terrain, sidewalks, walls and buildings, boxes, spheres,
rocks, cylinders, poles and branches), each with a procedural texture (plain, checker, stripes, value
noise) and Lambertian shading under one light with cast shadows. Textures and shadow boundaries give
image edges with no depth edge; objects of similar colour in front of each other give depth edges with
no image edge, so the two only partly agree, as in photos. Rays that hit nothing see the sky (a colour
gradient), and depth 0 marks them. `SyntheticScene.object_id` says which object each pixel sees: the
index of the primitive the ray hit, except that decals (lane markings, pictures on a wall) carry the id
of the surface they are painted on; -1 is the sky.

Families (docs/synthetic_world.md shows them):
- street: outdoor, camera 1.4-1.8 m above a road between rows of buildings, cars, poles, trees;
  depths from ~2 to 80 m (the world ends at z = 78 m, the camera is turned by at most 3 deg), sky above.
  Default camera when K is None: KITTI-like, fx = fy = 0.58 W (81 deg horizontal FOV, KITTI's 721.5 px
  over 1242), cx at the centre, cy at 46% of the height (KITTI: 172.9 of 375).
- room: indoor, a closed box room 3-8 m wide and 3-9 m deep with furniture; depths 0.5-10 m, no sky.
  Default camera: NYUv2-like (Kinect), fx = fy = 0.81 W (63 deg), principal point at the centre.
- nature: a park or a wood's edge, camera 1.5-1.9 m above rolling terrain that rises to a hill; trees
  (a third of them bare, with thin branches), bushes, rocks, maybe a fence of thin posts and rails; no
  buildings; depths ~3 to 80 m (the terrain ends at z = 75 m), sky above. Default camera: a phone's
  main camera, fx = fy = 0.7 W (71 deg), principal point at the centre.
- tabletop: a close-up of a table seen from 0.35-0.6 m above it, 30-45 deg down: boxes, books, cups,
  fruit and thin pens, a wall behind, the room around; depths ~0.2 to 4 m, no sky. Default camera:
  fx = fy = 0.75 W (67 deg), principal point at the centre.

The world is built in a frame with the camera at the origin looking along +z (x right, y down) and then
turned by a random camera rotation; `SyntheticScene.mesh` is the world in camera coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.camera import as_K, make_K, rotation_from_rotvec
from shared.scan.mesh import Mesh

FAMILIES = ("street", "room", "nature", "tabletop")
# Farthest surface of each family's world, and the depth cap of its evaluation: KITTI's 80 m outdoors, NYUv2's
# 10 m indoors (the caps of the MiDaS / Depth Anything zero-shot protocol, see datagen/teachers/oracle.py).
MAX_DEPTH_M = {"street": 80.0, "room": 10.0, "nature": 80.0, "tabletop": 10.0}


@dataclass
class SyntheticScene:
    rgb: np.ndarray        # H x W x 3 uint8
    depth_m: np.ndarray    # H x W float32, z in metres, 0 = sky
    K: np.ndarray          # 3 x 3 float64
    family: str
    seed: int
    mesh: Mesh             # the world, camera coordinates
    object_id: np.ndarray | None = None  # H x W int32: the object each pixel sees (see render_scene), -1 = sky


# Default camera per family: fx = fy = f * width, principal point (cx, cy) = ((W - 1) / 2, cy * (H - 1)).
_CAMERA = {"street": (0.58, 0.46), "room": (0.81, 0.5), "nature": (0.7, 0.5), "tabletop": (0.75, 0.5)}


def default_K(family: str, width: int, height: int) -> np.ndarray:
    if family not in _CAMERA:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    f, cy = _CAMERA[family]
    return make_K(f * width, f * width, (width - 1) / 2.0, cy * (height - 1))


# ----------------------------------------------------------------------------------------------------
# Primitives: (vertices N x 3, triangles M x 3) in the world frame (x right, y down, z forward)

PLAIN, CHECKER, STRIPES, NOISE = 0, 1, 2, 3


@dataclass
class _Material:
    kind: int
    c1: tuple[float, float, float]
    c2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale_m: float = 1.0   # texture period
    axis: int = 0          # stripes run along the first (0) or second (1) surface coordinate


@dataclass
class _Object:
    vertices: np.ndarray
    triangles: np.ndarray
    material: _Material
    carrier: int | None = None  # a decal (lane marking, picture) is part of the object it is painted on


def _box(center, size, yaw_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Box of size (sx, sy, sz) centred at center, turned by yaw about the vertical axis."""
    c = np.asarray(center, np.float64)
    h = np.asarray(size, np.float64) / 2.0
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64) * h
    a = math.radians(yaw_deg)
    R = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    v = corners @ R.T + c
    # corner index = 4 * (x > 0) + 2 * (y > 0) + (z > 0)
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    t = []
    for i0, i1, i2, i3 in faces:  # two triangles per face; face f is triangles 2f and 2f + 1
        t += [(i0, i1, i2), (i0, i2, i3)]
    return v, np.array(t, np.int32)


def _quad(p0, p1, p2, p3) -> tuple[np.ndarray, np.ndarray]:
    return np.array([p0, p1, p2, p3], np.float64), np.array([[0, 1, 2], [0, 2, 3]], np.int32)


def _sphere(center, radius: float, n_lat: int = 12, n_lon: int = 24) -> tuple[np.ndarray, np.ndarray]:
    th = np.linspace(0, math.pi, n_lat + 1)
    ph = np.linspace(0, 2 * math.pi, n_lon, endpoint=False)
    st, ct = np.sin(th)[:, None], np.cos(th)[:, None]
    v = np.stack(np.broadcast_arrays(st * np.cos(ph), -ct, st * np.sin(ph)), -1).reshape(-1, 3)
    v = v * radius + np.asarray(center, np.float64)
    idx = np.arange((n_lat + 1) * n_lon).reshape(n_lat + 1, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    t = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return v, t.astype(np.int32)


def _cylinder(base, radius: float, height: float, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinder standing on `base` (its bottom centre; up is -y), with caps."""
    b = np.asarray(base, np.float64)
    ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
    ring = np.stack([np.cos(ang) * radius, np.zeros(n), np.sin(ang) * radius], 1)
    v = np.concatenate([ring + b, ring + b - [0, height, 0], [b, b - [0, height, 0]]])
    i = np.arange(n)
    j = (i + 1) % n
    side = np.concatenate([np.stack([i, j, i + n], 1), np.stack([j, j + n, i + n], 1)])
    caps = np.concatenate([np.stack([np.full(n, 2 * n), j, i], 1), np.stack([np.full(n, 2 * n + 1), i + n, j + n], 1)])
    return v, np.concatenate([side, caps]).astype(np.int32)


def _cylinder_between(p0, p1, radius: float, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A cylinder from point p0 to point p1 (a branch, a rail, a pen lying on a table), with caps."""
    a, b = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    axis = (b - a) / np.linalg.norm(b - a)
    # any two unit vectors perpendicular to the axis span the ring
    u = np.cross(axis, [0.0, 1.0, 0.0] if abs(axis[1]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    w = np.cross(axis, u)
    ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
    ring = radius * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * w)
    v = np.concatenate([ring + a, ring + b, [a, b]])
    i = np.arange(n)
    j = (i + 1) % n
    side = np.concatenate([np.stack([i, j, i + n], 1), np.stack([j, j + n, i + n], 1)])
    caps = np.concatenate([np.stack([np.full(n, 2 * n), j, i], 1), np.stack([np.full(n, 2 * n + 1), i + n, j + n], 1)])
    return v, np.concatenate([side, caps]).astype(np.int32)


def _rock(center, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A squashed sphere with a lumpy surface: the bumps are a smooth function of direction, so the
    duplicated seam and pole vertices of the sphere move together and the surface stays closed."""
    c = np.asarray(center, np.float64)
    v, t = _sphere([0.0, 0.0, 0.0], 1.0, 10, 16)
    k, ph = rng.uniform(2.0, 4.0, 3), rng.uniform(0, 2 * math.pi, 3)
    bump = 1.0 + 0.12 * np.sin(k[0] * v[:, 0] + ph[0]) * np.cos(k[1] * v[:, 2] + ph[1]) \
        + 0.08 * np.sin(k[2] * v[:, 1] + ph[2])
    squash = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.45, 0.8), rng.uniform(0.8, 1.2)])
    return v * bump[:, None] * squash * radius + c, t


# ----------------------------------------------------------------------------------------------------
# Scene layouts

_FACADE = [(0.78, 0.72, 0.62), (0.62, 0.45, 0.38), (0.85, 0.84, 0.80), (0.55, 0.57, 0.60), (0.70, 0.62, 0.50),
           (0.45, 0.40, 0.36), (0.90, 0.88, 0.75)]
_CAR = [(0.7, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.1, 0.1, 0.1), (0.5, 0.5, 0.55), (0.8, 0.7, 0.2)]
_FURNITURE = [(0.55, 0.35, 0.2), (0.85, 0.85, 0.8), (0.3, 0.3, 0.32), (0.6, 0.15, 0.15), (0.2, 0.35, 0.5),
              (0.75, 0.65, 0.45)]

_BARK = [(0.35, 0.25, 0.15), (0.45, 0.38, 0.3), (0.28, 0.22, 0.18), (0.55, 0.5, 0.45)]
_LEAF = [(0.2, 0.45, 0.15), (0.3, 0.5, 0.2), (0.15, 0.35, 0.12), (0.45, 0.5, 0.15), (0.6, 0.4, 0.1)]
_ROCK = [(0.5, 0.5, 0.48), (0.6, 0.57, 0.52), (0.4, 0.38, 0.36), (0.55, 0.5, 0.42)]
_GRASS = [(0.35, 0.5, 0.2), (0.4, 0.45, 0.22), (0.5, 0.5, 0.3), (0.3, 0.42, 0.18)]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _material(rng: np.random.Generator, palette, scale=(0.3, 2.0)) -> _Material:
    kind = int(rng.integers(4))
    c1 = np.asarray(_pick(rng, palette))
    c2 = np.clip(c1 * rng.uniform(0.5, 0.85) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    return _Material(kind, tuple(c1), tuple(c2), float(rng.uniform(*scale)), int(rng.integers(2)))


def _street(rng: np.random.Generator) -> tuple[list[_Object], dict]:
    zmax, xmax = 78.0, 30.0
    cam_h = rng.uniform(1.4, 1.8)             # ground at y = +cam_h
    road_half = rng.uniform(3.0, 6.0)
    walk = rng.uniform(1.5, 3.5)
    objs: list[_Object] = []

    def add(vt, mat, carrier=None):
        objs.append(_Object(vt[0], vt[1], mat, carrier))
        return len(objs) - 1

    asphalt = _Material(NOISE, (0.32, 0.32, 0.33), (0.22, 0.22, 0.23), rng.uniform(0.3, 1.0))
    road = add(_quad([-road_half, cam_h, 0.0], [-road_half, cam_h, zmax], [road_half, cam_h, zmax],
                     [road_half, cam_h, 0.0]), asphalt)
    white = _Material(PLAIN, (0.92, 0.92, 0.9))
    dash, gap = rng.uniform(2.0, 4.0), rng.uniform(3.0, 8.0)
    z = rng.uniform(0.0, gap)
    while z < zmax - dash:  # lane dashes 1 cm above the road: an image edge with no depth edge
        add(_quad([-0.07, cam_h - 0.01, z], [-0.07, cam_h - 0.01, z + dash], [0.07, cam_h - 0.01, z + dash],
                  [0.07, cam_h - 0.01, z]), white, carrier=road)
        z += dash + gap
    for side in (-1, 1):
        kerb = 0.15
        x0 = side * road_half
        x1 = side * min(road_half + walk, xmax)
        add(_box([(x0 + x1) / 2, cam_h - kerb / 2, zmax / 2], [abs(x1 - x0), kerb, zmax]),
            _Material(CHECKER, (0.62, 0.6, 0.57), (0.5, 0.49, 0.47), rng.uniform(0.3, 0.8)))
        # Ground beyond the sidewalk, under and between the buildings.
        xb0 = side * (road_half + walk)
        add(_quad([xb0, cam_h - kerb, 0.0], [xb0, cam_h - kerb, zmax], [side * xmax, cam_h - kerb, zmax],
                  [side * xmax, cam_h - kerb, 0.0]), _Material(NOISE, (0.35, 0.42, 0.25), (0.25, 0.3, 0.18), 0.7))
        # A row of buildings.
        z = rng.uniform(-5.0, 5.0)
        while z < zmax - 2.0:
            length = min(rng.uniform(6.0, 20.0), zmax - z)
            if rng.random() < 0.2:  # a gap between buildings
                z += length
                continue
            setback = rng.uniform(0.0, 2.0)
            depth = rng.uniform(6.0, 12.0)
            xin = road_half + walk + setback
            xout = min(xin + depth, xmax)
            height = rng.uniform(5.0, 25.0)
            z0 = max(z, 0.0)
            add(_box([side * (xin + xout) / 2, cam_h - kerb - height / 2, (z0 + z + length) / 2],
                     [xout - xin, height, z + length - z0]), _material(rng, _FACADE, (0.8, 3.5)))
            z += length + rng.uniform(0.0, 1.0)
        # Poles, lamps and trees on the sidewalk.
        for _ in range(int(rng.integers(2, 7))):
            x = side * (road_half + rng.uniform(0.3, walk - 0.2))
            zp = rng.uniform(4.0, 60.0)
            if rng.random() < 0.5:
                hgt = rng.uniform(3.0, 8.0)
                add(_cylinder([x, cam_h - kerb, zp], rng.uniform(0.05, 0.15), hgt, 12),
                    _Material(PLAIN, (0.4, 0.4, 0.42)))
                if rng.random() < 0.5:
                    add(_box([x, cam_h - kerb - hgt + 0.4, zp], [0.05, 0.6, 0.6]),
                        _Material(STRIPES, (0.9, 0.9, 0.9), (0.8, 0.1, 0.1), 0.2))
            else:
                hgt = rng.uniform(2.0, 4.0)
                add(_cylinder([x, cam_h - kerb, zp], rng.uniform(0.1, 0.25), hgt, 12),
                    _Material(NOISE, (0.35, 0.25, 0.15), (0.25, 0.17, 0.1), 0.2))
                add(_sphere([x, cam_h - kerb - hgt - 0.8, zp], rng.uniform(1.0, 2.0)),
                    _Material(NOISE, (0.2, 0.45, 0.15), (0.1, 0.3, 0.08), rng.uniform(0.2, 0.6)))
    # Cars on the road and parked at the sides.
    for _ in range(int(rng.integers(1, 7))):
        x = rng.uniform(-road_half + 1.0, road_half - 1.0)
        zc = rng.uniform(5.0, 60.0)
        hgt = rng.uniform(1.3, 1.8)
        add(_box([x, cam_h - hgt / 2, zc], [rng.uniform(1.6, 2.0), hgt, rng.uniform(3.5, 5.0)],
                 rng.uniform(-10, 10)), _Material(PLAIN, _pick(rng, _CAR)))
    # Odd objects: bins, bollards, balls.
    for _ in range(int(rng.integers(0, 5))):
        x = rng.uniform(-road_half - walk + 0.5, road_half + walk - 0.5)
        zo = rng.uniform(3.0, 30.0)
        r = rng.uniform(0.2, 0.6)
        if rng.random() < 0.5:
            add(_sphere([x, cam_h - r, zo], r), _material(rng, _CAR, (0.1, 0.4)))
        else:
            add(_box([x, cam_h - r, zo], [2 * r, 2 * r, 2 * r], rng.uniform(0, 90)), _material(rng, _FURNITURE))
    if rng.random() < 0.5:  # the street ends at a building across it
        zf = rng.uniform(45.0, zmax - 3.0)
        hgt = rng.uniform(8.0, 30.0)
        add(_box([0.0, cam_h - hgt / 2, zf + 1.5], [2 * xmax * 0.95, hgt, 3.0]), _material(rng, _FACADE, (0.8, 3.5)))
    rot = np.radians([rng.uniform(-2, 2), rng.uniform(-3, 3), rng.uniform(-1, 1)])  # pitch, yaw, roll
    sun = np.array([rng.uniform(-0.6, 0.6), -rng.uniform(0.4, 0.9), rng.uniform(-0.5, 0.5)])
    light = {"kind": "sun", "dir": sun / np.linalg.norm(sun), "ambient": rng.uniform(0.3, 0.45)}
    return objs, {"rotvec": rot, "light": light, "sky": True}


def _room(rng: np.random.Generator) -> tuple[list[_Object], dict]:
    width = rng.uniform(3.0, 8.0)
    depth = rng.uniform(3.0, 9.0)
    height = rng.uniform(2.4, 3.2)
    cam_h = rng.uniform(1.2, 1.7)
    x0 = rng.uniform(-width / 2 + 0.8, width / 2 - 0.8)  # camera position across the room
    zb = -rng.uniform(0.3, 1.0)                          # back wall behind the camera
    xl, xr, zf = -width / 2 - x0, width / 2 - x0, zb + depth
    floor_y, ceil_y = cam_h, cam_h - height
    objs: list[_Object] = []

    def add(vt, mat, carrier=None):
        objs.append(_Object(vt[0], vt[1], mat, carrier))
        return len(objs) - 1

    wall = _material(rng, [(0.85, 0.83, 0.78), (0.75, 0.8, 0.85), (0.9, 0.85, 0.7), (0.7, 0.75, 0.65)], (0.1, 0.5))
    # The room is one closed box (shared corners: no ray can slip out between two walls).
    v, t = _box([(xl + xr) / 2, (floor_y + ceil_y) / 2, (zb + zf) / 2], [xr - xl, height, depth])
    walls = add((v, t[[i for i in range(12) if i // 2 != 3]]), wall)  # all faces but the floor (face 3: y > 0)
    add((v, t[6:8]), _Material(_pick(rng, [CHECKER, STRIPES]), (0.6, 0.45, 0.3), (0.45, 0.32, 0.2),
                               rng.uniform(0.2, 0.6), int(rng.integers(2))))
    # Furniture against the walls and in the room, never nearer than 1 m to the camera.
    for _ in range(int(rng.integers(2, 8))):
        sx, sy, sz = rng.uniform(0.4, 2.0), rng.uniform(0.4, 2.0), rng.uniform(0.4, 1.5)
        x = rng.uniform(xl + sx / 2, xr - sx / 2)
        z = rng.uniform(max(1.0 + sz / 2, zb + sz / 2), zf - sz / 2) if zf - sz / 2 > 1.0 + sz / 2 else zf - sz / 2
        sy = min(sy, height - 0.1)
        add(_box([x, floor_y - sy / 2, z], [sx, sy, sz], rng.uniform(-15, 15)), _material(rng, _FURNITURE, (0.1, 0.5)))
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(0.1, 0.4)
        x = rng.uniform(xl + r, xr - r)
        z = rng.uniform(1.5, max(1.6, zf - r))
        if rng.random() < 0.5:
            add(_sphere([x, floor_y - r - rng.uniform(0.0, 1.0), z], r), _material(rng, _CAR, (0.05, 0.2)))
        else:
            add(_cylinder([x, floor_y, z], r, rng.uniform(0.3, 1.8), 16), _material(rng, _FURNITURE, (0.1, 0.3)))
    # Pictures on the front wall: texture edges with (almost) no depth edge.
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.9)
        x = rng.uniform(xl + w / 2, xr - w / 2)
        y = rng.uniform(ceil_y + h / 2 + 0.2, floor_y - h / 2 - 0.8)
        add(_box([x, y, zf - 0.02], [w, h, 0.03]), _Material(NOISE, tuple(rng.uniform(0.1, 0.9, 3)),
                                                              tuple(rng.uniform(0.1, 0.9, 3)), rng.uniform(0.05, 0.2)),
            carrier=walls)
    rot = np.radians([rng.uniform(-5, 5), rng.uniform(-8, 8), rng.uniform(-2, 2)])
    lamp = np.array([rng.uniform(xl + 0.3, xr - 0.3), ceil_y + 0.05, rng.uniform(zb + 0.3, zf - 0.3)])
    light = {"kind": "point", "pos": lamp, "ambient": rng.uniform(0.3, 0.45)}
    return objs, {"rotvec": rot, "light": light, "sky": False}


def _nature(rng: np.random.Generator) -> tuple[list[_Object], dict]:
    """A park or the edge of a wood: rolling terrain rising to a hill, trees (some bare, with thin
    branches), bushes, rocks and maybe a fence of thin posts and rails; no buildings, sky above."""
    zmax, xmax = 75.0, 70.0
    cam_h = rng.uniform(1.5, 1.9)
    waves = [(rng.uniform(0.2, 1.2), rng.uniform(0, 2 * math.pi), 2 * math.pi / rng.uniform(15.0, 60.0),
              rng.uniform(0, 2 * math.pi)) for _ in range(3)]  # amplitude, direction, wavenumber, phase
    hill, z_hill = rng.uniform(2.0, 12.0), rng.uniform(30.0, 60.0)

    def ground(x, z):
        """Height of the terrain above the camera's foot point (flat under the camera, rolling beyond)."""
        x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
        h = sum(a * np.sin(k * (x * math.cos(d) + z * math.sin(d)) + p) for a, d, k, p in waves)
        return h * np.clip(z / 15.0, 0.0, 1.0) + hill * np.clip((z - z_hill) / (zmax - z_hill), 0.0, 1.0) ** 2

    def on_ground(x, z, lift=0.0):
        return [x, cam_h - float(ground(x, z)) - lift, z]

    objs: list[_Object] = []

    def add(vt, mat, carrier=None):
        objs.append(_Object(vt[0], vt[1], mat, carrier))
        return len(objs) - 1

    # The terrain: a height field on a 2.5 m x 1.9 m grid (flat facets: their shading is an image edge
    # with no depth edge).
    xs, zs = np.linspace(-xmax, xmax, 57), np.linspace(0.0, zmax, 41)
    X, Z = np.meshgrid(xs, zs)
    v = np.stack([X, cam_h - ground(X, Z), Z], -1).reshape(-1, 3)
    idx = np.arange(X.size).reshape(X.shape)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    t = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    add((v, t.astype(np.int32)), _Material(NOISE, _pick(rng, _GRASS), tuple(np.asarray(_pick(rng, _GRASS)) * 0.7),
                                           rng.uniform(0.5, 2.0)))
    for _ in range(int(rng.integers(6, 24))):  # trees, more of them near
        x, z = rng.uniform(-30.0, 30.0), 4.0 + 56.0 * rng.uniform(0.0, 1.0) ** 1.5
        base = np.array(on_ground(x, z))
        hgt, r = rng.uniform(2.5, 7.0), rng.uniform(0.08, 0.3)
        bark = _material(rng, _BARK, (0.1, 0.4))
        add(_cylinder(base, r, hgt, 10), bark)
        if rng.random() < 0.35:  # a bare tree: thin branches
            for _ in range(int(rng.integers(3, 7))):
                p0 = base - [0.0, rng.uniform(0.4, 0.95) * hgt, 0.0]
                ang, up = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.2)
                direction = np.array([math.cos(ang), -up, math.sin(ang)])
                p1 = p0 + rng.uniform(0.8, 2.5) * direction / np.linalg.norm(direction)
                add(_cylinder_between(p0, p1, r * rng.uniform(0.2, 0.4), 6), bark)
        else:
            leaves = _material(rng, _LEAF, (0.2, 0.6))
            for _ in range(int(rng.integers(1, 4))):
                rc = rng.uniform(1.0, 2.5)
                add(_sphere(base - [rng.uniform(-0.8, 0.8), hgt + 0.5 * rc, rng.uniform(-0.8, 0.8)], rc), leaves)
    for _ in range(int(rng.integers(2, 10))):  # bushes, half in the ground
        x, z = rng.uniform(-20.0, 20.0), rng.uniform(3.5, 35.0)
        rb = rng.uniform(0.3, 1.0)
        add(_sphere(on_ground(x, z, 0.4 * rb), rb), _material(rng, _LEAF, (0.1, 0.4)))
    for _ in range(int(rng.integers(1, 8))):  # rocks
        x, z = rng.uniform(-20.0, 20.0), rng.uniform(3.5, 40.0)
        rr = rng.uniform(0.2, 1.2)
        add(_rock(on_ground(x, z, 0.2 * rr), rr, rng), _material(rng, _ROCK, (0.1, 0.5)))
    if rng.random() < 0.5:  # a fence: thin posts and rails, across the view
        zf, x0 = rng.uniform(5.0, 25.0), rng.uniform(-20.0, 0.0)
        xe = x0 + rng.uniform(6.0, 25.0)
        post_r, post_h, step = rng.uniform(0.03, 0.06), rng.uniform(1.0, 1.3), rng.uniform(1.5, 2.5)
        wood = _material(rng, _BARK, (0.1, 0.3))
        tops = []
        for x in np.arange(x0, xe, step):
            z = zf + 0.1 * (x - x0)
            base = on_ground(x, z)
            add(_cylinder(base, post_r, post_h, 8), wood)
            tops.append(np.array(base))
        for q0, q1 in zip(tops[:-1], tops[1:], strict=False):
            for height in (0.45 * post_h, 0.9 * post_h):
                add(_cylinder_between(q0 - [0, height, 0], q1 - [0, height, 0], 0.6 * post_r, 6), wood)
    rot = np.radians([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-1, 1)])
    sun = np.array([rng.uniform(-0.6, 0.6), -rng.uniform(0.3, 0.9), rng.uniform(-0.5, 0.5)])
    light = {"kind": "sun", "dir": sun / np.linalg.norm(sun), "ambient": rng.uniform(0.3, 0.45)}
    return objs, {"rotvec": rot, "light": light, "sky": True}


def _tabletop(rng: np.random.Generator) -> tuple[list[_Object], dict]:
    """A close-up of a table: cups, books, fruit and a pen 0.2-2 m away, looked at from above (30-45 deg
    down), a wall behind and the room around it; no sky."""
    drop = rng.uniform(0.35, 0.6)              # the table top is this far below the camera (at y = drop)
    floor_y = drop + rng.uniform(0.7, 0.8)
    ceil_y = floor_y - rng.uniform(2.4, 2.8)
    tw, td = rng.uniform(1.0, 2.0), rng.uniform(0.8, 1.4)
    tx, tz0 = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.1)  # the camera stands at the table's near edge
    wall_z = tz0 + td + rng.uniform(0.05, 1.5)
    xl, xr, zb = tx - tw / 2 - rng.uniform(0.5, 2.0), tx + tw / 2 + rng.uniform(0.5, 2.0), -1.5
    objs: list[_Object] = []

    def add(vt, mat, carrier=None):
        objs.append(_Object(vt[0], vt[1], mat, carrier))
        return len(objs) - 1

    wall = _material(rng, [(0.85, 0.83, 0.78), (0.75, 0.8, 0.85), (0.9, 0.85, 0.7), (0.7, 0.75, 0.65)], (0.1, 0.5))
    v, t = _box([(xl + xr) / 2, (floor_y + ceil_y) / 2, (zb + wall_z) / 2], [xr - xl, floor_y - ceil_y, wall_z - zb])
    add((v, t[[i for i in range(12) if i // 2 != 3]]), wall)  # a closed room, as in _room
    add((v, t[6:8]), _Material(CHECKER, (0.5, 0.5, 0.5), (0.4, 0.4, 0.4), rng.uniform(0.2, 0.5)))
    wood = _Material(_pick(rng, [PLAIN, STRIPES, NOISE]), _pick(rng, _FURNITURE), (0.45, 0.3, 0.18),
                     rng.uniform(0.03, 0.15), int(rng.integers(2)))
    add(_box([tx, drop + 0.02, tz0 + td / 2], [tw, 0.04, td]), wood)
    for sx in (-1, 1):  # legs
        for sz in (0, 1):
            add(_box([tx + sx * (tw / 2 - 0.05), (drop + 0.04 + floor_y) / 2, tz0 + 0.05 + sz * (td - 0.1)],
                     [0.05, floor_y - drop - 0.04, 0.05]), wood)
    pitch = rng.uniform(30, 45)
    zc = drop / math.tan(math.radians(pitch))  # where the optical axis meets the table
    tall = drop - 0.2  # nothing on the table comes nearer than 0.2 m below the camera
    for _ in range(int(rng.integers(4, 12))):  # objects around the middle of the view
        kind = rng.random()
        s = rng.uniform(0.03, 0.12)  # footprint half-size
        x = np.clip(rng.uniform(-0.7, 0.7) * zc, tx - tw / 2 + s, tx + tw / 2 - s)
        z = np.clip(zc + rng.uniform(-0.5, 0.7) * zc, max(tz0, 0.25) + s, tz0 + td - s)
        if kind < 0.35:  # a box or a book
            hgt = rng.uniform(0.02, min(0.2, tall))
            add(_box([x, drop - hgt / 2, z], [2 * s, hgt, rng.uniform(0.6, 1.4) * s * 2], rng.uniform(-40, 40)),
                _material(rng, _FURNITURE + _CAR, (0.02, 0.1)))
        elif kind < 0.65:  # a cup, a can, a bottle
            r = min(s, rng.uniform(0.025, 0.06))
            add(_cylinder([x, drop, z], r, rng.uniform(0.06, min(0.3, tall)), 16), _material(rng, _CAR, (0.01, 0.05)))
        elif kind < 0.85:  # fruit, a ball
            r = min(s, rng.uniform(0.03, 0.08))
            add(_sphere([x, drop - r, z], r, 10, 20), _material(rng, _CAR + _LEAF, (0.01, 0.05)))
        else:  # a pen or a pencil lying on the table: a thin structure
            ang, half = rng.uniform(0, math.pi), rng.uniform(0.06, 0.1)
            r = rng.uniform(0.004, 0.008)
            d = half * np.array([math.cos(ang), 0.0, math.sin(ang)])
            add(_cylinder_between(np.array([x, drop - r, z]) - d, np.array([x, drop - r, z]) + d, r, 6),
                _Material(PLAIN, _pick(rng, _CAR)))
    rot = np.radians([pitch, rng.uniform(-10, 10), rng.uniform(-3, 3)])
    lamp = np.array([rng.uniform(xl + 0.3, xr - 0.3), ceil_y + 0.05, rng.uniform(0.0, wall_z - 0.3)])
    light = {"kind": "point", "pos": lamp, "ambient": rng.uniform(0.3, 0.45)}
    return objs, {"rotvec": rot, "light": light, "sky": False}


_LAYOUTS = {"street": _street, "room": _room, "nature": _nature, "tabletop": _tabletop}


# ----------------------------------------------------------------------------------------------------
# Textures and shading


def _hash2(i: np.ndarray, j: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) per integer lattice point (integer hashing)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (salt.astype(np.int64) * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float64) / 65536.0


def _value_noise(a: np.ndarray, b: np.ndarray, salt: np.ndarray) -> np.ndarray:
    ia, ib = np.floor(a), np.floor(b)
    fa, fb = a - ia, b - ib
    fa, fb = fa * fa * (3 - 2 * fa), fb * fb * (3 - 2 * fb)
    v00, v10 = _hash2(ia, ib, salt), _hash2(ia + 1, ib, salt)
    v01, v11 = _hash2(ia, ib + 1, salt), _hash2(ia + 1, ib + 1, salt)
    return (v00 * (1 - fa) + v10 * fa) * (1 - fb) + (v01 * (1 - fa) + v11 * fa) * fb


def _albedo(p: np.ndarray, n: np.ndarray, obj: np.ndarray, mats: list[_Material]) -> np.ndarray:
    """Per-pixel surface colour from each object's procedural texture, in world coordinates (N x 3)."""
    kind = np.array([m.kind for m in mats])[obj]
    c1 = np.array([m.c1 for m in mats])[obj]
    c2 = np.array([m.c2 for m in mats])[obj]
    scale = np.array([m.scale_m for m in mats])[obj]
    axis = np.array([m.axis for m in mats])[obj]
    # Planar coordinates across the surface: drop the axis the normal points along most.
    dom = np.abs(n).argmax(1)
    a = np.where(dom == 0, p[:, 2], p[:, 0]) / scale
    b = np.where(dom == 1, p[:, 2], p[:, 1]) / scale
    w = np.zeros(len(p))
    chk = kind == CHECKER
    w[chk] = (np.floor(a[chk]) + np.floor(b[chk])) % 2
    st = kind == STRIPES
    w[st] = np.floor(np.where(axis[st] == 0, a[st], b[st])) % 2
    nz = kind == NOISE
    w[nz] = 0.65 * _value_noise(a[nz], b[nz], obj[nz]) + 0.35 * _value_noise(4 * a[nz], 4 * b[nz], obj[nz] + 7)
    return c1 * (1 - w[:, None]) + c2 * w[:, None]


def render_scene(seed: int, family: str = "street", width: int = 640, height: int = 480,
                 K: np.ndarray | None = None) -> SyntheticScene:
    """A deterministic scene: same (seed, family, size, K), same bytes. See the module docstring."""
    import open3d as o3d

    K = default_K(family, width, height) if K is None else as_K(K)
    rng = np.random.default_rng(seed)
    if family not in _LAYOUTS:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    objs, extra = _LAYOUTS[family](rng)
    R = rotation_from_rotvec(extra["rotvec"])  # camera from world

    scene = o3d.t.geometry.RaycastingScene(nthreads=1)
    for o in objs:
        scene.add_triangles(o3d.core.Tensor(o.vertices.astype(np.float32)), o3d.core.Tensor(o.triangles.astype(np.uint32)))
    # Rays with camera-frame z = 1, so the hit distance is the depth z itself.
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    d_world = d_cam @ R  # R^T d for row vectors
    rays = np.concatenate([np.zeros_like(d_world), d_world], 1).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(rays), nthreads=1)
    t = hit["t_hit"].numpy().astype(np.float64)
    gid = hit["geometry_ids"].numpy().astype(np.int64)
    nrm = hit["primitive_normals"].numpy().astype(np.float64)
    ok = np.isfinite(t)
    depth = np.where(ok, t, 0.0).astype(np.float32).reshape(height, width)

    rgb = np.zeros((height * width, 3))
    p = t[ok, None] * d_world[ok]
    n = nrm[ok]
    n[np.einsum("ij,ij->i", n, d_world[ok]) > 0] *= -1.0  # face the camera
    mats = [o.material for o in objs]
    albedo = _albedo(p, n, gid[ok], mats)
    light = extra["light"]
    if light["kind"] == "sun":
        to_light = np.broadcast_to(-light["dir"], p.shape)
        shadow_dir, max_t = to_light, np.inf
    else:
        to_light = light["pos"] - p
        shadow_dir, max_t = to_light, 1.0  # unnormalised: t < 1 means a blocker before the lamp
        to_light = to_light / np.linalg.norm(to_light, axis=1, keepdims=True)
    lambert = np.clip(np.einsum("ij,ij->i", n, to_light), 0.0, 1.0)
    origin = p + 1e-3 * n * np.maximum(1.0, t[ok, None] / 20.0)  # lift off the surface against self-hits
    sh = scene.cast_rays(o3d.core.Tensor(np.concatenate([origin, shadow_dir], 1).astype(np.float32)),
                         nthreads=1)["t_hit"].numpy()
    lit = ~(sh < max_t)
    amb = light["ambient"]
    rgb[ok] = albedo * (amb + (1 - amb) * lambert * lit)[:, None]
    if extra["sky"]:
        up = -d_world[~ok, 1] / np.linalg.norm(d_world[~ok], axis=1)  # sine of the ray's elevation
        s = np.clip(up, 0, 1)[:, None] ** 0.5
        rgb[~ok] = (1 - s) * np.array([0.85, 0.9, 0.95]) + s * np.array([0.35, 0.55, 0.85])
    noise = np.random.default_rng([seed, 1]).normal(0, 0.006, rgb.shape)  # a little sensor noise
    img = (np.clip(rgb + noise, 0, 1) ** (1 / 1.2) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)

    # Object ids: the geometry each ray hit, a decal counted as part of its carrier.
    carrier = np.array([i if o.carrier is None else o.carrier for i, o in enumerate(objs)], np.int32)
    object_id = np.where(ok, carrier[np.where(ok, gid, 0)], -1).astype(np.int32).reshape(height, width)

    world = Mesh.concat([Mesh(o.vertices, o.triangles) for o in objs])
    return SyntheticScene(img, depth, K, family, seed, world.transformed(R, np.zeros(3)), object_id)
