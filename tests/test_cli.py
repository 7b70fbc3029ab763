"""The `preflab` command: every stage listed, every built stage's --help, not-built stages, bad values."""

from __future__ import annotations

import dataclasses

import pytest

from preflab.cli import main
from preflab.stages import GROUPS, STAGES, load_stage


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_stage(capsys):
    out = help_text(["--help"], capsys)
    for name in [*STAGES, *GROUPS]:
        assert name in out
    assert main([]) == 0  # no stage: the help, exit 0


def all_stages():
    yield from ((name,) for name in STAGES)
    yield from ((group, sub) for group, subs in GROUPS.items() for sub in subs)


def spec_of(path):
    return STAGES[path[0]] if len(path) == 1 else GROUPS[path[0]][path[1]]


@pytest.mark.parametrize("path", list(all_stages()), ids=" ".join)
def test_each_built_stage_help_explains_every_option(path, capsys):
    loaded = load_stage(*spec_of(path)[:2])
    if loaded is None:
        pytest.skip(f"{' '.join(path)} is not built yet")
    out = help_text([*path, "--help"], capsys)
    assert "--config" in out
    for field in dataclasses.fields(loaded[1]):
        if field.metadata.get("cli") is False:  # YAML-only options (nested mappings)
            continue
        assert "--" + field.name.replace("_", "-") in out
        assert field.metadata.get("help", "")[:20] in " ".join(out.split())  # argparse re-wraps the help


def test_a_stage_not_built_yet_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(STAGES, "future", ("preflab.no_such_module", "run", "a stage nobody wrote"))
    assert main(["future"]) == 2
    assert "not built yet" in capsys.readouterr().err
    out = help_text(["--help"], capsys)
    assert "future" in out


def test_bad_config_value_exits_2_and_quotes_it(capsys, tmp_path):
    assert main(["sft", "--model", "m", "--lr", "-0.5", "--out", str(tmp_path / "r")]) == 2
    assert "-0.5" in capsys.readouterr().err
    assert main(["pretrain", "--size", "huge", "--out", str(tmp_path / "p")]) == 2
    assert "'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # not a number at all: argparse says so, exit 2
        main(["sft", "--lr", "fast"])
    assert exit_.value.code == 2 and "'fast'" in capsys.readouterr().err


def test_config_file_and_unknown_option(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlearning_rate: 0.1\n")
    assert main(["sft", "--config", str(path)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_fast_flag_is_the_fast_preset():
    from preflab.cli import build_parser
    from preflab.config import resolve_config
    from preflab.demo import DemoConfig

    args = build_parser(["demo", "--fast"]).parse_args(["demo", "--fast"])
    assert args.preset == "fast"
    config = resolve_config(DemoConfig, args, stage="demo")
    assert config.bon_n == 2 and config.pretrain == {"max_steps": 120, "max_seconds": 0, "batch_size": 16}
