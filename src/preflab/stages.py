"""The stage registry: which function each `preflab` command runs. It sits below every stage, so stages import
it (for the `stage` decorator) and never the CLI; `cli.py` reads the table and imports only the stage asked for,
so `preflab --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib

# name -> (module, function, one-line help). Order is the pipeline's order.
STAGES: dict[str, tuple[str, str, str]] = {
    "pretrain": ("preflab.pretrain", "pretrain", "train a small causal LM from scratch on text"),
    "sft": ("preflab.sft", "sft", "fine-tune on demonstrations (loss on completion tokens only)"),
    "generate": (
        "preflab.generate",
        "generate_stage",
        "sample candidate responses (and comparison pairs) from a policy",
    ),
    "annotate": (
        "preflab.annotate",
        "annotate",
        "AI feedback: a judge (world, reward function, reward model or LM with a constitution) votes on pairs",
    ),
    "reward": ("preflab.reward.train", "train_reward", "train a Bradley-Terry reward model on comparisons"),
    "ppo": ("preflab.policy.ppo", "ppo", "PPO with a per-token KL penalty to a frozen reference"),
    "rloo": ("preflab.policy.rloo", "rloo", "REINFORCE leave-one-out (critic-free)"),
    "grpo": ("preflab.policy.rloo", "grpo", "group relative policy optimisation (critic-free)"),
    "dpo": ("preflab.policy.dpo", "dpo", "direct preference optimisation and its relatives"),
    "bon": ("preflab.policy.bon", "best_of_n", "best-of-n sampling against a reward (no training)"),
    "report": ("preflab.report.html", "report", "write a self-contained HTML report for a run folder"),
    "export": (
        "preflab.adapters",
        "export",
        "write a run's model as a Hugging Face directory (--merge folds a LoRA adapter in)",
    ),
    "demo": ("preflab.demo", "demo", "the whole loop end to end on the built-in tutoring world"),
}
# Commands with their own sub-commands: name -> {sub: (module, function, help)}.
GROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "data": {
        "check": ("preflab.data.check", "check", "validate a preference or demonstration file and describe it"),
        "world": (
            "preflab.world.export",
            "export_world",
            "write the tutoring world's corpus, demonstrations and prompts",
        ),
    },
    "collect": {
        "init": (
            "preflab.collect.cli",
            "init",
            "create a collection project from pairs.jsonl / responses.jsonl (or a model)",
        ),
        "annotator": (
            "preflab.collect.cli",
            "annotator",
            "add a person and print their personal link (token stored hashed)",
        ),
        "serve": ("preflab.collect.cli", "serve", "run the voting web app (FastAPI under uvicorn)"),
        "export": (
            "preflab.collect.cli",
            "export",
            "write the votes as the comparison JSONL preflab reward / dpo read",
        ),
        "train": (
            "preflab.collect.cli",
            "train",
            "retrain the live reward model on the votes so far (background worker)",
        ),
        "demo": (
            "preflab.collect.lesson.setup",
            "demo",
            "the lesson, live: vote in the browser, watch a reward model and a policy learn from you",
        ),
    },
    "eval": {
        "reward": (
            "preflab.reward.evaluate",
            "evaluate_reward",
            "accuracy, calibration and length bias of a reward model",
        ),
        "policy": (
            "preflab.evaluate.policy",
            "evaluate_policies",
            "true utility, proxy reward, win rates and KL of policies",
        ),
        "sweep": ("preflab.evaluate.sweep", "sweep", "over-optimisation sweep: true and proxy reward against sqrt(KL)"),
        "shift": (
            "preflab.evaluate.shift",
            "evaluate_shift",
            "reward-model accuracy against the true utility off its training distribution, and the ensemble alarm",
        ),
        "oversight": (
            "preflab.evaluate.oversight",
            "oversight",
            "raters who cannot judge: votes by raters knowing a share of the facts, with and without an oversight aid",
        ),
        "bias": ("preflab.evaluate.bias", "audit", "annotator bias audit of a comparison file (length, position)"),
    },
}


def stage(config_class):
    """Decorator marking a function as a CLI stage taking `config_class` (read by the CLI for its options)."""

    def wrap(fn):
        fn.config_class = config_class
        return fn

    return wrap


def load_stage(module: str, function: str):
    """(function, config class) for a registry entry, or None when that stage is not built yet."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            return None
        raise
    fn = getattr(mod, function, None)
    if fn is None:
        return None
    return fn, getattr(fn, "config_class", None)
