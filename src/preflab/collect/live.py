"""The live reward model: retrain on the votes so far in a background process, while people keep voting.

`start_job` records a job and starts `python -m preflab.collect.live DIR JOB` as its own process (its own
session: a server restart does not kill it, and voting never waits for it). The worker exports the votes
(the same export as `preflab collect export`), trains `preflab reward` on them with a share held out, and
writes the held-out accuracy, i.e. the model's agreement with votes it never saw, back to the job row. With
an ensemble of two or more members it also scores every pair's disagreement for active sampling:

    p_k = sigmoid(r_k(prompt, a) - r_k(prompt, b)),  BALD = H(mean_k p_k) - mean_k H(p_k)

(Houlsby et al. 2011): high where members are individually confident but disagree with each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from preflab.collect.db import Pair, TrainJob, now, open_database
from preflab.collect.export import export_rows, to_jsonl
from preflab.collect.project import Project, load_project

MIN_VOTES = 8


class TrainBusy(Exception):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def latest_job(session: Session) -> TrainJob | None:
    return session.scalar(select(TrainJob).order_by(TrainJob.id.desc()).limit(1))


def start_job(session: Session, *, project: Project) -> TrainJob:
    """Record a job and start its worker process; refuses while another job's worker is alive."""
    running = session.scalar(select(TrainJob).where(TrainJob.status == "running"))
    if running is not None:
        pid = int(running.message.split()[-1]) if running.message.startswith("pid ") else 0
        if pid and _alive(pid):
            raise TrainBusy(f"training job {running.id} is still running")
        running.status, running.message, running.finished_at = (
            "failed",
            "the worker process ended without a result",
            now(),
        )
    job = TrainJob(status="running", created_at=now(), run_dir="", message="")
    session.add(job)
    session.commit()
    live = project.dir / "live"
    live.mkdir(exist_ok=True)
    pid = start_worker("preflab.collect.live", [str(project.dir), str(job.id)], project.db, live / f"job-{job.id}.log")
    job.message = f"pid {pid}"
    session.commit()
    return job


def start_worker(module: str, args: list[str], db: str, log_path: Path) -> int:
    """`python -m module ARGS [--db URL]` in its own session (it outlives the request, and a server restart),
    output to `log_path`, OpenMP threads waiting passively beside the server; returns its pid."""
    cmd = [sys.executable, "-m", module, *args, *(["--db", db] if db else [])]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    return proc.pid


def bald(member_rewards_a, member_rewards_b):
    """BALD disagreement per pair from [members, pairs] rewards of the two responses."""
    import torch

    def entropy(p):
        p = p.clamp(1e-6, 1 - 1e-6)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    p = torch.sigmoid(member_rewards_a - member_rewards_b)
    return entropy(p.mean(0)) - entropy(p).mean(0)


def score_pairs(session: Session, model_dir: Path) -> int:
    """Store each pair's BALD score from the ensemble in `model_dir` (active sampling reads it)."""
    from preflab.reward.model import RewardEnsemble, load_reward_model

    model = load_reward_model(model_dir)
    if not isinstance(model, RewardEnsemble):
        return 0
    pairs = list(session.scalars(select(Pair)))
    session.rollback()
    prompts = [json.loads(p.prompt) for p in pairs]
    scores = bald(
        model.member_rewards(prompts, [p.response_a for p in pairs]),
        model.member_rewards(prompts, [p.response_b for p in pairs]),
    )
    for pair, s in zip(pairs, scores.tolist()):
        session.execute(update(Pair).where(Pair.id == pair.id).values(score=float(s)))
    session.commit()
    return len(pairs)


def run_job(project: Project, sessions, job_id: int) -> dict:
    """The worker: export, train with a held-out share, write the result to the job row."""
    from preflab.reward.train import RewardConfig, train_reward

    out = project.dir / "live" / f"job-{job_id}"
    out.mkdir(parents=True, exist_ok=True)
    with sessions() as session:
        rows = export_rows(session, authored=True)
    result = {"status": "failed", "votes": len(rows), "message": ""}
    try:
        if not project.reward_model:
            raise ValueError("no reward_model backbone set: `preflab collect init ... --reward-model M`")
        if len(rows) < MIN_VOTES:
            raise ValueError(f"only {len(rows)} comparisons so far: the live reward model needs at least {MIN_VOTES}")
        data = out / "votes.jsonl"
        data.write_text(to_jsonl(rows))
        options = {"held_out": 0.2, "epochs": 1, **project.live_options}
        summary = train_reward(
            RewardConfig(model=project.reward_model, data=str(data), out=str(out / "run"), **options)
        )
        result.update(
            status="done",
            accuracy=summary.get("eval_accuracy"),
            held_out=summary.get("eval_pairs", 0),
            run_dir=str(out / "run"),
        )
        with sessions() as session:
            scored = score_pairs(session, Path(summary["model"]))
        result["message"] = f"{summary['train_pairs']} training pairs" + (
            f"; {scored} pairs scored for active sampling" if scored else ""
        )
    except Exception as exc:  # the job row must say why; the log has the traceback
        import traceback

        traceback.print_exc()
        result["message"] = f"{type(exc).__name__}: {exc}"[:2000]
    with sessions() as session:
        session.execute(
            update(TrainJob)
            .where(TrainJob.id == job_id)
            .values(
                status=result["status"],
                votes=result["votes"],
                held_out=result.get("held_out", 0),
                accuracy=result.get("accuracy"),
                run_dir=result.get("run_dir", ""),
                message=result["message"],
                finished_at=now(),
            )
        )
        session.commit()
    return result


def main(argv: list[str]) -> int:
    directory, job = argv[0], int(argv[1])
    db = argv[argv.index("--db") + 1] if "--db" in argv else ""
    project = load_project(directory, db=db)
    _, sessions = open_database(project.db_url)
    return 0 if run_job(project, sessions, job)["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
