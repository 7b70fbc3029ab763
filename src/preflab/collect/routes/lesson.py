"""The lesson page and its API (only in a lesson project, `preflab collect demo`; elsewhere 404).

    GET  /lesson/login/{token}   the personal link of the demo: signs in, then opens /lesson
    GET  /lesson                 vote (the voting page's own script) beside the panels (lesson.js)
    GET  /api/lesson/state       everything the panels show: counts, reward model, biases, policy jobs
    POST /api/lesson/reward      retrain the live reward model ({"auto": true}: only when `every` votes are new)
    POST /api/lesson/policy      train the policy on the votes ({"algorithm": "dpo"|"ppo", "data": "mine"|"all"})
    POST /api/lesson/simulate    add simulated annotators' votes with a planted bias

Training runs in background processes (`preflab.collect.live`, `preflab.collect.lesson.policy`); these routes
only start them and read their state, so a vote is never queued behind training.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from preflab.collect import live, store
from preflab.collect.deps import DB, Caller
from preflab.collect.export import export_rows
from preflab.collect.lesson import Lesson, load_lesson
from preflab.collect.lesson import policy as policy_jobs
from preflab.collect.lesson.biases import person_biases
from preflab.collect.lesson.simulate import MAX_VOTES, add_simulated_votes
from preflab.collect.routes import pages
from preflab.collect.routes.admin import status as train_status
from preflab.evaluate.bias import wilson

router = APIRouter(tags=["lesson"])


def install(app: FastAPI) -> None:
    """Add the lesson's routes, and its link in the navigation when the project is a lesson."""
    app.include_router(router)
    app.state.templates.env.globals["lesson_nav"] = load_lesson(app.state.project.dir) is not None


def _lesson(request: Request) -> Lesson:
    lesson = load_lesson(request.app.state.project.dir)
    if lesson is None:
        raise HTTPException(404, "this project is not a lesson: start one with `preflab collect demo`")
    return lesson


class RewardStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    auto: bool = Field(False, description="start only when `every` votes arrived since the last retraining")


class PolicyStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["dpo", "ppo"] = "dpo"
    data: Literal["mine", "all"] = Field("mine", description="train on the caller's votes, or everyone's")


class SimulateStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    votes: int = Field(1000, ge=1, le=MAX_VOTES)
    annotators: int = Field(8, ge=1, le=50)
    length_bias: float = Field(0.3, ge=-2, le=2, description="logit per word of length difference")
    position_bias: float = Field(0.0, ge=-5, le=5, description="logit in favour of the left answer")
    temperature: float = Field(0.5, gt=0, le=10, description="noise: the utility difference is divided by it")


@router.get("/lesson/login/{token}", include_in_schema=False)
def lesson_login(token: str, db: DB) -> RedirectResponse:
    response = pages.login(token, db)
    response.headers["location"] = "/lesson"
    return response


@router.get("/lesson", response_class=HTMLResponse, include_in_schema=False)
def lesson_page(request: Request, db: DB) -> HTMLResponse:
    lesson = _lesson(request)
    person = pages._person(request, db)
    pair = pages.next_pair(request, db, person)
    messages = pair.prompt if isinstance(pair.prompt, list) else None
    return pages.render(
        request,
        "lesson.html",
        person,
        pair=pair,
        messages=messages,
        lesson=lesson,
        collected=store.count_votes(db),
        mine=store.count_votes(db, annotator_id=person.id),
    )


def reward_state(db, lesson: Lesson) -> dict:
    job = live.latest_job(db)
    out = train_status(job).model_dump()
    out["every"] = lesson.every
    out["new_votes"] = store.count_votes(db) - (job.votes if job is not None and job.status != "running" else 0)
    if job is not None and job.accuracy is not None and job.held_out:
        out["agreement"] = wilson(round(job.accuracy * job.held_out), job.held_out)
    return out


@router.get("/api/lesson/state")
def get_state(request: Request, db: DB, person: Caller) -> dict:
    """Counts, the live reward model, the caller's biases against the true utility, and the policy jobs."""
    lesson = _lesson(request)
    rows = [r for r in export_rows(db, authored=False) if r["annotator"] == person.name]
    return {
        "collected": store.count_votes(db),
        "mine": store.count_votes(db, annotator_id=person.id),
        "reward": reward_state(db, lesson),
        "biases": person_biases(rows),
        "policy": policy_jobs.list_jobs(request.app.state.project.dir),
        "simulated": db.scalar(_simulated_count()) or 0,
    }


def _simulated_count():
    from sqlalchemy import func, select

    from preflab.collect.db import Vote

    return select(func.count(Vote.id)).where(Vote.rule == "simulated")


@router.post("/api/lesson/reward", status_code=202)
def post_reward(request: Request, db: DB, person: Caller, response: Response, body: RewardStart | None = None) -> dict:
    """Retrain the live reward model on the votes so far, in the background: 202 started, 409 while one is
    running; with `auto`, 200 and `started: false` unless `every` new votes (and enough votes) have arrived."""
    lesson = _lesson(request)
    state = reward_state(db, lesson)
    if (
        body is not None
        and body.auto
        and (
            lesson.every == 0
            or state["new_votes"] < lesson.every
            or store.count_votes(db) < live.MIN_VOTES
            or state["status"] == "running"
        )
    ):
        response.status_code = 200
        return {**state, "started": False}
    try:
        job = live.start_job(db, project=request.app.state.project)
    except live.TrainBusy as err:
        raise HTTPException(409, str(err)) from None
    return {**train_status(job).model_dump(), "started": True}


@router.post("/api/lesson/policy", status_code=202)
def post_policy(request: Request, db: DB, person: Caller, body: PolicyStart) -> dict:
    """Train the policy from the SFT policy on the votes (DPO) or the reward model (PPO), in the background."""
    lesson = _lesson(request)
    if body.data == "mine" and lesson.person != person.name:
        raise HTTPException(403, f"only {lesson.person} trains on their own votes here; choose data 'all'")
    if body.algorithm == "ppo" and not policy_jobs.newest_reward_model(db):
        raise HTTPException(409, "PPO needs a trained reward model: retrain the reward model first")
    try:
        return policy_jobs.start_policy_job(
            request.app.state.project.dir,
            lesson,
            algorithm=body.algorithm,
            data=body.data,
            db=request.app.state.project.db,
        )
    except policy_jobs.PolicyBusy as err:
        raise HTTPException(409, str(err)) from None


@router.post("/api/lesson/simulate", status_code=201)
def post_simulate(request: Request, db: DB, person: Caller, body: SimulateStart) -> dict:
    """Votes from a new pool of simulated annotators with the planted biases (one transaction)."""
    lesson = _lesson(request)
    added = add_simulated_votes(
        db,
        votes=body.votes,
        annotators=body.annotators,
        overlap=request.app.state.project.overlap,
        length_bias=body.length_bias,
        position_bias=body.position_bias,
        temperature=body.temperature,
        seed=lesson.seed + store.count_votes(db),
    )
    if added["votes"] == 0:
        raise HTTPException(409, "no pair has room for another vote (every pair has reached the project's overlap)")
    return added
