"""`preflab data check`: counts, grouped skip reasons, duplicates, contradictions, token lengths."""

from __future__ import annotations

import json

from preflab.cli import main
from preflab.data.check import CheckConfig, describe, percentiles, reason_key


def write(tmp_path, rows, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_counts_duplicates_contradictions_and_skips(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "b", "rejected": "a"},  # contradicts line 1
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # duplicates line 1
        {"prompt": "q", "chosen": "a", "rejected": "b", "tie": True},
        {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"},  # implicit
        "{not json",
        {"prompt": "q", "chosen": "", "rejected": "b"},
        {"prompt": "q", "chosen": "x", "rejected": ""},
        {"prompt": "q", "chosen": "", "rejected": "c"},
    ]
    report = describe(CheckConfig(file=str(write(tmp_path, rows)), examples=1))
    assert report["kind"] == "preferences"
    assert (report["rows_read"], report["rows_usable"], report["rows_skipped"]) == (9, 5, 4)
    assert (report["explicit"], report["implicit"]) == (4, 1)
    assert report["duplicates"] == 1 and report["contradictory"] == 1 and report["ties"] == 1
    skipped = report["skipped"]
    assert skipped["field 'chosen' is empty"] == {"count": 2, "examples": [f"{tmp_path / 'f.jsonl'}:7"]}
    assert skipped["field 'rejected' is empty"]["count"] == 1 and skipped["malformed JSON"]["count"] == 1


def test_detects_demonstrations_and_token_lengths(tmp_path, model_dir, tokenizer):
    rows = [
        {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure! Hello."}]},
        {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."},
        {"prompt": "x"},
    ]
    report = describe(CheckConfig(file=str(write(tmp_path, rows)), model=str(model_dir)))
    assert report["kind"] == "demonstrations"
    assert (report["rows_usable"], report["rows_skipped"], report["duplicates"], report["chat_prompts"]) == (3, 1, 1, 1)
    completion_lengths = sorted(
        [len(tokenizer("2 + 3 = 5.", add_special_tokens=False)["input_ids"]) + 1] * 2
        + [len(tokenizer("Sure! Hello.", add_special_tokens=False)["input_ids"]) + 1]
    )
    assert report["token_lengths"]["completion"] == percentiles(completion_lengths)
    assert report["token_lengths"]["completion"]["max"] == completion_lengths[-1]
    # a length limit counts the rows it would cut; the percentiles stay those of the untruncated rows
    limit = completion_lengths[0]
    cut = describe(CheckConfig(file=str(write(tmp_path, rows)), model=str(model_dir), max_completion_length=limit))
    assert (
        cut["truncated"] == sum(n > limit for n in completion_lengths) > 0
        and cut["token_lengths"] == report["token_lengths"]
    )


def test_percentiles_and_reason_key():
    assert percentiles(list(range(1, 101))) == {"p50": 51, "p90": 90, "p99": 99, "max": 100}
    assert reason_key("missing field 'chosen' (fields present: ['prompt'])") == "missing field 'chosen'"
    assert (
        reason_key("field 'chosen': expected a string or a list of chat messages, got int 5")
        == "field 'chosen': expected a string or a list of chat messages"
    )


def test_cli_positional_file_and_hh_rlhf(hh_rlhf_path, capsys):
    assert main(["data", "check", str(hh_rlhf_path)]) == 0
    out = capsys.readouterr().out
    assert "rows read     1866" in out and "rows usable   1866" in out and "rows skipped  0" in out
    assert "contradictory 0" in out


def test_cli_flag_form_and_bad_kind(tmp_path, capsys):
    path = write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["data", "check", "--file", str(path)]) == 0
    assert main(["data", "check", str(path), "--kind", "pairs"]) == 2
    assert "'pairs'" in capsys.readouterr().err


def test_cli_exit_status_is_a_linters(tmp_path, capsys):
    """0: every row usable; 1: some (or all) rows skipped, after the report is printed; 2: nothing could be read."""
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert main(["data", "check", str(write(tmp_path, [good, good], "good.jsonl"))]) == 0
    for name, rows in (("some.jsonl", [good, "{not json", good]), ("all.jsonl", ["{not json", {"prompt": "p"}])):
        assert main(["data", "check", str(write(tmp_path, rows, name))]) == 1, name
        captured = capsys.readouterr()
        assert "rows skipped  " in captured.out and "skipped" in captured.err
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["data", "check", str(write(tmp_path, [], "empty.jsonl"))]) == 2
