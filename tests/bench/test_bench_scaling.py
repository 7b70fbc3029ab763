"""bench/scaling.py --quick end to end for preflab alone (`make test` does not install TRL), on one point of each
grid: the table has a finite row per point and both plots are PNG files."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_quick_scaling_for_preflab_gives_finite_rows_and_two_plots(tmp_path, quick_bench):
    quick_bench("scaling.py", "--points", "2x16,1x32", timeout=300)  # one on each grid: batch 2, length 32

    (raw,) = tmp_path.glob("scaling-quick-*.json")
    report = json.loads(raw.read_text())
    assert [(r["batch"], r["length"], r["method"]) for r in report["rows"]] == [(2, 16, "sft"), (1, 32, "sft")]
    for row in report["rows"]:
        assert row["tokens_per_step"] == row["batch"] * (row["length"] + 1)  # BOS + prompt + completion
        figures = row["preflab"]
        for key in ["seconds_per_step", "tokens_per_second", "mfu", "peak_rss_gib"]:
            assert math.isfinite(figures[key]) and figures[key] > 0, (row, key)
    md = raw.with_suffix(".md").read_text()
    assert md.count("\n| sft |") == 2 and "nan" not in md and "GFLOP/s" in md
    for axis in ["length", "batch"]:
        png = raw.with_name(f"{raw.stem}-{axis}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
