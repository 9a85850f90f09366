import numpy as np
from PIL import Image
from typer.testing import CliRunner

from shared.inspect import summarize
from shared.shard import ShardWriter


def test_summary_counts_density_and_ranges(tmp_path, samples):
    with ShardWriter(tmp_path / "a.tar") as w:
        for s in samples:
            w.write(s)
    summary, kept = summarize(tmp_path, keep=2)
    d = summary.as_dict()
    assert d["samples"] == len(samples) and d["skipped"] == 0 and len(kept) == 2
    expected = np.mean([100 * np.count_nonzero(s.sparse) / s.sparse.size for s in samples])
    assert abs(d["lidar_density_pct"]["mean"] - expected) < 1e-9
    lo = min(s.depth.min() for s in samples)
    assert abs(d["ranges"]["depth"]["min"] - lo) <= 1 / 256
    assert d["members"]["gt.png"] == len(samples)


def test_inspect_cli_writes_preview(tmp_path, samples):
    from datagen.cli import app

    with ShardWriter(tmp_path / "a.tar") as w:
        for s in samples:
            w.write(s)
    out = tmp_path / "sheet.png"
    res = CliRunner().invoke(app, ["inspect", str(tmp_path), "--preview", str(out), "--samples", "2"])
    assert res.exit_code == 0, res.output
    assert "samples           5" in res.output and "LiDAR density" in res.output and "teacher vs GT" in res.output
    img = Image.open(out)
    assert img.size[0] > img.size[1] > 100  # 5 panels wide, 2 rows
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no shards" in res.output


def test_teacher_vs_gt_is_scored_after_the_affine_fit(tmp_path, samples):
    """An affine teacher (any scale, any shift) scores AbsRel ~0; a teacher that has near and far the
    wrong way round does not. Unlabelled samples (no GT) are not scored."""
    from dataclasses import replace

    good = [replace(s, teacher=(7.0 / s.gt + 0.01).astype(np.float32)) for s in samples]
    wrong = [replace(s, key=s.key + "w", teacher=s.gt.copy(), meta={**s.meta, "family": "street"}) for s in samples]
    unlabelled = [replace(s, key=s.key + "u", gt=None, meta={**s.meta, "source": "other"}) for s in samples]
    with ShardWriter(tmp_path / "a.tar") as w:
        for s in good + wrong + unlabelled:
            w.write(s)
    t = summarize(tmp_path)[0].as_dict()["teacher_vs_gt"]
    assert set(t) == {"test", "street"}  # grouped by family, else source
    assert t["test"]["images"] == 5 and t["test"]["absrel"][0] < 1e-3 and t["test"]["delta1"][0] == 1.0
    assert t["street"]["absrel"][0] > 0.3 and t["street"]["delta1"][0] < 0.5
    lo, hi = t["street"]["absrel"][1:]
    assert lo <= t["street"]["absrel"][0] <= hi
