"""Property-based tests (hypothesis) of config files: random keys, values, types and nesting, and adversarial
YAML (binary, a BOM, deep nesting, aliases, tags, lone surrogates), read through `load_yaml` and
`resolve_config` / `build_config` for a few stage configs. The property: a config object, or `ConfigError`
naming the file or the offending key or value, never another exception; through the CLI, exit 0/1/2 and no
traceback. Bounded and derandomized for `make test`; PREFLAB_FUZZ_EXAMPLES=N runs N random examples.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preflab.cli import main
from preflab.config import ConfigError, build_config, load_yaml, resolve_config
from preflab.data.check import CheckConfig
from preflab.generate import GenerateConfig
from preflab.policy.dpo import DPOConfig
from preflab.sft import SFTConfig

LONG = int(os.environ.get("PREFLAB_FUZZ_EXAMPLES", "0"))
CLASSES = {"sft": SFTConfig, "dpo": DPOConfig, "generate": GenerateConfig, "check": CheckConfig}


def fuzz(examples: int):
    return settings(
        max_examples=LONG or examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "1e-4",
            "3",
            "yes",
            "off",
            "nan",
            "-inf",
            "0x10",
            "1_000",
            "",
            "\u202eevil",
            "e\u0301",
            "\x00",
            "9" * 5000,
            "x" * 10_000,
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def mapping(draw, cls):
    names = [f.name for f in dataclasses.fields(cls) if f.name != "model"]  # `model` would load a model
    keys = st.one_of(st.sampled_from(names), st.text(max_size=12), st.integers(), st.booleans(), st.none())
    return draw(st.dictionaries(keys, values, max_size=5))


def dump(data) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True).encode("utf-8")


RAW = [
    b"",
    b"\xef\xbb\xbflr: 0.5\n",
    b"\xef\xbb\xbf",
    bytes(range(256)),
    b"lr: 1e-4\r\nmax_steps: 3\r\n",
    b"[" * 1000,
    b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 300)),
    b"lr: &x [*x]\n",
    b"lr: !!python/object:os.system x\n",
    b"lr: 1\nlr: 2\n",
    b"\x00",
    b'lr: "\\ud800"\n',
    b'out: "\\ud800"\n',
    b"lr: \xed\xa0\x80\n",
    b"- a\n- b\n",
    b"just a string",
    b"? [a, b]\n: 1\n",
    b"{1: 2, 3: 4}",
    b"lr:\n  nested: 1\n",
    b"\tlr: 1\n",
    b"lr: 2001-01-01\n",
    b"lr: .nan\n",
    b"max_steps: 1e3\n",
    b"max_steps: 1.5\n",
    b"lr: 0x10\n",
    b"out: [a, b]\n",
    b"seed: 99999999999999999999999999999999999999\n",
    b"skip_bad_rows: maybe\n",
]


@contextlib.contextmanager
def yaml_file(body: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(body)
        yield path


def check_resolves(cls, path: Path, stage: str):
    args = argparse.Namespace(config=str(path), preset=None)
    try:
        data = load_yaml(path)
    except ConfigError as err:
        assert str(path) in str(err), str(err)[:300]
        return
    try:
        resolve_config(cls, args, stage=stage)
    except ConfigError as err:
        message = str(err)
        named = (
            [str(path)]
            + [str(k) for k in data]
            + [str(v)[:20] for v in data.values() if not isinstance(v, dict)]
            + [f.name for f in dataclasses.fields(cls)]
        )  # e.g. a required option the file did not give
        assert any(n in message for n in named), message[:300]


@pytest.mark.parametrize("stage", sorted(CLASSES))
@fuzz(50)
@given(data=st.data())
def test_random_yaml_resolves_or_names_the_problem(stage, data):
    cls = CLASSES[stage]
    body = data.draw(st.one_of(mapping(cls).map(dump), st.sampled_from(RAW), values.map(dump)), label="yaml")
    with yaml_file(body) as path:
        check_resolves(cls, path, stage)


@pytest.mark.parametrize("body", RAW, ids=range(len(RAW)))
def test_adversarial_yaml(body):
    for stage, cls in CLASSES.items():
        with yaml_file(body) as path:
            check_resolves(cls, path, stage)


@fuzz(30)
@given(data=st.data())
def test_cli_config_exit_status_and_no_traceback(data, tmp_path_factory):
    rows = tmp_path_factory.getbasetemp() / "rows.jsonl"
    rows.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    body = data.draw(st.one_of(mapping(CheckConfig).map(dump), st.sampled_from(RAW)), label="yaml")
    with yaml_file(body) as path:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["data", "check", "--config", str(path), "--file", str(rows)])
    assert code in (0, 1, 2) and "Traceback" not in out.getvalue() + err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("error: "), err.getvalue()[:300]


# -------------------------------------------------------------------------------- named regressions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr: 1e-4\n", 1e-4),  # YAML 1.1 reads 1e-4 as a string: it used to reach `lr > 0` and raise TypeError
        ("lr: '0.5'\n", 0.5),
        ("max_steps: 1e3\n", 1000),
        ("max_steps: '7'\n", 7),
    ],
)
def test_numbers_given_as_strings_are_read(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    config = build_config(SFTConfig, {**load_yaml(path), "model": "m"})
    assert getattr(config, text.split(":")[0]) == expected


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": "fast"}, "option 'lr' expects a number, got 'fast'"),
        ({"lr": [1]}, "option 'lr' expects a number, got [1]"),
        ({"max_steps": 1.5}, "option 'max_steps' expects an integer, got 1.5"),
        ({"max_steps": None}, "option 'max_steps' expects an integer, got None"),
        ({"max_steps": True}, "option 'max_steps' expects an integer, got True"),
        ({"skip_bad_rows": "maybe"}, "option 'skip_bad_rows' expects true or false, got 'maybe'"),
        ({"out": {"a": 1}}, "option 'out' expects a string, got {'a': 1}"),
        ({"out": "\ud800"}, "option 'out' expects valid Unicode text"),
        ({1: 2, "lr": 0.1}, r"unknown option(s) ['1']"),
        ({None: 2}, r"unknown option(s) ['None']"),
    ],
)
def test_wrong_types_name_the_option_and_value(values, message):
    with pytest.raises(ConfigError) as err:
        build_config(SFTConfig, values, source="c.yaml")
    assert str(err.value).startswith("c.yaml: ") and message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "body, message",
    [
        (bytes(range(256)), ":2: not UTF-8 text"),  # the first bad byte, 0x80, follows the newline 0x0a
        (b"lr: 0.5\nout: \xed\xa0\x80\n", ":2: not UTF-8 text"),
        (b"[" * 1000, "nested too deeply"),
    ],
)
def test_unreadable_yaml_names_the_file(tmp_path, body, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(body)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)


def test_a_bom_is_not_part_of_the_first_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbflr: 0.5\r\n")
    assert build_config(SFTConfig, {**load_yaml(path), "model": "m"}).lr == 0.5


def test_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path)
