"""bench/decode.py (preflab's rollout engine beside transformers' `generate`) and bench/shared_prompt.py (the
shared-prompt forward beside the plain one) run end to end on the tiny model and report finite figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *options: str) -> str:
    command = [sys.executable, str(BENCH / script), "--quick", "--repeats", "2", "--threads", "1", *options]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_decode_bench_times_both_engines_on_equal_work(tmp_path):
    run("decode.py", "--out", str(tmp_path))  # the script asserts that both produce rows x new tokens
    (raw,) = tmp_path.glob("decode-*.json")
    rows = json.loads(raw.read_text())["rows"]
    assert [(r["rows"], r["new"]) for r in rows] == [(2, 8)]
    for engine in ("preflab", "transformers"):
        assert len(rows[0]["seconds"][engine]) == 2 and rows[0]["median"][engine] > 0
    assert math.isfinite(rows[0]["speed_ratio"])
    assert "| 2 x 8 (9) | 16 |" in raw.with_suffix(".md").read_text()


@pytest.mark.slow
def test_shared_prompt_bench_reports_every_case():
    out = run("shared_prompt.py")
    lines = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [line.split(" | ")[0] for line in lines] == [
        "| DPO policy, forward + backward",
        "| DPO reference, inference",
        "| reward model, forward + backward",
        "| online group, forward + backward",
    ]
    # pairs: 4 rows (2 pairs), 2 distinct prompts; the online group: 4 rows, 2 prompts
    assert [line.split(" | ")[1:3] for line in lines] == [["4", "2"], ["4", "2"], ["4", "2"], ["4", "2"]]
