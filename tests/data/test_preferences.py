"""Preference loading: every bad input fails with file, line and field; non-strict mode counts skips; hh-rlhf."""

from __future__ import annotations

import json

import pytest

from preflab.cli import main
from preflab.data import DataError, load_demonstrations, load_preferences

GOOD = json.dumps({"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."})

# (bad line, the field or token the message must name, a phrase of the message)
BAD_ROWS = {
    "malformed JSON": ('{"prompt": "a", "chosen": "x", "rejected": ', "JSON", "malformed JSON"),
    "missing field": (json.dumps({"prompt": "a", "chosen": "x"}), "'rejected'", "missing field"),
    "empty chosen": (json.dumps({"prompt": "a", "chosen": "  ", "rejected": "y"}), "'chosen'", "is empty"),
    "empty rejected": (json.dumps({"prompt": "a", "chosen": "x", "rejected": ""}), "'rejected'", "is empty"),
    "chosen == rejected": (
        json.dumps({"prompt": "a", "chosen": "x", "rejected": "x"}),
        "'chosen' and 'rejected'",
        "identical",
    ),
    "non-string chosen": (json.dumps({"prompt": "a", "chosen": 5, "rejected": "y"}), "'chosen'", "expected a string"),
    "non-string content": (
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "a"}],
                "chosen": [{"role": "assistant", "content": ["x"]}],
                "rejected": [{"role": "assistant", "content": "y"}],
            }
        ),
        "'chosen'[0].content",
        "expected a string",
    ),
    "empty assistant message": (
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "a"}],
                "chosen": [{"role": "assistant", "content": " "}],
                "rejected": [{"role": "assistant", "content": "y"}],
            }
        ),
        "'chosen'",
        "empty",
    ),
}


def write(tmp_path, lines, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_line_and_field(tmp_path, case):
    line, field, phrase = BAD_ROWS[case]
    path = write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert f"{path}:2" in message and field in message and phrase in message, message


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_preferences(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(err.value)


def test_missing_demonstration_field_names_line(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "a"})], "demos.jsonl")
    with pytest.raises(DataError, match=r"demos.jsonl:2: missing field 'completion'"):
        load_demonstrations(path)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_cli_check_exits_1_without_traceback(tmp_path, capsys, case):
    """A file whose only row is unusable is a finding (exit 1, as a linter), not a failure to read it (exit 2)."""
    line, _, phrase = BAD_ROWS[case]
    path = write(tmp_path, [line])
    assert main(["data", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "1 of 1 rows skipped (0 usable)" in err
    assert f"{path}:1" in out and phrase in out  # the report lists the row and why it was skipped


def test_cli_check_missing_file_exits_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "Traceback" not in err


def test_non_strict_counts_every_skipped_row(tmp_path):
    lines = [GOOD, BAD_ROWS["malformed JSON"][0], GOOD, "", BAD_ROWS["empty chosen"][0], GOOD]
    data = load_preferences(write(tmp_path, lines), strict=False)
    assert len(data) == 3 and data.lines_read == 5  # the blank line is not a row
    assert [src.rsplit(":", 1)[1] for src, _ in data.skipped] == ["2", "5"]
    assert "malformed JSON" in data.skipped[0][1] and "is empty" in data.skipped[1][1]
    with pytest.raises(DataError, match=":2:"):
        load_preferences(write(tmp_path, lines, "strict.jsonl"), strict=True)


def test_optional_fields(tmp_path):
    row = {"prompt": "a", "chosen": "x", "rejected": "y", "margin": 2, "tie": True, "annotator": "ann-1", "subset": "s"}
    pref = load_preferences(write(tmp_path, [json.dumps(row)])).rows[0]
    assert (pref.margin, pref.tie, pref.annotator, pref.subset) == (2.0, True, "ann-1", "s")
    with pytest.raises(DataError, match=r":1: field 'margin'"):
        load_preferences(write(tmp_path, [json.dumps({**row, "margin": "big"})], "m.jsonl"))


def test_implicit_chat_form_splits_shared_messages(tmp_path):
    user = {"role": "user", "content": "Hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Hello."}],
        "rejected": [user, {"role": "assistant", "content": "Go."}],
    }
    pref = load_preferences(write(tmp_path, [json.dumps(row)])).rows[0]
    assert pref.prompt == [user] and pref.chosen[-1]["content"] == "Hello." and pref.rejected[-1]["content"] == "Go."


def test_hh_rlhf_all_rows_load(hh_rlhf_path):
    data = load_preferences(hh_rlhf_path)
    assert len(data) == 1866 and data.lines_read == 1866 and not data.skipped
    assert all(isinstance(p.prompt, str) and p.chosen and p.rejected and p.chosen != p.rejected for p in data)
    # every hh-rlhf `chosen`/`rejected` repeats the prompt: the repeated prefix is dropped and counted, twice a row
    assert data.notes["completion repeated the prompt (prefix dropped)"] == 2 * 1866


def test_split_by_row_is_unchanged_and_by_group_keeps_each_prompt_on_one_side():
    from preflab.data import split_rows
    from preflab.data.preferences import Preference, split_key

    rows = [Preference(prompt=f"q{i // 3}", chosen=f"a{i}", rejected="no") for i in range(30)]
    by_row = split_rows(rows, 0.2, 7)
    import random

    order = list(range(30))
    random.Random(7).shuffle(order)
    assert [r.chosen for r in by_row[1]] == [f"a{i}" for i in sorted(order[:6])]  # the old row split, exactly
    train, held = split_rows(rows, 0.2, 7, by="prompt")
    assert len(held) == 6 and not {r.prompt for r in train} & {r.prompt for r in held}
    assert split_rows(rows, 0.2, 7, by="prompt") == (train, held)  # reproducible
    # the first human turn of a conversation, in text or as messages
    text = Preference(prompt="\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: more", chosen="x", rejected="y")
    chat = Preference(prompt=[{"role": "user", "content": "hi there"}], chosen="x", rejected="y")
    assert split_key(text, "first_turn") == split_key(chat, "first_turn") == "hi there"
    with pytest.raises(ValueError, match="split by"):
        split_rows(rows, 0.2, 7, by="prompts")


def test_hh_rlhf_split_by_first_turn_shares_no_opening_question(hh_rlhf_path):
    from preflab.data import load_preferences, split_rows
    from preflab.data.preferences import split_key

    rows = load_preferences(hh_rlhf_path).rows
    train, held = split_rows(rows, 0.2, 0, by="first_turn")
    firsts = {split_key(r, "first_turn") for r in held}
    assert abs(len(held) - 0.2 * len(rows)) <= 10 and not firsts & {split_key(r, "first_turn") for r in train}
    # by row, some opening questions land on both sides (the leak the option exists for)
    train, held = split_rows(rows, 0.2, 0)
    assert {split_key(r, "first_turn") for r in held} & {split_key(r, "first_turn") for r in train}
