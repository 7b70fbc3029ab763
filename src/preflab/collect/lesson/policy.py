""" "Train the policy on my preferences": DPO on the votes (or PPO on the live reward model) in the background,
then held-out prompts answered before and after, measured against the true utility.

`start_policy_job` writes `lesson/policy-N/status.json` and starts `python -m preflab.collect.lesson.policy DIR N`
as its own process (as the live reward model's worker does), so voting never waits for it. The worker

    1. exports the votes (the person's own, or everyone's including simulated annotators) as comparison JSONL
    2. trains from the SFT policy with a budget in optimiser steps: `preflab dpo` on those votes, or
       `preflab ppo` against the newest live reward model (which was trained on the same votes)
    3. evaluates both policies on held-out world prompts (`preflab eval policy`: one sample per prompt and
       policy, the same seed) and summarises what the page shows: the change in true utility paired by prompt,
       the KL to the SFT policy (k1 on the new policy's samples) and the change in length, each a mean with a
       95% bootstrap interval over prompts, and the first prompts side by side

Progress is the newest `step` in the training run's metrics.jsonl over the step budget. The job files hold
no secret and no vote text beyond the export the worker trains on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from preflab.collect.lesson import Lesson
from preflab.collect.live import start_worker

ALGORITHMS = ("dpo", "ppo")
DATA = ("mine", "all")
MIN_VOTES = 8
SIDE_BY_SIDE = 6


class PolicyBusy(Exception):
    pass


def jobs_dir(project_dir: Path) -> Path:
    return Path(project_dir) / "lesson"


def read_status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def write_status(job_dir: Path, status: dict) -> None:
    tmp = job_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.replace(job_dir / "status.json")  # atomic: the page never reads half a file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def list_jobs(project_dir: Path) -> list[dict]:
    """Every policy job, oldest first, with its progress; a running job whose process is gone is marked failed."""
    root = jobs_dir(project_dir)
    out = []
    for job_dir in sorted(root.glob("policy-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []:
        try:
            status = read_status(job_dir)
        except (OSError, json.JSONDecodeError):
            continue
        pid = (job_dir / "pid").read_text().strip() if (job_dir / "pid").is_file() else ""
        if status["status"] == "running" and not (pid.isdigit() and int(pid) > 0 and _alive(int(pid))):
            status.update(status="failed", message="the worker process ended without a result")
            write_status(job_dir, status)
        status["step"] = last_step(job_dir / "run" / "metrics.jsonl")
        out.append(status)
    return out


def last_step(metrics: Path) -> int:
    """The newest logged step of a run (0 before the first log line)."""
    if not metrics.is_file():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError, AttributeError):
            continue  # the line being written right now
    return step


def start_policy_job(project_dir: Path, lesson: Lesson, *, algorithm: str, data: str, db: str = "") -> dict:
    """Record a job and start its worker; refuses while another policy job's worker is alive."""
    if algorithm not in ALGORITHMS or data not in DATA:
        raise ValueError(f"algorithm must be one of {ALGORITHMS} and data one of {DATA}, got {algorithm!r}, {data!r}")
    jobs = list_jobs(project_dir)
    running = [j for j in jobs if j["status"] == "running"]
    if running:
        raise PolicyBusy(f"policy job {running[0]['id']} is still running")
    job_id = 1 + max((j["id"] for j in jobs), default=0)
    job_dir = jobs_dir(project_dir) / f"policy-{job_id}"
    job_dir.mkdir(parents=True)
    (job_dir / "pid").write_text(str(os.getpid()))  # until the worker's own pid replaces it (no "failed" flash)
    options = lesson.dpo if algorithm == "dpo" else lesson.ppo
    status = {
        "id": job_id,
        "algorithm": algorithm,
        "data": data,
        "status": "running",
        "phase": "starting",
        "max_steps": int(options["max_steps"]),
        "votes": 0,
        "message": "",
        "created_at": time.time(),
    }
    write_status(job_dir, status)
    pid = start_worker("preflab.collect.lesson.policy", [str(project_dir), str(job_id)], db, job_dir / "worker.log")
    (job_dir / "pid").write_text(str(pid))  # its own file: the worker alone writes status.json from now on
    return status


def training_rows(rows: list[dict], lesson: Lesson, data: str) -> list[dict]:
    """The export rows a job trains on: the person's own votes, or everyone's."""
    return [r for r in rows if data == "all" or r.get("annotator") == lesson.person]


def newest_reward_model(session) -> str:
    """The run folder of the newest finished live reward model ("" when none has finished)."""
    from sqlalchemy import select

    from preflab.collect.db import TrainJob

    job = session.scalar(select(TrainJob).where(TrainJob.status == "done").order_by(TrainJob.id.desc()).limit(1))
    return job.run_dir if job is not None else ""


def before_after(samples: list[dict], before: str = "before", after: str = "after", seed: int = 0) -> dict:
    """What the page shows, from `preflab eval policy`'s samples.jsonl rows (the same prompts, in order)."""
    from preflab.evaluate.stats import bootstrap_mean, paired_difference
    from preflab.world.tutor import question_of

    b = [s for s in samples if s["policy"] == before]
    a = [s for s in samples if s["policy"] == after]
    assert [s["prompt"] for s in a] == [s["prompt"] for s in b], "before and after must answer the same prompts"
    ub, ua = [s["utility"] for s in b], [s["utility"] for s in a]
    lb, la = [len(s["response"].split()) for s in b], [len(s["response"].split()) for s in a]
    words_change, utility_change = paired_difference(la, lb, seed=seed), paired_difference(ua, ub, seed=seed)
    return {
        "prompts": len(b),
        # the lesson's warning: longer for sure (the interval above 0), better not for sure
        "length_warning": bool(words_change.low > 0 and utility_change.low <= 0),
        "utility_before": bootstrap_mean(ub, seed=seed).as_dict(),
        "utility_after": bootstrap_mean(ua, seed=seed).as_dict(),
        "utility_change": utility_change.as_dict(),
        "kl": bootstrap_mean([s["kl"] for s in a], seed=seed).as_dict(),
        "words_before": float(sum(lb) / len(lb)),
        "words_after": float(sum(la) / len(la)),
        "words_change": words_change.as_dict(),
        "side_by_side": [
            {
                "question": question_of(x["prompt"]),
                "before": x["response"],
                "after": y["response"],
                "utility_before": x["utility"],
                "utility_after": y["utility"],
            }
            for x, y in zip(b[:SIDE_BY_SIDE], a[:SIDE_BY_SIDE])
        ],
    }


def run_job(project_dir: Path, job_id: int, db: str = "") -> dict:
    """The worker (module docstring steps 1-3); the status file says how it went."""
    from preflab.collect.db import open_database
    from preflab.collect.export import export_rows, to_jsonl
    from preflab.collect.lesson import load_lesson
    from preflab.collect.project import load_project
    from preflab.config import build_config
    from preflab.evaluate.policy import EvalConfig, evaluate_policies

    job_dir = jobs_dir(project_dir) / f"policy-{job_id}"
    status = read_status(job_dir)
    try:
        project, lesson = load_project(project_dir, db=db), load_lesson(project_dir)
        engine, sessions = open_database(project.db_url)
        with sessions() as session:
            rows = training_rows(export_rows(session, authored=False), lesson, status["data"])
            reward = newest_reward_model(session) if status["algorithm"] == "ppo" else ""
        engine.dispose()
        decided = [r for r in rows if not r["tie"]]
        status.update(votes=len(decided), phase="training")
        write_status(job_dir, status)
        if len(decided) < MIN_VOTES:
            raise ValueError(f"only {len(decided)} decided votes to train on: at least {MIN_VOTES} are needed")
        (job_dir / "votes.jsonl").write_text(to_jsonl(rows))
        common = {"model": lesson.sft, "out": str(job_dir / "run"), "seed": lesson.seed, "threads": 1}
        if status["algorithm"] == "dpo":
            from preflab.policy.dpo import dpo

            options = {"held_out": 0.0, "eval_every": 0, "log_every": 1, "epochs": 1000.0, **lesson.dpo}
            values = {**common, "data": str(job_dir / "votes.jsonl"), **options}
            dpo(build_config(dpo.config_class, values, "lesson dpo"))
        else:
            from preflab.policy.ppo import ppo

            if not reward:
                raise ValueError("PPO needs a trained reward model: retrain the reward model first")
            options = {"eval_prompts": 0, "log_every": 1, "max_new_tokens": lesson.max_new_tokens, **lesson.ppo}
            ppo(build_config(ppo.config_class, {**common, "reward": reward, **options}, "lesson ppo"))
        status["phase"] = "evaluating"
        write_status(job_dir, status)
        evaluate_policies(
            EvalConfig(
                reference=lesson.sft,
                reference_name="before",
                policies=[f"after={job_dir / 'run'}"],
                n_prompts=lesson.eval_prompts,
                max_new_tokens=lesson.max_new_tokens,
                threads=1,
                seed=lesson.seed,
                out=str(job_dir / "eval"),
            )
        )
        samples = [json.loads(x) for x in (job_dir / "eval" / "samples.jsonl").read_text().splitlines()]
        result = before_after(samples, seed=lesson.seed)
        status.update(status="done", phase="done", result=result, finished_at=time.time())
    except Exception as exc:  # the page must say why; the log has the traceback
        import traceback

        traceback.print_exc()
        status.update(
            status="failed", phase="failed", message=f"{type(exc).__name__}: {exc}"[:2000], finished_at=time.time()
        )
    write_status(job_dir, status)
    return status


def main(argv: list[str]) -> int:
    db = argv[argv.index("--db") + 1] if "--db" in argv else ""
    return 0 if run_job(Path(argv[0]), int(argv[1]), db)["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
