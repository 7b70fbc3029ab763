"""POST /api/authored: author mode, a comparison written by a person."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from preflab.collect import store
from preflab.collect.deps import DB, Caller
from preflab.collect.schemas import AuthoredCreate, AuthoredPublic

router = APIRouter(prefix="/api", tags=["authored"])


@router.post("/authored", response_model=AuthoredPublic, status_code=201)
def post_authored(body: AuthoredCreate, db: DB, person: Caller) -> AuthoredPublic:
    """Store a written comparison (prompt, better and worse response, what it teaches, what bias it risks)."""
    try:
        row = store.add_authored(
            db,
            annotator_id=person.id,
            prompt=body.prompt,
            chosen=body.better,
            rejected=body.worse,
            teaches=body.teaches,
            bias=body.bias,
        )
    except store.VoteError as err:
        raise HTTPException(err.status, str(err)) from None
    return AuthoredPublic(id=row.id, created_at=row.created_at)
