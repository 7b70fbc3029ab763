"""`preflab eval reward`: can this reward model be trusted, and where is it weak?

    1. load the reward model (or ensemble) and the comparisons (all rows, or the train / held-out side of the
       same reproducible split `preflab reward` used)
    2. score every chosen and rejected response in token space (prompt ids + completion ids, as in training)
    3. pairwise strict accuracy r_w > r_l, overall and per `subset`; RewardBench-style sections where subsets
       are named `section/subset`: a section's accuracy pools its subsets' pairs (prompt-weighted), the
       section score is the unweighted mean of the sections (Lambert et al. 2024)
    4. calibration of p = sigma(r_w - r_l) on the Bradley-Terry (raw head) scale: a reliability table over the
       confidence max(p, 1 - p) of the predicted winner, and ECE = sum_b n_b / N |accuracy_b - confidence_b|
    5. the length-bias probe: accuracy by length-difference bin (completion tokens, chosen - rejected),
       Spearman(reward, length) over all responses, and the length-only baselines (longer wins, shorter wins)
    6. ensembles: per-pair disagreement std_k(margin_k) on normalised member rewards, the share of pairs whose
       members disagree on the winner, and accuracy on the most vs least disputed half of the pairs
    7. print a markdown report; save report.json, report.md and pairs.jsonl (one line per pair) in the run folder
Tie rows (tie: true) are scored and written to pairs.jsonl but left out of accuracy, calibration and baselines.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from preflab.config import check, opt
from preflab.data import DataError, load_preferences, split_rows, tokenize_rows, write_jsonl
from preflab.data.preferences import SPLIT_BY
from preflab.reward.model import REDUCTIONS, RewardEnsemble, load_reward_model, reduce_ensemble
from preflab.runs import Run
from preflab.stages import stage
from preflab.training import set_threads


@dataclass
class EvalRewardConfig:
    model: str = opt("", "a reward-model folder, an ensemble folder, or a `preflab reward` run folder")
    data: str = opt("", "preference JSONL to evaluate on")
    out: str = opt("", "run folder to write (default runs/eval-reward-<time>)")
    split: str = opt("all", "rows to use: all, or the train / heldout side of the split below")
    held_out: float = opt(0.1, "held-out share of the split (use the value given to `preflab reward`)")
    split_seed: int = opt(0, "seed of the split (use the value given to `preflab reward`)")
    split_by: str = opt(
        "row", "what the split keeps together: row, prompt or first_turn (as given to `preflab reward`)"
    )
    max_rows: int = opt(0, "evaluate only the first N rows after the split (0: all)")
    batch_size: int = opt(32, "sequences per scoring batch")
    max_prompt_length: int = opt(-1, "prompt tokens kept (its end); -1: the model's training value, 0: all")
    max_completion_length: int = opt(-1, "completion tokens kept (its start); -1: the model's training value, 0: all")
    calibration_bins: int = opt(10, "bins of the reliability table over confidence [0.5, 1]")
    length_edges: list[int] = opt([-32, -8, 8, 32], "edges (tokens) of the length-difference bins, chosen - rejected")
    reduce: str = opt("", "ensemble reduction: mean, min or mean_minus_std (default: the ensemble's saved one)")
    threads: int = opt(0, "torch intra-op threads (0: torch's default)")

    def __post_init__(self):
        check(bool(self.model), "give --model (a reward-model folder)")
        check(bool(self.data), "give --data (a preference JSONL file)")
        check(self.split in ("all", "train", "heldout"), f"split must be all, train or heldout, got {self.split!r}")
        check(0 < self.held_out < 1 or self.split == "all", f"held_out must be in (0, 1), got {self.held_out}")
        check(self.split_by in SPLIT_BY, f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.calibration_bins >= 1, f"calibration_bins must be >= 1, got {self.calibration_bins}")
        check(
            list(self.length_edges) == sorted(self.length_edges),
            f"length_edges must be increasing, got {self.length_edges}",
        )
        check(self.reduce in ("",) + REDUCTIONS, f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")


# --- pure pieces (tests call these directly) -------------------------------------------------------------


def members_of(model) -> list:
    return model.members if isinstance(model, RewardEnsemble) else [model]


def score_pairs(model, pairs, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (Bradley-Terry scale) rewards of chosen and rejected, [K, N] each (K = 1 for a single model)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    raw = torch.stack(
        [m.score_ids(prompts, completions, normalise=False, batch_size=batch_size) for m in members_of(model)]
    )
    return raw[:, : len(pairs)], raw[:, len(pairs) :]


def calibration(p_chosen: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Reliability table and ECE of the predicted winner: confidence max(p, 1 - p), correct when p > 0.5."""
    p_chosen = np.asarray(p_chosen, dtype=float)
    confidence = np.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).astype(float)
    index = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        acc, conf = correct[inside].mean(), confidence[inside].mean()
        ece += inside.mean() * abs(acc - conf)
        table.append(
            {
                "bin": f"[{0.5 + b / (2 * bins):.2f}, {0.5 + (b + 1) / (2 * bins):.2f})",
                "n": int(inside.sum()),
                "confidence": float(conf),
                "accuracy": float(acc),
            }
        )
    return table, float(ece)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (nan when either side is constant)."""
    rx, ry = rank(x), rank(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def length_table(delta: np.ndarray, model_correct: np.ndarray, edges: list[int]) -> list[dict]:
    """Accuracy of the model and of `longer wins` per bin of delta = len(chosen) - len(rejected)."""
    bounds = [-math.inf] + list(edges) + [math.inf]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (delta >= lo) & (delta < hi)
        if not inside.any():
            continue
        rows.append(
            {
                "bin": f"[{lo:g}, {hi:g})",
                "n": int(inside.sum()),
                "accuracy": float(model_correct[inside].mean()),
                "longer_wins": float((delta[inside] > 0).mean()),
            }
        )
    return rows


def subset_tables(subsets: list[str | None], correct: np.ndarray) -> tuple[list[dict], list[dict], float | None]:
    """Per-subset accuracy; sections (`section/subset`) pooled over their pairs; the mean of section scores."""
    by_subset, by_section = defaultdict(list), defaultdict(list)
    for name, ok in zip(subsets, correct):
        if name is None:
            continue
        by_subset[name].append(ok)
        if "/" in name:
            by_section[name.split("/", 1)[0]].append(ok)
    subset_rows = [{"subset": k, "n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_subset.items())]
    section_rows = [{"section": k, "n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_section.items())]
    score = float(np.mean([r["accuracy"] for r in section_rows])) if section_rows else None
    return subset_rows, section_rows, score


def disagreement(margins: torch.Tensor, correct: np.ndarray) -> dict:
    """[K, N] normalised member margins r_k(w) - r_k(l) -> per-pair std and summary (K > 1 only)."""
    std = margins.std(0, unbiased=False).numpy()
    split = ((margins > 0).any(0) & (margins <= 0).any(0)).numpy()
    order = np.argsort(std, kind="mergesort")
    half = len(order) // 2
    return {
        "per_pair": std,
        "mean_std": float(std.mean()),
        "share_split": float(split.mean()),
        "accuracy_least_disputed_half": float(correct[order[:half]].mean()) if half else float("nan"),
        "accuracy_most_disputed_half": float(correct[order[half:]].mean()) if half else float("nan"),
    }


# --- the report ------------------------------------------------------------------------------------------


def reward_report(
    model,
    rows,
    batch_size: int = 32,
    max_prompt_length: int = 0,
    max_completion_length: int = 0,
    bins: int = 10,
    length_edges=(-32, -8, 8, 32),
    reduce: str | None = None,
) -> tuple[dict, list[dict]]:
    """(report, per-pair rows) for preference `rows` (steps 2-6 of the module docstring)."""
    members = members_of(model)
    pairs, n_truncated = tokenize_rows(members[0].tokenizer, rows, max_prompt_length, max_completion_length)
    # 2. score: raw for calibration, normalised (per member) for rewards and the ensemble reduction
    raw_w, raw_l = score_pairs(model, pairs, batch_size)
    gain = torch.stack([m.gain for m in members]).float().cpu()
    bias = torch.stack([m.bias for m in members]).float().cpu()
    return report_from_scores(
        rows,
        pairs,
        n_truncated,
        members[0].tokenizer,
        raw_w,
        raw_l,
        gain,
        bias,
        bins,
        length_edges,
        reduce or getattr(model, "reduce", "mean"),
        getattr(model, "lam", 1.0),
    )


def report_from_scores(
    rows,
    pairs,
    n_truncated: int,
    tokenizer,
    raw_w: torch.Tensor,
    raw_l: torch.Tensor,
    gain: torch.Tensor,
    bias: torch.Tensor,
    bins: int = 10,
    length_edges=(-32, -8, 8, 32),
    reduce: str = "mean",
    lam: float = 1.0,
) -> tuple[dict, list[dict]]:
    """Steps 3-6 from raw member rewards [K, N] and each member's gain and bias [K]."""
    members = raw_w.shape[0]
    full, _ = tokenize_rows(tokenizer, rows)  # untruncated: the lengths people see
    len_w = np.array([len(p.chosen_ids) - 1 for p in full])  # completion tokens, EOS not counted
    len_l = np.array([len(p.rejected_ids) - 1 for p in full])
    gain, bias = gain.reshape(-1, 1), bias.reshape(-1, 1)
    norm_w, norm_l = raw_w * gain + bias, raw_l * gain + bias
    r_w, r_l = reduce_ensemble(norm_w, reduce, lam).numpy(), reduce_ensemble(norm_l, reduce, lam).numpy()
    p_chosen = torch.sigmoid(raw_w - raw_l).mean(0).numpy()  # mean of member probabilities
    tie = np.array([bool(p.tie) for p in pairs])
    keep = ~tie
    correct = (r_w > r_l).astype(float)
    delta = len_w - len_l
    # 3. accuracy overall and by subset / section
    subsets, sections, section_score = subset_tables([r.subset for r, k in zip(rows, keep) if k], correct[keep])
    # 4. calibration
    table, ece = calibration(p_chosen[keep], bins)
    # 5. length
    lengths = np.concatenate([len_w, len_l])
    report = {
        "pairs": len(pairs),
        "ties": int(tie.sum()),
        "truncated_pairs": n_truncated,
        "members": members,
        "reduce": reduce if members > 1 else None,
        "accuracy": float(correct[keep].mean()) if keep.any() else float("nan"),
        "mean_margin": float((r_w - r_l)[keep].mean()) if keep.any() else float("nan"),
        "ece": ece,
        "longer_wins": float((delta[keep] > 0).mean()) if keep.any() else float("nan"),
        "shorter_wins": float((delta[keep] < 0).mean()) if keep.any() else float("nan"),
        "equal_length": float((delta[keep] == 0).mean()) if keep.any() else float("nan"),
        "spearman_reward_length": spearman(np.concatenate([r_w, r_l]), lengths),
        "mean_length_chosen": float(len_w.mean()),
        "mean_length_rejected": float(len_l.mean()),
        "subsets": subsets,
        "sections": sections,
        "section_score": section_score,
        "calibration": table,
        "length_bins": length_table(delta[keep], correct[keep], list(length_edges)),
    }
    # 6. ensemble disagreement
    dis = disagreement((norm_w - norm_l)[:, keep], correct[keep]) if members > 1 and keep.any() else None
    if dis is not None:
        report["disagreement"] = {k: v for k, v in dis.items() if k != "per_pair"}
    per_pair_std = np.full(len(pairs), np.nan)
    if dis is not None:
        per_pair_std[keep] = dis["per_pair"]
    per_pair = []
    for i, (row, pair) in enumerate(zip(rows, pairs)):
        per_pair.append(
            {
                "source": pair.source,
                "subset": row.subset,
                "tie": bool(pair.tie),
                "reward_chosen": float(r_w[i]),
                "reward_rejected": float(r_l[i]),
                "p_chosen": float(p_chosen[i]),
                "length_chosen": int(len_w[i]),
                "length_rejected": int(len_l[i]),
                "member_margins": [float(x) for x in (norm_w - norm_l)[:, i]] if members > 1 else None,
                "disagreement": None if math.isnan(per_pair_std[i]) else float(per_pair_std[i]),
            }
        )
    return report, per_pair


def _f(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(report: dict, title: str = "Reward model evaluation") -> str:
    lines = [
        f"## {title}",
        "",
        f"{report['pairs']} pairs ({report['ties']} ties left out), {report['truncated_pairs']} truncated; "
        f"{report['members']} member(s)" + (f", reduced by {report['reduce']}" if report.get("reduce") else ""),
        "",
        "| scorer | accuracy | ECE | Spearman(reward, length) |",
        "|---|---|---|---|",
        f"| reward model | {_f(report['accuracy'])} | {_f(report['ece'])} | {_f(report['spearman_reward_length'])} |",
        f"| longer wins | {_f(report['longer_wins'])} | | |",
        f"| shorter wins | {_f(report['shorter_wins'])} | | |",
        "",
        f"Equal-length pairs (both baselines count them wrong): {_f(report['equal_length'])}. "
        f"Mean completion tokens: chosen {report['mean_length_chosen']:.1f}, "
        f"rejected {report['mean_length_rejected']:.1f}.",
        "",
    ]
    if report["subsets"]:
        lines += ["| subset | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {r['subset']} | {r['n']} | {_f(r['accuracy'])} |" for r in report["subsets"]] + [""]
    if report["sections"]:
        lines += ["| section (prompt-weighted) | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {r['section']} | {r['n']} | {_f(r['accuracy'])} |" for r in report["sections"]]
        lines += [f"| **mean of sections** | | {_f(report['section_score'])} |", ""]
    lines += [
        "Calibration of sigma(r_w - r_l) (confidence of the predicted winner):",
        "",
        "| confidence bin | pairs | mean confidence | accuracy |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['bin']} | {r['n']} | {_f(r['confidence'])} | {_f(r['accuracy'])} |" for r in report["calibration"]
    ] + [""]
    lines += [
        "Accuracy by length difference (completion tokens, chosen - rejected):",
        "",
        "| bin | pairs | reward model | longer wins |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['bin']} | {r['n']} | {_f(r['accuracy'])} | {_f(r['longer_wins'])} |" for r in report["length_bins"]
    ]
    if report.get("disagreement"):
        d = report["disagreement"]
        lines += [
            "",
            f"Ensemble disagreement: mean std of member margins {_f(d['mean_std'])}; members split on the winner "
            f"in {_f(d['share_split'])} of pairs; accuracy on the least / most disputed half "
            f"{_f(d['accuracy_least_disputed_half'])} / {_f(d['accuracy_most_disputed_half'])}.",
        ]
    return "\n".join(lines) + "\n"


def save_report(directory, report: dict, per_pair: list[dict], title: str) -> str:
    """Write report.md, report.json and pairs.jsonl into `directory`; returns the markdown."""
    text = markdown(report, title)
    (directory / "report.md").write_text(text)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_jsonl(directory / "pairs.jsonl", per_pair)
    return text


def select_rows(path: str, split: str, held_out: float, split_seed: int, max_rows: int, by: str = "row") -> list:
    rows = load_preferences(path).rows
    if split != "all":
        train, held = split_rows(rows, held_out, split_seed, by)
        rows = held if split == "heldout" else train
    rows = rows[:max_rows] if max_rows else rows
    if not rows:
        raise DataError(path, f"no rows left to evaluate (split {split!r}, held_out {held_out})", "use --split all")
    return rows


@stage(EvalRewardConfig)
def evaluate_reward(config: EvalRewardConfig) -> dict:
    set_threads(config.threads)
    # 1. model and rows
    model = load_reward_model(config.model, reduce=config.reduce or None)
    if torch.cuda.is_available():
        for member in members_of(model):
            member.to("cuda")
    rows = select_rows(config.data, config.split, config.held_out, config.split_seed, config.max_rows, config.split_by)
    first = members_of(model)[0]
    max_p = first.max_prompt_length if config.max_prompt_length < 0 else config.max_prompt_length
    max_c = first.max_completion_length if config.max_completion_length < 0 else config.max_completion_length
    run = Run(config.out or None, "eval-reward", config)
    # 2-6. scores and statistics
    report, per_pair = reward_report(
        model,
        rows,
        config.batch_size,
        max_p,
        max_c,
        config.calibration_bins,
        config.length_edges,
        config.reduce or None,
    )
    # 7. print and save
    print(
        save_report(run.dir, report, per_pair, f"Reward model {config.model} on {config.data} ({config.split})"),
        flush=True,
    )
    run.log(
        0,
        {
            "reward/eval/accuracy": report["accuracy"],
            "reward/eval/ece": report["ece"],
            "reward/eval/margin": report["mean_margin"],
            "reward/eval/spearman_length": report["spearman_reward_length"],
        },
    )
    return run.finish(
        {
            "pairs": report["pairs"],
            "accuracy": report["accuracy"],
            "ece": report["ece"],
            "longer_wins": report["longer_wins"],
            "shorter_wins": report["shorter_wins"],
            "spearman_reward_length": report["spearman_reward_length"],
            "report": str(run.dir / "report.md"),
        }
    )
