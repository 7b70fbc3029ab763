"""Preference and demonstration files: reading and validating JSONL, with file:line errors.

Preference rows (one JSON object a line), in either form:
  * explicit: {"prompt": P, "chosen": C, "rejected": R} where P is a string or a list of chat messages and
    C, R are the completions (strings, or a list holding the final assistant message). Where C repeats P
    (as in hh-rlhf's full dialogues with a `prompt` column), the repeated prefix is dropped and counted.
  * implicit: {"chosen": FULL_C, "rejected": FULL_R} full dialogues sharing a prefix; the prompt is split off
    later in token space (strings) or as the shared leading messages (chat lists).
Optional fields: `margin` (float), `tie` (bool), `annotator` (str), `subset` (str).

Demonstration rows: {"prompt": P, "completion": C} or {"messages": [..., {"role": "assistant", ...}]}.

`strict=True` (training) raises `DataError` at the first bad row; `strict=False` (`preflab data check`)
collects every problem as a skipped row with its reason. Nothing is ever dropped silently.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = list[dict]
Text = str | Messages
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is unusable. The message names the file, the line, the field and what to do."""

    def __init__(self, source: str, message: str, hint: str = ""):
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}" + (f"\n  what to do: {hint}" if hint else ""))


@dataclass
class Preference:
    prompt: Text | None
    chosen: Text
    rejected: Text
    margin: float | None = None
    tie: bool = False
    annotator: str | None = None
    subset: str | None = None
    source: str = ""


@dataclass
class Demonstration:
    prompt: Text
    completion: str
    source: str = ""


@dataclass
class DataSet:
    """Rows read from a file, with an account of what was read and skipped."""

    path: str
    rows: list = field(default_factory=list)
    lines_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)
    notes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def skipped_by_reason(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.skipped)


def _check_messages(value: Any, src: str, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(
            src,
            f"field '{name}': expected a non-empty list of chat messages",
            'give {"role": ..., "content": ...} objects',
        )
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(
                src, f"field '{name}'[{i}]: expected an object with 'role' and 'content', got {_short(msg)}"
            )
        if msg["role"] not in ROLES:
            raise DataError(src, f"field '{name}'[{i}].role: expected one of {ROLES}, got {msg['role']!r}")
        if not isinstance(msg["content"], str):
            raise DataError(src, f"field '{name}'[{i}].content: expected a string, got {type(msg['content']).__name__}")
        _check_unicode(msg["content"], src, f"'{name}'[{i}].content")
    return value


def _check_unicode(value: str, src: str, name: str) -> str:
    """A string that can be written back as UTF-8 and tokenised: no lone surrogates (e.g. a JSON "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            src,
            f"field {name}: not valid Unicode text (a lone surrogate {value[exc.start]!r} at "
            f"character {exc.start + 1})",
            "fix the text's encoding or remove the row",
        ) from None
    return value


def _finite(value: Any) -> float | None:
    """The number as a finite float, or None when it is not a number (bools are not) or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _check_text(row: dict, name: str, src: str) -> Text:
    if name not in row:
        raise DataError(src, f"missing field '{name}' (fields present: {sorted(row)})", f"every row needs '{name}'")
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(src, f"field '{name}' is empty", "remove the row or fill in the text")
        return _check_unicode(value, src, f"'{name}'")
    if isinstance(value, list):
        return _check_messages(value, src, name)
    raise DataError(
        src, f"field '{name}': expected a string or a list of chat messages, got {type(value).__name__} {_short(value)}"
    )


def _short(value: Any, n: int = 60) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, str) else repr(value)
    except (RecursionError, ValueError):
        text = type(value).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def _strip_repeated_prompt(prompt: Text, completion: Text, notes: Counter) -> Text:
    """hh-rlhf style rows give `prompt` and a `chosen` that repeats it: keep what follows the prompt."""
    if (
        isinstance(prompt, str)
        and isinstance(completion, str)
        and completion.startswith(prompt)
        and len(completion) > len(prompt)
    ):
        notes["completion repeated the prompt (prefix dropped)"] += 1
        return completion[len(prompt) :]
    if (
        isinstance(prompt, list)
        and isinstance(completion, list)
        and completion[: len(prompt)] == prompt
        and len(completion) > len(prompt)
    ):
        notes["completion repeated the prompt (prefix dropped)"] += 1
        return completion[len(prompt) :]
    return completion


def completion_text(value: Text, src: str, name: str) -> str:
    """The text of a completion given as a string or as a list ending in an assistant message."""
    if isinstance(value, str):
        return value
    last = value[-1]
    if last["role"] != "assistant":
        raise DataError(src, f"field '{name}': the last message must be the assistant's, got role {last['role']!r}")
    if not last["content"].strip():
        raise DataError(
            src, f"field '{name}': the final assistant message is empty", "remove the row or fill in the text"
        )
    return last["content"]


def parse_preference(row: Any, src: str, notes: Counter | None = None) -> Preference:
    notes = notes if notes is not None else Counter()
    if not isinstance(row, dict):
        raise DataError(src, f"expected a JSON object, got {type(row).__name__}")
    chosen = _check_text(row, "chosen", src)
    rejected = _check_text(row, "rejected", src)
    prompt = _check_text(row, "prompt", src) if row.get("prompt") is not None else None
    if type(chosen) is not type(rejected):
        raise DataError(src, "fields 'chosen' and 'rejected' must both be strings or both be message lists")
    if prompt is not None:
        chosen = _strip_repeated_prompt(prompt, chosen, notes)
        rejected = _strip_repeated_prompt(prompt, rejected, notes)
    elif isinstance(chosen, list):  # implicit chat form: shared leading messages are the prompt
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise DataError(
                src,
                "implicit-prompt chat rows need 'chosen' and 'rejected' to share all messages but the last",
                "add a 'prompt' field, or make both dialogues differ only in the final assistant turn",
            )
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            completion_text(value, src, name)
    if chosen == rejected:
        raise DataError(
            src, "fields 'chosen' and 'rejected' are identical: the row carries no preference", "remove the row"
        )
    margin = row.get("margin")
    if margin is not None and _finite(margin) is None:
        raise DataError(src, f"field 'margin': expected a finite number, got {_short(margin)}")
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        raise DataError(src, f"field 'tie': expected true or false, got {_short(tie)}")
    for name in ("annotator", "subset"):
        if row.get(name) is not None and not isinstance(row[name], (str, int)):
            raise DataError(src, f"field '{name}': expected a string, got {_short(row[name])}")
        if isinstance(row.get(name), str):
            _check_unicode(row[name], src, f"'{name}'")
    return Preference(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        margin=_finite(margin) if margin is not None else None,
        tie=tie,
        annotator=str(row["annotator"]) if row.get("annotator") is not None else None,
        subset=str(row["subset"]) if row.get("subset") is not None else None,
        source=src,
    )


def parse_demonstration(row: Any, src: str, notes: Counter | None = None) -> Demonstration:
    if not isinstance(row, dict):
        raise DataError(src, f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], src, "messages")
        if len(messages) < 2:
            raise DataError(src, "field 'messages' needs at least a prompt message and the assistant's reply")
        return Demonstration(prompt=messages[:-1], completion=completion_text(messages, src, "messages"), source=src)
    prompt = _check_text(row, "prompt", src)
    completion = _check_text(row, "completion", src)
    if isinstance(completion, list):
        completion = completion_text(completion, src, "completion")
    return Demonstration(prompt=prompt, completion=completion, source=src)


def parse_prompt(row: Any, src: str, notes: Counter | None = None) -> Text:
    if not isinstance(row, dict):
        raise DataError(src, f"expected a JSON object, got {type(row).__name__}")
    return _check_text(row, "prompt", src)


def _lines(path: Path) -> list[bytes]:
    """The file's lines as bytes (split on \\n, \\r\\n or \\r, as text mode splits them), a UTF-8 BOM dropped."""
    if not path.exists():
        raise DataError(str(path), "file not found", "check the path (relative paths start from the current folder)")
    if path.is_dir():
        raise DataError(str(path), "is a folder, expected a .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(str(path), f"cannot read the file ({exc.strerror or exc})") from None
    return (raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw).splitlines()


def parse_json_line(line: bytes | str, src: str) -> Any:
    """One JSONL line as a value, or `DataError(src, ...)`: bad UTF-8, malformed JSON, nesting too deep for the
    parser or deeper than MAX_DEPTH, a number too long to read. Never another exception."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                src, f"not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)", "save the file as UTF-8"
            ) from None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            src, f"malformed JSON ({exc.msg} at column {exc.colno})", "each line must be one JSON object"
        ) from None
    except RecursionError:
        raise DataError(
            src, "malformed JSON (nested too deeply to read)", "each line must be one JSON object"
        ) from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise DataError(
            src,
            f"malformed JSON (a number too long to read: {str(exc).split(':')[0]})",
            "each line must be one JSON object",
        ) from None
    if _too_deep(value):
        raise DataError(
            src,
            f"row nested too deeply (more than {MAX_DEPTH} levels of lists and objects)",
            "rows hold text, chat messages and a few flat fields",
        )
    return value


MAX_DEPTH = 100  # deeper rows are refused on reading, so no later comparison or dump of them can recurse too far


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return False


def read_jsonl(path: str | Path, parse, strict: bool = True) -> DataSet:
    path = Path(path)
    lines = _lines(path)
    data = DataSet(path=str(path))
    for number, line in enumerate(lines, start=1):
        if not line.decode("utf-8", "replace").strip():  # blank as text (an undecodable line is not blank)
            continue
        data.lines_read += 1
        src = f"{path}:{number}"
        try:
            data.rows.append(parse(parse_json_line(line, src), src, data.notes))
        except DataError as err:
            if strict:
                raise
            data.skipped.append((src, err.reason))
    if strict and not data.rows:
        raise DataError(
            str(path), "no usable rows", "the file is empty or every row was skipped; run `preflab data check`"
        )
    return data


def load_preferences(path: str | Path, strict: bool = True) -> DataSet:
    """Read a preference JSONL file into `Preference` rows (see the module docstring for the forms)."""
    return read_jsonl(path, parse_preference, strict=strict)


def load_prompts(path: str | Path, strict: bool = True) -> DataSet:
    """Read a JSONL file of {"prompt": string | chat messages} rows (for generation and online RL)."""
    return read_jsonl(path, parse_prompt, strict=strict)


def load_demonstrations(path: str | Path, strict: bool = True) -> DataSet:
    """Read a demonstration JSONL file into `Demonstration` rows."""
    return read_jsonl(path, parse_demonstration, strict=strict)


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


SPLIT_BY = ("row", "prompt", "first_turn")
SPLIT_BY_HELP = (
    "what the held-out split keeps together: row, prompt (all rows of one prompt on one side) "
    "or first_turn (conversations opening with one question)"
)


def split_key(row, by: str) -> str:
    """What a held-out split keeps together: the whole prompt, or the first human turn of a conversation (in
    hh-rlhf one opening question is continued in several conversations: by first turn none of them leaks)."""
    prompt = getattr(row, "prompt", None)
    if by == "prompt":
        return json.dumps(prompt, sort_keys=True)
    if isinstance(prompt, list):
        return next((str(m.get("content", "")) for m in prompt if m.get("role") == "user"), json.dumps(prompt))
    text = (prompt or "").strip()
    if text.startswith("Human:"):
        text = text[len("Human:") :]
    return text.split("\n\nAssistant:")[0].strip()


def split_rows(rows: list, held_out: float, seed: int, by: str = "row") -> tuple[list, list]:
    """A reproducible split: the same seed and rows give the same held-out set. `by` "row" holds out single rows;
    "prompt" / "first_turn" hold out whole groups of rows sharing a `split_key` (groups drawn in a seeded order
    until the held-out share is reached), so no prompt is on both sides."""
    import random

    if by not in SPLIT_BY:
        raise ValueError(f"split by must be one of {SPLIT_BY}, got {by!r}")
    n_held = int(round(len(rows) * held_out))
    if by == "row":
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[:n_held])
    else:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(split_key(row, by), []).append(i)
        keys = list(groups)
        random.Random(seed).shuffle(keys)
        held = set()
        for key in keys:
            if len(held) >= n_held:
                break
            held.update(groups[key])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
