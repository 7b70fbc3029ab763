"""The docs tell the truth about the code. In README.md and docs/**/*.md: every code citation names a file and a
definition that exist, no citation is a line number (they rot with the next edit), every relative link points to
a file (and heading), every `preflab.x.y` imports, every `--flag` is an option of some command, and every test
named as evidence exists.

A citation is `path/to/file.py:name` or `file.py:Class.method` (a path suffix that names one file in the
repository is enough: `ppo.py:ppo`, `policy/losses.py:gae`); a bare `path/to/file.py` must name a file.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# Pages still citing line numbers, being converted to file:function form; empty this set once they are.
PENDING: set[str] = set()

# `file.py`, `file.py:name`, `file.py:Class.method`, `file.py:123`; not inside a URL or a longer path.
CITATION = re.compile(r"(?<![\w/.:-])((?:[\w-]+/)*[\w-]+\.py)(?::([A-Za-z_][\w.]*\w|[A-Za-z_]|\d+(?:-\d+)?))?")
LINE_NUMBER = re.compile(r"\(l\. \d+|\bl\. \d+(?:-\d+)?\b")  # "(l. 157)", "l. 66-71"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def checked(path: Path) -> bool:
    return rel(path) not in PENDING


@cache
def python_files() -> tuple[str, ...]:
    """Every .py file of the repository: at the top or in a top-level folder not hidden (.venv, .git) nor generated."""
    tops = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ("build", "runs")]
    return tuple(sorted(rel(p) for p in [*ROOT.glob("*.py"), *(p for d in tops for p in d.rglob("*.py"))]))


def resolve(cited: str) -> list[str]:
    """The repository files that `cited` names: itself, or the files whose path ends with `/cited`."""
    return [f for f in python_files() if f == cited or f.endswith("/" + cited)]


@cache
def definitions(path: str) -> frozenset[str]:
    """Dotted names defined in a module: functions, classes, their methods and nested classes, module-level names."""
    names: set[str] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(prefix + t.id for t in targets if isinstance(t, ast.Name))

    visit(ast.parse((ROOT / path).read_text()).body, "")
    return frozenset(names)


def citation_problems(text: str, page: str) -> list[str]:
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{page}:{lineno}"
        for cited, name in CITATION.findall(line):
            files = resolve(cited)
            if not files:
                problems.append(f"{where}: `{cited}` names no file in the repository")
                continue
            if len(files) > 1:
                problems.append(f"{where}: `{cited}` is ambiguous ({', '.join(files)}): give more of its path")
                continue
            if not name:
                continue
            if name[0].isdigit():
                problems.append(
                    f"{where}: `{cited}:{name}` cites a line number, which rots with the next edit: "
                    f"cite the function instead (`{cited}:function_name` or `{cited}:Class.method`)"
                )
            elif name not in definitions(files[0]):
                problems.append(f"{where}: `{cited}:{name}`: {files[0]} defines no `{name}`")
        for match in LINE_NUMBER.finditer(line):
            problems.append(
                f"{where}: a line-number citation ({match.group(0).strip('(')}) rots with the next edit: "
                f"cite the function instead (`file.py:function_name`)"
            )
    return problems


@pytest.mark.parametrize("path", [p for p in DOCS if checked(p)], ids=rel)
def test_code_citations_name_existing_functions(path):
    problems = citation_problems(path.read_text(), rel(path))
    assert not problems, "\n".join(problems)


def test_pending_pages_exist():
    """PENDING names real pages (a renamed page must not escape the check by staying listed)."""
    assert all((ROOT / p).exists() for p in PENDING)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_point_to_existing_files(path):
    problems = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{rel(path)}:{lineno}: link to {target}: {file} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(
                    f"{rel(path)}:{lineno}: link to {target}: no heading `#{anchor}` in {file or rel(path)}"
                )
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should():
    """A line number (either form), a missing function and a missing file are reported; good citations are not."""
    text = (
        "`config.py:opt`, `src/preflab/config.py:ConfigError` and `https://example.org/a/b.py` are fine\n"
        "`config.py:42` (l. 7) `config.py:no_such_function` `nowhere/missing.py`\n"
    )
    problems = citation_problems(text, "probe.md")
    assert len(problems) == 4, problems
    assert all(p.startswith("probe.md:2: ") for p in problems)
    assert "line number" in problems[0] and "no `no_such_function`" in problems[1] and "names no file" in problems[2]
    assert "line-number citation (l. 7)" in problems[3]


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_dotted_references_resolve(path):
    """`preflab.module.name` and `preflab.module:function` in the docs import."""
    import importlib

    problems = []
    for ref in sorted(set(re.findall(r"\bpreflab(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?", path.read_text()))):
        parts = ref.replace(":", ".").split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            problems.append(f"{rel(path)}: `{ref}` does not resolve (no `{name}` in {'.'.join(parts[:i])})")
    assert not problems, "\n".join(problems)


# Flags the docs name on purpose although no stage has them (e.g. results.md telling of an option that was removed).
GONE_FLAGS = {"--eval-world-prompts"}


@cache
def cli_flags() -> frozenset[str]:
    """Every option of every `preflab` command, read from the parsers the CLI builds."""
    import argparse

    from preflab.cli import build_parser
    from preflab.stages import GROUPS, STAGES

    flags: set[str] = set()
    for argv in [[name] for name in STAGES] + [[group, sub] for group, subs in GROUPS.items() for sub in subs]:
        parser = build_parser(argv)
        for name in argv:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        flags |= {option for action in parser._actions for option in action.option_strings}
    return frozenset(flags)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_flag_named_is_an_option(path):
    """A `--flag` in README or docs is an option of some `preflab` command (accelerate's own flags excepted)."""
    problems = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r"accelerate launch[^`]*", "", line)  # `accelerate launch --config_file ...` is not ours
        line = re.sub(r"bench/\w+\.py[^`]*", "", line)  # bench scripts have their own options (`bench/run.py --quick`)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*\b(?!_)", line):
            if flag not in cli_flags() and flag not in GONE_FLAGS:
                problems.append(f"{rel(path)}:{lineno}: {flag} is no option of any preflab command")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_test_named_exists(path):
    """A test the docs name as evidence (`test_something`) is a test function in tests/."""
    defined = {name.rpartition(".")[2] for f in python_files() if f.startswith("tests/") for name in definitions(f)}
    named = set(re.findall(r"`(test_\w+)`", path.read_text()))
    assert not named - defined, f"{rel(path)} names tests that do not exist: {sorted(named - defined)}"
