"""A synthetic world with exact depth: procedural scenes from a seed, rendered by ray casting.

Why: every other source only has the teacher's guess of depth. Here the truth is known, so the whole
chain (teacher -> depth -> mesh -> LiDAR) can be checked end to end, and the `oracle` teacher below
stands in for Depth Anything in tests and offline runs.

A scene is a list of primitives (ground, sidewalks, walls and buildings, boxes, spheres, cylinders
and poles), each with a procedural texture (plain, checker, stripes, value noise) and Lambertian
shading under one light with cast shadows. Textures and shadow boundaries give image edges with no
depth edge; objects of similar colour in front of each other give depth edges with no image edge, so
the two only partly agree, as in photos. Rays that hit nothing see the sky (a colour gradient), and
depth 0 marks them.

Families:
- street: outdoor, camera 1.4-1.8 m above a road between rows of buildings, cars, poles, trees;
  depths from ~2 to 80 m (the world ends at z = 78 m, the camera is turned by at most 3 deg), sky above.
  Default camera when K is None: KITTI-like, fx = fy = 0.58 W (81 deg horizontal FOV, KITTI's 721.5 px
  over 1242), cx at the centre, cy at 46% of the height (KITTI: 172.9 of 375).
- room: indoor, a closed box room 3-8 m wide and 3-9 m deep with furniture; depths 0.5-10 m, no sky.
  Default camera: NYUv2-like (Kinect), fx = fy = 0.81 W (63 deg), principal point at the centre.

The world is built in a frame with the camera at the origin looking along +z (x right, y down) and then
turned by a small random camera rotation; `SyntheticScene.mesh` is the world in camera coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datagen.lidar import rotation_from_rotvec
from datagen.mesh import Mesh
from shared.camera import as_K, make_K

STREET_MAX_DEPTH_M = 80.0
ROOM_MAX_DEPTH_M = 10.0


@dataclass
class SyntheticScene:
    rgb: np.ndarray        # H x W x 3 uint8
    depth_m: np.ndarray    # H x W float32, z in metres, 0 = sky
    K: np.ndarray          # 3 x 3 float64
    family: str
    seed: int
    mesh: Mesh             # the world, camera coordinates


def default_K(family: str, width: int, height: int) -> np.ndarray:
    if family == "street":
        return make_K(0.58 * width, 0.58 * width, (width - 1) / 2.0, 0.46 * (height - 1))
    if family == "room":
        return make_K(0.81 * width, 0.81 * width, (width - 1) / 2.0, (height - 1) / 2.0)
    raise ValueError(f"unknown family {family!r}: use 'street' or 'room'")


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


# ----------------------------------------------------------------------------------------------------
# Scene layouts

_FACADE = [(0.78, 0.72, 0.62), (0.62, 0.45, 0.38), (0.85, 0.84, 0.80), (0.55, 0.57, 0.60), (0.70, 0.62, 0.50),
           (0.45, 0.40, 0.36), (0.90, 0.88, 0.75)]
_CAR = [(0.7, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.1, 0.1, 0.1), (0.5, 0.5, 0.55), (0.8, 0.7, 0.2)]
_FURNITURE = [(0.55, 0.35, 0.2), (0.85, 0.85, 0.8), (0.3, 0.3, 0.32), (0.6, 0.15, 0.15), (0.2, 0.35, 0.5),
              (0.75, 0.65, 0.45)]


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

    def add(vt, mat):
        objs.append(_Object(vt[0], vt[1], mat))

    asphalt = _Material(NOISE, (0.32, 0.32, 0.33), (0.22, 0.22, 0.23), rng.uniform(0.3, 1.0))
    add(_quad([-road_half, cam_h, 0.0], [-road_half, cam_h, zmax], [road_half, cam_h, zmax], [road_half, cam_h, 0.0]),
        asphalt)
    white = _Material(PLAIN, (0.92, 0.92, 0.9))
    dash, gap = rng.uniform(2.0, 4.0), rng.uniform(3.0, 8.0)
    z = rng.uniform(0.0, gap)
    while z < zmax - dash:  # lane dashes 1 cm above the road: an image edge with no depth edge
        add(_quad([-0.07, cam_h - 0.01, z], [-0.07, cam_h - 0.01, z + dash], [0.07, cam_h - 0.01, z + dash],
                  [0.07, cam_h - 0.01, z]), white)
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

    def add(vt, mat):
        objs.append(_Object(vt[0], vt[1], mat))

    wall = _material(rng, [(0.85, 0.83, 0.78), (0.75, 0.8, 0.85), (0.9, 0.85, 0.7), (0.7, 0.75, 0.65)], (0.1, 0.5))
    # The room is one closed box (shared corners: no ray can slip out between two walls).
    v, t = _box([(xl + xr) / 2, (floor_y + ceil_y) / 2, (zb + zf) / 2], [xr - xl, height, depth])
    add((v, t[[i for i in range(12) if i // 2 != 3]]), wall)  # all faces but the floor (face 3: y > 0)
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
                                                              tuple(rng.uniform(0.1, 0.9, 3)), rng.uniform(0.05, 0.2)))
    rot = np.radians([rng.uniform(-5, 5), rng.uniform(-8, 8), rng.uniform(-2, 2)])
    lamp = np.array([rng.uniform(xl + 0.3, xr - 0.3), ceil_y + 0.05, rng.uniform(zb + 0.3, zf - 0.3)])
    light = {"kind": "point", "pos": lamp, "ambient": rng.uniform(0.3, 0.45)}
    return objs, {"rotvec": rot, "light": light, "sky": False}


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
    objs, extra = {"street": _street, "room": _room}[family](rng)
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

    world = Mesh.concat([Mesh(o.vertices, o.triangles) for o in objs])
    return SyntheticScene(img, depth, K, family, seed, world.transformed(R, np.zeros(3)))


# ----------------------------------------------------------------------------------------------------
# The oracle teacher


def oracle_teacher(depth_m: np.ndarray, rng: np.random.Generator, *, distortion: float = 0.03,
                   blur_sigma_px: float = 1.0, scale_range: tuple[float, float] = (1.0, 100.0),
                   shift_range: tuple[float, float] = (0.025, 0.1), n_waves: int = 3) -> np.ndarray:
    """What a monocular model would say about a scene of known depth: relative disparity, never the truth.

    From the true disparity 1/depth (sky 0), normalised by its maximum:
    1. smooth multiplicative distortion 1 + distortion * f, f a sum of n_waves random plane waves of at
       most 1.5 cycles across the image, scaled to |f| <= 1 (default +-3%: monocular models bend
       large planes by a few percent);
    2. Gaussian blur of blur_sigma_px (default 1 px): the teacher's edges are soft, so pixels next to a
       depth edge get a mix of both sides, as from a DPT decoder's upsampling;
    3. an unknown affine map: scale log-uniform in scale_range, shift uniform in shift_range (relative
       to the maximum, default 2.5-10%: enough that valid pixels stay above the 2% sky threshold);
    4. sky (depth 0) exactly 0, as Depth Anything outputs for the sky.
    Draw order: scale, shift, then per wave: direction, frequency, phase, weight.
    """
    from scipy.ndimage import gaussian_filter

    depth = np.asarray(depth_m, dtype=np.float64)
    sky = ~(np.isfinite(depth) & (depth > 0))
    disp = np.where(sky, 0.0, 1.0 / np.where(sky, 1.0, depth))
    top = disp.max()
    if top > 0:
        disp = disp / top
    scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    shift = rng.uniform(*shift_range)

    h, w = disp.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros_like(disp)
    for _ in range(n_waves):
        ang = rng.uniform(0, 2 * math.pi)
        cycles = rng.uniform(0.25, 1.5)
        phase = rng.uniform(0, 2 * math.pi)
        weight = rng.uniform(0.5, 1.0)
        x = (u * math.cos(ang) / w + v * math.sin(ang) / h) * 2 * math.pi * cycles
        field += weight * np.cos(x + phase)
    peak = np.abs(field).max()
    if peak > 0:
        field /= peak
    disp = disp * (1.0 + distortion * field)
    if blur_sigma_px > 0:
        disp = gaussian_filter(disp, blur_sigma_px, mode="nearest")
    out = scale * (disp + shift)
    out[sky] = 0.0
    return out.astype(np.float32)
