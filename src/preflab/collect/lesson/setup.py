"""`preflab collect demo`: a lesson project with world prompts and SFT candidates, one person's link, the server.

    preflab collect demo                        # builds a small SFT policy first (fast preset), then serves
    preflab collect demo DIR --model runs/demo-x # the SFT policy of an earlier `preflab demo` (its sft/)

1. the SFT policy: `--model` (a demo folder's `sft/`, an SFT run folder or a model directory), else one is built
   with the demo's own stages on the `fast` preset (pretrain is cached by `preflab.demo.pretrain_cached`, so a
   second lesson reuses the base model); the time it took is printed and kept in lesson.json
2. candidates: `k` answers per world training prompt from that policy; every distinct pair is a pair to vote on
3. the collection project (the SFT policy is the live reward model's backbone), the person (an admin, so the
   admin page works too) and `lesson.json`
4. the link is printed and the server started (`--no-serve` stops after printing). Rerunning on an existing
   lesson folder serves it again and prints the same link.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from preflab.collect.lesson import Lesson, load_lesson
from preflab.config import check, opt
from preflab.stages import stage

# The live reward model on a lesson: small steps on few votes (the live default of 1 epoch is 3 steps on 30
# votes); a step cap keeps a thousand simulated votes from making each retrain minutes long.
LIVE_OPTIONS = {
    "epochs": 3,
    "lr": 1e-3,
    "batch_size": 8,
    "max_steps": 40,
    "max_completion_length": 48,
    "held_out": 0.25,
    "threads": 1,
}


@dataclass
class LessonConfig:
    dir: str = opt("", "the lesson folder (default runs/lesson-<time>)", positional=True)
    model: str = opt(
        "",
        "the SFT policy: a `preflab demo` folder (its sft/), an SFT run folder or a model "
        "directory; empty: build one with the `fast` preset first",
    )
    build_preset: str = opt("fast", "preset of the demo stages used to build the SFT policy when --model is empty")
    n_prompts: int = opt(200, "world training prompts to sample candidates for")
    k: int = opt(4, "answers sampled per prompt (every distinct pair becomes a pair to vote on)")
    max_new_tokens: int = opt(32, "longest sampled answer, in tokens")
    overlap: int = opt(3, "annotators per pair (room for simulated annotators beside the person)")
    name: str = opt("you", "the person's name")
    every: int = opt(10, "retrain the reward model after every N new votes (0: only on the button)")
    eval_prompts: int = opt(48, "held-out prompts for the before / after panel")
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    serve: bool = opt(True, "start the server after printing the link")
    browser: bool = opt(False, "also open the link in the default web browser")
    seed: int = opt(0, "seed for building, sampling and the held-out prompts")

    def __post_init__(self):
        check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        check(self.k >= 2, f"k must be >= 2 (a pair needs two answers), got {self.k}")
        check(self.overlap >= 1, f"overlap must be >= 1, got {self.overlap}")
        check(self.every >= 0, f"every must be >= 0, got {self.every}")
        check(self.eval_prompts >= 2, f"eval_prompts must be >= 2, got {self.eval_prompts}")
        check(0 < self.port < 65536, f"port must be in 1..65535, got {self.port}")


def resolve_sft(spec: str) -> Path:
    """The SFT model directory behind `spec`: a demo folder (sft/), a run folder (model/) or a model directory."""
    from preflab.models import resolve_model_path

    path = Path(spec)
    if (path / "sft").is_dir() and not (path / "config.json").exists():
        path = path / "sft"
    return resolve_model_path(path)[0].resolve()  # absolute: the background workers may start elsewhere


def build_sft(root: Path, preset: str, seed: int) -> tuple[Path, float]:
    """An SFT policy built by the demo's own stages (pretrain cached) on `preset`; (model dir, seconds)."""
    from preflab.config import load_preset
    from preflab.demo import DemoConfig, Pipeline, pretrain_cached

    sections = load_preset(preset).get("demo", {})
    config = DemoConfig(out=str(root), seed=seed, **{k: v for k, v in sections.items() if k in ("pretrain", "sft")})
    p = Pipeline(root, config, n_stages=2)
    pretrain_cached(p, f"pretrain ({preset} preset; cached after the first time)")
    p.run("sft", "sft: imperfect demonstrations", model=str(root / "pretrain"))
    return (root / "sft" / "model").resolve(), time.time() - p.started


def create_lesson(config: LessonConfig, root: Path) -> tuple[Lesson, dict]:
    """Steps 1-3 of the module docstring; returns the lesson and the timings."""
    from preflab.collect import store
    from preflab.collect.cli import read_pairs
    from preflab.collect.db import open_database
    from preflab.collect.project import create_project
    from preflab.generate import GenerateConfig, generate_stage

    times = {}
    if config.model:
        sft = resolve_sft(config.model)
    else:
        print(f"[lesson] no --model: building a small SFT policy with the {config.build_preset!r} preset", flush=True)
        sft, times["build_sft_seconds"] = build_sft(root / "build", config.build_preset, config.seed)
        print(f"[lesson] SFT policy built in {times['build_sft_seconds']:.0f}s: {sft}", flush=True)
    start = time.time()
    gen = generate_stage(
        GenerateConfig(
            model=str(sft),
            prompts="world",
            split="train",
            n_prompts=config.n_prompts,
            n=config.k,
            max_new_tokens=config.max_new_tokens,
            pairs=True,
            seed=config.seed,
            out=str(root / "generate"),
        )
    )
    pairs = read_pairs(str(Path(gen["run_dir"]) / "pairs.jsonl"))
    times["candidates_seconds"] = round(time.time() - start, 1)
    base_url = f"http://{config.host}:{config.port}"
    project = create_project(
        root, overlap=config.overlap, base_url=base_url, reward_model=str(sft), live_options=dict(LIVE_OPTIONS)
    )
    engine, sessions = open_database(project.db_url)
    with sessions() as session:
        store.add_pairs(session, pairs=pairs)
        _, token = store.create_annotator(session, name=config.name, is_admin=True)
    engine.dispose()
    lesson = Lesson(
        sft=str(sft),
        person=config.name,
        link=f"{base_url}/lesson/login/{token}",
        every=config.every,
        eval_prompts=config.eval_prompts,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    lesson.save(root)
    (root / "lesson-times.json").write_text(json.dumps({**times, "pairs": len(pairs)}, indent=2) + "\n")
    print(
        f"[lesson] {len(pairs)} pairs from {config.n_prompts} prompts x {config.k} answers "
        f"({times['candidates_seconds']:.0f}s)",
        flush=True,
    )
    return lesson, times


@stage(LessonConfig)
def demo(config: LessonConfig) -> dict:
    from preflab.runs import default_out

    root = Path(config.dir) if config.dir else default_out("lesson")
    lesson = load_lesson(root)
    if lesson is None:
        check(
            not (root / "project.json").exists(), f"{root} is a collection project but not a lesson: give a new folder"
        )
        lesson, times = create_lesson(config, root)
    else:
        times = {}
        print(f"[lesson] {root} exists: serving it again", flush=True)
    link = f"http://{config.host}:{config.port}/lesson/login/{lesson.link.rsplit('/', 1)[1]}"  # this server's
    print(f"\nOpen your link to vote and watch the models learn:\n  {link}\n", flush=True)
    if config.browser:
        import webbrowser

        webbrowser.open(link)
    if config.serve:
        from preflab.collect.cli import ServeConfig, serve

        serve(ServeConfig(dir=str(root), host=config.host, port=config.port))
    return {"dir": str(root), "link": link, **times}
