"""POST /api/votes, GET /api/votes (the caller's own) and GET /api/stats."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from preflab.collect import store
from preflab.collect.deps import DB, Caller
from preflab.collect.schemas import Stats, VoteCreate, VotePublic

router = APIRouter(prefix="/api", tags=["votes"])


def public(vote, stored: bool = True) -> VotePublic:
    return VotePublic(
        id=vote.id,
        pair_id=vote.pair_id,
        choice=vote.choice,
        left_is_a=bool(vote.left_is_a),
        rationale=vote.rationale,
        client_id=vote.client_id,
        rule=vote.rule,
        created_at=vote.created_at,
        stored=stored,
    )


@router.post("/votes", response_model=VotePublic, responses={201: {"model": VotePublic}, 404: {}, 409: {}})
def post_vote(body: VoteCreate, db: DB, person: Caller, response: Response) -> VotePublic:
    """Store a vote on a pair given to the caller. Answered only after the vote is committed: 201 when stored,
    200 when the same `client_id` was stored before (the earlier vote is returned), 409 for a second vote on
    the same pair, 404 for an unknown pair."""
    try:
        vote, created = store.record_vote(
            db,
            annotator_id=person.id,
            pair_id=body.pair_id,
            choice=body.choice,
            rationale=body.rationale,
            client_id=body.client_id,
        )
    except store.VoteError as err:
        raise HTTPException(err.status, str(err)) from None
    response.status_code = 201 if created else 200
    return public(vote, stored=created)


@router.get("/votes", response_model=list[VotePublic])
def get_votes(db: DB, person: Caller) -> list[VotePublic]:
    """The caller's own votes, oldest first (nobody can read another person's votes here)."""
    return [public(v) for v in store.votes_of(db, annotator_id=person.id)]


@router.get("/stats", response_model=Stats)
def get_stats(db: DB, person: Caller) -> Stats:
    return Stats(
        collected=store.count_votes(db),
        mine=store.count_votes(db, annotator_id=person.id),
        authored=store.count_authored(db),
    )
