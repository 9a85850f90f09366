"""The scoring half of scripts/ablation.py (`make demo`, `make bench-synthetic`): the baselines, per-region
errors, the interval over training seeds and scenes, and the results table, on hand-made shards and
prediction PNGs; and the commands it runs for several pre-training and fine-tuning seeds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.camera import make_K
from shared.depth import encode_depth_png
from shared.shard import Sample, ShardWriter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "scripts" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = mod  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("ablation", None)


def test_nearest_fill_takes_the_nearest_point(ablation):
    sparse = np.zeros((9, 12), np.float32)
    sparse[2, 3], sparse[7, 10] = 5.0, 20.0
    got = ablation.nearest_fill(sparse)
    v, u = np.mgrid[0:9, 0:12]
    d1, d2 = (v - 2) ** 2 + (u - 3) ** 2, (v - 7) ** 2 + (u - 10) ** 2
    clear = d1 != d2  # ties may go either way
    np.testing.assert_array_equal(got[clear], np.where(d1 < d2, 5.0, 20.0)[clear])
    assert not ablation.nearest_fill(np.zeros((3, 4), np.float32)).any()


def test_teacher_fit_recovers_an_affine_teacher_from_the_lidar(ablation):
    rng = np.random.default_rng(0)
    depth = rng.uniform(3.0, 60.0, (12, 16)).astype(np.float32)
    teacher = (0.2 / depth + 0.01).astype(np.float32)  # an exact disparity teacher, unknown scale and shift
    teacher[:2] = 0  # its sky: no surface there
    sparse = np.where(rng.random(depth.shape) < 0.1, depth, 0).astype(np.float32)
    sparse[:2] = 0
    got = ablation.teacher_fit(teacher, sparse)
    np.testing.assert_allclose(got[2:], depth[2:], rtol=1e-4)
    np.testing.assert_array_equal(got[:2], ablation.nearest_fill(sparse)[:2])  # the sky: nearest point
    np.testing.assert_array_equal(ablation.teacher_fit(None, sparse), ablation.nearest_fill(sparse))


def test_region_errors_by_hand(ablation):
    gt = np.array([[10.0, 0.0], [4.0, 6.0]], np.float32)
    pred = np.array([[12.0, 99.0], [0.0, 6.0]], np.float32)  # 0 counts as the 1/256 m floor
    region = np.array([[True, True], [True, False]])
    e = ablation.region_errors(pred, gt, region)  # pixels (0,0) and (1,0): errors 2 and 1/256 - 4
    errs = np.array([2.0, 1 / 256 - 4.0])
    assert e["rmse_m"] == pytest.approx(np.sqrt(np.mean(errs**2)))
    assert e["mae_m"] == pytest.approx(np.mean(np.abs(errs)))
    assert ablation.region_errors(pred, gt, np.zeros_like(region)) is None


def test_score_and_summary_every_variant_overall_and_in_the_unlabelled_rows(ablation, tmp_path):
    h, w, top = 20, 24, 6  # rows 0..5 never had labels
    eval_dir, preds = tmp_path / "eval", {}
    keys = []
    with ShardWriter(tmp_path / "eval.tar", rgb_format="png") as wr:
        for i in range(4):
            gt = np.full((h, w), 10.0 + i, np.float32)
            sparse = np.zeros((h, w), np.float32)
            sparse[::4, ::4] = gt[::4, ::4]  # the nearest fill is then exact
            s = Sample(key=f"scene-{i}", rgb=np.zeros((h, w, 3), np.uint8), K=make_K(20, 20, w / 2, h / 2),
                       sparse=sparse, gt=gt, meta={})
            wr.write(s)
            keys.append((s.key, gt))
    eval_dir.mkdir()
    (tmp_path / "eval.tar").rename(eval_dir / "eval-000000.tar")
    # predictions of two seeds: "full" exact, the others off by 1 m in the unlabelled rows only (or 2 m
    # everywhere); pretrain_sup's second seed is off by 3 m there, so its seeds differ
    offsets = {"finetune_only": [(2.0, 2.0)] * 2, "pretrain_only": [(1.0, 0.0)],
               "pretrain_sup": [(1.0, 0.0), (3.0, 0.0)], "full": [(0, 0)] * 2}
    for v, per_seed in offsets.items():
        preds[v] = []
        for seed, (above, below) in enumerate(per_seed):
            d = tmp_path / "pred" / f"{v}-{seed}"
            d.mkdir(parents=True)
            for key, gt in keys:
                p = gt.copy()
                p[:top] += above
                p[top:] += below
                (d / f"{key}.png").write_bytes(encode_depth_png(p))
            preds[v].append(d)
    errs = ablation.score(preds, eval_dir, top, tmp_path / "out", n_previews=1)
    assert errs["pretrain_sup"]["no_label"]["mae_m"].shape == (2, 4)  # seeds x scenes
    res = ablation.summarize(errs, n_boot=200)
    m = {v: r["metrics"] for v, r in res.items()}
    assert m["full"]["overall"]["rmse_m"] == 0.0 and m["nearest"]["overall"]["mae_m"] == 0.0
    assert m["teacher"]["overall"]["mae_m"] == 0.0  # no teacher map in these shards: the nearest fill
    assert m["ip_basic"]["overall"]["rmse_m"] == pytest.approx(0.0, abs=1e-4)  # a constant scene: exact
    assert m["finetune_only"]["overall"]["mae_m"] == pytest.approx(2.0)
    assert m["pretrain_only"]["no_label"]["mae_m"] == pytest.approx(1.0)
    assert m["pretrain_only"]["overall"]["mae_m"] == pytest.approx(top / h)
    assert m["pretrain_only"]["overall"]["rmse_m"] == pytest.approx(np.sqrt(top / h))
    assert m["pretrain_sup"]["no_label"]["mae_m"] == pytest.approx(2.0)  # the mean of its two seeds
    assert res["pretrain_sup"]["per_seed"]["no_label"]["mae_m"] == pytest.approx([1.0, 3.0])
    sup = res["pretrain_sup"]["vs_full"]["no_label"]["mae_m"]  # seed s against the full method's seed s
    assert sup["per_seed"] == pytest.approx([1.0, 3.0]) and sup["seeds_agree"] and sup["significant"]
    assert sup["ci95"][0] == pytest.approx(1.0) and sup["ci95"][1] == pytest.approx(3.0)  # the seeds' spread
    assert sup["ci95_scenes"] == pytest.approx([2.0, 2.0])  # scenes alone: every scene is off by the same
    # one pre-training run against the full method's two seeds: compared with each of them
    assert res["pretrain_only"]["vs_full"]["no_label"]["mae_m"]["per_seed"] == pytest.approx([1.0, 1.0])
    assert all(r["metrics"]["overall"]["images"] == 4 for r in res.values())
    # every scene is off by the same amount: the interval is the point, and it excludes 0
    d = res["finetune_only"]["vs_full"]["overall"]["mae_m"]
    assert d["mean"] == pytest.approx(2.0) and d["ci95"] == pytest.approx([2.0, 2.0]) and d["significant"]
    assert d["ci_excludes_0"] and d["seeds_agree"] and d["per_seed"] == pytest.approx([2.0, 2.0])
    assert not res["nearest"]["vs_full"]["overall"]["mae_m"]["significant"]  # exact too: difference 0
    assert "vs_full" not in res["full"] or not res["full"]["vs_full"]
    assert len(list((tmp_path / "out" / "previews").glob("*.png"))) == 1
    table = ablation.table(res)
    assert table.count("\n") == 1 + len(ablation.VARIANTS) and "full" in table and "*" in table
    json.dumps(res)  # what results.json holds must be plain JSON


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_scenes(ablation):
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 1.0, 20), rng.normal(0.3, 1.0, 2000)
    lo_s, hi_s = ablation.bootstrap_ci(small, 2000)
    lo_l, hi_l = ablation.bootstrap_ci(large, 2000)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < 0.25 * (hi_s - lo_s)  # ~ 1 / sqrt(100)
    assert ablation.bootstrap_ci(small, 500, seed=1) == ablation.bootstrap_ci(small, 500, seed=1)  # seeded


def test_hierarchical_interval_with_identical_seeds_is_the_scene_interval(ablation):
    rng = np.random.default_rng(1)
    per_scene = rng.normal(0.4, 1.0, 50)
    scenes_only = ablation.bootstrap_ci(per_scene, 1000, seed=3)
    assert ablation.hierarchical_bootstrap_ci(per_scene[None], 1000, seed=3) == scenes_only  # one seed: the same
    lo, hi = ablation.hierarchical_bootstrap_ci(np.tile(per_scene, (3, 1)), 1000, seed=3)
    assert (lo, hi) == pytest.approx(scenes_only, abs=1e-12)  # three seeds that do not differ: the same


def test_hierarchical_interval_widens_with_seed_spread_and_excludes_0_when_it_must(ablation):
    rng = np.random.default_rng(2)
    scenes = rng.normal(0.0, 0.05, 40)
    consistent = 1.0 + scenes + rng.normal(0.0, 0.05, (3, 1))  # every seed about +1 m: clearly worse
    lo, hi = ablation.hierarchical_bootstrap_ci(consistent, 2000)
    assert 0 < lo < 1.0 < hi
    spread = scenes + np.array([[1.5], [0.2], [1.3]])  # the seeds disagree by more than the scenes do
    h_lo, h_hi = ablation.hierarchical_bootstrap_ci(spread, 2000)
    s_lo, s_hi = ablation.bootstrap_ci(spread.mean(0), 2000)
    assert (h_hi - h_lo) > 5 * (s_hi - s_lo)  # the scene-only interval hides the training noise


def test_seeds_that_disagree_are_not_significant_even_when_the_interval_excludes_0(ablation):
    rng = np.random.default_rng(4)
    full = rng.uniform(3, 5, (3, 60))  # 3 seeds x 60 scenes of the full method
    # seeds 0 and 1 of the variant are worse by 1 m, seed 2 is better by 0.1 m
    variant = full + np.array([[1.0], [1.0], [-0.1]]) + rng.normal(0, 0.01, (3, 60))
    r = ablation.compare(variant, full, 2000)
    assert r["per_seed"][0] > 0 and r["per_seed"][2] < 0 and not r["seeds_agree"]
    assert r["ci95_scenes"][0] > 0  # over scenes alone it would have been called
    assert not r["significant"]
    agree = ablation.compare(full + 0.5 + rng.normal(0, 0.01, (3, 60)), full, 2000)
    assert agree["seeds_agree"] and agree["ci_excludes_0"] and agree["significant"]
    assert agree["mean"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="pretrain-seeds"):
        ablation.compare(full[:2], full, 100)  # 2 runs cannot be matched with 3


def test_every_training_run_is_validated_and_seeded(ablation, tmp_path, monkeypatch):
    """The commands for 2 pre-training and 2 fine-tuning seeds: fine-tuning seed s starts from pre-training
    seed s, every run validates on the validation set with the rows above every label, threads pass on."""
    calls = []
    monkeypatch.setattr(ablation, "run", lambda cmd, log, **kw: calls.append(cmd) or 1.0)
    p = ablation.Preset(**{**ablation.asdict(ablation.PRESETS["demo"]), "seeds": 2, "pretrain_seeds": 2})
    data = {k: tmp_path / k for k in ("pretrain", "finetune", "eval", "val")}
    stage_s = {}
    runs = ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, stage_s, threads=1)
    args = [dict(zip(c[2::1], c[3::1], strict=False)) for c in calls]
    assert [c[1] for c in calls] == ["pretrain"] * 2 + ["finetune"] * 6
    assert [a["--seed"] for a in args] == ["0", "1"] + ["0"] * 3 + ["1"] * 3
    assert all(a["--val-shards"] == str(tmp_path / "val") and a["--val-every"] == str(p.val_every)
               and a["--val-top-rows"] == "38" and a["--threads"] == "1" for a in args)
    inits = [a.get("--init") for a in args[2:]]
    pre = [str(r) for r in runs["pretrain_only"]]
    assert inits == [None, pre[0], pre[0], None, pre[1], pre[1]]
    assert [r.name for r in runs["full"]] == ["full-seed0", "full-seed1"] and len(stage_s) == 8
    p.pretrain_seeds = 3
    with pytest.raises(SystemExit, match="pretrain-seeds"):
        ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, {})


def test_pretrained_runs_are_fine_tuned_from_and_the_teacher_weights_pass_on(ablation, tmp_path, monkeypatch):
    """--pretrained: no pre-training command, fine-tuning starts from the given runs, which are the zero-shot
    variant's; the preset's lambda_ssi / lambda_reg reach the full method and fine-tuning only, not L_sup only."""
    calls = []
    monkeypatch.setattr(ablation, "run", lambda cmd, log, **kw: calls.append(cmd) or 1.0)
    p = ablation.Preset(**{**ablation.asdict(ablation.PRESETS["demo"]), "seeds": 2, "pretrain_seeds": 1,
                           "lambda_ssi": 0.1, "lambda_reg": 0.05})
    data = {k: tmp_path / k for k in ("finetune", "eval", "val")}
    given = [tmp_path / "earlier" / "runs" / "pretrain"]
    runs = ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, {}, threads=1, pretrained=given)
    assert [c[1] for c in calls] == ["finetune"] * 6 and runs["pretrain_only"] == given
    args = {c[c.index("--out") + 1].rsplit("/", 1)[-1]: dict(zip(c[2::1], c[3::1], strict=False)) for c in calls}
    assert args["full-seed1"]["--init"] == str(given[0]) and "--init" not in args["finetune_only-seed0"]
    for name in ("full-seed0", "finetune_only-seed1"):
        assert (args[name]["--lambda-ssi"], args[name]["--lambda-reg"]) == ("0.1", "0.05")
    assert (args["pretrain_sup-seed0"]["--lambda-ssi"], args["pretrain_sup-seed0"]["--lambda-reg"]) == ("0", "0")
    with pytest.raises(SystemExit, match="--pretrained names 2"):
        ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, {}, pretrained=given * 2)


def test_rounding_spread_compares_runs_seed_by_seed(ablation):
    def results(full_rmse):
        per_seed = {r: {m: [1.0, 1.0] for m in ablation.METRICS} for r in ablation.REGIONS}
        variants = {v: {"per_seed": per_seed} for v in ablation.LEARNED}
        variants["full"] = {"per_seed": {**per_seed, "overall": {"rmse_m": full_rmse, "mae_m": [1.0, 1.0]}}}
        return {"variants": variants}

    got = ablation.rounding_spread(results([4.0, 4.5]), results([4.001, 4.497]))
    assert got["full"]["overall"]["rmse_m"] == pytest.approx({"max_abs_diff": 0.003, "seed_spread": 0.5})
    assert got["pretrain_sup"]["no_label"]["mae_m"] == {"max_abs_diff": 0.0, "seed_spread": 0.0}
    assert "0.0030 / 0.5000" in ablation.rounding_table(got)
    with pytest.raises(ValueError, match="seed"):
        ablation.rounding_spread(results([4.0, 4.5]), results([4.0]))


def test_unlabelled_rows_and_density_from_shards(ablation, tmp_path):
    h, w = 10, 8
    with ShardWriter(tmp_path / "s" / "x-000000.tar", rgb_format="png") as wr:
        for i, first in enumerate((4, 3, 6)):
            gt = np.zeros((h, w), np.float32)
            gt[first:, ::2] = 5.0
            sparse = np.zeros((h, w), np.float32)
            sparse[5, : i + 1] = 5.0
            wr.write(Sample(key=f"k-{i}", rgb=np.zeros((h, w, 3), np.uint8), K=make_K(5, 5, 4, 5),
                            sparse=sparse, gt=gt, meta={}))
    assert ablation.unlabelled_rows(tmp_path / "s") == 3
    assert ablation.target_density(tmp_path / "s") == pytest.approx(np.mean([1, 2, 3]) / (h * w))


def test_heldout_command_is_a_datagen_argv_with_seed_limit_and_out(ablation, tmp_path):
    p = ablation.PRESETS["demo"]
    cmd = ablation.datagen_command(p, "eval", 7, tmp_path / "heldout")
    assert Path(cmd[0]).name == "datagen" and cmd[1] == "run"
    args = dict(zip(cmd[2::1], cmd[3::1], strict=False))
    assert args["--seed"] == str(ablation.SEEDS["eval"]) and args["--limit"] == "7"
    assert args["--out"] == str(tmp_path / "heldout") and "--labelled" in cmd and "rig=kitti" in cmd
    assert len(set(ablation.SEEDS.values())) == 4  # four disjoint worlds: validation never on the held-out seed
    val = ablation.datagen_command(p, "val", 5, tmp_path / "val")
    assert val[val.index("--seed") + 1] == str(ablation.SEEDS["val"]) and val[val.index("--gt") + 1] == "dense"
    assert [x for x in val if x not in (str(tmp_path / "val"), "5", str(ablation.SEEDS["val"]))] == \
        [x for x in cmd if x not in (str(tmp_path / "heldout"), "7", str(ablation.SEEDS["eval"]))]  # same rig


def test_parallelism_gives_each_run_its_share_of_the_cores(ablation, monkeypatch):
    monkeypatch.setattr(ablation.os, "cpu_count", lambda: 2)
    assert ablation.parallelism(None, None, 1) == (2, 2)  # a lone run keeps both cores
    assert ablation.parallelism(None, None, 6) == (2, 1)  # two side by side, one thread each
    assert ablation.parallelism(1, None, 6) == (1, 2)
    assert ablation.parallelism(None, 3, 6) == (2, 3)  # --threads wins
    monkeypatch.setattr(ablation.os, "cpu_count", lambda: 64)
    assert ablation.parallelism(None, None, 12) == (4, 16)
    with pytest.raises(SystemExit, match="--jobs"):
        ablation.parallelism(0, None, 2)


def test_runs_side_by_side_train_the_same_commands_with_one_thread_each(ablation, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "run", lambda cmd, log, **kw: calls.append(cmd) or 1.0)
    monkeypatch.setattr(ablation.os, "cpu_count", lambda: 2)
    p = ablation.Preset(**{**ablation.asdict(ablation.PRESETS["demo"]), "seeds": 2, "pretrain_seeds": 2})
    data = {k: tmp_path / k for k in ("pretrain", "finetune", "eval", "val")}
    stage_s = {}
    ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, stage_s, jobs=2)
    out = [c[c.index("--out") + 1] for c in calls]
    assert sorted(out) == sorted(str(tmp_path / "out" / "runs" / n) for n in stage_s) and len(out) == 8
    assert all(c[c.index("--threads") + 1] == "1" for c in calls)
    p.pretrain_seeds = 1  # the one pre-training run alone gets both cores, the fine-tuning runs one each
    calls.clear()
    ablation.train(p, data, tmp_path / "out", tmp_path / "log.txt", 38, {}, jobs=2)
    assert [c[c.index("--threads") + 1] for c in calls] == ["2"] + ["1"] * 6


def test_run_all_runs_commands_at_the_same_time(ablation, tmp_path):
    """Each command marks that it started, then waits for the other's mark: they can only both succeed if
    they run side by side (one after the other, the first would time out and end the job)."""
    wait = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "t = time.time()\nwhile not (d / sys.argv[3]).exists():\n    time.sleep(0.05)\n"
            "    if time.time() - t > 60: sys.exit('alone')\nprint('met')")
    cmds = {"a": [sys.executable, "-c", wait, str(tmp_path), "a", "b"],
            "b": [sys.executable, "-c", wait, str(tmp_path), "b", "a"]}
    log = tmp_path / "log.txt"
    times = ablation.run_all(cmds, log, jobs=2)
    assert set(times) == {"a", "b"}
    lines = log.read_text().splitlines()
    assert "[a] met" in lines and "[b] met" in lines  # each run's lines tagged with its name
    with pytest.raises(SystemExit, match="command failed"):
        ablation.run_all({"bad": [sys.executable, "-c", "import sys; sys.exit(3)"]}, log, jobs=2)
