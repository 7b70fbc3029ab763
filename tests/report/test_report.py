import base64
import json
import re

import pytest

from preflab.config import ConfigError
from preflab.evaluate.policy import score, summarise
from preflab.evaluate.sweep import fit_arm
from preflab.report.figures import calibration_table
from preflab.report.html import ReportConfig, report
from preflab.reward.interface import function_reward
from preflab.world import prompts as world_prompts

PROMPTS = world_prompts(6, seed=0, split="eval")


def _fake_policy(texts, kl):
    return {
        "texts": texts,
        "lengths": [len(t.split()) for t in texts],
        "finished": [True] * len(texts),
        "kl": [kl] * len(texts),
    }


def make_demo_folder(root):
    """A folder shaped like a demo run: stage sub-runs with metrics, an eval and a sweep."""
    (root / "ppo").mkdir(parents=True)
    with open(root / "ppo" / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(
                json.dumps({"step": step, "ppo/objective/scores": 0.1 * step, "ppo/objective/kl": 0.05 * step}) + "\n"
            )
    reward = function_reward(lambda p, r: float(len(r.split())))
    sft = score(PROMPTS, _fake_policy(["I am not sure."] * 6, 0.0), reward)
    ppo = score(PROMPTS, _fake_policy(["Sure! I am not sure. Thanks for asking."] * 6, 2.0), reward)
    (root / "eval").mkdir()
    table = summarise({"sft": sft, "ppo": ppo}, "sft")
    (root / "eval" / "eval.json").write_text(json.dumps({"reference": "sft", "n_prompts": 6, "policies": table}))
    with open(root / "eval" / "samples.jsonl", "w") as f:
        for name, s in (("sft", sft), ("ppo", ppo)):
            for i, p in enumerate(PROMPTS):
                f.write(
                    json.dumps(
                        {
                            "policy": name,
                            "prompt": p,
                            "response": s["texts"][i],
                            "length": s["lengths"][i],
                            "utility": s["utility"][i],
                            "proxy": s["proxy"][i],
                            "kl": s["kl"][i],
                        }
                    )
                    + "\n"
                )
    points = [
        {
            "arm": "beta=0",
            "beta": 0.0,
            "steps": n,
            "kl": kl,
            "sqrt_kl": kl**0.5,
            "true_utility": u,
            "proxy": pr,
            "length": 8 + n,
        }
        for n, kl, u, pr in [(5, 0.5, 0.3, 0.5), (10, 2.0, 0.4, 1.2), (20, 6.0, -0.2, 2.0)]
    ]
    base = {"kl": 0.0, "sqrt_kl": 0.0, "true_utility": 0.0, "proxy": 0.0, "length": 8.0}
    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.json").write_text(
        json.dumps({"reference": base, "points": points, "fits": {"beta=0": fit_arm(points, 0.0)}})
    )
    for stage in ("eval", "sweep"):  # one row per policy / sweep point: never to be drawn as training curves
        (root / stage / "config.yaml").write_text(f"stage: {stage}\n")
        (root / stage / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i, f"{stage}/x": i}) + "\n" for i in range(3))
        )
    claims = [
        {"claim": "PPO beats SFT on true utility", "holds": True, "evidence": "gain +0.5 [+0.2, +0.8]"},
        {"claim": "PPO gains right answers (not only hedges)", "holds": False, "evidence": "-0.1 [-0.3, +0.1]"},
    ]
    (root / "headline.json").write_text(json.dumps({"ppo_gain": 0.5, "claims": claims}))


def test_report_embeds_every_figure_as_png(tmp_path):
    make_demo_folder(tmp_path / "demo")
    summary = report(ReportConfig(run_dir=str(tmp_path / "demo")))
    text = (tmp_path / "demo" / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert summary["figures"] == len(images) == 5
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='http" not in text and "<link" not in text  # self-contained
    assert "ppo_gain" in text and "Sample responses" in text and "I am not sure." in text
    assert summary["eval"] and summary["sweep"] and summary["runs"] == 1  # eval and sweep are not curves
    assert "<td>PPO gains right answers (not only hedges)</td><td>FAILED</td>" in text
    assert "Answers by question kind" in text and "capital: right / hedged / wrong" in text
    assert text.index("Answers by question kind") < text.index("Sample responses") < text.index("<img")


def test_report_on_a_bare_training_run_draws_only_curves(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "sft/loss": 3.0 / s}) + "\n" for s in range(1, 4))
    )
    summary = report(ReportConfig(run_dir=str(run), out=str(tmp_path / "r.html")))
    assert summary["figures"] == 1 and (tmp_path / "r.html").exists()


def test_report_draws_ensemble_disagreement_beside_true_utility(tmp_path):
    run = tmp_path / "ppo"
    run.mkdir()
    rows = [{"step": s, "ppo/ensemble/disagreement": 0.2 * s, "ppo/true_utility": 1.0 - 0.3 * s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = report(ReportConfig(run_dir=str(run), out=str(tmp_path / "r.html")))
    text = (tmp_path / "r.html").read_text()
    assert summary["figures"] == 2 and "<h2>Ensemble disagreement beside true utility</h2>" in text
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "ppo/true_utility": 0.0}) + "\n" for s in (1, 2)))
    assert (
        report(ReportConfig(run_dir=str(run), out=str(tmp_path / "r.html")))["figures"] == 1
    )  # no ensemble: no figure


def test_calibration_pairs_policy_with_reference_samples():
    rows = [
        {"policy": "sft", "prompt": "q", "response": "a", "utility": 0.0, "proxy": 0.0},
        {"policy": "sft", "prompt": "q", "response": "b", "utility": 1.0, "proxy": 0.0},
        {"policy": "ppo", "prompt": "q", "response": "c", "utility": 1.0, "proxy": 3.0},
        {"policy": "ppo", "prompt": "q", "response": "d", "utility": 0.0, "proxy": -3.0},
    ]
    table = calibration_table(rows, "sft", bins=2)
    assert [(r["n"], r["observed"]) for r in table] == [(1, 0.0), (1, 1.0)]


def test_report_config_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ReportConfig(run_dir=str(tmp_path / "nope"))


def test_report_on_an_eval_of_own_prompts_without_true_utility(tmp_path):
    """`preflab eval policy --prompts FILE` has no true utility: the report shows the proxy table and samples."""
    own = ["Write a haiku about rain.", "Say hi."]
    reward = function_reward(lambda p, r: float(len(r.split())))
    base = score(own, _fake_policy(["Rain.", "Hi."], 0.0), reward, world=False)
    tuned = score(own, _fake_policy(["Rain on the roof.", "Hi there."], 1.0), reward, world=False)
    root = tmp_path / "eval"
    root.mkdir()
    (root / "eval.json").write_text(
        json.dumps(
            {
                "reference": "base",
                "n_prompts": 2,
                "has_true_utility": False,
                "policies": summarise({"base": base, "tuned": tuned}, "base"),
            }
        )
    )
    with open(root / "samples.jsonl", "w") as f:
        for name, s in (("base", base), ("tuned", tuned)):
            for i, p in enumerate(own):
                f.write(
                    json.dumps(
                        {
                            "policy": name,
                            "prompt": p,
                            "response": s["texts"][i],
                            "length": s["lengths"][i],
                            "utility": None,
                            "proxy": s["proxy"][i],
                            "kl": s["kl"][i],
                        }
                    )
                    + "\n"
                )
    summary = report(ReportConfig(run_dir=str(root)))
    text = (root / "report.html").read_text()
    assert "True utility needs the built-in world" in text and "proxy gain vs reference" in text
    assert "Rain on the roof.  [+4.00]" in text
    assert summary["figures"] == 2  # the frontier (proxy against KL) and length drift; no calibration


def test_a_multi_seed_demo_folder_reports_each_claim_on_every_seed(tmp_path):
    seeds = {
        "seeds": [0, 1],
        "claims": {"PPO beats SFT on true utility": [True, False], "the planted length bias is found": [True, True]},
        "numbers": {"ppo: gain vs sft": {"values": [0.2, -0.1], "mean": 0.05, "min": -0.1, "max": 0.2}},
    }
    (tmp_path / "seeds.json").write_text(json.dumps(seeds))
    assert report(ReportConfig(run_dir=str(tmp_path)))["runs"] == 2
    page = (tmp_path / "report.html").read_text()
    row = re.search(r"<tr><td>PPO beats SFT on true utility</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(\w+)</td>", row) == ["holds", "FAILED"]
    assert "href='seed-1/report.html'" in page and "+0.050" in page


def _estimate(mean, low, high, n=8):
    return {"mean": mean, "low": low, "high": high, "n": n}


def make_oversight_folders(root):
    """What `preflab demo --oversight true` adds, by hand: shift/, oversight/ and annotate/<judge>/."""
    sets = {
        "same": _estimate(0.9, 0.8, 0.97),
        "policy": _estimate(0.7, 0.55, 0.85),
        "left_out": _estimate(0.6, 0.45, 0.75),
    }
    shift = {
        "reward": "r",
        "members": 3,
        "left_out": "add",
        "sets": {
            name: {
                "pairs": 10,
                "counted": 8,
                "accuracy": acc,
                "mean_disagreement": 0.2,
                "auroc": _estimate(0.71, 0.52, 0.88),
            }
            for name, acc in sets.items()
        },
    }
    arms = ["sft", "full", "limited", "aid@0.5", "aid@1"]
    over = {
        "config": {"knowledge": 0.5, "bon_n": 4, "aid_precision": 1.0, "recalls": [0.5, 1.0]},
        "n_prompts": 10,
        "verifiable_prompts": 4,
        "votes": {a: {"agreement_with_true_utility": 0.8, "blind_share": 0.5} for a in arms[1:]},
        "table": {"unverified": {"prompts": 6, **{a: {"bluff_rate": _estimate(0.2, 0.1, 0.3)} for a in arms}}},
        "recovered": {
            s: {"0.5": _estimate(0.4, 0.1, 0.7), "1": _estimate(0.9, 0.5, 1.2)} for s in ("unverified", "all")
        },
    }
    for rel, data in [
        ("shift/shift.json", shift),
        ("oversight/oversight.json", over),
        (
            "annotate/world/summary.json",
            {
                "judge": "world",
                "pairs": 5,
                "agreement": 1.0,
                "agreement_low": 1.0,
                "agreement_high": 1.0,
                "people_agreement": 0.7,
                "people_agreement_low": 0.5,
                "people_agreement_high": 0.9,
            },
        ),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))


def test_report_oversight_section_only_where_its_folders_are(tmp_path):
    make_demo_folder(tmp_path)
    summary = report(ReportConfig(run_dir=str(tmp_path)))
    assert not summary["oversight"] and "<h2>Oversight</h2>" not in (tmp_path / "report.html").read_text()
    make_oversight_folders(tmp_path)
    again = report(ReportConfig(run_dir=str(tmp_path)))
    text = (tmp_path / "report.html").read_text()
    assert again["oversight"] and again["figures"] == summary["figures"] + 2
    images = dict(re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", text))
    for title in ("Reward model under distribution shift", "Raters who cannot judge, and the oversight aid"):
        assert base64.b64decode(images[title])[:4] == b"\x89PNG", title
    assert "0.710 [0.520, 0.880]" in text and "ensemble of 3 members" in text  # the alarm, with an ensemble
    assert "<td>world</td><td>5</td><td>1.000 [1.000, 1.000]</td><td>0.700 [0.500, 0.900]</td>" in text
