"""Smoke test of benchmarks/bench_train_scale.py at tiny sizes: it builds its synthetic COCO set,
runs the trainer in one process and under torchrun with 2 (one size: each run starts Python,
torch and the trainer, seconds each), and prints a table with one row per size and process count. Its timings are not checked: on a shared machine they mean nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train_scale.py"


def test_quick_run_prints_a_row_per_size_and_process_count(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--sizes", "120", "--processes", "1,2",
         "--workdir", str(tmp_path / "set"), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| train images | captions | processes | records s | vocabulary s")
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [row[:3] for row in cells] == [["120", "600", "1 x 1 thr"], ["120", "600", "2 x 1 thr"]]
    assert all(len(row) == len(cells[0]) for row in cells)

    rows = json.loads(out.read_text())["rows"]
    assert [(r["images"], r["processes"], len(r["ranks"])) for r in rows] == [(120, 1, 1), (120, 2, 2)]
    for row in rows:
        # Zipf draws over the 500 pseudo-words of --quick; those seen 5 times make the vocabulary.
        assert 100 < row["vocabulary"] <= 500 + 4
        assert row["steps_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["first_batch_s"] > 0
    # The trainer found the synthetic feature cache (it would have written entries of its own):
    # one array and one completion marker for train and for val, nothing else.
    assert len(list((tmp_path / "set" / "cache").glob("features-*"))) == 2 * 2
