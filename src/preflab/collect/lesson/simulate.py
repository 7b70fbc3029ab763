""" "Add simulated annotators": a pool from `preflab.world.annotators` votes on the project's pairs.

Each simulated person is a row in `annotators` (named `sim<batch>-<i>`, so a class can add several pools and
tell them apart) and votes the way a person does: the pair is assigned to them (respecting the project's
overlap and never twice to one person), the sides are shuffled, and the vote on the left / right answer is
drawn with the pool's planted biases,

    P(left) = sigmoid((u_L - u_R) / temperature + length_bias * (len_L - len_R) + position_bias)

(`Annotator.p_first`). Everything is written in one transaction: a thousand votes arrive together, and a
person voting meanwhile waits for one commit, not a thousand.
"""

from __future__ import annotations

import json
import random
import secrets

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from preflab.collect.db import Annotator, Assignment, Pair, Vote, now
from preflab.collect.store import hash_token
from preflab.data.text import n_words
from preflab.world.annotators import annotator_pool
from preflab.world.tutor import true_utility

MAX_VOTES = 5000


def next_batch(session: Session) -> int:
    """1 + the number of simulated pools added so far (their names start with `sim<batch>-`)."""
    names = session.scalars(select(Annotator.name).where(Annotator.name.like("sim%-%"))).all()
    batches = {n.split("-")[0][3:] for n in names}
    return 1 + sum(b.isdigit() for b in batches)


def add_simulated_votes(
    session: Session,
    *,
    votes: int,
    annotators: int,
    overlap: int,
    length_bias: float = 0.0,
    position_bias: float = 0.0,
    temperature: float = 0.5,
    seed: int = 0,
) -> dict:
    """`votes` votes from a new pool of `annotators` (as far as free pairs allow); returns what was added."""
    if not 1 <= votes <= MAX_VOTES:
        raise ValueError(f"votes must be in 1..{MAX_VOTES}, got {votes}")
    rng = random.Random(seed)
    # free slots: pairs with assigned < overlap, least covered first (as people are given them), shuffled within
    pairs = list(
        session.execute(
            select(Pair.id, Pair.assigned).where(Pair.assigned < overlap).order_by(Pair.assigned, func.random())
        ).all()
    )
    slots = [pid for pid, assigned in pairs for _ in range(overlap - assigned)]
    if not slots:
        return {"batch": None, "annotators": [], "votes": 0}
    batch = next_batch(session)
    pool = annotator_pool(
        annotators,
        seed=seed,
        temperature=(temperature, temperature),
        length_bias=length_bias,
        position_bias=position_bias,
    )
    t = now()
    people = []
    for sim in pool:
        # a random token nobody is given: a simulated person cannot be signed in as
        row = Annotator(
            name=f"sim{batch}-{sim.name[4:]}",
            token_hash=hash_token(secrets.token_urlsafe(32)),
            is_admin=0,
            created_at=t,
        )
        session.add(row)
        people.append((sim, row))
    session.flush()
    per = -(-votes // len(pool))
    added, bumps = 0, {}
    for k, (sim, person) in enumerate(people):
        mine = list(dict.fromkeys(slots[k :: len(pool)]))[: min(per, votes - added)]  # distinct pairs per person
        for pair_id in mine:
            pair = session.get(Pair, pair_id)
            prompt = json.loads(pair.prompt)
            left_is_a = int(rng.random() < 0.5)
            left, right = (pair.response_a, pair.response_b) if left_is_a else (pair.response_b, pair.response_a)
            p = sim.p_first(
                true_utility(prompt, left).total, true_utility(prompt, right).total, n_words(left), n_words(right)
            )
            choice = "left" if rng.random() < p else "right"
            session.add(
                Assignment(annotator_id=person.id, pair_id=pair_id, left_is_a=left_is_a, rule="simulated", created_at=t)
            )
            session.add(
                Vote(
                    annotator_id=person.id,
                    pair_id=pair_id,
                    choice=choice,
                    left_is_a=left_is_a,
                    rationale="",
                    client_id=None,
                    rule="simulated",
                    shown_at=t,
                    created_at=t,
                )
            )
            bumps[pair_id] = bumps.get(pair_id, 0) + 1
            added += 1
    for pair_id, n in bumps.items():
        session.execute(update(Pair).where(Pair.id == pair_id).values(assigned=Pair.assigned + n))
    session.commit()
    return {
        "batch": batch,
        "annotators": [p.name for _, p in people],
        "votes": added,
        "length_bias": length_bias,
        "position_bias": position_bias,
        "temperature": temperature,
    }
