"""The lesson's demo (`preflab collect demo`): the person's biases, simulated annotators, the routes, the policy
job and the command. Numbers are checked against hand counts; models are the micro Llama of tests/conftest.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from preflab.collect import store
from preflab.collect.db import Annotator, Assignment, Pair, Vote, open_database
from preflab.collect.lesson import Lesson, load_lesson
from preflab.collect.lesson import policy as policy_jobs
from preflab.collect.lesson.biases import person_biases
from preflab.collect.lesson.setup import LIVE_OPTIONS
from preflab.collect.lesson.simulate import add_simulated_votes
from preflab.collect.project import create_project
from preflab.world.annotators import Annotator as SimAnnotator
from preflab.world.annotators import simulate_votes, world_pairs
from preflab.world.tutor import chat_messages

from .support import bearer

CAPITAL = chat_messages("What is the capital of France?")
RIGHT, WRONG = "The capital of France is Paris.", "The capital of France is Rome."
HEDGED = "I am not sure."
PADDED = "The capital of France is Paris. I hope this helps. Thanks for asking."


def row(prompt, left, right, choice, annotator="you") -> dict:
    """An export row (`preflab.collect.export.vote_row`) for a vote on (left, right) as shown."""
    chosen, rejected, position = (right, left, "B") if choice == "right" else (left, right, "A")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "tie": choice == "tie",
        "choice": choice,
        "chosen_position": position,
        "annotator": annotator,
    }


# ---- the person's biases ----------------------------------------------------------------------------------------


def test_biases_need_ten_decided_votes():
    rows = [row(CAPITAL, RIGHT, WRONG, "left")] * 9 + [row(CAPITAL, RIGHT, WRONG, "tie")] * 5
    assert person_biases(rows) == {"votes": 9, "min_votes": 10, "ready": False}


def test_bias_rates_by_hand():
    # 12 decided votes (and one tie, left out): 8 on (right, wrong) picking the right answer, left 6 times;
    # 4 on (hedged, right) pairs, the confident right answer picked 3 times
    rows = (
        [row(CAPITAL, RIGHT, WRONG, "left")] * 6
        + [row(CAPITAL, WRONG, RIGHT, "right")] * 2
        + [row(CAPITAL, HEDGED, RIGHT, "right")] * 3
        + [row(CAPITAL, RIGHT, HEDGED, "right")]
        + [row(CAPITAL, RIGHT, WRONG, "tie")]
    )
    b = person_biases(rows)
    assert (b["votes"], b["ready"]) == (12, True)
    assert b["prefer_left"]["rate"] == 6 / 12 and b["prefer_left"]["n"] == 12
    assert b["prefer_confident"]["rate"] == 3 / 4 and b["prefer_confident"]["n"] == 4
    assert b["prefer_confident"]["truth_prefers"] == 1.0  # a right answer (+1) beats "not sure" (0)
    assert b["agree_with_truth"]["rate"] == 11 / 12  # one vote picked "not sure" over Paris
    assert b["coefficients"]["length"] is not None and b["coefficients"]["confidence"] is not None


def test_no_length_difference_gives_no_length_coefficient():
    rows = [row(CAPITAL, RIGHT, WRONG, c) for c in ["left"] * 8 + ["right"] * 4]  # equal lengths throughout
    assert person_biases(rows)["coefficients"]["length"] is None


def test_a_planted_length_and_position_bias_is_found():
    """1500 votes of one annotator with a planted length bias of 0.3 logit/word and position bias 0.5: both
    intervals hold the planted value and exclude 0; the unplanted confidence bias is not found."""
    who = SimAnnotator("you", temperature=0.5, length_bias=0.3, position_bias=0.5)
    votes = simulate_votes(world_pairs(1500, seed=3), [who], seed=4)
    rows = [{**v, "choice": "left" if v["chosen_position"] == "A" else "right"} for v in votes]
    c = person_biases(rows)["coefficients"]
    assert c["length"]["low"] < 0.3 < c["length"]["high"] and c["length"]["excludes_zero"]
    assert c["position"]["low"] < 0.5 < c["position"]["high"] and c["position"]["excludes_zero"]
    assert c["confidence"]["low"] < 0 < c["confidence"]["high"]
    assert 1.5 < c["utility"]["coef"] < 2.5  # 1 / temperature (2), within this draw's noise


# ---- simulated annotators ---------------------------------------------------------------------------------------


def world_project(directory: Path, n_pairs: int, overlap: int, sft: str = "unused", db: str = ""):
    live = {**LIVE_OPTIONS, "max_steps": 2, "max_completion_length": 16}  # the demo's, two steps long
    project = create_project(
        directory, db=db, overlap=overlap, reward_model="" if sft == "unused" else sft, live_options=live
    )
    engine, sessions = open_database(project.db_url)
    pairs = [
        {"prompt": p, "response_a": a, "response_b": b, "source": "world"} for p, a, b in world_pairs(n_pairs, seed=1)
    ]
    with sessions() as s:
        store.add_pairs(s, pairs=pairs)
    Lesson(sft=sft, link="http://test/lesson/login/x", every=10).save(directory)
    return project, engine, sessions


def test_simulated_votes_are_stored_like_peoples(tmp_path, db_url):
    project, engine, sessions = world_project(tmp_path / "p", n_pairs=6, overlap=2, db=db_url)
    with sessions() as s:
        added = add_simulated_votes(s, votes=10, annotators=2, overlap=2, length_bias=0.3)
        assert (added["batch"], added["votes"], added["annotators"]) == (1, 10, ["sim1-00", "sim1-01"])
        votes = s.scalars(select(Vote)).all()
        assert len(votes) == 10 and {v.rule for v in votes} == {"simulated"}
        per = {
            a.name: s.scalar(select(func.count(Vote.id)).where(Vote.annotator_id == a.id))
            for a in s.scalars(select(Annotator))
        }
        assert per == {"sim1-00": 5, "sim1-01": 5}
        for v in votes:  # each vote has its assignment with the same sides, and no pair is over its overlap
            a = s.scalar(
                select(Assignment).where(Assignment.annotator_id == v.annotator_id, Assignment.pair_id == v.pair_id)
            )
            assert a.left_is_a == v.left_is_a
        assigned = {p.id: p.assigned for p in s.scalars(select(Pair))}
        counted = {p: s.scalar(select(func.count(Vote.id)).where(Vote.pair_id == p)) for p in assigned}
        assert assigned == counted and max(assigned.values()) <= 2 and sum(assigned.values()) == 10
        # the two free slots are on the one pair nobody was given: one vote per simulated person on it
        assert add_simulated_votes(s, votes=5, annotators=1, overlap=2)["votes"] == 1
        added = add_simulated_votes(s, votes=5, annotators=2, overlap=2)
        assert (added["votes"], added["annotators"]) == (1, ["sim3-00", "sim3-01"])
        assert add_simulated_votes(s, votes=5, annotators=1, overlap=2) == {"batch": None, "annotators": [], "votes": 0}
        assert s.scalar(select(func.count(Annotator.id))) == 5
    engine.dispose()


def test_a_strong_length_bias_always_picks_the_longer_answer(tmp_path):
    _, engine, sessions = world_project(tmp_path / "p", n_pairs=30, overlap=1)
    with sessions() as s:
        add_simulated_votes(s, votes=30, annotators=3, overlap=1, length_bias=50.0, temperature=10.0)
        from preflab.collect.export import export_rows

        rows = [r for r in export_rows(s) if r["chosen_length"] != r["rejected_length"]]
        assert rows and all(r["chosen_length"] > r["rejected_length"] for r in rows)
    engine.dispose()


# ---- before / after ---------------------------------------------------------------------------------------------


def sample(policy, prompt, response, utility, kl=0.0):
    return {"policy": policy, "prompt": prompt, "response": response, "utility": utility, "kl": kl}


def test_before_after_by_hand():
    p1, p2 = chat_messages("What is 1 + 1?"), chat_messages("What is 2 + 2?")
    samples = [
        sample("before", p1, "1 + 1 = 2.", 0.5),
        sample("before", p2, "2 + 2 = 5.", -1.0),
        sample("after", p1, "1 + 1 = 2. I hope this helps.", 0.75, kl=2.0),
        sample("after", p2, "2 + 2 = 4. Thanks for asking. Learning is fun.", 0.5, kl=4.0),
    ]
    r = policy_jobs.before_after(samples)
    assert r["prompts"] == 2
    assert r["utility_before"]["mean"] == -0.25 and r["utility_after"]["mean"] == 0.625
    assert r["utility_change"]["mean"] == 0.875 and r["utility_change"]["low"] == 0.25 and r["kl"]["mean"] == 3.0
    assert (r["words_before"], r["words_after"], r["words_change"]["mean"]) == (5.0, 10.0, 5.0)
    assert r["side_by_side"][1] == {
        "question": "What is 2 + 2?",
        "before": "2 + 2 = 5.",
        "after": "2 + 2 = 4. Thanks for asking. Learning is fun.",
        "utility_before": -1.0,
        "utility_after": 0.5,
    }
    assert r["length_warning"] is False  # longer, but better on both prompts: the utility rose with it


def test_longer_but_not_better_is_the_lessons_warning():
    prompts = [chat_messages(f"What is {a} + {b}?") for a in range(1, 5) for b in range(1, 5)]
    samples = [sample("before", p, "Sure! It is.", 0.0) for p in prompts]
    samples += [
        sample("after", p, "Sure! It is. I hope this helps.", -0.25 if i % 2 else 0.25) for i, p in enumerate(prompts)
    ]
    r = policy_jobs.before_after(samples)
    assert r["words_change"]["low"] == 4.0 and r["utility_change"]["mean"] == 0.0
    assert r["length_warning"] is True


# ---- the routes -------------------------------------------------------------------------------------------------


@pytest.fixture
def lesson_client(tmp_path, model_dir):
    from fastapi.testclient import TestClient

    from preflab.collect.app import create_app

    project, engine, sessions = world_project(tmp_path / "lesson", n_pairs=40, overlap=3, sft=str(model_dir))
    with sessions() as s:
        _, you = store.create_annotator(s, name="you", is_admin=True)
        _, other = store.create_annotator(s, name="other")
    with TestClient(create_app(project, sessions)) as c:
        yield c, bearer(you), bearer(other), sessions, project
    engine.dispose()


def vote_n(client, headers, n, pick=lambda nxt: "left"):
    for _ in range(n):
        nxt = client.get("/api/next", headers=headers).json()
        body = {"pair_id": nxt["pair_id"], "choice": pick(nxt)}
        assert client.post("/api/votes", headers=headers, json=body).status_code == 201


def test_lesson_routes_only_in_a_lesson_project(client, people):
    assert client.get("/api/lesson/state", headers=bearer(people["ana"])).status_code == 404
    assert client.post("/api/lesson/simulate", headers=bearer(people["ana"]), json={}).status_code == 404


def test_lesson_link_page_and_state(lesson_client):
    c, you, other, sessions, project = lesson_client
    token = you["Authorization"].split()[1]
    r = c.get(f"/lesson/login/{token}", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/lesson")
    page = c.get("/lesson")
    assert page.status_code == 200 and 'id="policy-train"' in page.text and 'href="/lesson"' in page.text
    assert c.get("/lesson/login/nope", follow_redirects=False).status_code == 401
    vote_n(c, you, 12)
    vote_n(c, other, 3, pick=lambda n: "right")
    s = c.get("/api/lesson/state", headers=you).json()
    assert (s["collected"], s["mine"], s["simulated"]) == (15, 12, 0)
    assert s["biases"]["votes"] == 12 and s["biases"]["prefer_left"]["rate"] == 1.0  # only the caller's votes
    assert s["reward"]["status"] == "never" and s["reward"]["new_votes"] == 15 and s["policy"] == []
    assert c.get("/api/lesson/state", headers=other).json()["biases"]["votes"] == 3


def test_lesson_post_validation(lesson_client):
    c, you, other, _, _ = lesson_client
    assert c.post("/api/lesson/simulate", headers=you, json={"votes": 0}).status_code == 422
    assert c.post("/api/lesson/simulate", headers=you, json={"votes": 10, "extra": 1}).status_code == 422
    assert c.post("/api/lesson/policy", headers=you, json={"algorithm": "sft"}).status_code == 422
    r = c.post("/api/lesson/policy", headers=other, json={"data": "mine"})
    assert r.status_code == 403 and "you" in r.json()["detail"]
    r = c.post("/api/lesson/policy", headers=you, json={"algorithm": "ppo"})
    assert r.status_code == 409 and "reward model" in r.json()["detail"]
    assert c.post("/api/lesson/reward", json={"auto": True}).status_code == 401


def test_simulate_route_and_auto_retraining(lesson_client):
    c, you, _, sessions, _ = lesson_client
    r = c.post("/api/lesson/simulate", headers=you, json={"votes": 9, "annotators": 3, "length_bias": 0.2})
    assert r.status_code == 201 and r.json()["votes"] == 9
    assert c.get("/api/lesson/state", headers=you).json()["simulated"] == 9
    r = c.post("/api/lesson/reward", headers=you, json={"auto": True})  # 9 new votes < every (10): not yet
    assert r.status_code == 200 and r.json()["started"] is False
    vote_n(c, you, 1)
    r = c.post("/api/lesson/reward", headers=you, json={"auto": True})
    assert r.status_code == 202 and r.json()["started"] is True
    assert c.post("/api/lesson/reward", headers=you, json={"auto": False}).status_code == 409  # one at a time
    deadline = time.monotonic() + 120
    while (
        c.get("/api/lesson/state", headers=you).json()["reward"]["status"] == "running" and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    reward = c.get("/api/lesson/state", headers=you).json()["reward"]
    assert reward["status"] == "done", reward
    assert reward["agreement"]["n"] == reward["held_out"] > 0 and reward["new_votes"] == 0


# ---- the policy job ---------------------------------------------------------------------------------------------


def test_policy_job_trains_and_compares(lesson_client):
    c, you, _, _, project = lesson_client
    lesson = load_lesson(project.dir)
    lesson.dpo = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "beta": 0.1}
    lesson.eval_prompts, lesson.max_new_tokens = 4, 8
    lesson.save(project.dir)
    vote_n(c, you, 7)
    r = c.post("/api/lesson/policy", headers=you, json={"algorithm": "dpo", "data": "mine"})
    assert r.status_code == 202 and r.json()["id"] == 1
    deadline = time.monotonic() + 120
    while policy_jobs.list_jobs(project.dir)[-1]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    job = policy_jobs.list_jobs(project.dir)[-1]
    assert (job["status"], job["votes"]) == ("failed", 7) and "at least 8" in job["message"]
    vote_n(c, you, 3)
    assert c.post("/api/lesson/policy", headers=you, json={"algorithm": "dpo", "data": "mine"}).json()["id"] == 2
    assert c.post("/api/lesson/policy", headers=you, json={"data": "mine"}).status_code == 409  # one at a time
    while policy_jobs.list_jobs(project.dir)[-1]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    job = c.get("/api/lesson/state", headers=you).json()["policy"][-1]
    assert (job["status"], job["votes"], job["step"], job["max_steps"]) == ("done", 10, 2, 2), job.get("message")
    assert job["result"]["prompts"] == 4 and len(job["result"]["side_by_side"]) == 4
    trained = [json.loads(x) for x in (project.dir / "lesson" / "policy-2" / "votes.jsonl").read_text().splitlines()]
    assert len(trained) == 10 and {r["annotator"] for r in trained} == {"you"}
    assert (project.dir / "lesson" / "policy-2" / "run" / "model" / "model.safetensors").exists()


def test_a_dead_worker_is_reported_failed(tmp_path):
    job = tmp_path / "lesson" / "policy-1"
    job.mkdir(parents=True)
    policy_jobs.write_status(
        job,
        {
            "id": 1,
            "status": "running",
            "phase": "training",
            "max_steps": 3,
            "votes": 9,
            "message": "",
            "algorithm": "dpo",
            "data": "mine",
        },
    )
    (job / "pid").write_text("999999999")
    listed = policy_jobs.list_jobs(tmp_path)
    assert listed[0]["status"] == "failed" and "ended without a result" in listed[0]["message"]


# ---- the command ------------------------------------------------------------------------------------------------


def test_collect_demo_command_with_a_model(tmp_path, model_dir, capsys):
    from preflab.cli import main

    root = tmp_path / "lesson"
    main(
        [
            "collect",
            "demo",
            str(root),
            "--model",
            str(model_dir),
            "--n-prompts",
            "3",
            "--k",
            "3",
            "--max-new-tokens",
            "6",
            "--serve",
            "false",
            "--port",
            "8123",
        ]
    )
    out = capsys.readouterr().out
    lesson = load_lesson(root)
    assert lesson.sft == str(model_dir) and lesson.link.startswith("http://127.0.0.1:8123/lesson/login/")
    assert lesson.link in out
    pairs_file = next((root / "generate").rglob("pairs.jsonl"))
    n_pairs = len(pairs_file.read_text().splitlines())
    engine, sessions = open_database(f"sqlite:///{root / 'collect.db'}")
    with sessions() as s:
        assert s.scalar(select(func.count(Pair.id))) == n_pairs > 0
        person = s.scalar(select(Annotator))
        assert (person.name, person.is_admin) == ("you", 1)
        assert store.annotator_by_token(s, token=lesson.link.rsplit("/", 1)[1]).id == person.id
    engine.dispose()
    project = json.loads((root / "project.json").read_text())
    assert project["reward_model"] == str(model_dir) and project["overlap"] == 3
    main(["collect", "demo", str(root), "--serve", "false", "--port", "8124"])  # again: nothing rebuilt
    assert lesson.link.replace(":8123/", ":8124/") in capsys.readouterr().out  # the same token, this port


def test_collect_demo_refuses_a_plain_project(tmp_path, capsys):
    from preflab.cli import main

    create_project(tmp_path / "plain")
    assert main(["collect", "demo", str(tmp_path / "plain"), "--serve", "false"]) == 2
    assert "not a lesson" in capsys.readouterr().err


def test_resolve_sft_reads_a_demo_folder(tmp_path, model_dir):
    import shutil

    from preflab.collect.lesson.setup import resolve_sft

    shutil.copytree(model_dir, tmp_path / "demo" / "sft" / "model")
    assert resolve_sft(str(tmp_path / "demo")) == tmp_path / "demo" / "sft" / "model"
    assert resolve_sft(str(model_dir)) == Path(model_dir)
