"""Config resolution: defaults < --config file < --preset < command-line flags; validation quotes values."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from preflab import config as config_module
from preflab.config import ConfigError, add_config_arguments, build_config, check, load_yaml, opt, resolve_config


@dataclass
class Toy:
    lr: float = opt(0.1, "learning rate")
    steps: int = opt(10, "steps")
    name: str = opt("a", "a name")
    flag: bool = opt(False, "a switch")
    sizes: list[int] = opt([1, 2], "a list")
    target: str = opt("", "positional target", positional=True)

    def __post_init__(self):
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--preset")
    add_config_arguments(parser, Toy)
    return parser.parse_args(argv)


def test_precedence(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("toy:\n  steps: 30\n  name: preset\nother:\n  steps: 99\n")
    monkeypatch.setattr(config_module, "load_preset", lambda name: config_module.load_yaml(tmp_path / f"{name}.yaml"))
    file = tmp_path / "c.yaml"
    file.write_text("lr: 0.5\nsteps: 20\nname: file\n")
    assert resolve_config(Toy, parse([]), stage="toy") == Toy()
    c = resolve_config(Toy, parse(["--config", str(file)]), stage="toy")
    assert (c.lr, c.steps, c.name) == (0.5, 20, "file")
    c = resolve_config(Toy, parse(["--config", str(file), "--preset", "p"]), stage="toy")
    assert (c.lr, c.steps, c.name) == (0.5, 30, "preset")  # the preset's own stage section only
    c = resolve_config(Toy, parse(["--config", str(file), "--preset", "p", "--steps", "40"]), stage="toy")
    assert (c.lr, c.steps, c.name) == (0.5, 40, "preset")


def test_types_from_the_command_line():
    c = resolve_config(Toy, parse(["--flag", "yes", "--sizes", "3,4,5", "--lr", "1e-3", "tgt"]))
    assert c.flag is True and c.sizes == [3, 4, 5] and c.lr == 1e-3 and c.target == "tgt"
    assert resolve_config(Toy, parse(["--target", "t2"])).target == "t2"
    with pytest.raises(SystemExit):
        parse(["--flag", "maybe"])


def test_validation_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match="got -1"):
        Toy(lr=-1)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['stesp'\]"):
        build_config(Toy, {"stesp": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")


def test_list_defaults_are_not_shared():
    a, b = Toy(), Toy()
    a.sizes.append(9)
    assert b.sizes == [1, 2]


def test_help_shows_each_default_once():
    @dataclass
    class Helped:
        out: str = opt("", "run folder to write (default runs/toy-<time>)")
        steps: int = opt(10, "steps")
        threads: int = opt(0, "torch intra-op threads (0: torch's default)")
        model: str = opt("", "a model folder")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Helped)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert helps["out"] == "run folder to write (default runs/toy-<time>)"  # its own default, no second one
    assert helps["steps"] == "steps (default: 10)"
    assert helps["threads"] == "torch intra-op threads (0: torch's default) (default: 0)"  # torch's, not ours
    assert helps["model"] == "a model folder"  # '' means not given: nothing to show


def test_stage_configs_round_trip_through_yaml(tmp_path):
    """A run folder's config.yaml can be fed back with --config (minus the `stage` key)."""
    import yaml

    from preflab.config import to_dict
    from preflab.sft import SFTConfig

    c = SFTConfig(model="m", lr=1e-4, epochs=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(c)))
    assert build_config(SFTConfig, load_yaml(path)) == c


def test_presets_ship_inside_the_package():
    from importlib import resources

    from preflab.config import load_preset, preset_names

    assert {"tiny", "small", "demo", "fast"} <= set(preset_names())
    assert resources.files("preflab.presets").joinpath("tiny.yaml").is_file()
    assert load_preset("tiny")["pretrain"]["size"] == "tiny"
    with pytest.raises(ConfigError, match="'nope'.*tiny"):
        load_preset("nope")
