"""The admin page's numbers: progress, agreement and each annotator's biases, computed by the bias audit
(`preflab.evaluate.bias`) on the votes in the database, so the page and `preflab eval bias` on an export agree.

Each vote becomes the audit's `Vote` oriented as shown (a = left). Per annotator: P(prefer the left
response) among decided votes (position bias; 0.5 is unbiased) and P(prefer the longer response) where the
lengths differ by at least `clear_length_diff` words, each with its 95% Wilson interval. Overall (with at
least 10 decided votes): the audit's logistic regression of the vote on position and length difference with
Wald intervals, Cohen's kappa per pair of annotators sharing pairs and Krippendorff's alpha. No true-utility
covariate: people's prompts are not the lab world's, so the length term also holds any real length-quality link.
"""

from __future__ import annotations

import json
from collections import defaultdict

from sqlalchemy.orm import Session

from preflab.collect import store
from preflab.collect.export import vote_row
from preflab.evaluate import bias

MIN_SHARED = 3  # Cohen's kappa for annotator pairs sharing at least this many pairs


def audit_votes_from_rows(rows: list[dict]) -> list[bias.Vote]:
    """Export rows (votes only, no "both bad") as the bias audit's votes, a = the response shown on the left."""
    votes = []
    for r in rows:
        left, right = (r["chosen"], r["rejected"]) if r["chosen_position"] == "A" else (r["rejected"], r["chosen"])
        winner = -1 if r["tie"] else int(r["choice"] == "left")
        key = (json.dumps(r["prompt"], sort_keys=True), *sorted((left, right)))
        votes.append(bias.Vote(key, left, right, winner, r["annotator"], r["prompt"]))
    return votes


def summary(session: Session, *, overlap: int) -> dict:
    rows = [vote_row(v, p, a) for v, p, a in store.all_votes(session) if v.choice != "both_bad"]
    votes = audit_votes_from_rows(rows)
    config = bias.BiasConfig(file="the project's votes", utility="none", min_shared=MIN_SHARED)
    by_person = defaultdict(list)
    for v in votes:
        by_person[v.annotator].append(v)
    people = {}
    for name, mine in sorted(by_person.items()):
        decided = [v for v in mine if v.winner != -1]
        people[name] = {
            "votes": len(mine),
            "ties": len(mine) - len(decided),
            "prefer_left": bias.wilson(sum(v.winner == 1 for v in decided), len(decided)),
            "prefer_longer": bias.prefer_longer(decided, None, True, config.clear_length_diff),
        }
    decided = [v for v in votes if v.winner != -1]
    regression = None
    if len(decided) >= 10:
        audit = bias.audit_votes(votes, True, config)
        regression = {"position": audit["position_bias"], "length": audit["length_bias"]}
    return {
        "progress": store.progress(session, overlap=overlap),
        "annotators": people,
        "agreement": bias.agreement(votes, MIN_SHARED),
        "regression": regression,
        "both_bad": sum(1 for v, _, _ in store.all_votes(session) if v.choice == "both_bad"),
        "authored": store.count_authored(session),
        "clear_length_diff": config.clear_length_diff,
    }
