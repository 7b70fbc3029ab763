"""The shape of the house: dependencies point down (only the entry point imports the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "preflab"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_but_the_entry_point_imports_the_cli():
    offenders = [
        str(p.relative_to(SRC))
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "cli.py" and {"preflab.cli"} & imported_modules(p)
    ]
    assert offenders == []


def test_the_check_sees_an_import_of_the_cli(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from preflab.cli import main\n")
    assert "preflab.cli" in imported_modules(bad)
    bad.write_text("from preflab import cli\n")
    assert "preflab.cli" in imported_modules(bad)
