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
    assert "samples           5" in res.output and "LiDAR density" in res.output
    img = Image.open(out)
    assert img.size[0] > img.size[1] > 100  # 5 panels wide, 2 rows
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no shards" in res.output
