"""Stage configs: one dataclass per stage, a help string per field, YAML presets and command-line overrides.

Each stage declares its config as a dataclass whose fields are made with `opt(default, "help")`; validation
lives in the dataclass's `__post_init__` and raises `ConfigError` quoting the offending value. The CLI builds
its options from the fields (`add_config_arguments`) and resolves them in this order: dataclass default <
`--config FILE.yaml` < `--preset NAME` < explicit command-line flags (`resolve_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the value."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by `--help` and in docs)."""
    if isinstance(default, (list, dict)):
        factory = (lambda d=default: type(d)(d))
        return dataclasses.field(default_factory=factory, metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds: `check(lr > 0, f"lr must be > 0, got {lr}")`."""
    if not condition:
        raise ConfigError(message)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(field.name, str)


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _converter(args[0])
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple):
        inner = _converter(args[0]) if args else str
        return lambda text: [inner(x) for x in str(text).split(",") if x != ""]
    return str


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per dataclass field, defaulting to None (meaning: not given)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.metadata.get("cli") is False:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        tp = _field_type(cls, field)
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})"
        if field.metadata.get("positional"):  # `opt(..., positional=True)`: also accepted as a bare argument
            group.add_argument(f"_{field.name}_positional", nargs="?", type=_converter(tp), default=None,
                               help=help_text, metavar=field.name.upper())
        extra = {"nargs": "?", "const": True} if tp is bool else {}  # `--flag` alone means `--flag true`
        flags = [flag, "-" + field.name] if len(field.name) == 1 else [flag]  # `-k 4` as well as `--k 4`
        group.add_argument(*flags, dest=field.name, type=_converter(tp), default=None, help=help_text,
                           metavar=field.name.upper(), **extra)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def build_config(cls: type, values: dict, source: str = "config") -> Any:
    """Instantiate `cls` from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)


def resolve_config(cls: type, args: argparse.Namespace, stage: str | None = None) -> Any:
    """Defaults < --config file < --preset (its `stage:` section or top level) < command-line flags."""
    values: dict = {}
    names = {f.name for f in dataclasses.fields(cls)}
    config_file = getattr(args, "config", None)
    if config_file:
        data = load_yaml(config_file)
        values.update(data.get(stage, data) if stage and isinstance(data.get(stage), dict) else data)
    preset = getattr(args, "preset", None)
    if preset:
        data = load_yaml(preset_path(preset))
        section = data.get(stage) if stage else None
        values.update({k: v for k, v in (section or {}).items()})
    values = {k: v for k, v in values.items() if k in names or not isinstance(v, dict)}
    for name in names:
        given = getattr(args, name, None)
        if given is None:
            given = getattr(args, f"_{name}_positional", None)
        if given is not None:
            values[name] = given
    return build_config(cls, values, source=str(config_file or preset or "command line"))
