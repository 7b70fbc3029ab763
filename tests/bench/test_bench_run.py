"""bench/run.py --quick end to end for preflab alone (TRL is a benchmark-only extra that `make test` does not
install): the table has a row per method, and every figure in it is finite."""

from __future__ import annotations

import json
import math

import pytest

METHODS = ["reward", "sft", "dpo", "dpo_precomputed", "grpo", "rloo", "ppo"]


@pytest.mark.slow
def test_quick_benchmark_for_preflab_gives_a_finite_table(tmp_path, quick_bench):
    quick_bench("run.py", timeout=900)

    (md,) = tmp_path.glob("bench-quick-*.md")
    (raw,) = tmp_path.glob("bench-quick-*.json")
    report = json.loads(raw.read_text())
    assert [row["method"] for row in report["rows"]] == METHODS
    for row in report["rows"]:
        figures = row["preflab"]
        assert row["tokens_per_step"] > 0
        for key in ["seconds_per_step", "diff_seconds_per_step", "tokens_per_second", "mfu", "peak_rss_gib"]:
            assert math.isfinite(figures[key]), (row["method"], key, figures[key])
        assert figures["seconds_per_step"] > 0 and figures["peak_rss_gib"] > 0
    meta = report["meta"]
    assert meta["libs"] == ["preflab"] and math.isfinite(meta["peak_gflops"]) and meta["peak_gflops"] > 0

    lines = [x for x in md.read_text().splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["method", "tokens/step"] and len(header) == 6  # preflab's 4 columns
    assert len(lines) == 2 + len(METHODS)
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header) and "n/a" not in line and "nan" not in line
    assert "GFLOP/s" in md.read_text()
