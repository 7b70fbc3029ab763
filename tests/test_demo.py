import base64
import dataclasses
import json
import math
import re

import pytest

from preflab.config import ConfigError, build_config, load_preset
from preflab.demo import DEFAULTS, STAGE_FUNCTIONS, DemoConfig, demo


def test_demo_config_validation_and_presets_parse():
    with pytest.raises(ConfigError, match="held_out"):
        DemoConfig(held_out=0.7)
    with pytest.raises(ConfigError, match="temperature"):
        DemoConfig(temperature_low=2.0, temperature_high=1.0)
    for name in ("demo", "fast"):
        config = build_config(DemoConfig, load_preset(name)["demo"], source=name)
        assert isinstance(config.sweep, dict)
        for section in DemoConfig.__dataclass_fields__:  # every stage option a preset sets exists
            options = {**DEFAULTS.get(section, {}), **(getattr(config, section) if section in STAGE_FUNCTIONS else {})}
            fields = {f.name for f in dataclasses.fields(STAGE_FUNCTIONS[section].config_class)} if options else set()
            assert set(options) <= fields, (name, section, set(options) - fields)


def test_the_ppo_run_doubles_as_the_sweep_arm_only_when_their_options_agree(tmp_path):
    from preflab.demo import shared_ppo_run

    config = DemoConfig(out=str(tmp_path))
    shared = shared_ppo_run(config, tmp_path, tmp_path / "reward")
    steps = DEFAULTS["sweep"]["steps"]
    assert shared == {
        "options": {
            "max_steps": max(steps),
            "checkpoint_every": math.gcd(*steps),
            "keep_checkpoints": max(steps) // math.gcd(*steps),
        },
        "label": f"beta={DEFAULTS['ppo']['beta']:g}",
        "steps": DEFAULTS["ppo"]["max_steps"],
    }
    assert shared_ppo_run(dataclasses.replace(config, ppo={"lr": 3e-4}), tmp_path, tmp_path / "reward") is None
    assert shared_ppo_run(dataclasses.replace(config, ppo={"beta": 0.05}), tmp_path, tmp_path / "reward") is None
    assert shared_ppo_run(dataclasses.replace(config, ppo={"max_steps": 7}), tmp_path, tmp_path / "reward") is None
    assert shared_ppo_run(dataclasses.replace(config, run_sweep=False), tmp_path, tmp_path / "reward") is None


@pytest.mark.slow
def test_fast_demo_end_to_end_twice_gives_the_same_headline(tmp_path, monkeypatch, capsys):
    """The `fast` preset, end to end: every artefact exists, every figure is a finite PNG, SFT beats the base model;
    a second run with the same seed reuses the cached base model and writes the same headline.json."""
    monkeypatch.setenv("PREFLAB_CACHE_DIR", str(tmp_path / "cache"))
    values = load_preset("fast")["demo"]
    summary = demo(build_config(DemoConfig, {**values, "out": str(tmp_path / "demo")}, source="fast"))
    root = tmp_path / "demo"
    for rel in [
        "pretrain/model/config.json",
        "sft/model/config.json",
        "generate/pairs.jsonl",
        "votes/train.jsonl",
        "votes/heldout.jsonl",
        "reward/summary.json",
        "bias/bias.json",
        "ppo/model/config.json",
        "dpo/model/config.json",
        "eval/eval.json",
        "eval/eval.md",
        "sweep/sweep.json",
        "headline.json",
        "timings.json",
        "report.html",
    ]:
        assert (root / rel).exists(), rel
    ev = json.loads((root / "eval" / "eval.json").read_text())
    assert set(ev["policies"]) == {"sft", "base", "ppo", "dpo", "bon2"}
    for row in ev["policies"].values():
        assert math.isfinite(row["true_utility"]["mean"]) and math.isfinite(row["kl"])
    # SFT beats the base (pretrained) model on the true utility
    assert ev["policies"]["sft"]["true_utility"]["mean"] > ev["policies"]["base"]["true_utility"]["mean"]
    text = (root / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) == 5 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    sweep = json.loads((root / "sweep" / "sweep.json").read_text())
    assert sorted({p["steps"] for p in sweep["points"]}) == [1, 2]
    # the PPO run is also the sweep's beta=0.2 arm: measured from its checkpoints, not trained twice
    shared = [p for p in sweep["points"] if p["arm"] == "beta=0.2"]
    assert [p["run"] for p in shared] == [str(root / "ppo" / "checkpoints" / f"step-0000000{n}") for n in (1, 2)]
    assert not (root / "sweep" / "runs" / "beta=0.2").exists()
    assert all(math.isfinite(p["true_utility"]) and math.isfinite(p["proxy"]) for p in sweep["points"])
    assert 0.5 <= json.loads((root / "votes" / "annotators.json").read_text())["ceiling_accuracy"] <= 1.0
    headline = json.loads((root / "headline.json").read_text())
    assert len(headline["claims"]) == 6 and headline["claims"] == summary["claims"]
    assert "The lesson's claims" in capsys.readouterr().out

    again = demo(build_config(DemoConfig, {**values, "out": str(tmp_path / "again")}, source="fast"))
    assert "reusing the base model cached at" in capsys.readouterr().out
    assert (tmp_path / "again" / "headline.json").read_text() == (root / "headline.json").read_text()
    assert again["numbers"] == summary["numbers"]
