"""The admin numbers (agreement and biases from the bias audit, on votes whose answers are known), and the live
reward model: the button and `preflab collect train` retrain in a background process while voting goes on,
report held-out agreement, and (with an ensemble) score pairs for active sampling."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from preflab.cli import main
from preflab.collect import store
from preflab.collect.agreement import summary
from preflab.collect.db import Pair, TrainJob, Vote, open_database
from preflab.evaluate import bias

from .support import bearer, new_project


def vote_by_truth(s, person, overlap, decide) -> None:
    """`person` votes on every pair it is given; decide(pair_id, left_is_a) -> choice."""
    while (found := store.next_assignment(s, annotator_id=person.id, overlap=overlap)) is not None:
        assignment, pair = found
        store.record_vote(s, annotator_id=person.id, pair_id=pair.id, choice=decide(pair.id, assignment.left_is_a))


def a_wins(pair_id: int) -> bool:
    return pair_id % 2 == 1


def test_agreement_and_bias_match_known_answers_and_the_audit_of_the_export(tmp_path, db_url):
    project = new_project(tmp_path / "p", db_url, n_pairs=12, overlap=3)
    _, sessions = open_database(project.db_url)
    truthful = lambda pid, left_is_a: "left" if a_wins(pid) == bool(left_is_a) else "right"  # noqa: E731
    with sessions() as s:
        for name, decide in (
            ("ana", truthful),
            ("bob", truthful),
            ("cat", lambda pid, left_is_a: "right" if truthful(pid, left_is_a) == "left" else "left"),
        ):
            vote_by_truth(s, store.create_annotator(s, name=name)[0], 3, decide)
        result = summary(s, overlap=3)
        assert result["progress"]["votes"] == 36 and result["progress"]["done"] == 1.0
        kappa = result["agreement"]["cohen_kappa"]
        assert kappa["ana|bob"] == {"kappa": 1.0, "n": 12}
        assert kappa["ana|cat"]["kappa"] == pytest.approx(-1.0)  # balanced labels: complete disagreement is -1
        # each person's P(prefer left) is what their votes say, with the audit's Wilson interval
        votes = {v.annotator_id: [] for v in s.scalars(select(Vote))}
        for v in s.scalars(select(Vote)):
            votes[v.annotator_id].append(v.choice == "left")
        assert result["annotators"]["ana"]["prefer_left"] == bias.wilson(sum(votes[1]), 12)
    # the same numbers as `preflab eval bias` on the export
    out = tmp_path / "votes.jsonl"
    assert main(["collect", "export", str(project.dir), "--out", str(out)]) == 0
    audit_votes, positioned = bias.read_votes(str(out))
    assert positioned and bias.agreement(audit_votes, 3) == result["agreement"]


def test_a_left_clicker_shows_position_bias(tmp_path, db_url):
    project = new_project(tmp_path / "p", db_url, n_pairs=20, overlap=1)
    _, sessions = open_database(project.db_url)
    with sessions() as s:
        vote_by_truth(s, store.create_annotator(s, name="lefty")[0], 1, lambda pid, left_is_a: "left")
        result = summary(s, overlap=1)
    lefty = result["annotators"]["lefty"]["prefer_left"]
    assert (lefty["rate"], lefty["n"]) == (1.0, 20) and lefty["low"] > 0.8
    assert result["regression"]["position"]["coef"] > 3  # the audit's logit for the left side


def wait_job(sessions, seconds: float = 240) -> TrainJob:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with sessions() as s:
            job = s.scalar(select(TrainJob).order_by(TrainJob.id.desc()))
        if job is not None and job.status != "running":
            return job
        time.sleep(0.5)
    raise AssertionError("the training job did not finish in time")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_live_reward_model_trains_in_the_background_while_people_vote(tmp_path, db_url, model_dir):
    project = new_project(
        tmp_path / "p",
        db_url,
        n_pairs=30,
        overlap=1,
        reward_model=str(model_dir),
        live_options={"ensemble": 2, "max_steps": 2, "batch_size": 4, "threads": 1},
    )
    _, sessions = open_database(project.db_url)
    with sessions() as s:
        person, _ = store.create_annotator(s, name="ana")
        for _ in range(20):
            assignment, pair = store.next_assignment(s, annotator_id=person.id, overlap=1)
            store.record_vote(s, annotator_id=person.id, pair_id=pair.id, choice="left")
        _, root = store.create_annotator(s, name="root", is_admin=True)
        _, bob = store.create_annotator(s, name="bob")
    from fastapi.testclient import TestClient

    from preflab.collect.app import create_app

    with TestClient(create_app(project, sessions)) as client:
        started = client.post("/api/admin/train", headers=bearer(root))
        assert started.status_code == 202 and started.json()["status"] == "running"
        assert client.post("/api/admin/train", headers=bearer(root)).status_code == 409  # one job at a time
        # voting is not blocked while the worker trains
        pair = client.get("/api/next", headers=bearer(bob)).json()
        t0 = time.monotonic()
        assert (
            client.post(
                "/api/votes", headers=bearer(bob), json={"pair_id": pair["pair_id"], "choice": "tie"}
            ).status_code
            == 201
        )
        assert time.monotonic() - t0 < 5
        job = wait_job(sessions)
        assert job.status == "done", job.message
        status = client.get("/api/admin/train", headers=bearer(root)).json()
    assert status["held_out"] == job.held_out == 4  # 20% of the 20 votes exported when the job started
    assert 0 <= status["accuracy"] <= 1
    assert "30 pairs scored for active sampling" in status["message"]
    with sessions() as s:
        scores = {p.id: p.score for p in s.scalars(select(Pair))}
        assert all(v is not None and v >= -1e-6 for v in scores.values())  # BALD is a mutual information: >= 0
        # active sampling (no random share) gives the unseen pair the ensemble disagrees on most, and says so
        found = store.next_assignment(s, annotator_id=person.id, overlap=1, random_share=0.0)
        assigned = {v.pair_id for v in s.scalars(select(Vote))}
        best = max((pid for pid in scores if pid not in assigned), key=scores.get)
        assert (found[0].rule, found[1].id) == ("active", best)


@pytest.mark.slow
def test_collect_train_command_reports_held_out_agreement(tmp_path, model_dir, capsys):
    project = new_project(
        tmp_path / "p",
        "",
        n_pairs=12,
        overlap=1,
        reward_model=str(model_dir),
        live_options={"max_steps": 2, "batch_size": 4, "threads": 1},
    )
    _, sessions = open_database(project.db_url)
    assert main(["collect", "train", str(project.dir)]) == 2  # no votes yet: a clear failure
    assert "needs at least 8" in capsys.readouterr().err
    with sessions() as s:
        vote_by_truth(s, store.create_annotator(s, name="ana")[0], 1, lambda pid, left_is_a: "right")
    assert main(["collect", "train", str(project.dir)]) == 0
    out = capsys.readouterr().out
    assert "held-out agreement" in out and "on 2 votes" in out  # 20% of 12, rounded
    run = json.loads((project.dir / "live" / "job-2" / "run" / "summary.json").read_text())
    assert run["train_pairs"] == 10 and run["eval_pairs"] == 2
