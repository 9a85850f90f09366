"""`trainer eval --sparsity / --sweep` on shards of the real sources: the labelled synthetic world, and the
KITTI and NYU fixture trees (tests/datagen/fixtures.py), with a tiny random network saved as a checkpoint.

The shards are written straight from each source's records with the project's ShardWriter (no Ray, no
teacher: evaluation reads neither the teacher map nor anything else the pipeline adds to a labelled sample).
It lives in tests/datagen because it builds its data with the datagen sources."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures import make_kitti, make_nyu  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from datagen.sources import get_source  # noqa: E402
from shared.scan.fit import read_pose  # noqa: E402
from shared.shard import Sample, ShardWriter  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.cli import app  # noqa: E402
from trainer.evaluate import iter_predictions, load_for_inference  # noqa: E402
from trainer.model import build_model, model_config_dict  # noqa: E402

# KITTI's calib_velo_to_cam.txt of 2011_09_26 (the real numbers): the Velodyne is turned ~0.6 deg in pitch
# and roll against the camera
VELO_TO_CAM = ("calib_time: 15-Mar-2012 11:37:16\n"
               "R: 7.533745e-03 -9.999714e-01 -6.166020e-04 1.480249e-02 7.280733e-04 -9.998902e-01 "
               "9.998621e-01 7.523790e-03 1.480755e-02\nT: -4.069766e-03 -7.631618e-02 -2.717806e-01\n")


def source_shards(out, name, root=None, **options) -> list[str]:
    """One shard of every record of a source; returns the keys."""
    src = get_source(name, root, **options)
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    with ShardWriter(out / f"{name}-000000.tar", rgb_format="png") as w:
        for item in src.items():
            r = src.load(item)
            w.write(Sample(r.key, r.rgb, r.K, sparse=r.sparse, gt=r.gt, meta={"source": r.source, **r.meta}))
            keys.append(r.key)
    return keys


def tiny_checkpoint(out, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny")
    sd = model.state_dict()
    save_checkpoint(out, 1, sd, {k: v.clone() for k, v in sd.items()}, {"model_name": "tiny", "model_config": model_config_dict(model),
                                     "stage": "pretrain"}, {})
    return out


def run_sweep(ckpt, shards, path, *sweeps, kind="kitti"):
    args = ["eval", "--ckpt", ckpt, "--shards", shards, "--kind", kind, "--json", path]
    for s in sweeps:
        args += ["--sweep", s]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = json.loads(path.read_text())
    rows = {r["protocol"]: r for r in table["rows"]}
    assert table["rows"][0]["protocol"] == "full" and path.with_suffix(".md").read_text().count("\n") == len(rows) + 2
    assert all(math.isfinite(v) for r in rows.values() for v in r["metrics"].values())
    return rows, result.output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_sweep_on_labelled_synthetic_shards(tmp_path, ckpt):
    keys = source_shards(tmp_path / "syn", "synthetic", labelled=True, gt="dense", count=1, width=320,
                        height=96)
    rows, out = run_sweep(ckpt, tmp_path / "syn", tmp_path / "sweep.json", "lines:64,32,16,8",
                          "lines-uniform:16", "points:200", "keypoints:100")
    assert list(rows) == ["full", "lines:64", "lines:32", "lines:16", "lines:8", "lines-uniform:16", "points:200",
                          "keypoints:100"]
    assert "| lines:16 |" in out
    rel = {k: r["relative_density"] for k, r in rows.items()}
    # the scan's true rings: lines:N keeps N of the 64, so about N/64 of the points
    assert rel["lines:64"] == 1.0
    assert abs(rel["lines:32"] - 0.5) < 0.04 and abs(rel["lines:16"] - 0.25) < 0.03 and abs(rel["lines:8"] - 0.125) < 0.025
    assert abs(rel["lines-uniform:16"] - 0.25) < 0.05
    assert rows["points:200"]["input_density_percent"] == pytest.approx(100 * 200 / (320 * 96))  # exactly N
    assert 0 < rows["keypoints:100"]["input_density_percent"] <= 100 * 100 / (320 * 96)
    assert all(r["seed"] == 0 and r["count"] == 1 for r in rows.values())

    # one setting: protocol and seed in the metrics JSON; the same points for two different networks
    res = CliRunner().invoke(app, [str(a) for a in ("eval", "--ckpt", ckpt, "--shards", tmp_path / "syn", "--json",
                                                    tmp_path / "one.json", "--sparsity", "points:200",
                                                    "--sparsity-seed", "3")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["sparsity"] == {"protocol": "points:200", "seed": 3}
    assert one["input_density_percent"] == pytest.approx(rows["points:200"]["input_density_percent"])
    res = CliRunner().invoke(app, [str(a) for a in ("predict", "--ckpt", ckpt, "--shards", tmp_path / "syn", "--out",
                                                    tmp_path / "pred", "--sparsity", "lines:8")],
                             catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.output)["sparsity"] == {"protocol": "lines:8", "seed": 0}
    assert (tmp_path / "pred" / f"{keys[0]}.png").is_file()
    other, _ = load_for_inference(tiny_checkpoint(tmp_path / "other", seed=1))
    model, _ = load_for_inference(ckpt)
    for spec in ("points:200", "keypoints:50"):
        a, b, c = (list(iter_predictions(m, tmp_path / "syn", sparsity=spec)) for m in (model, other, model))
        assert [p.key for p in a] == keys
        for pa, pb, pc in zip(a, b, c, strict=True):
            assert np.array_equal(pa.sparse, pb.sparse) and np.array_equal(pa.sparse, pc.sparse)
            assert np.array_equal(pa.gt, pb.gt)  # the GT is never touched
        assert not np.array_equal(a[0].depth_m, b[0].depth_m)  # two networks, one input


def test_sweep_on_the_kitti_fixture_tree(tmp_path, ckpt):
    tree = make_kitti(tmp_path / "kitti", splits=("train",), selection=0, test=0)  # 96 x 64, ~5% random pixels
    date_dir = tmp_path / "kitti" / "raw" / "2011_09_26"
    (date_dir / "calib_velo_to_cam.txt").write_text(VELO_TO_CAM)
    source_shards(tmp_path / "shards", "kitti", tree["root"], split="train")
    src = get_source("kitti", tree["root"], split="train")
    metas = [src.load(it).meta["lidar"] for it in src.items()]
    # the pose comes from the drive date's calibration where it is on disk (camera 3: moved by the baseline)
    by_date = {m["pose_from"] for m in metas}
    assert by_date == {"calibration"}
    cam2 = read_pose(date_dir / "calib_velo_to_cam.txt")
    m2 = next(m for m, it in zip(metas, src.items(), strict=True) if it.extra["camera"] == "image_02")
    np.testing.assert_allclose(m2["pose"]["R_cam_from_lidar"], cam2[:3, :3])
    np.testing.assert_allclose(m2["pose"]["t_cam_from_lidar"], cam2[:3, 3])

    rows, _ = run_sweep(ckpt, tmp_path / "shards", tmp_path / "kitti.json", "lines:64,32,16,8",
                        "lines-uniform:16", "points:50,20", "keypoints:20")
    d = {k: r["input_density_percent"] for k, r in rows.items()}
    assert d["lines:64"] == d["full"] > d["lines:32"] >= d["lines:16"] >= d["lines:8"] > 0
    # the fixture's "scan" is random pixels: the literature's equal pitch bins keep about a quarter of them
    assert abs(rows["lines-uniform:16"]["relative_density"] - 0.25) < 0.07
    assert d["points:50"] == pytest.approx(100 * 50 / (96 * 64)) and d["points:20"] == pytest.approx(100 * 20 / (96 * 64))
    assert 0 < d["keypoints:20"] <= d["points:20"]
    assert all(r["count"] == tree["splits"]["train"]["count"] for r in rows.values())


def test_sweep_on_the_nyu_fixture_tree(tmp_path, ckpt):
    tree = make_nyu(tmp_path / "nyu", splits=("val",), frames=2)  # 64 x 48, 500 points each
    source_shards(tmp_path / "shards", "nyu", tree["root"], split="val")
    rows, _ = run_sweep(ckpt, tmp_path / "shards", tmp_path / "nyu.json", "points:500,200,100,50", "keypoints:50",
                        kind="nyu")
    for n in (500, 200, 100, 50):
        assert rows[f"points:{n}"]["relative_density"] == pytest.approx(n / 500)
    assert 0 < rows["keypoints:50"]["relative_density"] <= 0.1
    assert set(rows["full"]["metrics"]) == {"rmse_m", "rel", "delta1", "delta2", "delta3"}
    # NYU has no LiDAR: lines:N says what it needs instead of inventing rings
    with pytest.raises(ValueError, match="lidar.pattern.elevations_deg"):
        list(iter_predictions(load_for_inference(ckpt)[0], tmp_path / "shards", sparsity="lines:16"))
