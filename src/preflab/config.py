"""Stage configs: one dataclass per stage, a help string per field, YAML presets and command-line overrides.

Each stage declares its config as a dataclass whose fields are made with `opt(default, "help")`; validation
lives in the dataclass's `__post_init__` and raises `ConfigError` quoting the offending value. The CLI builds
its options from the fields (`add_config_arguments`) and resolves them in this order: dataclass default <
`--config FILE.yaml` < `--preset NAME` < explicit command-line flags (`resolve_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the value."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by `--help` and in docs)."""
    if isinstance(default, (list, dict)):

        def factory(d=default):
            return type(d)(d)

        return dataclasses.field(default_factory=factory, metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds: `check(lr > 0, f"lr must be > 0, got {lr}")`."""
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class RunConfig:
    """What every stage that writes a run folder shares. A stage re-declares a field only to change its default
    or help; the checks stay here."""

    out: str = opt("", "run folder to write (default runs/<stage>-<time>)")
    seed: int = opt(0, "random seed")
    threads: int = opt(0, "torch intra-op threads (0: torch's default)")

    def __post_init__(self):
        check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")


DTYPES = ("fp32", "bf16")


@dataclass(kw_only=True)
class PrecisionConfig(RunConfig):
    """The arithmetic a stage's forward passes use. Weights, optimiser state and losses stay fp32 either way."""

    dtype: str = opt(
        "fp32",
        "fp32, or bf16: mixed precision (the forward passes autocast to bfloat16, weights and optimiser stay fp32); "
        "pays on GPUs and on CPUs with native bfloat16 (AVX512-BF16, AMX), costs time on others",
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(kw_only=True)
class OptimConfig(PrecisionConfig):
    """What every training stage shares: AdamW, gradient clipping and the budget (steps and/or seconds)."""

    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    max_steps: int = opt(0, "stop after this many optimiser steps (0: no step limit)")
    max_seconds: float = opt(0.0, "also stop after this many seconds (0: no time limit)")
    checkpoint_every: int = opt(0, "write a checkpoint every N steps (0: only when stopped by Ctrl-C)")
    keep_checkpoints: int = opt(2, "checkpoints kept (the newest N; a corrupt newest one falls back to the one before)")
    resume: bool = opt(False, "continue the run in --out from its newest good checkpoint (same options required)")

    def __post_init__(self):
        super().__post_init__()
        check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        check(self.max_seconds >= 0, f"max_seconds must be >= 0, got {self.max_seconds}")


@dataclass(kw_only=True)
class LoraConfig(RunConfig):
    """LoRA (Hu et al. 2021) for the stages that fine-tune an existing model: low-rank adapters on the chosen
    linear layers are trained and the base weights stay frozen; the reference is the base with the adapter off."""

    lora_r: int = opt(0, "LoRA rank (0: train every weight, no adapter)")
    lora_alpha: float = opt(16.0, "LoRA scale alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input (keep 0 for online RL: the first PPO ratio must be 1)")
    lora_targets: str = opt(
        "all-linear",
        "layers that get adapters: 'all-linear' (every linear layer but the LM "
        "head) or comma-separated module names, e.g. q_proj,v_proj",
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.lora_r >= 0, f"lora_r must be >= 0, got {self.lora_r}")
        check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(bool(self.lora_targets.strip()), "lora_targets must name layers or be 'all-linear', got ''")


SHARED_BASES = (RunConfig, OptimConfig, LoraConfig)


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


def own_fields(cls: type) -> set[str]:
    """Names the stage's own classes declare (re-declared shared fields included), as against those it only
    inherits from the shared bases (`RunConfig`, `OptimConfig`, `LoraConfig`)."""
    return {
        name
        for klass in cls.__mro__
        if klass not in SHARED_BASES and klass is not object
        for name in vars(klass).get("__annotations__", {})
    }


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per dataclass field, defaulting to None (meaning: not given): the stage's own
    options first, then those every stage of its kind shares."""
    own = own_fields(cls)
    groups = {
        True: parser.add_argument_group(f"{cls.__name__} options"),
        False: parser.add_argument_group("options shared with the other stages"),
    }
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # stable: declaration order kept
    for field in fields:
        if field.metadata.get("cli") is False:
            continue
        group = groups[field.name in own]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        tp = _field_type(cls, field)
        help_text = field.metadata.get("help", "")
        # Show each default once: not when the help states its own ("(default runs/<stage>-<time>)"), nor an
        # empty one ('' or [] means "not given"; the help says what happens then).
        if "(default" not in help_text.lower() and default not in ("", [], {}, None):
            help_text = f"{help_text} (default: {default!r})"
        if field.metadata.get("positional"):  # `opt(..., positional=True)`: also accepted as a bare argument
            group.add_argument(
                f"_{field.name}_positional",
                nargs="?",
                type=_converter(tp),
                default=None,
                help=help_text,
                metavar=field.name.upper(),
            )
        extra = {"nargs": "?", "const": True} if tp is bool else {}  # `--flag` alone means `--flag true`
        flags = [flag, "-" + field.name] if len(field.name) == 1 else [flag]  # `-k 4` as well as `--k 4`
        flags += field.metadata.get("aliases", [])  # `opt(..., aliases=["-k"])`
        group.add_argument(
            *flags,
            dest=field.name,
            type=_converter(tp),
            default=None,
            help=help_text,
            metavar=field.name.upper(),
            **extra,
        )


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    """The presets shipped inside the package (`preflab/presets/*.yaml`), so they work from any install."""
    return sorted(p.name[:-5] for p in resources.files("preflab.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """A packaged preset as a dict (read with importlib.resources: works from a wheel as from a checkout)."""
    if name not in preset_names():
        raise ConfigError(f"no preset {name!r}; the presets are {preset_names()}")
    text = resources.files("preflab.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _show(value: Any, n: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:
        text = type(value).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """A YAML (or dict) value as the field's type, or ConfigError naming the option and the value. Strings are
    read as numbers where a number is wanted (YAML reads `1e-4` as a string), numbers kept as they are."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: option '{name}' expects {expected}, got {_show(value)}")

    origin, args = typing.get_origin(tp), [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp, origin = args[0], typing.get_origin(args[0])
        args = list(typing.get_args(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise bad("true or false")
    if tp in (int, float):
        expected = "an integer" if tp is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad(expected)
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value.strip())
            except ValueError:
                try:  # an int option given as 1e3
                    as_float = float(value)
                except ValueError:
                    raise bad(expected) from None
                value = as_float
        if tp is int and isinstance(value, float):
            if not value.is_integer():
                raise bad(expected)
            value = int(value)
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("valid Unicode text (no lone surrogates)") from None
            return value
        if isinstance(value, os.PathLike):
            return value
        raise bad("a string")
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = [x for x in value.split(",") if x != ""]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        inner = args[0] if args else Any
        return [_coerce(f"{name}[{i}]", inner, v, source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
    return value


def build_config(cls: type, values: dict, source: str = "config") -> Any:
    """Instantiate `cls` from a dict, rejecting unknown keys by name and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(k, hints.get(k, Any), v, source) for k, v in values.items()}
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
        data = load_preset(preset)
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
