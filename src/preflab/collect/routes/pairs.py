"""GET /api/next: the caller's next pair, with its sides randomised and recorded."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from preflab.collect import store
from preflab.collect.deps import DB, Caller
from preflab.collect.schemas import NextPair

router = APIRouter(prefix="/api", tags=["pairs"])


def next_pair(request: Request, db, person) -> NextPair:
    project = request.app.state.project
    found = store.next_assignment(
        db, annotator_id=person.id, overlap=project.overlap, random_share=project.random_share
    )
    if found is None:
        return NextPair(done=True)
    assignment, pair = found
    left, right = store.pair_sides(pair, assignment.left_is_a)
    return NextPair(pair_id=pair.id, prompt=json.loads(pair.prompt), left=left, right=right, rule=assignment.rule)


@router.get("/next", response_model=NextPair)
def get_next(request: Request, db: DB, person: Caller) -> NextPair:
    """The pair to vote on next (the same one again until it is voted on); `done` when none is left."""
    return next_pair(request, db, person)
