"""Database functions: everything the routes, the CLI and the export do to the database, keyword-only.

Routes never build queries themselves; they call these and turn `VoteError` into an HTTP status. Each
function that writes commits before it returns, so whatever a route reports as done is on disk.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from preflab.collect.db import Annotator, Assignment, Authored, Pair, Vote, now

CHOICES = ("left", "right", "tie", "both_bad")


class VoteError(Exception):
    """A request the database refuses: `status` is the HTTP status the route answers with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def hash_token(token: str) -> str:
    """Tokens are 32 random bytes, so one SHA-256 is enough (no dictionary to guard against)."""
    return hashlib.sha256(token.encode()).hexdigest()


def add_pairs(session: Session, *, pairs: list[dict]) -> int:
    """Insert pairs ({prompt, response_a, response_b, source}); returns how many."""
    t = now()
    session.add_all(
        [
            Pair(
                prompt=json.dumps(p["prompt"], ensure_ascii=False),
                response_a=p["response_a"],
                response_b=p["response_b"],
                source=p.get("source", "")[:200],
                assigned=0,
                created_at=t,
            )
            for p in pairs
        ]
    )
    session.commit()
    return len(pairs)


def create_annotator(session: Session, *, name: str, is_admin: bool = False) -> tuple[Annotator, str]:
    """A new person and their token (returned once; only its hash is stored)."""
    if session.scalar(select(Annotator).where(Annotator.name == name)) is not None:
        raise VoteError(409, f"an annotator named {name!r} already exists")
    token = secrets.token_urlsafe(32)
    person = Annotator(name=name, token_hash=hash_token(token), is_admin=int(is_admin), created_at=now())
    session.add(person)
    session.commit()
    return person, token


def annotator_by_token(session: Session, *, token: str) -> Annotator | None:
    if not token or len(token) > 200:
        return None
    return session.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))


def _open_assignment(session: Session, annotator_id: int):
    voted = select(Vote.pair_id).where(Vote.annotator_id == annotator_id)
    return session.execute(
        select(Assignment, Pair)
        .join(Pair, Pair.id == Assignment.pair_id)
        .where(Assignment.annotator_id == annotator_id, Assignment.pair_id.not_in(voted))
        .order_by(Assignment.id)
        .limit(1)
    ).first()


def next_assignment(
    session: Session, *, annotator_id: int, overlap: int, random_share: float = 1.0, rng: random.Random | None = None
) -> tuple[Assignment, Pair] | None:
    """The caller's next pair with its sides, or None when nothing is left for them.

    An assignment not yet voted on is returned again (a reload shows the same pair). Otherwise a pair is
    taken that fewer than `overlap` people were given and this person never saw: with probability
    `random_share` among the least-covered pairs at random ("random"), else the pair the live reward
    ensemble disagrees on most ("active"; falls back to random while no scores exist).
    """
    rng = rng or random.SystemRandom()
    for _ in range(20):  # retries only when a concurrent request took the same pair
        found = _open_assignment(session, annotator_id)
        if found is not None:
            return found[0], found[1]
        seen = select(Assignment.pair_id).where(Assignment.annotator_id == annotator_id)
        query = select(Pair.id).where(Pair.assigned < overlap, Pair.id.not_in(seen))
        rule = "random" if rng.random() < random_share else "active"
        if rule == "active" and session.scalar(query.where(Pair.score.is_not(None)).limit(1)) is None:
            rule = "random"
        if rule == "active":
            query = query.where(Pair.score.is_not(None)).order_by(Pair.score.desc(), func.random())
        else:
            query = query.order_by(Pair.assigned, func.random())
        candidates = list(session.scalars(query.limit(8)))
        session.rollback()  # end the read transaction before writing
        if not candidates:
            return None
        for pair_id in candidates:
            taken = session.execute(
                update(Pair).where(Pair.id == pair_id, Pair.assigned < overlap).values(assigned=Pair.assigned + 1)
            )
            if taken.rowcount != 1:
                session.rollback()
                continue
            assignment = Assignment(
                annotator_id=annotator_id,
                pair_id=pair_id,
                left_is_a=int(rng.random() < 0.5),
                rule=rule,
                created_at=now(),
            )
            session.add(assignment)
            try:
                session.commit()
            except IntegrityError:  # the same person asked twice at once: use the other request's assignment
                session.rollback()
                break
            return assignment, session.get(Pair, pair_id)
    return None


def record_vote(
    session: Session, *, annotator_id: int, pair_id: int, choice: str, rationale: str = "", client_id: str | None = None
) -> tuple[Vote, bool]:
    """Store a vote and commit; (vote, created). A repeated `client_id` returns the stored vote (created False)."""
    if choice not in CHOICES:
        raise VoteError(422, f"choice must be one of {list(CHOICES)}, got {choice!r}")
    if client_id:
        earlier = session.scalar(select(Vote).where(Vote.annotator_id == annotator_id, Vote.client_id == client_id))
        if earlier is not None:
            if earlier.pair_id != pair_id:
                raise VoteError(409, f"client_id {client_id!r} was already used for pair {earlier.pair_id}")
            return earlier, False
    assignment = session.scalar(
        select(Assignment).where(Assignment.annotator_id == annotator_id, Assignment.pair_id == pair_id)
    )
    if assignment is None:
        exists = session.get(Pair, pair_id) is not None
        raise VoteError(
            409 if exists else 404,
            f"pair {pair_id} was not given to you: GET /api/next first" if exists else f"no pair {pair_id}",
        )
    earlier = session.scalar(select(Vote).where(Vote.annotator_id == annotator_id, Vote.pair_id == pair_id))
    if earlier is not None:
        if client_id and earlier.client_id == client_id:  # a concurrent retry committed first
            return earlier, False
        raise VoteError(409, f"you already voted on pair {pair_id}")
    vote = Vote(
        annotator_id=annotator_id,
        pair_id=pair_id,
        choice=choice,
        left_is_a=assignment.left_is_a,
        rationale=rationale or "",
        client_id=client_id or None,
        rule=assignment.rule,
        shown_at=assignment.created_at,
        created_at=now(),
    )
    session.add(vote)
    try:
        session.commit()
    except IntegrityError:  # a concurrent retry of the same submission won the race
        session.rollback()
        if client_id:
            earlier = session.scalar(select(Vote).where(Vote.annotator_id == annotator_id, Vote.client_id == client_id))
            if earlier is not None and earlier.pair_id == pair_id:
                return earlier, False
        raise VoteError(409, f"you already voted on pair {pair_id}") from None
    return vote, True


def votes_of(session: Session, *, annotator_id: int) -> list[Vote]:
    return list(session.scalars(select(Vote).where(Vote.annotator_id == annotator_id).order_by(Vote.id)))


def count_votes(session: Session, *, annotator_id: int | None = None) -> int:
    query = select(func.count(Vote.id))
    if annotator_id is not None:
        query = query.where(Vote.annotator_id == annotator_id)
    return session.scalar(query) or 0


def count_authored(session: Session, *, annotator_id: int | None = None) -> int:
    query = select(func.count(Authored.id))
    if annotator_id is not None:
        query = query.where(Authored.annotator_id == annotator_id)
    return session.scalar(query) or 0


def add_authored(
    session: Session, *, annotator_id: int, prompt: str, chosen: str, rejected: str, teaches: str, bias: str
) -> Authored:
    if chosen.strip() == rejected.strip():
        raise VoteError(422, "the two responses are identical: the comparison would teach nothing")
    row = Authored(
        annotator_id=annotator_id,
        prompt=json.dumps(prompt, ensure_ascii=False),
        chosen=chosen,
        rejected=rejected,
        teaches=teaches,
        bias=bias,
        created_at=now(),
    )
    session.add(row)
    session.commit()
    return row


def all_votes(session: Session) -> list[tuple[Vote, Pair, Annotator]]:
    """Every vote with its pair and annotator, oldest first (the export and the admin page read this)."""
    return list(
        session.execute(
            select(Vote, Pair, Annotator)
            .join(Pair, Pair.id == Vote.pair_id)
            .join(Annotator, Annotator.id == Vote.annotator_id)
            .order_by(Vote.id)
        ).all()
    )


def all_authored(session: Session) -> list[tuple[Authored, Annotator]]:
    return list(
        session.execute(
            select(Authored, Annotator).join(Annotator, Annotator.id == Authored.annotator_id).order_by(Authored.id)
        ).all()
    )


def progress(session: Session, *, overlap: int) -> dict:
    """Pairs, votes wanted (pairs x overlap), votes so far, and votes / authored pairs per annotator."""
    pairs = session.scalar(select(func.count(Pair.id))) or 0
    per = session.execute(
        select(Annotator.name, Annotator.is_admin, func.count(Vote.id))
        .outerjoin(Vote, Vote.annotator_id == Annotator.id)
        .group_by(Annotator.id, Annotator.name, Annotator.is_admin)
        .order_by(Annotator.name)
    ).all()
    authored = dict(
        session.execute(
            select(Annotator.name, func.count(Authored.id))
            .join(Authored, Authored.annotator_id == Annotator.id)
            .group_by(Annotator.name)
        ).all()
    )
    votes = sum(n for _, _, n in per)
    return {
        "pairs": pairs,
        "overlap": overlap,
        "wanted": pairs * overlap,
        "votes": votes,
        "done": votes / (pairs * overlap) if pairs else 0.0,
        "annotators": [
            {"name": name, "admin": bool(admin), "votes": n, "authored": authored.get(name, 0)}
            for name, admin, n in per
        ],
    }


def pair_sides(pair: Pair, left_is_a: int) -> tuple[str, str]:
    """(left text, right text) as the annotator was shown them."""
    return (pair.response_a, pair.response_b) if left_is_a else (pair.response_b, pair.response_a)
