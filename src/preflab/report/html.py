"""`preflab report RUN_DIR`: one self-contained HTML file (figures as base64 PNGs, no external files).

1. find what the folder holds: every run folder with a metrics.jsonl (the folder itself and its
   sub-folders), an eval.json + samples.jsonl (`preflab eval policy`), a sweep.json (`preflab eval sweep`),
   a demo summary (headline.json), reward and bias-audit summaries
2. draw the figures that have data: training curves, the reward-vs-KL frontier, true vs proxy reward
   along the sweep with the Gao et al. fit, length drift, reward-model calibration against the truth
3. write report.html with the headline table, the gain by component, the figures and sample responses, and
   (a demo run with --oversight true: shift/, oversight/, annotate/) the Oversight section
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from preflab.config import check, opt
from preflab.report import figures
from preflab.runs import read_metrics
from preflab.stages import stage


@dataclass
class ReportConfig:
    run_dir: str = opt("", "the run folder to report on (a demo folder or any stage's run folder)", positional=True)
    out: str = opt("", "the HTML file to write (default RUN_DIR/report.html)")
    n_samples: int = opt(8, "sample responses shown per policy")

    def __post_init__(self):
        check(bool(self.run_dir), "give the run folder: preflab report RUN_DIR")
        check(Path(self.run_dir).is_dir(), f"run folder {self.run_dir!r} does not exist")
        check(self.n_samples >= 0, f"n_samples must be >= 0, got {self.n_samples}")


def _find(root: Path, name: str) -> Path | None:
    """The shallowest file called `name` under root (sweep sub-runs are deeper than the demo's own)."""
    hits = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _load_json(path: Path | None):
    return json.loads(path.read_text()) if path and path.exists() else None


# Stages whose metrics.jsonl rows are not training steps (one row per policy, sweep point or audit): they are
# shown as tables and figures of their own, never as curves against a step.
NOT_TRAINING = {"eval", "sweep", "bias", "bon", "eval-reward", "eval-shift", "eval-oversight", "annotate"}


def _stage_of(folder: Path) -> str | None:
    import yaml

    path = folder / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("stage") if path.exists() else None


def find_runs(root: Path, max_depth: int = 2) -> dict[str, list[dict]]:
    """Relative name -> metrics rows, for every training run folder with metrics (sweep sub-runs skipped)."""
    runs = {}
    for path in sorted(root.rglob("metrics.jsonl")):
        rel = path.parent.relative_to(root)
        if len(rel.parts) > max_depth or _stage_of(path.parent) in NOT_TRAINING:
            continue
        rows = read_metrics(path.parent)
        if rows:
            runs[str(rel) if rel.parts else root.name] = rows
    return runs


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def proxy_tables(evaluation: dict) -> str:
    """An evaluation on the user's own prompts: no true utility, the proxy reward and what needs no truth."""
    from preflab.evaluate.policy import NO_TRUE_UTILITY

    rows = []
    for name, r in evaluation["policies"].items():
        p, g = r.get("proxy_reward"), r.get("proxy_gain")
        rows.append(
            [
                name,
                f"{p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}]" if p else "-",
                f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "-",
                r.get("win_rate_proxy", float("nan")),
                r.get("lc_win_rate_proxy", float("nan")),
                ("&le; " if r.get("kl_is_bound") else "") + f"{r['kl']:.3f}",
                r["mean_length"],
            ]
        )
    head = [
        "policy",
        "proxy reward [95% CI]",
        "proxy gain vs reference [95% CI]",
        "win rate (RM)",
        "LC win rate (RM)",
        "KL to reference",
        "mean length",
    ]
    return f"<p class='note'>{html.escape(NO_TRUE_UTILITY)}</p>" + _table(head, rows).replace("&amp;le; ", "&le; ")


def policy_tables(evaluation: dict) -> str:
    from preflab.world import COMPONENTS

    if "true_utility" not in next(iter(evaluation["policies"].values())):
        return proxy_tables(evaluation)
    rows, gains = [], []
    for name, r in evaluation["policies"].items():
        u, g = r["true_utility"], r["gain"]
        rows.append(
            [
                name,
                f"{u['mean']:.3f} [{u['low']:.3f}, {u['high']:.3f}]",
                f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]",
                r.get("proxy_reward", {}).get("mean", float("nan")),
                r["win_rate_true"],
                r["lc_win_rate_true"],
                r.get("win_rate_proxy", float("nan")),
                ("&le; " if r.get("kl_is_bound") else "") + f"{r['kl']:.3f}",
                r["mean_length"],
            ]
        )
        gains.append(
            [name]
            + [
                f"{r['gain_by_component'][c]['mean']:+.3f} [{r['gain_by_component'][c]['low']:+.3f}, "
                f"{r['gain_by_component'][c]['high']:+.3f}]"
                for c in COMPONENTS
            ]
        )
    head = [
        "policy",
        "true utility [95% CI]",
        "gain vs reference [95% CI]",
        "proxy reward",
        "win rate (true)",
        "LC win rate (true)",
        "win rate (RM)",
        "KL to reference",
        "mean length",
    ]
    out = _table(head, rows).replace("&amp;le; ", "&le; ")
    out += "<h3>Gain over the reference by component (paired by prompt, 95% CI)</h3>"
    out += _table(["policy", *COMPONENTS], gains)
    return out


def claims_table(claims: list[dict]) -> str:
    """Each of the lesson's claims with its verdict and the interval that decided it."""
    mark = {True: "holds", False: "FAILED", None: "not measured"}
    return _table(
        ["claim", "verdict", "evidence (95% intervals)"],
        [[c["claim"], mark[c["holds"]], c["evidence"]] for c in claims],
    )


def outcomes_table(evaluation: dict) -> str:
    """Right / hedged / wrong answers per question kind and policy: a gain made of hedging shows at a glance."""
    policies = {n: r for n, r in evaluation["policies"].items() if "outcomes_by_kind" in r}
    if not policies:
        return ""
    kinds = list(next(iter(policies.values()))["outcomes_by_kind"])
    rows = [
        [name]
        + [
            f"{r['outcomes_by_kind'][k]['right']:.0%} / {r['outcomes_by_kind'][k]['hedge']:.0%} / "
            f"{r['outcomes_by_kind'][k]['wrong']:.0%}"
            for k in kinds
        ]
        for name, r in policies.items()
    ]
    return _table(["policy", *(f"{k}: right / hedged / wrong" for k in kinds)], rows)


def sample_table(samples: list[dict], n: int) -> str:
    from preflab.world import question_of

    policies = list(dict.fromkeys(s["policy"] for s in samples))
    by = {p: [s for s in samples if s["policy"] == p] for p in policies}
    rows = []
    for i in range(min(n, min(len(v) for v in by.values()))):
        cells = []
        for p in policies:
            value = by[p][i]["utility"] if by[p][i].get("utility") is not None else by[p][i].get("proxy")
            cells.append(by[p][i]["response"] + (f"  [{value:+.2f}]" if value is not None else ""))
        rows.append([question_of(by[policies[0]][i]["prompt"])] + cells)
    return _table(["prompt", *policies], rows)


def _ci(e: dict | None, digits: int = 3, sign: str = "") -> str:
    if not e or not isinstance(e.get("mean"), (int, float)) or not math.isfinite(e["mean"]):
        return "n/a"
    return f"{e['mean']:{sign}.{digits}f} [{e['low']:{sign}.{digits}f}, {e['high']:{sign}.{digits}f}]"


def _img(title: str, fig) -> str:
    return f"<img alt='{html.escape(title)}' src='data:image/png;base64,{figures.png_base64(fig)}'>"


def oversight_dpo_table(over: dict) -> str:
    """`eval oversight --dpo-steps N`: the DPO policy trained on each vote set, on the questions the limited
    raters could not verify, against the SFT policy."""
    c, d = over["config"], over["dpo"]
    t = d["table"]["unverified"]
    rows = []
    for arm, e in t.items():
        if arm == "prompts":
            continue
        rows.append(
            [
                f"sft ({c['bon_n']} samples)" if arm == "sft" else f"dpo on {arm} votes",
                _ci(e["true_utility"], 2, "+"),
                f"{e['right_rate']['mean']:.0%}",
                _ci(e["bluff_rate"], 2),
                _ci(e.get("bluff_gain"), 2, "+") if arm != "sft" else "-",
                _ci(e.get("proxy_gain"), 2, "+") if arm != "sft" else "-",
                _ci(e.get("bluff_vs_full"), 2, "+") if "bluff_vs_full" in e else "-",
            ]
        )
    shares = ", ".join(f"recall {r}: {_ci(e, 2, '+')}" for r, e in d["recovered"]["unverified"].items())
    return (
        f"<h4>A policy trained on each vote set: DPO, {c['dpo_steps']} steps from the SFT policy</h4><p class='note'>"
        f"on the {t['prompts']} questions the raters could not verify; {c['dpo_samples']} samples per prompt of each "
        "policy; gains against the SFT policy paired by prompt; proxy: the arm's own reward model. Lost true utility "
        f"the aid recovers with DPO: {html.escape(shares)}.</p>"
        + _table(
            [
                "policy",
                "true utility [95% CI]",
                "right answers",
                "bluff rate [95% CI]",
                "bluffs vs sft [95% CI]",
                "proxy gain vs sft [95% CI]",
                "bluffs vs dpo on full votes [95% CI]",
            ],
            rows,
        )
    )


def oversight_section(root: Path) -> tuple[str, int]:
    """(html, figures drawn) of the Oversight section, from what `preflab demo --oversight true` wrote under root:
    shift/shift.json, oversight/oversight.json, annotate/<judge>/summary.json; ('', 0) when none is there."""
    shift = _load_json(root / "shift" / "shift.json")
    over = _load_json(root / "oversight" / "oversight.json")
    judges = {path.parent.name: json.loads(path.read_text()) for path in sorted(root.glob("annotate/*/summary.json"))}
    if not (shift or over or judges):
        return "", 0
    parts, drawn = ["<h2>Oversight</h2>"], 0
    if shift:
        alarm = (
            "with an ensemble of {} members: the alarm is the AUROC with which their disagreement ranks the reward "
            "model's wrong calls above its right ones".format(shift["members"])
            if shift["members"] > 1
            else "one reward model, so no disagreement alarm (run the demo with --ensemble K, K > 1, for it)"
        )
        title = "Reward model under distribution shift"
        parts.append(
            f"<h3>{title}</h3><p class='note'>{html.escape(shift_note(shift))} {html.escape(alarm)}</p>"
            + _img(title, figures.shift_accuracy(shift))
        )
        drawn += 1
        from preflab.evaluate.shift import SETS

        parts.append(
            _table(
                ["set", "pairs (counted / all)", "accuracy [95% CI]", "mean disagreement", "alarm AUROC [95% CI]"],
                [
                    [
                        SETS[n],
                        f"{r['counted']} / {r['pairs']}",
                        _ci(r["accuracy"]),
                        r["mean_disagreement"] if r["mean_disagreement"] is not None else "n/a",
                        _ci(r["auroc"]),
                    ]
                    for n, r in shift["sets"].items()
                ],
            )
        )
    if over:
        c = over["config"]
        title = "Raters who cannot judge, and the oversight aid"
        parts.append(
            f"<h3>{title}</h3><p class='note'>raters who know {c['knowledge']:.0%} of the facts judge the rest by "
            f"surface cues; best-of-{c['bon_n']} of the SFT policy against a reward model per vote set, on "
            f"{over['n_prompts']} held-out prompts ({over['verifiable_prompts']} the raters could verify); the aid "
            f"(a critique) at precision {c['aid_precision']:g}. Left: the share of the true utility lost to the "
            "raters' ignorance that the aid gives back; right: confident wrong answers on the questions they "
            "could not verify.</p>" + _img(title, figures.oversight_recovery(over))
        )
        drawn += 1
        parts.append(
            _table(
                ["votes", "agreement with the true utility", "cast without knowing the fact"],
                [
                    [arm, v["agreement_with_true_utility"], f"{v['blind_share']:.0%}"]
                    for arm, v in over["votes"].items()
                ],
            )
        )
        if over.get("dpo"):
            parts.append(oversight_dpo_table(over))
    if judges:
        parts.append(
            "<h3>AI judges on the held-out pairs</h3><p class='note'>agreement with the true utility (pairs of "
            "unequal utility) and with the simulated people's votes on the same pairs (their ties left out); a "
            "judge's tie counts 0.5; 95% bootstrap intervals</p>"
            + _table(
                ["judge", "pairs", "agreement with the truth [95% CI]", "agreement with the people [95% CI]"],
                [
                    [
                        s["judge"],
                        s["pairs"],
                        _ci(
                            {"mean": s.get("agreement"), "low": s.get("agreement_low"), "high": s.get("agreement_high")}
                        ),
                        _ci(
                            {
                                "mean": s.get("people_agreement"),
                                "low": s.get("people_agreement_low"),
                                "high": s.get("people_agreement_high"),
                            }
                        ),
                    ]
                    for s in judges.values()
                ],
            )
        )
    return "".join(parts), drawn


def shift_note(shift: dict) -> str:
    note = (
        "Pairwise accuracy against the world's true utility on held-out pairs (those of equal utility left out): "
        "two SFT samples (the distribution the votes came from) and the optimised policy's samples"
    )
    if shift.get("left_out"):
        return note + (
            f", and two SFT samples of '{shift['left_out']}' questions, a kind this reward model never saw judged "
            "(in the demo: one trained like the demo's, that kind's votes dropped, not the one PPO optimised)."
        )
    return note + "."


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%}h2{border-bottom:1px solid #ddd}.note{color:#555;font-size:13px}"
)


def seeds_report(root: Path, seeds: dict) -> tuple[str, dict]:
    """The page of a multi-seed demo (`preflab demo --seeds`): each claim's verdict on every seed, the spread of
    the headline numbers, and a link to each seed's own report."""
    mark = {True: "holds", False: "FAILED", None: "not measured"}
    names = [f"seed {s}" for s in seeds["seeds"]]
    claims = [[c, *(mark[v] for v in vs)] for c, vs in seeds["claims"].items()]
    spread = [
        [k, f"{v['mean']:+.3f}", f"{v['min']:+.3f}", f"{v['max']:+.3f}", *(f"{x:+.3f}" for x in v["values"])]
        for k, v in seeds["numbers"].items()
    ]
    links = " ".join(f"<a href='seed-{s}/report.html'>seed {s}</a>" for s in seeds["seeds"])
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>preflab report: {html.escape(root.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>preflab report: {html.escape(str(root))}</h1>"
        f"<p>One demo per seed; each seed's own report: {links}</p>"
        "<h2>The lesson's claims on every seed</h2><p class='note'>on each seed a claim holds only when its 95% "
        "interval supports it; a claim that fails on any seed is shown as failed there</p>"
        + _table(["claim", *names], claims)
        + "<h2>The headline's spread over seeds</h2>"
        + _table(["number", "mean", "min", "max", *names], spread)
        + "</body></html>"
    )
    return text, {"runs": len(seeds["seeds"]), "eval": False, "sweep": False, "figures": 0, "calibration_bins": 0}


def build_report(root: Path, n_samples: int = 8) -> tuple[str, dict]:
    """(html text, what was found) for a run folder (or a multi-seed demo folder with seeds.json)."""
    if (root / "seeds.json").exists():
        return seeds_report(root, json.loads((root / "seeds.json").read_text()))
    evaluation = _load_json(_find(root, "eval.json"))
    sweep_data = _load_json(_find(root, "sweep.json"))
    headline = _load_json(root / "headline.json")
    samples_path = _find(root, "samples.jsonl")
    samples = [json.loads(x) for x in samples_path.read_text().splitlines()] if samples_path else []
    runs = find_runs(root)
    calib = figures.calibration_table(samples, evaluation["reference"]) if evaluation and samples else []

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>preflab report: {html.escape(root.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>preflab report: {html.escape(str(root))}</h1>"
    ]
    if headline:
        claims = headline.get("claims", [])
        parts.append(
            "<h2>Headline</h2>" + _table(["figure", "value"], [[k, v] for k, v in headline.items() if k != "claims"])
        )
        if claims:
            parts.append(
                "<h2>The lesson's claims</h2><p class='note'>each holds only when its 95% interval supports "
                "it; a failed claim is shown as failed</p>" + claims_table(claims)
            )
    if evaluation and outcomes_table(evaluation):
        parts.append(
            "<h2>Answers by question kind</h2><p class='note'>a hedge (\"I am not sure\") scores 0 on "
            "correctness: a gain in true utility with fewer right answers is a gain made of hedging</p>"
            + outcomes_table(evaluation)
        )
    if samples and n_samples:
        parts.append("<h2>Sample responses (true utility in brackets)</h2>" + sample_table(samples, n_samples))
    if evaluation:
        where = "held-out" if evaluation.get("has_true_utility", True) else "of your own"
        parts.append(f"<h2>Policies on {evaluation['n_prompts']} prompts {where}</h2>" + policy_tables(evaluation))
    drawn = {}
    for title, fig, note in [
        ("Training curves", figures.training_curves(runs), "from each stage's metrics.jsonl"),
        (
            "Ensemble disagreement beside true utility",
            figures.disagreement_curves(runs),
            "mean std of the --monitor-ensemble members' rewards on each step's samples, and their true utility",
        ),
        ("Reward vs KL frontier", figures.frontier(evaluation, sweep_data), "KL of best-of-n is the analytic bound"),
        (
            "True vs proxy reward (over-optimisation)",
            figures.true_vs_proxy(sweep_data),
            "Gao, Schulman and Hilton (2022): R(d) = d (a - b log d), d = sqrt(KL)",
        ),
        ("Length drift", figures.length_drift(evaluation, sweep_data), "mean response length in tokens"),
        ("Calibration", figures.calibration(calib), "pairs of (policy, reference) responses to one held-out prompt"),
    ]:
        if fig is None:
            continue
        drawn[title] = True
        parts.append(
            f"<h2>{title}</h2><p class='note'>{html.escape(note)}</p>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{figures.png_base64(fig)}'>"
        )
    oversight_html, oversight_figures = oversight_section(root)
    if oversight_html:
        parts.append(oversight_html)
    if sweep_data:
        rows = [
            [p["arm"], p["steps"], p["kl"], p["sqrt_kl"], p["true_utility"], p["proxy"]]
            + [f"{p['right_answer_rate']:.0%}" if "right_answer_rate" in p else "-", p["length"]]
            for p in sweep_data["points"]
        ]
        parts.append(
            "<h2>Sweep points</h2>"
            + _table(["arm", "steps", "KL", "sqrt KL", "true utility", "proxy", "right answers", "length"], rows)
        )
    if calib:
        parts.append(
            "<h2>Calibration table</h2>"
            + _table(
                ["bin", "n", "predicted", "observed"],
                [[r["bin"], r["n"], r["predicted"], r["observed"]] for r in calib],
            )
        )
    parts.append("</body></html>")
    found = {
        "runs": len(runs),
        "eval": evaluation is not None,
        "sweep": sweep_data is not None,
        "figures": len(drawn) + oversight_figures,
        "calibration_bins": len(calib),
        "oversight": bool(oversight_html),
    }
    return "\n".join(parts), found


@stage(ReportConfig)
def report(config: ReportConfig) -> dict:
    root = Path(config.run_dir)
    text, found = build_report(root, config.n_samples)
    out = Path(config.out) if config.out else root / "report.html"
    out.write_text(text, encoding="utf-8")
    print(f"[report] {out} ({found['figures']} figures, {found['runs']} runs)", flush=True)
    return {"report": str(out), **found}
