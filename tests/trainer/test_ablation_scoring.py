"""The scoring half of scripts/ablation.py (`make demo`, `make bench-synthetic`): nearest-neighbour
baseline, per-region errors, and the results table, on hand-made shards and prediction PNGs."""

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


def test_region_errors_by_hand(ablation):
    gt = np.array([[10.0, 0.0], [4.0, 6.0]], np.float32)
    pred = np.array([[12.0, 99.0], [0.0, 6.0]], np.float32)  # 0 counts as the 1/256 m floor
    region = np.array([[True, True], [True, False]])
    e = ablation.region_errors(pred, gt, region)  # pixels (0,0) and (1,0): errors 2 and 1/256 - 4
    errs = np.array([2.0, 1 / 256 - 4.0])
    assert e["rmse_m"] == pytest.approx(np.sqrt(np.mean(errs**2)))
    assert e["mae_m"] == pytest.approx(np.mean(np.abs(errs)))
    assert ablation.region_errors(pred, gt, np.zeros_like(region)) is None


def test_evaluate_scores_every_variant_overall_and_in_the_unlabelled_rows(ablation, tmp_path):
    h, w = 20, 24
    top = int(ablation.NO_LABEL_FRACTION * h)  # rows 0..5 never had labels
    eval_dir, preds = tmp_path / "eval", {}
    keys = []
    with ShardWriter(tmp_path / "eval.tar", rgb_format="png") as wr:
        for i in range(2):
            gt = np.full((h, w), 10.0 + i, np.float32)
            sparse = np.zeros((h, w), np.float32)
            sparse[::4, ::4] = gt[::4, ::4]  # the nearest fill is then exact
            s = Sample(key=f"scene-{i}", rgb=np.zeros((h, w, 3), np.uint8), K=make_K(20, 20, w / 2, h / 2),
                       sparse=sparse, gt=gt, meta={})
            wr.write(s)
            keys.append((s.key, gt))
    eval_dir.mkdir()
    (tmp_path / "eval.tar").rename(eval_dir / "eval-000000.tar")
    # predictions: "full" exact, the others off by 1 m in the unlabelled rows only (or 2 m everywhere)
    offsets = {"finetune_only": (2.0, 2.0), "pretrain_only": (1.0, 0.0), "pretrain_sup": (1.0, 0.0), "full": (0, 0)}
    for v, (above, below) in offsets.items():
        preds[v] = tmp_path / "pred" / v
        preds[v].mkdir(parents=True)
        for key, gt in keys:
            p = gt.copy()
            p[:top] += above
            p[top:] += below
            (preds[v] / f"{key}.png").write_bytes(encode_depth_png(p))
    res = ablation.evaluate(preds, eval_dir, tmp_path / "out", n_previews=1)
    assert res["full"]["overall"]["rmse_m"] == 0.0 and res["nearest"]["overall"]["mae_m"] == 0.0
    assert res["finetune_only"]["overall"]["mae_m"] == pytest.approx(2.0)
    assert res["pretrain_only"]["no_label"]["mae_m"] == pytest.approx(1.0)
    assert res["pretrain_only"]["overall"]["mae_m"] == pytest.approx(top / h)
    assert res["pretrain_only"]["overall"]["rmse_m"] == pytest.approx(np.sqrt(top / h))
    assert all(r["overall"]["images"] == 2 for r in res.values())
    assert len(list((tmp_path / "out" / "previews").glob("*.png"))) == 1
    table = ablation.table(res)
    assert table.count("\n") == 1 + len(ablation.VARIANTS) and "full" in table
    json.dumps(res)  # what results.json holds must be plain JSON
