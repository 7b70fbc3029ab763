import base64
import dataclasses
import json
import math
import re

import pytest

from preflab.config import ConfigError, build_config, load_preset
from preflab.demo import DEFAULTS, OVERSIGHT_FUNCTIONS, STAGE_FUNCTIONS, DemoConfig, demo, oversight_options


def test_demo_config_validation_and_presets_parse():
    with pytest.raises(ConfigError, match="held_out"):
        DemoConfig(held_out=0.7)
    with pytest.raises(ConfigError, match="temperature"):
        DemoConfig(temperature_low=2.0, temperature_high=1.0)
    for name in ("demo", "fast"):
        config = build_config(DemoConfig, load_preset(name)["demo"], source=name)
        assert isinstance(config.sweep, dict)
        for name in OVERSIGHT_FUNCTIONS:  # and every option of the oversight experiments
            fields = {f.name for f in dataclasses.fields(OVERSIGHT_FUNCTIONS[name].config_class)}
            assert set(oversight_options(config, name)) <= fields, (name, set(oversight_options(config, name)) - fields)
        for section in DemoConfig.__dataclass_fields__:  # every stage option a preset sets exists
            if section == "oversight_stages":
                continue
            options = {**DEFAULTS.get(section, {}), **(getattr(config, section) if section in STAGE_FUNCTIONS else {})}
            fields = {f.name for f in dataclasses.fields(STAGE_FUNCTIONS[section].config_class)} if options else set()
            assert set(options) <= fields, (name, section, set(options) - fields)


def test_oversight_is_off_by_default_and_its_sections_are_checked():
    assert DemoConfig().oversight is False
    with pytest.raises(ConfigError, match="oversight_stages.shfit"):
        DemoConfig(oversight_stages={"shfit": {"n_prompts": 8}})
    with pytest.raises(ConfigError, match="got shift: 8"):
        DemoConfig(oversight_stages={"shift": 8})
    # the config's section overrides the preset's, option by option
    config = DemoConfig(oversight_stages={"shift": {"n_prompts": 8}})
    assert oversight_options(config, "shift") == {**DEFAULTS["oversight_stages"]["shift"], "n_prompts": 8}


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
    a second run with the same seed, its stages one after another instead of side by side, reuses the cached base
    model and writes the same headline.json and the same models."""
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
    # --oversight is off by default: none of its experiments ran, no Oversight section
    assert not any((root / name).exists() for name in ("shift", "oversight", "annotate"))
    assert "<h2>Oversight</h2>" not in text
    headline = json.loads((root / "headline.json").read_text())
    assert len(headline["claims"]) == 6 and headline["claims"] == summary["claims"]
    assert "The lesson's claims" in capsys.readouterr().out

    # PPO, DPO and the beta=0 arm trained side by side (two processes), then eval beside the sweep's measurements
    assert {p.name for p in (root / "logs").iterdir()} == {
        "ppo.log",
        "dpo.log",
        "sweep_beta=0.log",
        "eval.log",
        "sweep.log",
    }
    assert (root / "sweep" / "runs" / "beta=0" / "checkpoints" / "step-00000002").is_dir()

    again = demo(build_config(DemoConfig, {**values, "out": str(tmp_path / "again"), "parallel": False}, source="fast"))
    assert "reusing the base model cached at" in capsys.readouterr().out
    assert not (tmp_path / "again" / "logs").exists()
    assert (tmp_path / "again" / "headline.json").read_text() == (root / "headline.json").read_text()
    assert again["numbers"] == summary["numbers"]
    for model in ("ppo/model", "dpo/model", "sweep/runs/beta=0/model"):
        assert (tmp_path / "again" / model / "model.safetensors").read_bytes() == (
            root / model / "model.safetensors"
        ).read_bytes(), model


def png_titles(text: str) -> dict[str, bytes]:
    """alt text -> decoded PNG of every embedded figure."""
    return {
        alt: base64.b64decode(data)
        for alt, data in re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", text)
    }


@pytest.mark.slow
def test_fast_demo_with_oversight_writes_the_experiments_and_the_report_section(tmp_path, monkeypatch):
    """`--oversight true` on the fast preset: shift/, oversight/ and annotate/<judge>/ written by their stages on
    the demo's artefacts, their numbers in headline.json, and the report's Oversight section with its figures."""
    monkeypatch.setenv("PREFLAB_CACHE_DIR", str(tmp_path / "cache"))
    values = {**load_preset("fast")["demo"], "oversight": True, "run_sweep": False, "out": str(tmp_path / "demo")}
    demo(build_config(DemoConfig, values, source="fast"))
    root = tmp_path / "demo"
    shift = json.loads((root / "shift" / "shift.json").read_text())
    assert set(shift["sets"]) == {"same", "policy", "left_out"} and shift["left_out"] == "add"
    assert shift["policy"] == str(root / "ppo") and shift["reward"] == str(root / "shift" / "reward")
    assert shift["members"] == 1 and all(r["auroc"] is None for r in shift["sets"].values())  # no ensemble: no alarm
    reward_config = (root / "shift" / "reward" / "config.yaml").read_text()
    assert "exclude_kind: add" in reward_config
    over = json.loads((root / "oversight" / "oversight.json").read_text())
    assert set(over["votes"]) == {"full", "limited", "aid@1"} and over["config"]["model"] == str(root / "sft")
    assert set(over["dpo"]["training"]) == {"full", "limited", "aid@1"}  # the fast preset's dpo_steps: 2
    assert all(
        json.loads((root / "oversight" / "dpo" / a / "summary.json").read_text())["steps"] == 2 for a in over["votes"]
    )
    for judge, spec in (("world", "world"), ("function", "preflab.world.rewards:length_closeness")):
        s = json.loads((root / "annotate" / judge / "summary.json").read_text())
        assert s["judge"] == spec and s["pairs"] == len((root / "votes" / "heldout.jsonl").read_text().splitlines())
        assert s["people_votes"] > 0 and s["pairs_without_people"] == 0  # every held-out pair has its vote
        assert 0 <= s["people_agreement_low"] <= s["people_agreement"] <= s["people_agreement_high"] <= 1
    assert json.loads((root / "annotate" / "world" / "summary.json").read_text())["agreement"] == 1.0
    headline = json.loads((root / "headline.json").read_text())
    assert "oversight: bluff rate on unverifiable questions, full / limited raters" in headline
    assert "annotate world: agreement with truth / people" in headline
    assert "oversight: DPO on full / limited raters' votes, bluff rate on unverifiable questions" in headline
    text = (root / "report.html").read_text()
    assert "<h2>Oversight</h2>" in text and "no disagreement alarm" in text
    assert "A policy trained on each vote set: DPO, 2 steps from the SFT policy" in text
    images = png_titles(text)
    for title in ("Reward model under distribution shift", "Raters who cannot judge, and the oversight aid"):
        assert images[title][:4] == b"\x89PNG", title
    assert "preflab.world.rewards:length_closeness" in text
