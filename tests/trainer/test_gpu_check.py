"""bench/gpu_check.py: its --cpu mode runs every part green (so the one GPU run it prepares does not trip on
rot), with a carry bundle, and its driver records a hung part, a crashed part and a failed check instead of
dying with them. (The same --cpu run in an environment holding only torch, transformers and numpy, with the
real bundle, is the rehearsal the README records; it needs PyPI and minutes, so it is not run here.)"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_gpu_bundle import probe_bundle

from trainer import ops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def report_rows(text: str) -> dict[str, tuple[str, str]]:
    """what -> (value, status) of every row of the report's part tables (cells split on unescaped |)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[2] in ("PASS", "FAIL", "ERROR", "SKIP", "-"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_cpu_mode_runs_every_part_green_and_leaves_the_gpu_results_alone(tmp_path):
    gpu_results = ROOT / "bench" / "RESULTS-gpu.md"
    before = gpu_results.read_bytes() if gpu_results.exists() else None
    report = tmp_path / "report.md"
    bundle = probe_bundle(tmp_path / "bundle")  # one distribution nobody has, one everybody has
    proc = run_script("--cpu", "--out", str(report), "--bundle", str(bundle), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = report.read_text()
    carried = next(line for line in text.splitlines() if line.startswith("| carry bundle |"))
    assert "unpacked dmd3c-probe 1.0;" in carried and "own: " in carried and "pytest" in carried
    for n in range(1, 6):
        assert f"## Part {n}:" in text
    rows = report_rows(text)
    assert not [w for w, (_, status) in rows.items() if status in ("FAIL", "ERROR")]
    # the checks that matter ran and passed (a part that silently did nothing would have no FAIL either)
    passed = {w for w, (_, status) in rows.items() if status == "PASS"}
    for what in ("bf16 vs fp32: max |diff| / max |fp32| (worst image) < 0.05",
                 "tiny 64x96 batch 2, bf16 autocast: loss and grad norm finite",
                 "full-resolution prediction is fp32 under autocast",
                 "brute on cpu: indices and offsets equal to the KD-tree's, 20 cases",
                 "torchrun --nproc_per_node 1 trainer pretrain, 2 steps",
                 "steps, device, bf16 autocast, finite loss, checkpoint",
                 "gloo process group + DDP(tiny), 2 bf16-autocast steps, all_reduce of the loss",
                 "all_gather_object (of RNG states, as checkpoints do) and barrier",
                 "datagen run --executor local: 8 images, tiny random Depth Anything",  # part 4, always local
                 f"datagen run --executor {'ray' if importlib.util.find_spec('ray') else 'local'}: 8 images, "
                 "tiny random Depth Anything",  # part 5: Ray where it is installed
                 "teacher on cpu", "shards validate", "manifest has 8 rows, no failures"):
        assert what in passed, what
    assert rows["brute on cpu: indices and offsets equal to the KD-tree's, 20 cases"][0] == "20/20 equal"
    assert rows["manifest has 8 rows, no failures"][0] == "8 rows, 0 failures"
    assert (gpu_results.read_bytes() if gpu_results.exists() else None) == before


def test_cpu_mode_refuses_to_write_the_gpu_results_file():
    proc = run_script("--cpu", "--out", str(ROOT / "bench" / "RESULTS-gpu.md"), timeout=60)
    assert proc.returncode == 2 and "never writes" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole GPU check")
def test_without_a_gpu_the_gpu_mode_exits_2_and_keeps_the_gpu_results(tmp_path):
    gpu_results = ROOT / "bench" / "RESULTS-gpu.md"
    before = gpu_results.read_bytes() if gpu_results.exists() else None
    proc = run_script(timeout=120)
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stdout
    assert (gpu_results.read_bytes() if gpu_results.exists() else None) == before
    proc = run_script("--out", str(tmp_path / "r.md"), timeout=120)  # asked for: the reason is written down
    assert proc.returncode == 2 and "sees no CUDA device" in (tmp_path / "r.md").read_text()


def test_a_part_past_its_time_limit_fails_the_run_and_the_report_is_still_written(tmp_path):
    report = tmp_path / "report.md"
    proc = run_script("--cpu", "--parts", "3", "--budget", "0.002", "--out", str(report), timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:]
    text = report.read_text()
    assert "## Part 3:" in text and report_rows(text)["part time limit"] == ("killed after 0 s", "FAIL")


def test_driver_kills_a_hung_part_and_keeps_the_rows_of_a_crashed_one(tmp_path):
    gc = load_script()
    t = time.time()
    rows, took = gc.run_part([sys.executable, "-c", "import time; time.sleep(60)"], limit=1)
    assert time.time() - t < 30 and took < 30
    assert [r["status"] for r in rows] == ["FAIL"] and rows[0]["what"] == "part time limit"

    saved = tmp_path / "rows.json"
    crash = ("import json, os, sys; rows = [{'what': 'measured', 'value': '1', 'status': 'PASS', 'note': ''}]; "
             f"open({str(saved)!r}, 'w').write(json.dumps(rows)); print('about to crash', flush=True); os.abort()")
    rows, _ = gc.run_part([sys.executable, "-c", crash, "--rows", str(saved)], limit=60)
    assert [r["status"] for r in rows] == ["PASS", "ERROR"]
    assert rows[1]["value"].startswith("exit -") and "about to crash" in rows[1]["note"]
    assert gc.failed(rows) and not gc.failed(rows[:1])
    assert json.loads(saved.read_text())[0]["what"] == "measured"


def test_every_listed_knn4_method_is_accepted_and_exact():
    """gpu_check checks the methods in KNN4_METHODS on CUDA: each must be one knn4 takes, and exact."""
    sparse = torch.zeros(1, 1, 12, 20)
    sparse[0, 0, ::3, ::4] = 5.0  # a grid: many exact ties
    ref = ops.knn4(sparse, method="kdtree")
    assert "kdtree" in ops.KNN4_METHODS
    for method in ops.KNN4_METHODS:
        idx, off = ops.knn4(sparse, method=method)
        assert torch.equal(idx, ref[0]) and torch.equal(off, ref[1]), method
