"""`datagen lidar`: fit a scan pattern to your own sensor's scans, and look at a pattern. Thin: parse, call, print."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from datagen.world.scenes import default_K, render_scene
from shared.scan.fit import fit_pattern, format_report, read_intrinsics, read_pose, read_sparse_dir
from shared.scan.lidar import simulate_sparse_depth
from shared.scan.mesh import Mesh
from shared.scan.patterns import azimuth_deg, elevation_deg, get_pattern, save_pattern
from shared.scan.spec import ScanSpec

lidar_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@lidar_app.callback()
def main() -> None:
    """Scan patterns for your own LiDAR: fit one from real scans, show one."""


def show_pattern(spec: str, out: str, *, intrinsics: str | None = None, width: int = 1216, height: int = 352,
                 scene: str = "street", mount: str | None = None, seed: int = 0) -> dict:
    """Write a two-panel figure: the pattern's rays (azimuth x elevation, LiDAR frame) and the sparse depth it
    gives in a camera of this size on a scene; return counts. (Plotting, so it lives here, not in geometry.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pat = get_pattern(spec, rng)
    K = read_intrinsics(intrinsics) if intrinsics else default_K("street", width, height)
    if scene in ("street", "room"):
        s = render_scene(seed, scene, width, height, K)
        rgb, mesh = s.rgb, s.mesh
    elif scene == "plane":
        rgb = np.full((height, width, 3), 128, np.uint8)
        mesh = Mesh(np.array([[-1e3, -1e3, 10.0], [1e3, -1e3, 10.0], [1e3, 1e3, 10.0], [-1e3, 1e3, 10.0]]),
                    np.array([[0, 1, 2], [0, 2, 3]]))
    else:
        raise ValueError(f"scene must be street, room or plane, got {scene!r}")
    sparse, info = simulate_sparse_depth(np.zeros((height, width), np.float32), K, rng,
                                         ScanSpec(lidar=spec, mount=mount or "none"), pattern=pat, surface=mesh)

    if pat.spinning:
        d, _ = pat.rays(-180.0, 180.0)
    else:
        d = pat.directions
    sub = np.random.default_rng(0).permutation(len(d))[:60000]  # a scatter of more points shows nothing more
    az, el = azimuth_deg(d[sub]), elevation_deg(d[sub])
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    a0.scatter(az, el, s=0.3, c="k", marker=".", linewidths=0)
    a0.set(xlabel="azimuth (deg, + = right)", ylabel="elevation (deg, + = up)",
           title=f"{pat.name}: {len(d)} rays" + (f", {pat.n_rings} rings" if pat.n_rings else ""))
    half = np.degrees(np.arctan2([-K[0, 2] - 0.5, width - 0.5 - K[0, 2]], K[0, 0]))
    vhalf = np.degrees(np.arctan2([K[1, 2] + 0.5, -(height - 0.5 - K[1, 2])], K[1, 1]))
    a0.add_patch(plt.Rectangle((half[0], vhalf[1]), half[1] - half[0], vhalf[0] - vhalf[1], fill=False,
                               ec="tab:red", ls="--", label="camera view (at the image centre lines)"))
    a0.legend(loc="lower right", fontsize=8)
    a0.grid(alpha=0.3)
    a1.imshow((rgb * 0.45).astype(np.uint8))
    v, u = np.nonzero(sparse)
    sc = a1.scatter(u, v, c=sparse[v, u], s=1.5, cmap="turbo_r", marker="s", linewidths=0)
    fig.colorbar(sc, ax=a1, label="depth (m)", fraction=0.025)
    a1.set(title=f"{scene}, {width} x {height}, fx {K[0, 0]:.0f}: {len(v)} points ({info['density']:.2%})",
           xlim=(-0.5, width - 0.5), ylim=(height - 0.5, -0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"name": pat.name, "rays": int(info["n_rays"]), "points": int(len(v)), "density": float(info["density"])}


@lidar_app.command()
def fit(
    sparse: Path = typer.Option(..., help="Folder of KITTI-style uint16 depth PNGs (value / 256 = metres)."),
    intrinsics: str = typer.Option(..., help="A file (JSON, text with 4/9/12 numbers, KITTI calib_cam_to_cam.txt) "
                                   "or 'fx,fy,cx,cy' or 9 numbers."),
    out: Path = typer.Option(..., help="Pattern JSON to write (use it with `datagen run --lidar OUT`)."),
    pose: Path | None = typer.Option(None, help="T_cam_from_lidar: a 4x4/3x4 in text or JSON, or KITTI's "
                                     "calib_velo_to_cam.txt. Without it the LiDAR is assumed at the camera."),
    lidar_frame: str = typer.Option("flu", help="Axes of the pose's LiDAR frame: flu (x fwd, y left, z up: "
                                    "KITTI, ROS) or rdf (x right, y down, z fwd)."),
    limit: int | None = typer.Option(None, help="Use only the first N maps."),
    max_rings: int = typer.Option(256, help="More rings than this means not a spinning sensor."),
) -> None:
    """Estimate ring elevations and azimuth step (or a direction density) from real projected scans."""
    try:
        maps = read_sparse_dir(sparse, limit)
        K = read_intrinsics(intrinsics)
        T = read_pose(pose, lidar_frame) if pose else None
        pattern, report = fit_pattern([m for _, m in maps], K, T, max_rings=max_rings, name=out.stem)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_report(report))
    save_pattern(pattern, out, extra={"fit": report})
    typer.echo(f"pattern written to {out}")


@lidar_app.command()
def show(
    pattern: str = typer.Argument(..., help="A preset (hdl64, ...), a spec (livox:t=0.1, lines:n=4, ...) or a "
                                  "pattern JSON."),
    out: Path = typer.Option(..., help="PNG to write."),
    intrinsics: str | None = typer.Option(None, help="Camera K ('fx,fy,cx,cy', 9 numbers or a file). Default: "
                                          "KITTI-like (81 deg wide)."),
    width: int = typer.Option(1216, help="Image width."),
    height: int = typer.Option(352, help="Image height."),
    scene: str = typer.Option("street", help="What the LiDAR scans: street, room (synthetic world) or plane "
                              "(a wall 10 m ahead)."),
    mount: str = typer.Option("none", help="none, kitti or random."),
    seed: int = typer.Option(0, help="Scene and scan seed."),
) -> None:
    """Plot a pattern's rays (azimuth x elevation) and its sparse depth in a camera, to compare with your scans."""
    try:
        stats = show_pattern(pattern, str(out), intrinsics=intrinsics, width=width, height=height, scene=scene,
                             mount=None if mount == "none" else mount, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{stats['name']}: {stats['rays']} rays in view, {stats['points']} points, "
               f"density {stats['density']:.2%} of {width} x {height} pixels")
    typer.echo(f"figure written to {out}")
