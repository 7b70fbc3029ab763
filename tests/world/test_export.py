"""`preflab data world`: the world's corpus, demonstrations and prompts as files the stages read back."""

from __future__ import annotations

import json

from preflab.cli import main
from preflab.data import load_demonstrations
from preflab.pretrain import read_corpus


def test_export_writes_files_the_stages_read(tmp_path):
    out = tmp_path / "world"
    assert main(["data", "world", "--corpus-docs", "50", "--demos", "20", "--prompts", "10", "--out", str(out)]) == 0
    assert len(read_corpus(str(out / "corpus.txt"), 10, 0)) == 50  # documents survive the blank-line split
    demos = load_demonstrations(out / "demos.jsonl")
    assert len(demos) == 20 and not demos.skipped and all(isinstance(d.prompt, list) for d in demos)
    prompts = [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 10 and all(p[-1]["role"] == "user" for p in prompts)
    # the same seed writes the same files
    again = tmp_path / "again"
    assert main(["data", "world", "--corpus-docs", "50", "--demos", "20", "--prompts", "10", "--out", str(again)]) == 0
    for name in ("corpus.txt", "demos.jsonl", "prompts.jsonl"):
        assert (out / name).read_text() == (again / name).read_text()
