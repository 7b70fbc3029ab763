"""Property-based tests (hypothesis) of the JSONL loaders: preferences, demonstrations, prompts.

Files are built from valid rows (plain text and chat messages, with and without the optional fields) mixed with
adversarial ones: huge strings, odd unicode (RTL, combining marks, NUL, zero-width, line separators), lone
surrogates (as JSON escapes and as raw invalid bytes), nulls, a wrong type in every field, deep nesting, huge
numbers, NaN, CRLF line ends, a UTF-8 BOM, blank lines, a truncated last line, trailing garbage, binary junk.

The properties:
  1. a loader returns rows or raises `DataError` naming the file (and the line, for a row problem): never any
     other exception;
  2. non-strict (as `preflab data check` and `--skip-bad-rows` read): every valid row comes back exactly once,
     in order, at its line, equal to what was written; the skipped rows are exactly the bad lines;
  3. through the CLI the exit status is 0, 1 or 2 and nothing prints a traceback.

Bounded for `make test` (a fixed number of derandomized examples, a few seconds in all); set
PREFLAB_FUZZ_EXAMPLES=2000 for a longer, randomised run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preflab.cli import main
from preflab.data.preferences import (
    DataError,
    load_demonstrations,
    load_preferences,
    load_prompts,
    parse_demonstration,
    parse_preference,
    parse_prompt,
)

LONG = int(os.environ.get("PREFLAB_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Deterministic in CI; PREFLAB_FUZZ_EXAMPLES=N runs N random examples instead."""
    return settings(
        max_examples=LONG or examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# ---------------------------------------------------------------------------------------------- text

ODD = [
    "\u202eRTL override\u202c",
    "مرحبا بالعالم",
    "שלום",
    "e\u0301\u0301\u0301\u0308",
    "\u0000NUL\u0000",
    "zero\u200bwidth\u200d",
    "line\u2028sep\u2029para",
    "nel\x85",
    "\ufeffBOM inside",
    "tab\tand\x0bvt",
    "emoji 🙂👩‍👩‍👧",
    "\U0010ffff",
    "Human: hi\n\nAssistant:",
    '"quoted" \\ back\\slash',
    "x" * 100_000,
]
plain = st.text(min_size=1, max_size=40)
text = st.one_of(plain, st.sampled_from(ODD), st.tuples(plain, st.sampled_from(ODD)).map("".join)).filter(
    lambda t: bool(t.strip())
)


def message(role):
    return st.builds(lambda c: {"role": role, "content": c}, text)


turns = st.lists(st.one_of(message("user"), message("system"), message("assistant")), min_size=1, max_size=3)


# ------------------------------------------------------------------------------------------ valid rows


@st.composite
def preference_row(draw):
    form = draw(st.sampled_from(["explicit", "implicit", "chat", "implicit-chat"]))
    c, r = draw(text), draw(text)
    if c == r:
        r = r + " (other)"
    if form == "explicit":  # (a completion that repeats the prompt is tested in test_preferences.py)
        row = {
            "prompt": draw(text.filter(lambda p: not c.startswith(p) and not r.startswith(p))),
            "chosen": c,
            "rejected": r,
        }
    elif form == "implicit":
        row = {"chosen": c, "rejected": r}
    elif form == "chat":
        row = {
            "prompt": draw(turns),
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
    else:
        shared = draw(turns)
        row = {
            "chosen": shared + [{"role": "assistant", "content": c}],
            "rejected": shared + [{"role": "assistant", "content": r}],
        }
    for name, value in (
        ("margin", st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False))),
        ("tie", st.booleans()),
        ("annotator", st.one_of(text, st.integers(0, 10**9))),
        ("subset", text),
        ("extra", st.integers(-(2**64), 2**64)),
    ):
        if draw(st.booleans()):
            row[name] = draw(value)
    return row


@st.composite
def demonstration_row(draw):
    form = draw(st.sampled_from(["plain", "chat-prompt", "messages"]))
    if form == "plain":
        return {"prompt": draw(text), "completion": draw(text)}
    if form == "chat-prompt":
        return {"prompt": draw(turns), "completion": draw(text)}
    return {"messages": draw(turns) + [{"role": "assistant", "content": draw(text)}]}


prompt_row = st.builds(lambda p: {"prompt": p}, st.one_of(text, turns))

KINDS = {
    "preferences": (load_preferences, parse_preference, preference_row()),
    "demonstrations": (load_demonstrations, parse_demonstration, demonstration_row()),
    "prompts": (load_prompts, parse_prompt, prompt_row),
}

# ------------------------------------------------------------------------------------ adversarial rows

NOT_TEXT = [
    None,
    0,
    1.5,
    True,
    {},
    {"a": 1},
    [],
    [1, 2],
    ["x"],
    [{"role": "user"}],
    [{"content": "x"}],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": None}],
    "",
    "   ",
    "\n\t",
    "\u2028",
    [{"role": "user", "content": "x"}, "not a message"],
]
WRONG = {  # field -> values that make a row unusable whatever else it holds
    "chosen": NOT_TEXT,
    "rejected": NOT_TEXT,
    "completion": NOT_TEXT,
    "prompt": [v for v in NOT_TEXT if v is not None],  # a null prompt means "implicit" in a preference row
    "messages": NOT_TEXT
    + [
        [{"role": "user", "content": "only the prompt"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "ends with the user"}],
    ],
    "margin": ["big", True, [1], {"v": 1}, "NaN"],
    "tie": [None, 0, 1, "yes", [], {}],
    "annotator": [1.5, [], {}, ["a"]],
    "subset": [2.5, [], {"s": 1}],
}
FIELDS = {
    "preferences": ["chosen", "rejected", "prompt", "margin", "tie", "annotator", "subset"],
    "demonstrations": ["completion", "prompt", "messages"],
    "prompts": ["prompt"],
}
MARK = "@@MARK@@"  # a placeholder value, replaced in the encoded row by raw JSON
QMARK = json.dumps(MARK).encode()
LONE = '"\\ud800"', '"\\udfff tail"', '"head \\udc00"'  # lone surrogates as JSON escapes


def dumps(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


@st.composite
def bad_line(draw, kind):
    """(raw bytes of a line that is certainly not a usable row, a label). Never blank, never holds a newline."""
    valid = draw(KINDS[kind][2])
    raw = dumps(valid)
    choice = draw(
        st.sampled_from(
            [
                "truncated",
                "trailing garbage",
                "wrong type",
                "missing field",
                "lone surrogate escape",
                "lone surrogate bytes",
                "invalid utf-8",
                "deep nesting",
                "deep nesting in a field",
                "huge integer",
                "not an object",
                "raw NUL",
                "binary",
                "nan margin",
                "inf margin",
                "raw control char",
            ]
        )
    )
    if choice == "truncated":
        return raw[: draw(st.integers(1, len(raw) - 1))], choice
    if choice == "trailing garbage":
        return raw + draw(st.sampled_from([b"x", b" ,", b"}", b" {}", b"\x00", b" // comment"])), choice
    if choice == "wrong type":
        name = draw(st.sampled_from(FIELDS[kind]))
        if kind == "demonstrations" and name != "messages" and "messages" in valid:
            valid = {"prompt": "p", "completion": "c"}
        if kind == "demonstrations" and name == "messages":
            valid = {"messages": None}
        row = {**valid, name: draw(st.sampled_from(WRONG[name]))}
        return dumps(row), f"{choice}: {name}"
    if choice == "missing field":
        needed = {"preferences": ["chosen", "rejected"], "demonstrations": ["completion"], "prompts": ["prompt"]}[kind]
        if kind == "demonstrations":
            valid = {"prompt": "p", "completion": "c"}
        row = dict(valid)
        row.pop(draw(st.sampled_from(needed)))
        return dumps(row), choice
    if choice == "lone surrogate escape":
        name = {"preferences": "chosen", "demonstrations": "completion", "prompts": "prompt"}[kind]
        if kind == "demonstrations":
            valid = {"prompt": "p", "completion": "c"}
        if kind == "preferences" and isinstance(valid["chosen"], list):
            valid = {"prompt": "p", "chosen": "c", "rejected": "r"}
        row = {**valid, name: MARK}
        return dumps(row).replace(QMARK, draw(st.sampled_from(LONE)).encode(), 1), choice
    if choice == "lone surrogate bytes":  # U+D800 as UTF-8-style bytes: invalid UTF-8
        return raw.replace(b"{", b'{"x": "\xed\xa0\x80", ', 1), choice
    if choice == "invalid utf-8":
        return raw.replace(
            b"{", draw(st.sampled_from([b"{\xff", b"{\xc3", b"{\x80\x80", b"{\xf8\x88\x80\x80\x80"])), 1
        ), choice
    if choice == "deep nesting":
        depth = draw(st.sampled_from([2_000, 100_000]))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth])), choice
    if choice == "deep nesting in a field":
        name = {"preferences": "chosen", "demonstrations": "completion", "prompts": "prompt"}[kind]
        if kind == "demonstrations":
            valid = {"prompt": "p", "completion": "c"}
        depth = draw(st.sampled_from([50, 500]))
        return dumps({**valid, name: MARK}).replace(QMARK, b"[" * depth + b"]" * depth, 1), choice
    if choice == "huge integer":
        digits = draw(st.sampled_from([5_000, 50_000]))
        row = {**valid, "margin" if kind == "preferences" else "prompt": MARK}
        return dumps(row).replace(QMARK, b"9" * digits, 1), choice
    if choice == "not an object":
        return draw(st.sampled_from([b"[]", b"1", b'"a string"', b"null", b"true", b"[{}]", b"-0.5e10"])), choice
    if choice == "raw NUL":
        return raw.replace(b"{", b"{\x00", 1), choice
    if choice == "binary":
        junk = draw(st.binary(min_size=1, max_size=200)).replace(b"\n", b"").replace(b"\r", b"")
        return b"\xff" + junk, choice
    if choice in ("nan margin", "inf margin"):
        if kind != "preferences":
            return raw[:-1], "truncated"
        token = b"NaN" if choice == "nan margin" else draw(st.sampled_from([b"Infinity", b"-Infinity", b"1e400"]))
        return dumps({**valid, "margin": MARK}).replace(QMARK, token, 1), choice
    # raw control character inside a string (JSON forbids it)
    return raw.replace(b'":', b'\x01":', 1) if b'":' in raw else raw[:-1], choice


@st.composite
def jsonl_file(draw, kind):
    """(file bytes, [(line number, row)] of the valid rows, [(line number, label)] of the bad ones)."""
    entries = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("good"), KINDS[kind][2]),
                st.tuples(st.just("bad"), bad_line(kind)),
                st.tuples(st.just("blank"), st.sampled_from([b"", b"   ", b"\t", b" \t "])),
            ),
            max_size=8,
        )
    )
    bom = draw(st.booleans())
    chunks, good, bad = [], [], []
    for number, (what, value) in enumerate(entries, start=1):
        if what == "good":
            chunks.append(dumps(value))
            good.append((number, value))
        elif what == "bad":
            chunks.append(value[0])
            bad.append((number, value[1]))
        else:
            chunks.append(value)
        chunks.append(draw(st.sampled_from([b"\n", b"\r\n"])))
    if chunks and draw(st.booleans()):
        chunks.pop()  # no newline after the last line
    body = b"".join(chunks)
    return (b"\xef\xbb\xbf" if bom else b"") + body, good, bad


@contextlib.contextmanager
def file_with(data: bytes, name: str = "rows.jsonl"):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        yield path


def expected_rows(kind, good, path):
    parse = KINDS[kind][1]
    return [parse(json.loads(json.dumps(row)), f"{path}:{n}") for n, row in good]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("kind", sorted(KINDS))
@fuzz(60)
@given(data=st.data())
def test_non_strict_keeps_every_valid_row_once(kind, data):
    body, good, bad = data.draw(jsonl_file(kind), label="file")
    load = KINDS[kind][0]
    with file_with(body) as path:
        got = load(path, strict=False)
        assert got.rows == expected_rows(kind, good, path)
        if kind != "prompts":  # (prompt rows are bare prompts)
            assert [row.source for row in got.rows] == [f"{path}:{n}" for n, _ in good]
        assert [src for src, _ in got.skipped] == [f"{path}:{n}" for n, _ in bad], (bad, got.skipped)
        assert all(reason.strip() for _, reason in got.skipped)
        assert got.lines_read == len(good) + len(bad)


@pytest.mark.parametrize("kind", sorted(KINDS))
@fuzz(40)
@given(data=st.data())
def test_strict_stops_at_the_first_bad_line(kind, data):
    body, good, bad = data.draw(jsonl_file(kind), label="file")
    load = KINDS[kind][0]
    with file_with(body) as path:
        if bad:
            with pytest.raises(DataError) as err:
                load(path)
            assert str(err.value).startswith(f"{path}:{bad[0][0]}: "), (bad[0], str(err.value)[:300])
        elif not good:
            with pytest.raises(DataError, match="no usable rows"):
                load(path)
        else:
            assert load(path).rows == expected_rows(kind, good, path)


@pytest.mark.parametrize("kind", sorted(KINDS))
@fuzz(40)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("utf-8")),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "prompt",
                            "chosen",
                            "rejected",
                            "completion",
                            "messages",
                            "role",
                            "content",
                            "margin",
                            "tie",
                            "annotator",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_any_bytes_load_or_name_the_file(kind, body):
    load = KINDS[kind][0]
    with file_with(body) as path:
        for strict in (True, False):
            try:
                load(path, strict=strict)
            except DataError as err:
                assert str(err).startswith(str(path)), str(err)[:300]


@pytest.mark.parametrize("kind", ["preferences", "demonstrations"])
@fuzz(25)
@given(data=st.data())
def test_cli_data_check_exit_status_and_no_traceback(kind, data):
    body, good, bad = data.draw(jsonl_file(kind), label="file")
    with file_with(body) as path:
        code, out, err = run_cli(["data", "check", str(path), "--kind", kind])
    assert code in (0, 1, 2) and "Traceback" not in out + err
    if good:
        assert code in (0, 1) and f"rows usable   {len(good)}" in out
    elif bad:  # rows read, none usable: a finding, as a linter reports it (exit 1)
        assert code == 1 and "rows usable   0" in out and f"{path}: {len(bad)} of {len(bad)} rows skipped" in err
    else:  # nothing to read at all
        assert code == 2 and err.startswith(f"error: {path}")


# ---------------------------------------------------------------------------------- named regressions

GOOD = {
    "preferences": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "demonstrations": {"prompt": "p", "completion": "c"},
    "prompts": {"prompt": "p"},
}
ROW = b"<ROW>"  # in NAMED, stands for a valid row of the loader's kind
NAMED = {  # name -> (file bytes, what the loader must say: None = the row loads)
    "empty file": (b"", "no usable rows"),
    "only blank lines": (b"\n \r\n\t\n", "no usable rows"),
    "BOM then a row": (b"\xef\xbb\xbf" + ROW + b"\n", None),
    "CRLF line ends": (ROW + b"\r\n" + ROW + b"\r\n", None),
    "truncated last line": (ROW + b"\n" + ROW[:-1], ":2: malformed JSON"),
    "binary file": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, ":1: not UTF-8 text"),  # a PNG header
    "lone surrogate bytes": (b'{"prompt": "\xed\xa0\x80"}\n', ":1: not UTF-8 text"),
    "lone surrogate escape": (
        b'{"prompt": "a\\ud800b", "chosen": "a\\ud800b", "completion": "a\\ud800b"}\n',
        ":1: field 'prompt': not valid Unicode text",
    ),
    "deeply nested line": (b"[" * 100_000 + b"\n", ":1: malformed JSON (nested too deeply"),
    "a 5000-digit number": (b'{"prompt": ' + b"9" * 5000 + b"}\n", ":1: malformed JSON (a number too long"),
}


def named_file(name: str, kind: str) -> tuple[bytes, str | None]:
    body, expected = NAMED[name]
    row = dumps(GOOD[kind])
    body = body.replace(ROW, row)
    if body.endswith(ROW[:-1]):  # a truncated row
        body = body[: -len(ROW[:-1])] + row[:-1]
    return body, expected


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_bad_files(name):
    body, expected = named_file(name, "prompts")
    with file_with(body) as path:
        if expected is None:
            assert load_prompts(path).rows
        else:
            with pytest.raises(DataError) as err:
                load_prompts(path)
            assert str(err.value).startswith(str(path)) and expected in str(err.value), str(err.value)[:300]


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 400])
def test_non_finite_margin_is_a_bad_row(token):
    body = dumps({**GOOD["preferences"], "margin": MARK}).replace(QMARK, token, 1) + b"\n"
    with file_with(body) as path:
        with pytest.raises(DataError, match=r":1: field 'margin': expected a finite number"):
            load_preferences(path)


def test_a_bad_line_keeps_the_rest_of_the_file(tmp_path):
    """One undecodable line used to reject the whole file, even in `data check`: now it is one skipped row."""
    good = dumps(GOOD["demonstrations"])
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff"}\n' + good + b"\n")
    data = load_demonstrations(path, strict=False)
    assert len(data.rows) == 2 and [s for s, _ in data.skipped] == [f"{path}:2"]
    assert "not UTF-8 text" in data.skipped[0][1]


def test_unreadable_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_prompts(tmp_path)


STAGE_CASES = {  # stage -> (argv but the file, its module, the function there that reads the file, the kind)
    "sft": (["sft", "--model", "m", "--data"], "preflab.sft", "read_demonstrations", "demonstrations"),
    "dpo": (["dpo", "--model", "m", "--data"], "preflab.policy.dpo", "load_rows", "preferences"),
    "generate": (["generate", "--model", "m", "--prompts"], "preflab.generate", "read_prompts", "prompts"),
}


class Loaded(Exception):
    """Raised in place of training once the stage has read its data."""


@pytest.mark.parametrize("stage", sorted(STAGE_CASES))
@pytest.mark.parametrize("name", sorted(NAMED))
def test_stage_cli_reads_bad_files_without_traceback(stage, name, monkeypatch):
    """From argv to the data-loading point of a training stage: rows loaded, or `error: FILE:LINE` and exit 2."""
    import importlib

    argv, module_name, reader, kind = STAGE_CASES[stage]
    module = importlib.import_module(module_name)
    original = getattr(module, reader)

    def read_then_stop(*args, **kwargs):
        rows = original(*args, **kwargs)
        raise Loaded(len(rows))

    monkeypatch.setattr("preflab.models.load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(module, "load_model", lambda *a, **k: (None, None), raising=False)
    monkeypatch.setattr(module, reader, read_then_stop)
    body, expected = named_file(name, kind)
    with file_with(body) as path:
        try:
            code, out, err = run_cli(argv + [str(path), "--out", str(path.parent / "run")])
        except Loaded:
            assert expected is None, f"{name}: loaded, expected {expected}"
            return
    assert expected is not None, f"{name}: exit {code}, expected rows: {err[:300]}"
    assert code == 2 and "Traceback" not in out + err, err[-2000:]
    assert err.startswith(f"error: {path}") and expected.split(": ")[-1].split(" (")[0] in err, err[:300]


@pytest.mark.parametrize("name", ["deeply nested line", "a 5000-digit number"])
def test_cli_data_check_auto_kind_without_traceback(name):
    body, _ = named_file(name, "preferences")
    with file_with(body) as path:
        code, out, err = run_cli(["data", "check", str(path)])
    assert code == 1 and "Traceback" not in out + err and "1 of 1 rows skipped (0 usable)" in err
