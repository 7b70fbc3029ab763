"""`preflab demo`: the whole RLHF loop on the built-in tutoring world, measured against its known true utility.

     1. pretrain   a tiny Llama from scratch on the world's corpus (mixed-quality answers)
     2. sft        fine-tune on imperfect demonstrations
     3. generate   sample 4 responses per training prompt from the SFT policy: every distinct pair is a candidate
     4. annotate   simulated annotators vote (noise per annotator, a planted length bias and position bias);
                   votes split by pair into train / held-out files; the noise ceiling of the held-out pairs
     5. reward     a Bradley-Terry reward model on the SFT backbone; held-out accuracy beside the ceiling
                   (--ensemble K: K members in one run; member 0 is that reward model, the min of all K a sweep arm)
     6. bias       audit the votes: the planted length bias must be found
     7. ppo, dpo   (and rloo when asked) from the SFT policy, on the reward model / the votes; the PPO run is also
                   the sweep's arm at its beta (trained on to the sweep's longest length; evaluated at its own)
     8. eval       every policy (+ the base model and best-of-n) on held-out prompts against the truth
     9. sweep      KL coefficients x training length: true and proxy reward against sqrt(KL)
    10. report     report.html, headline.json, and the headline printed
   (--oversight true: after the sweep and before the report, on the demo's own artefacts, issue 15's experiments:
    shift        `eval shift`: the reward model on same-distribution / PPO-policy / left-out-kind pairs (with an
                 ensemble, the disagreement alarm); a left-out kind needs a reward model that never saw it, so
                 one is trained like the demo's with that kind's votes dropped (shift/reward)
    oversight    `eval oversight`: raters who know only some facts, and the critique aid at a few recalls
    annotate     `annotate`: AI judges on the held-out pairs, agreement with the truth and with the votes)

Every stage is the same function its CLI command calls (`fn(Config) -> summary`), writing its run folder
under the demo folder. Stage options are the stage's own config fields: `DEFAULTS` (the packaged preset
`presets/demo.yaml`),
overridden by another preset (`--fast` = `presets/fast.yaml`) and by YAML given with `--config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from preflab.annotate import annotate as annotate_stage
from preflab.config import RunConfig, build_config, check, load_preset, opt, to_dict
from preflab.evaluate.bias import audit
from preflab.evaluate.claims import all_claims, format_claims
from preflab.evaluate.oversight import oversight as oversight_stage
from preflab.evaluate.policy import evaluate_policies
from preflab.evaluate.shift import evaluate_shift
from preflab.evaluate.sweep import sweep
from preflab.generate import generate_stage
from preflab.policy.dpo import dpo
from preflab.policy.ppo import ppo
from preflab.policy.rloo import rloo
from preflab.pretrain import pretrain
from preflab.reward.train import train_reward
from preflab.runs import default_out
from preflab.sft import sft
from preflab.stages import stage
from preflab.training import runs_on_cpu, set_threads

# Per-stage options of the demo (each stage's own config fields): the `demo` preset, the one source of them.
DEFAULTS: dict[str, dict] = load_preset("demo")["demo"]
# The stage function behind each section of options (`bias`, `eval`, `sweep` are `preflab eval ...` commands).
STAGE_FUNCTIONS = {
    "pretrain": pretrain,
    "sft": sft,
    "generate": generate_stage,
    "reward": train_reward,
    "bias": audit,
    "ppo": ppo,
    "dpo": dpo,
    "rloo": rloo,
    "eval": evaluate_policies,
    "sweep": sweep,
}
# The oversight experiments (`--oversight true`): options under the preset's `oversight_stages:` section.
OVERSIGHT_FUNCTIONS = {
    "shift_reward": train_reward,
    "shift": evaluate_shift,
    "oversight": oversight_stage,
    "annotate": annotate_stage,
}
SECTIONS = tuple(DEFAULTS)


@dataclass(kw_only=True)
class DemoConfig(RunConfig):
    out: str = opt("", "the demo folder (default runs/demo-<time>): one sub-folder per stage, report.html")
    seed: int = opt(0, "seed for every stage")
    annotators: int = opt(8, "simulated annotators in the pool")
    temperature_low: float = opt(0.2, "annotator noise: temperatures drawn uniformly from [low, high]")
    temperature_high: float = opt(0.5, "annotator noise: temperatures drawn uniformly from [low, high]")
    length_bias: float = opt(0.05, "the planted length bias: logit per word of length difference")
    position_bias: float = opt(0.2, "the planted position bias: logit in favour of the first-shown response")
    held_out: float = opt(0.1, "share of candidate pairs whose votes are held out for the reward model")
    bon_n: int = opt(4, "best-of-n's n (0: no best-of-n policy)")
    run_rloo: bool = opt(False, "also train RLOO")
    run_sweep: bool = opt(True, "run the over-optimisation sweep")
    parallel: bool = opt(
        True,
        "on a CPU, train independent stages at once (PPO, DPO and the sweep's arms; then eval and the sweep's "
        "measurements), two processes of half the threads each: the same files, sooner",
    )
    ensemble: int = opt(
        0,
        "K > 1: the reward stage trains K members (member 0 is the demo's reward model, the min over all K an extra "
        "sweep arm at the smallest beta); costs K reward-model trainings",
    )
    seeds: list[int] = opt(
        [],
        "run the whole demo once per seed (e.g. 0,1,2) into seed-N/ and report each claim "
        "on every seed with the spread of the numbers (seeds.md)",
    )
    oversight: bool = opt(
        False,
        "after the sweep, issue 15's experiments on the demo's own artefacts: `eval shift` (with --ensemble K > 1 "
        "the alarm too), `eval oversight` and `annotate` (AI judges against the truth and the votes); an "
        "Oversight section in the report",
    )
    oversight_stages: dict = opt(
        {},
        "options of the oversight experiments over the preset's (YAML: shift, shift_reward, oversight, annotate)",
        cli=False,
    )
    pretrain: dict = opt({}, "pretrain options over the demo's defaults (YAML)", cli=False)
    sft: dict = opt({}, "sft options (YAML)", cli=False)
    generate: dict = opt({}, "generate options (YAML)", cli=False)
    reward: dict = opt({}, "reward options (YAML)", cli=False)
    ppo: dict = opt({}, "ppo options (YAML)", cli=False)
    dpo: dict = opt({}, "dpo options (YAML)", cli=False)
    rloo: dict = opt({}, "rloo options (YAML)", cli=False)
    eval: dict = opt({}, "eval policy options (YAML)", cli=False)
    sweep: dict = opt({}, "eval sweep options (YAML)", cli=False)

    def __post_init__(self):
        super().__post_init__()
        check(self.annotators >= 1, f"annotators must be >= 1, got {self.annotators}")
        check(
            0 < self.temperature_low <= self.temperature_high,
            f"need 0 < temperature_low <= temperature_high, got {self.temperature_low}, {self.temperature_high}",
        )
        check(0 < self.held_out < 0.5, f"held_out must be in (0, 0.5), got {self.held_out}")
        check(
            len(set(self.seeds)) == len(self.seeds) and all(x >= 0 for x in self.seeds),
            f"seeds must be distinct and >= 0, got {self.seeds}",
        )
        check(
            self.bon_n >= 0 and self.ensemble >= 0,
            f"bon_n and ensemble must be >= 0, got {self.bon_n}, {self.ensemble}",
        )
        for name in SECTIONS:
            check(
                isinstance(getattr(self, name), dict),
                f"{name} must be a mapping of options, got {getattr(self, name)!r}",
            )
        for name, options in self.oversight_stages.items():
            check(
                name in OVERSIGHT_FUNCTIONS and isinstance(options, dict),
                f"oversight_stages.{name} must be one of {tuple(OVERSIGHT_FUNCTIONS)} with a mapping of options, "
                f"got {name}: {options!r}",
            )


class Pipeline:
    """Runs stages into one folder, printing a banner and the time each took."""

    def __init__(self, root: Path, config: DemoConfig, n_stages: int):
        self.root, self.config, self.n, self.i = root, config, n_stages, 0
        self.started = time.time()
        self.times: dict[str, float] = {}

    def banner(self, title: str) -> float:
        self.i += 1
        print(f"\n=== [{self.i}/{self.n}] {title}  (t={time.time() - self.started:.0f}s)", flush=True)
        return time.time()

    def run(self, section: str, title: str, **values) -> dict:
        """The section's stage on options DEFAULTS[section] < the demo config's section < `values`."""
        options = {**DEFAULTS.get(section, {}), **getattr(self.config, section, {})}
        return self.run_stage(section, STAGE_FUNCTIONS[section], options, title, **values)

    def run_stage(self, name: str, fn, options: dict, title: str, **values) -> dict:
        """`fn` (a stage function) on `options` < `values`, seeded with the demo's seed, timed as `name`."""
        start = self.banner(title)
        summary = fn(build_config(fn.config_class, self.options(name, options, values), source=f"demo {name}"))
        self.times[name] = time.time() - start
        return summary

    def options(self, name: str, options: dict, values: dict) -> dict:
        options = {**options, **values}
        options.setdefault("seed", self.config.seed)
        options.setdefault("out", str(self.root / name))
        return options

    def job(self, section: str, title: str, **values) -> Job:
        """A `run` to hand to `side_by_side`."""
        options = {**DEFAULTS.get(section, {}), **getattr(self.config, section, {})}
        return Job(section, STAGE_FUNCTIONS[section], self.options(section, options, values), title)

    def side_by_side(self, jobs: list[Job]) -> dict[str, dict]:
        """Independent stages at once, a process each with an equal share of the cores (at least one thread: with
        more stages than cores the system shares the cores out, which single-threaded processes bear well), when
        `parallel` is on and the stages run on a CPU; one after another otherwise. Every stage seeds itself and the
        results do not depend on the thread count, so both ways write the same files (tests/test_demo.py).
        Returns {name: summary}."""
        cores = self.config.threads or os.cpu_count() or 1
        if not self.config.parallel or len(jobs) < 2 or cores < 2 or not runs_on_cpu():
            return {j.name: self.run_stage(j.name, j.fn, j.options, j.title) for j in jobs}
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = {j.name: logs / f"{j.name.replace('/', '_').replace(' ', '_')}.log" for j in jobs}
        for j in jobs:
            self.banner(f"{j.title}  [side by side; console: {log[j.name]}]")
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        out = {}
        threads = max(1, cores // len(jobs))
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(run_job, j.fn.__module__, j.fn.__name__, j.options, threads, log[j.name]): j.name
                for j in jobs
            }
            for future in as_completed_or_raise(futures):
                name = futures[future]
                out[name], self.times[name] = future.result()
                print(f"[demo] {name} done in {self.times[name]:.0f}s", flush=True)
        return {j.name: out[j.name] for j in jobs}


@dataclass
class Job:
    """One stage for `Pipeline.side_by_side`: its name (folder and timing key), function, options and banner."""

    name: str
    fn: object
    options: dict
    title: str


def run_job(module: str, function: str, options: dict, threads: int, log: Path) -> tuple[dict, float]:
    """One stage in a worker process with `threads` torch threads, its console output into `log`."""
    import contextlib
    import importlib

    fn = getattr(importlib.import_module(module), function)
    start = time.time()
    with open(log, "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        summary = fn(build_config(fn.config_class, {**options, "threads": threads}, source=f"demo {log.stem}"))
    return summary, time.time() - start


def as_completed_or_raise(futures: dict):
    """Futures as they finish; the first failure cancels what has not started and raises, naming the stage."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for future in done:
            error = future.exception()
            if error is not None:
                for other in pending:
                    other.cancel()
                raise RuntimeError(f"demo stage {futures[future]!r} failed: {error}") from error
            yield future


def annotate(root: Path, pairs_file: Path, config: DemoConfig) -> dict:
    """Simulated votes on the SFT candidate pairs, split by pair; the held-out noise ceiling."""
    from preflab.generate import read_candidate_pairs
    from preflab.world.annotators import annotator_pool, ceiling_accuracy, describe_pool, simulate_votes, write_votes

    pairs = read_candidate_pairs(pairs_file, config.seed)
    n_held = max(1, int(len(pairs) * config.held_out))
    held, train = pairs[:n_held], pairs[n_held:]
    pool = annotator_pool(
        config.annotators,
        seed=config.seed,
        temperature=(config.temperature_low, config.temperature_high),
        length_bias=config.length_bias,
        position_bias=config.position_bias,
    )
    out = root / "votes"
    out.mkdir(parents=True, exist_ok=True)
    write_votes(out / "train.jsonl", simulate_votes(train, pool, seed=config.seed))
    write_votes(out / "heldout.jsonl", simulate_votes(held, pool, seed=config.seed + 1))
    write_votes(
        out / "all.jsonl",
        [json.loads(x) for f in ("train", "heldout") for x in (out / f"{f}.jsonl").read_text().splitlines()],
    )
    info = {
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "ceiling_accuracy": ceiling_accuracy(held, pool),
        "annotators": describe_pool(pool),
    }
    (out / "annotators.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"[annotate] {len(train)} train + {len(held)} held-out votes; noise ceiling on held-out pairs "
        f"{info['ceiling_accuracy']:.3f}",
        flush=True,
    )
    return info


def headline(ev: dict, rm: dict, votes: dict, bias: dict, sweep: dict | None) -> dict:
    """The numbers the lesson is about, flat, for headline.json, the report and the console (nothing in it depends
    on the machine's speed or the folder: the same seed gives the same file)."""
    h = {}
    for name, r in ev["policies"].items():
        g = r["gain"]
        h[f"{name}: true utility"] = round(r["true_utility"]["mean"], 3)
        if name != ev["reference"]:
            h[f"{name}: gain vs sft [95% CI]"] = f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"
            h[f"{name}: gain by component"] = ", ".join(
                f"{c} {v['mean']:+.2f}" for c, v in r["gain_by_component"].items()
            )
            h[f"{name}: KL"] = round(r["kl"], 3)
        h[f"{name}: right / hedged answers by kind"] = ", ".join(
            f"{k} {o['right']:.0%}/{o['hedge']:.0%}" for k, o in r["outcomes_by_kind"].items()
        )
    h["reward model held-out accuracy"] = round(rm.get("eval_accuracy", float("nan")), 3)
    if "ensemble_accuracy" in rm:
        h["reward ensemble (min) held-out accuracy"] = round(rm["ensemble_accuracy"], 3)
    h["annotators' noise ceiling (held-out)"] = round(votes["ceiling_accuracy"], 3)
    h["bias audit: length bias (logit/word) [95% CI]"] = (
        f"{bias['length_bias']:.3f} [{bias['length_bias_low']:.3f}, {bias['length_bias_high']:.3f}]"
    )
    if sweep:
        base = sweep["reference"]
        for arm in sweep["fits"]:
            last = max((p for p in sweep["points"] if p["arm"] == arm), key=lambda p: p["steps"])
            h[f"sweep {arm}: longest run proxy / true gain"] = (
                f"{last['proxy'] - base['proxy']:+.2f} / {last['true_utility'] - base['true_utility']:+.2f}"
            )
    return h


def numbers(ev: dict, rm: dict, bias: dict, sweep: dict | None) -> dict:
    """The headline as numbers (no intervals), for the spread over seeds."""
    out = {}
    for name, r in ev["policies"].items():
        if name != ev["reference"]:
            out[f"{name}: gain vs sft"] = r["gain"]["mean"]
        out[f"{name}: right-answer rate"] = r["right_answer_rate"]
    out["reward model held-out accuracy"] = rm.get("eval_accuracy", float("nan"))
    out["bias audit: length bias"] = bias["length_bias"]
    if sweep:
        base = sweep["reference"]
        for arm in sweep["fits"]:
            last = max((p for p in sweep["points"] if p["arm"] == arm), key=lambda p: p["steps"])
            out[f"sweep {arm}: longest run proxy gain"] = last["proxy"] - base["proxy"]
            out[f"sweep {arm}: longest run true gain"] = last["true_utility"] - base["true_utility"]
    return out


# ---- stage 1, cached -----------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where base models are cached: $PREFLAB_CACHE_DIR, else $XDG_CACHE_HOME/preflab, else ~/.cache/preflab."""
    if os.environ.get("PREFLAB_CACHE_DIR"):
        return Path(os.environ["PREFLAB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "preflab"


def pretrain_key(options: dict) -> str:
    """A hash of everything the base model depends on: the resolved pretrain config (its folder aside), the code
    that builds the corpus, tokenizer and model, and the library versions."""
    import torch
    import transformers

    config = to_dict(build_config(pretrain.config_class, options, source="demo pretrain"))
    config.pop("out", None)
    config.pop("threads", None)
    here = Path(__file__).resolve().parent
    code = sorted([here / "pretrain.py", here / "models.py", here / "training.py", *(here / "world").glob("*.py")])
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in code:
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__} {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def pretrain_cached(p: Pipeline, title: str) -> dict:
    """Stage 1 through the cache: a step-budgeted base model is trained once per config hash and reused after
    (a time budget gives a machine-dependent model, so it is never cached)."""
    options = {
        **DEFAULTS.get("pretrain", {}),
        **p.config.pretrain,
        "seed": p.config.seed,
        "out": str(p.root / "pretrain"),
    }
    if options.get("max_seconds"):
        return p.run("pretrain", title)
    cached = cache_root() / "pretrain" / pretrain_key(options)
    if (cached / "summary.json").exists():
        p.banner(title)
        shutil.copytree(cached, p.root / "pretrain", dirs_exist_ok=True)
        print(
            f"[demo] pretrain: reusing the base model cached at {cached} (same options, code and versions; "
            "delete that folder to pretrain again)",
            flush=True,
        )
        return json.loads((cached / "summary.json").read_text())
    summary = p.run("pretrain", title)
    tmp = cached.parent / (cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(p.root / "pretrain", tmp, ignore=shutil.ignore_patterns("checkpoints", "events.*"))
    if not cached.exists():
        tmp.rename(cached)
    shutil.rmtree(tmp, ignore_errors=True)
    return summary


# ---- stage 7 and 9 share a run ---------------------------------------------------------------------------------


def shared_ppo_run(config: DemoConfig, root: Path, reward: Path) -> dict | None:
    """When the sweep runs PPO at the demo PPO's beta with the same options, the demo's PPO run is also that sweep
    arm: it trains to the sweep's longest length, checkpointed at every length, and the PPO policy the demo
    evaluates is its checkpoint at `ppo.max_steps` (the online stages' constant learning rate and step-indexed
    prompts and seeds make that checkpoint the policy a run of `ppo.max_steps` ends with). Returns the extra PPO
    options and the sweep arm's label, or None when the two runs differ (then each trains on its own)."""
    from preflab.evaluate.sweep import rl_options

    if not config.run_sweep:
        return None
    common = {"model": str(root / "sft"), "reward": str(reward), "seed": config.seed}
    sw = sweep_config(config, root, common)
    own = build_config(ppo.config_class, {**DEFAULTS["ppo"], **config.ppo, **common}, source="demo ppo")
    if sw.algorithm != "ppo" or own.beta not in sw.betas or own.max_steps not in sw.steps:
        return None
    arm = build_config(ppo.config_class, rl_options(sw, own.beta, common["reward"], root / "ppo"), source="demo sweep")
    run_only = ("out", "max_steps", "checkpoint_every", "keep_checkpoints", "monitor_ensemble")  # not the policy
    if {k: v for k, v in to_dict(own).items() if k not in run_only} != {
        k: v for k, v in to_dict(arm).items() if k not in run_only
    }:
        return None
    extra = {k: getattr(arm, k) for k in ("max_steps", "checkpoint_every", "keep_checkpoints")}
    return {"options": extra, "label": f"beta={own.beta:g}", "steps": own.max_steps}


def sweep_config(config: DemoConfig, root: Path, options: dict):
    """The demo's sweep options (preset < config < `options`) as the sweep stage reads them."""
    return build_config(
        sweep.config_class,
        {**DEFAULTS["sweep"], **config.sweep, "seed": config.seed, "out": str(root / "sweep"), **options},
        source="demo sweep",
    )


def sweep_arms(config: DemoConfig, root: Path, options: dict, skip: str | None) -> dict[str, tuple]:
    """The sweep's arms as runs for the demo to train beside its other stages: {label: (stage function, options)},
    each exactly the run `preflab eval sweep` would train itself (to the longest length, checkpointed at every
    length, into sweep/runs/<label>), then handed to it as trained; `skip`: the arm the demo's PPO run is."""
    from preflab.evaluate.sweep import arm_folder, arms, rl_options, rl_stage

    sw = sweep_config(config, root, options)
    return {
        label: (rl_stage(sw.algorithm), rl_options(sw, beta, spec, arm_folder(root / "sweep", label)))
        for label, beta, spec in arms(sw)
        if label != skip
    }


# ---- the oversight experiments (--oversight true) --------------------------------------------------------------


def oversight_options(config: DemoConfig, name: str) -> dict:
    """Options of one oversight experiment: the demo preset's `oversight_stages.<name>` < the config's."""
    return {**DEFAULTS.get("oversight_stages", {}).get(name, {}), **config.oversight_stages.get(name, {})}


OVERSIGHT_JUDGES = {"world": "world", "function": "preflab.world.rewards:length_closeness"}


def oversight_experiments(p: Pipeline, config: DemoConfig, root: Path, ppo_policy: Path) -> dict:
    """Issue 15's experiments on the demo's artefacts, each through its command's stage function into its own
    sub-folder: shift/, oversight/ and annotate/<judge>/. Returns their summaries."""
    ensemble = {"ensemble": config.ensemble, "reduce": "min"} if config.ensemble > 1 else {}
    shift = oversight_options(config, "shift")
    reward = root / "reward"
    if shift.get("left_out"):  # a left-out kind means nothing to a reward model that saw it: train one that did not
        reward = root / "shift" / "reward"
        p.run_stage(
            "shift_reward",
            train_reward,
            {**DEFAULTS["reward"], **config.reward, **oversight_options(config, "shift_reward")},
            f"shift: a reward model like the demo's, {shift['left_out']!r} questions dropped from its votes",
            model=str(root / "sft"),
            data=str(root / "votes" / "train.jsonl"),
            eval_data=str(root / "votes" / "heldout.jsonl"),
            held_out=0.0,
            exclude_kind=shift["left_out"],
            out=str(reward),
            **ensemble,
        )
    alarm = "with the ensemble's disagreement alarm" if ensemble else "no alarm: --ensemble K > 1 gives one"
    out = {
        "shift": p.run_stage(
            "shift",
            evaluate_shift,
            shift,
            f"eval shift: the reward model off its distribution ({alarm})",
            reward=str(reward),
            reference=str(root / "sft"),
            policy=str(ppo_policy),
        )
    }
    out["oversight"] = p.run_stage(
        "oversight",
        oversight_stage,
        oversight_options(config, "oversight"),
        "eval oversight: raters who know only some facts, and the critique aid",
        model=str(root / "sft"),
        pairs=str(root / "generate" / "pairs.jsonl"),
        annotators=config.annotators,
        temperature_low=config.temperature_low,
        temperature_high=config.temperature_high,
        length_bias=config.length_bias,
        position_bias=config.position_bias,
    )
    heldout = str(root / "votes" / "heldout.jsonl")
    for label, judge in OVERSIGHT_JUDGES.items():
        folder = root / "annotate" / label
        out[f"annotate/{label}"] = p.run_stage(
            f"annotate/{label}",
            annotate_stage,
            oversight_options(config, "annotate"),
            f"annotate: the {judge} judge on the held-out pairs, against the truth and the votes",
            judge=judge,
            pairs=heldout,
            people=heldout,
            truth="world",
            out=str(folder / "votes.jsonl"),
            out_dir=str(folder),
        )
    return out


def oversight_headline(root: Path) -> dict:
    """A few oversight numbers for headline.json (only when the experiments ran)."""
    h = {}
    shift = json.loads((root / "shift" / "shift.json").read_text())
    for name, r in shift["sets"].items():
        a = r["accuracy"]
        h[f"shift: reward-model accuracy, {name} [95% CI]"] = f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
        if r.get("auroc"):
            h[f"shift: alarm AUROC, {name}"] = round(r["auroc"]["mean"], 3)
    ov = json.loads((root / "oversight" / "oversight.json").read_text())
    unverified = ov["table"]["unverified"]
    h["oversight: bluff rate on unverifiable questions, full / limited raters"] = (
        f"{unverified['full']['bluff_rate']['mean']:.0%} / {unverified['limited']['bluff_rate']['mean']:.0%}"
    )
    for r, e in ov["recovered"]["unverified"].items():
        h[f"oversight: lost utility recovered by the aid at recall {r} [95% CI]"] = (
            f"{e['mean']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
            if math.isfinite(e["mean"])
            else "n/a (no utility lost)"
        )
    if ov.get("dpo"):
        d = ov["dpo"]["table"]["unverified"]
        h["oversight: DPO on full / limited raters' votes, bluff rate on unverifiable questions"] = (
            f"{d['full']['bluff_rate']['mean']:.0%} / {d['limited']['bluff_rate']['mean']:.0%}"
        )
        for arm in ("full", "limited"):
            g = d[arm]["proxy_gain"]
            h[f"oversight: DPO on {arm} raters' votes, proxy gain on unverifiable questions [95% CI]"] = (
                f"{g['mean']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}]"
            )
        for r, e in ov["dpo"]["recovered"]["unverified"].items():
            h[f"oversight: DPO, lost utility recovered by the aid at recall {r} [95% CI]"] = (
                f"{e['mean']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
                if math.isfinite(e["mean"])
                else "n/a (no utility lost)"
            )
    for label in OVERSIGHT_JUDGES:
        s = json.loads((root / "annotate" / label / "summary.json").read_text())
        h[f"annotate {label}: agreement with truth / people"] = f"{s['agreement']:.3f} / {s['people_agreement']:.3f}"
    return h


# ---- the demo ------------------------------------------------------------------------------------------------


def demo_once(config: DemoConfig, root: Path) -> dict:
    """The whole loop once, with `config.seed`, into `root`. Returns headline, claims and numbers."""
    root.mkdir(parents=True, exist_ok=True)
    n_oversight = (4 + bool(oversight_options(config, "shift").get("left_out"))) if config.oversight else 0
    # the reward model PPO trains against (with --ensemble K: member 0, the single reward model) and the sweep's
    # arms the demo trains itself (all but the one its PPO run is), known before any stage runs
    ensemble = {"ensemble": config.ensemble, "reduce": "min"} if config.ensemble > 1 else {}
    reward = root / "reward" / "model" / "member-0" if ensemble else root / "reward"
    sweep_options = {
        "model": str(root / "sft"),
        "reward": str(reward),
        "extra_rewards": [f"ensemble={root / 'reward'}"] if ensemble else [],
    }
    shared = shared_ppo_run(config, root, reward)
    arms = sweep_arms(config, root, sweep_options, skip=shared["label"] if shared else None) if config.run_sweep else {}
    p = Pipeline(root, config, n_stages=10 + config.run_rloo + config.run_sweep + len(arms) + n_oversight)
    print(f"[demo] writing to {root} (seed {config.seed})", flush=True)

    # 1-3. pretrain (cached), SFT, candidates from the SFT policy
    pretrain_cached(p, "pretrain: a tiny Llama from scratch on the world corpus")
    p.run("sft", "sft: imperfect demonstrations", model=str(root / "pretrain"))
    gen = p.run(
        "generate", "generate: candidate pairs from the SFT policy", model=str(root / "sft"), pairs=True, split="train"
    )
    # 4. annotators
    p.banner("annotate: simulated annotators with a planted length bias")
    votes = annotate(root, Path(gen["run_dir"]) / "pairs.jsonl", config)
    # 5-6. reward model (with --ensemble K: K members trained in one run, member 0 the single reward model, the
    #      min over members the ensemble arm of the sweep), bias audit
    rm = p.run(
        "reward",
        f"reward: Bradley-Terry reward model{f' ({config.ensemble}-member ensemble, min)' if ensemble else ''}",
        model=str(root / "sft"),
        data=str(root / "votes" / "train.jsonl"),
        eval_data=str(root / "votes" / "heldout.jsonl"),
        held_out=0.0,
        **ensemble,
    )
    if ensemble:  # member 0 is the reward model a one-member run trains (same seed, data order and head)
        rm = {**rm, "ensemble_accuracy": rm["eval_accuracy"], "eval_accuracy": rm["eval_accuracy_members"][0]}
    print(
        f"[demo] reward model held-out accuracy {rm.get('eval_accuracy', float('nan')):.3f} vs the annotators' "
        f"noise ceiling {votes['ceiling_accuracy']:.3f}"
        + (f"; the ensemble (min of {config.ensemble}) {rm['ensemble_accuracy']:.3f}" if ensemble else ""),
        flush=True,
    )
    bias = p.run("bias", "bias audit of the votes", file=str(root / "votes" / "all.jsonl"))
    # 7. policies, side by side: PPO, DPO (and RLOO), and the sweep's other arms, each an ordinary run of its stage
    #    (the PPO run doubles as the sweep's arm at its beta when their options agree)
    ppo_policy = root / "ppo"
    watch = {"monitor_ensemble": str(root / "reward")} if ensemble else {}  # its disagreement beside true utility
    common = {"model": str(root / "sft"), "reward": str(reward)}
    if shared:
        title = (
            f"ppo: against the reward model (to step {shared['options']['max_steps']}, also the sweep's "
            f"{shared['label']} arm; the policy evaluated is step {shared['steps']})"
        )
        jobs = [p.job("ppo", title, **common, **shared["options"], **watch)]
        ppo_policy = root / "ppo" / "checkpoints" / f"step-{shared['steps']:08d}"
    else:
        jobs = [p.job("ppo", "ppo: against the reward model", **common, **watch)]
    jobs += [Job(f"sweep/{label}", fn, options, f"sweep: the {label} arm") for label, (fn, options) in arms.items()]
    dpo_job = p.job(
        "dpo",
        "dpo: on the votes",
        model=str(root / "sft"),
        data=str(root / "votes" / "train.jsonl"),
        # the reward model's held-out votes: every training vote trains
        eval_data=str(root / "votes" / "heldout.jsonl"),
    )
    jobs.insert(0, dpo_job)
    policies = [f"base={root / 'pretrain'}", f"ppo={ppo_policy}", f"dpo={root / 'dpo'}"]
    if config.run_rloo:
        jobs.append(p.job("rloo", "rloo: against the reward model", **common))
        policies.append(f"rloo={root / 'rloo'}")
    if config.bon_n:
        policies.append(f"bon{config.bon_n}=bon:{config.bon_n}")
    p.side_by_side(jobs)
    # 8-9. evaluation against the truth, and the over-optimisation sweep's measurements, side by side
    jobs = [
        p.job(
            "eval",
            "eval: policies on held-out prompts",
            reference=str(root / "sft"),
            policies=policies,
            reward_model=str(reward),
        )
    ]
    if config.run_sweep:
        trained = {**({shared["label"]: root / "ppo"} if shared else {}), **{k: v[1]["out"] for k, v in arms.items()}}
        jobs.append(
            p.job(
                "sweep",
                "sweep: KL coefficient x training length (measured)",
                **sweep_options,
                trained=[f"{label}={folder}" for label, folder in trained.items()],
            )
        )
    p.side_by_side(jobs)
    ev = json.loads((root / "eval" / "eval.json").read_text())
    swept = json.loads((root / "sweep" / "sweep.json").read_text()) if config.run_sweep else None
    # (--oversight) distribution shift, raters who cannot judge, AI feedback
    if config.oversight:
        oversight_experiments(p, config, root, ppo_policy)
    # 10. headline, claims, report
    h = headline(ev, rm, votes, bias, swept)
    if config.oversight:
        h.update(oversight_headline(root))
    claims = all_claims(ev, bias, swept, seed=config.seed)
    (root / "headline.json").write_text(json.dumps({**h, "claims": claims}, indent=2) + "\n")
    seconds = round(time.time() - p.started, 1)
    (root / "timings.json").write_text(
        json.dumps({"demo seconds": seconds, "stage seconds": {k: round(v, 1) for k, v in p.times.items()}}, indent=2)
        + "\n"
    )
    p.banner("report")
    from preflab.report.html import ReportConfig, report

    report(ReportConfig(run_dir=str(root)))
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in h.items()), flush=True)
    print(
        "\nThe lesson's claims (each holds only when its 95% interval supports it):\n" + format_claims(claims),
        flush=True,
    )
    print(f"\n[demo] done in {seconds:.0f}s; open {root / 'report.html'}", flush=True)
    return {"headline": h, "claims": claims, "numbers": numbers(ev, rm, bias, swept), "seconds": seconds}


def demo_seeds(config: DemoConfig, root: Path) -> dict:
    """The demo once per seed (`root/seed-N/`), then each claim's verdict on every seed and the headline's spread
    (`seeds.json`, `seeds.md`)."""
    results = {}
    for seed in config.seeds:
        one = dataclasses.replace(config, seed=seed, seeds=[], out=str(root / f"seed-{seed}"))
        results[seed] = demo_once(one, root / f"seed-{seed}")
    claims = [c["claim"] for c in results[config.seeds[0]]["claims"]]
    verdicts = {c: [next(x["holds"] for x in r["claims"] if x["claim"] == c) for r in results.values()] for c in claims}
    spread = {}
    for key in results[config.seeds[0]]["numbers"]:
        values = [r["numbers"].get(key, float("nan")) for r in results.values()]
        spread[key] = {"values": values, "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    out = {"seeds": config.seeds, "claims": verdicts, "numbers": spread}
    (root / "seeds.json").write_text(json.dumps(out, indent=2) + "\n")
    mark = {True: "holds", False: "FAILED", None: "n/a"}
    lines = [
        "# The demo on seeds " + ", ".join(map(str, config.seeds)),
        "",
        "| claim | " + " | ".join(f"seed {s}" for s in config.seeds) + " |",
        "|---|" + "---|" * len(config.seeds),
    ]
    lines += [f"| {c} | " + " | ".join(mark[v] for v in vs) + " |" for c, vs in verdicts.items()]
    lines += ["", "| number | mean | min | max | per seed |", "|---|---|---|---|---|"]
    lines += [
        f"| {k} | {v['mean']:+.3f} | {v['min']:+.3f} | {v['max']:+.3f} | "
        + ", ".join(f"{x:+.3f}" for x in v["values"])
        + " |"
        for k, v in spread.items()
    ]
    (root / "seeds.md").write_text("\n".join(lines) + "\n")
    from preflab.report.html import ReportConfig, report

    report(ReportConfig(run_dir=str(root)))
    print("\n" + "\n".join(lines), flush=True)
    return out


@stage(DemoConfig)
def demo(config: DemoConfig) -> dict:
    set_threads(config.threads)
    root = Path(config.out) if config.out else default_out("demo")
    return demo_seeds(config, root) if config.seeds else demo_once(config, root)
