"""`preflab data check FILE`: validate a preference or demonstration file and describe it before training.

Reads the file non-strictly (every bad row is counted with its reason, none stops the check) and prints:
rows read / usable / skipped (grouped by reason, with the first file:line examples), notes (e.g. a completion
that repeated the prompt), explicit vs implicit prompt forms, duplicate rows, contradictory pairs (the same
prompt with A > B in one row and B > A in another), ties, and, given `--model`, token-length percentiles of
prompts and completions as the training stages will tokenise them.

Exit status, as a linter's (so the check can guard a CI job): 0 when every row is usable, 1 when any row was
skipped (the report is printed first), 2 when the file cannot be read or holds no rows at all.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from preflab.config import check as check_value
from preflab.config import opt
from preflab.data.preferences import (
    DataError,
    DataSet,
    Preference,
    load_demonstrations,
    load_preferences,
    parse_json_line,
)
from preflab.data.tokenize import encode_demonstration, encode_preference
from preflab.stages import stage

KINDS = ("auto", "preferences", "demonstrations")


@dataclass
class CheckConfig:
    file: str = opt("", "the JSONL file to check (also accepted as the first positional argument)", positional=True)
    kind: str = opt("auto", "what the file holds: auto (detected from the rows' fields), preferences or demonstrations")
    model: str = opt(
        "", "a model or tokenizer (HF dir, run folder, .gguf, 'smollm2') for token lengths ('' skips them)"
    )
    examples: int = opt(3, "file:line examples shown per skip reason")
    max_prompt_length: int = opt(0, "count the rows a stage with this prompt limit would truncate (0: no limit)")
    max_completion_length: int = opt(
        0, "count the rows a stage with this completion limit would truncate (0: no limit)"
    )

    def __post_init__(self):
        check_value(bool(self.file), "give the file to check: `preflab data check FILE`")
        check_value(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        check_value(self.examples >= 0, f"examples must be >= 0, got {self.examples}")


def detect_kind(path: str | Path) -> str:
    """'preferences' when most parseable rows carry chosen/rejected, else 'demonstrations'."""
    votes = Counter()
    path = Path(path)
    if not path.is_file():
        return "preferences"  # the loader reports the missing file
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for n, line in enumerate(handle):
            if n >= 1000:
                break
            try:
                row = parse_json_line(line, str(path))
            except DataError:
                continue
            if isinstance(row, dict):
                if "chosen" in row or "rejected" in row:
                    votes["preferences"] += 1
                elif "completion" in row or "messages" in row:
                    votes["demonstrations"] += 1
    return "demonstrations" if votes["demonstrations"] > votes["preferences"] else "preferences"


def reason_key(reason: str) -> str:
    """Group skip reasons: drop the varying details (parenthesised text, 'got ...')."""
    key = re.sub(r"\s*\([^)]*\)", "", reason)
    return key.split(", got ")[0].strip()


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def pair_stats(rows: list[Preference]) -> dict:
    """Duplicates (same prompt, chosen, rejected) and contradictions (same prompt, A>B and B>A)."""
    seen: Counter = Counter()
    for r in rows:
        seen[(_key(r.prompt), _key(r.chosen), _key(r.rejected))] += 1
    duplicates = sum(c - 1 for c in seen.values())
    contradictory = 0
    for (p, a, b), count in seen.items():
        if (p, b, a) in seen and a < b:
            contradictory += min(count, seen[(p, b, a)])
    explicit = sum(r.prompt is not None for r in rows)
    return {
        "explicit": explicit,
        "implicit": len(rows) - explicit,
        "duplicates": duplicates,
        "contradictory": contradictory,
        "ties": sum(bool(r.tie) for r in rows),
        "with_margin": sum(r.margin is not None for r in rows),
    }


def demo_stats(rows) -> dict:
    seen = Counter((_key(r.prompt), r.completion) for r in rows)
    return {
        "duplicates": sum(c - 1 for c in seen.values()),
        "chat_prompts": sum(isinstance(r.prompt, list) for r in rows),
    }


def percentiles(values: list[int]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {}

    def pick(q: float):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def token_lengths(tokenizer, data: DataSet, kind: str, max_prompt: int, max_completion: int) -> tuple[dict, list, int]:
    """({field: [untruncated lengths]}, [(file:line, reason)] rows that cannot be tokenised, rows the limits cut)."""
    lengths: dict[str, list[int]] = defaultdict(list)
    failed, truncated = [], 0
    for row in data.rows:
        try:
            if kind == "preferences":
                pair, _ = encode_preference(tokenizer, row)
                prompt, completions = (
                    len(pair.prompt_ids),
                    {"chosen": len(pair.chosen_ids), "rejected": len(pair.rejected_ids)},
                )
            else:
                ex, _ = encode_demonstration(tokenizer, row)
                prompt, completions = len(ex.prompt_ids), {"completion": len(ex.completion_ids)}
        except DataError as err:
            failed.append((err.source, err.reason))
            continue
        lengths["prompt"].append(prompt)
        for name, n in completions.items():
            lengths[name].append(n)
        truncated += int(
            bool(max_prompt and prompt > max_prompt)
            or bool(max_completion and max(completions.values()) > max_completion)
        )
    return dict(lengths), failed, truncated


def describe(config: CheckConfig) -> dict:
    """Everything the check prints, as a dict (tests read it)."""
    kind = detect_kind(config.file) if config.kind == "auto" else config.kind
    load = load_preferences if kind == "preferences" else load_demonstrations
    data = load(config.file, strict=False)
    report = {"file": config.file, "kind": kind, "rows_read": data.lines_read, "notes": dict(data.notes)}
    skipped = list(data.skipped)
    if config.model and data.rows:
        from preflab.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        lengths, failed, truncated = token_lengths(
            tokenizer, data, kind, config.max_prompt_length, config.max_completion_length
        )
        bad = {src for src, _ in failed}
        data.rows = [r for r in data.rows if r.source not in bad]
        skipped += failed
        report["token_lengths"] = {name: percentiles(v) for name, v in lengths.items()}
        report["truncated"] = truncated
        report["tokenizer"] = config.model
    groups: dict[str, list[str]] = defaultdict(list)
    for src, reason in skipped:
        groups[reason_key(reason)].append(src)
    report["rows_usable"] = len(data.rows)
    report["rows_skipped"] = len(skipped)
    report["skipped"] = {
        k: {"count": len(v), "examples": v[: config.examples]}
        for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    }
    report.update(pair_stats(data.rows) if kind == "preferences" else demo_stats(data.rows))
    return report


def format_report(r: dict) -> str:
    lines = [
        f"{r['file']}: {r['kind']}",
        f"  rows read     {r['rows_read']}",
        f"  rows usable   {r['rows_usable']}",
        f"  rows skipped  {r['rows_skipped']}",
    ]
    for reason, info in r["skipped"].items():
        lines.append(f"    {info['count']:>6}  {reason}   e.g. {', '.join(info['examples'])}")
    if r["kind"] == "preferences":
        lines.append(f"  prompt form   explicit {r['explicit']}, implicit {r['implicit']} (split off in token space)")
        lines.append(f"  duplicates    {r['duplicates']} rows repeat an earlier (prompt, chosen, rejected)")
        lines.append(f"  contradictory {r['contradictory']} pairs (same prompt, A>B in one row and B>A in another)")
        lines.append(f"  ties          {r['ties']}; rows with a margin {r['with_margin']}")
    else:
        lines.append(f"  duplicates    {r['duplicates']} rows repeat an earlier (prompt, completion)")
        lines.append(f"  chat prompts  {r['chat_prompts']} (the rest are plain text)")
    for note, count in r["notes"].items():
        lines.append(f"  note          {count} x {note}")
    if "token_lengths" in r:
        lines.append(f"  token lengths with {r['tokenizer']} (p50 / p90 / p99 / max):")
        for name, q in r["token_lengths"].items():
            lines.append(f"    {name:<10} {q['p50']:>6} {q['p90']:>6} {q['p99']:>6} {q['max']:>6}")
        if r.get("truncated"):
            lines.append(f"  truncated     {r['truncated']} rows exceed the given max lengths")
    else:
        lines.append("  token lengths: skipped (give --model DIR to count tokens with its tokenizer)")
    return "\n".join(lines)


@stage(CheckConfig)
def check(config: CheckConfig) -> dict:
    report = describe(config)
    print(format_report(report), flush=True)
    if report["rows_read"] == 0:
        raise DataError(config.file, "no rows: the file is empty", "give a JSONL file with one row per line")
    if report["rows_skipped"]:
        print(
            f"{config.file}: {report['rows_skipped']} of {report['rows_read']} rows skipped "
            f"({report['rows_usable']} usable)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    return report
