"""The one bridge from votes to training data: the comparison JSONL that `preflab reward` and `preflab dpo` read
(`preflab.data.load_preferences`) and `preflab eval bias` audits.

One row per vote:

    {"prompt": ..., "chosen": ..., "rejected": ..., "tie": false, "annotator": "ana",
     "chosen_position": "A", "choice": "left", "left": "a", "rule": "random", "rationale": "...",
     "pair_id": 3, "vote_id": 17, "shown_at": 1764570000.1, "voted_at": 1764570004.9,
     "chosen_length": 9, "rejected_length": 4, "length_unit": "words", "source": "pairs.jsonl:3"}

`chosen_position` is where the chosen response was shown ("A" = left), as the simulated annotators write it.
A tie keeps the shown order (left as `chosen`) with `"tie": true`. "Both bad" says nothing about which
response is better, so it is left out unless `include_both_bad`, and then written like a tie with
`"both_bad": true`. Authored comparisons follow with `"authored": true`, what they teach and the bias they
might introduce, and no shown order (nobody was shown them).
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from preflab.collect import store


def words(text: str) -> int:
    return len(text.split())


def vote_row(vote, pair, person) -> dict:
    left, right = store.pair_sides(pair, vote.left_is_a)
    if vote.choice == "right":
        chosen, rejected, position = right, left, "B"
    else:  # left, and ties / both bad in the shown order
        chosen, rejected, position = left, right, "A"
    row = {
        "prompt": json.loads(pair.prompt),
        "chosen": chosen,
        "rejected": rejected,
        "tie": vote.choice in ("tie", "both_bad"),
        "annotator": person.name,
        "chosen_position": position,
        "choice": vote.choice,
        "left": "a" if vote.left_is_a else "b",
        "rule": vote.rule,
        "rationale": vote.rationale,
        "pair_id": pair.id,
        "vote_id": vote.id,
        "shown_at": vote.shown_at,
        "voted_at": vote.created_at,
        "chosen_length": words(chosen),
        "rejected_length": words(rejected),
        "length_unit": "words",
        "source": pair.source,
    }
    if vote.choice == "both_bad":
        row["both_bad"] = True
    return row


def authored_row(row, person) -> dict:
    return {
        "prompt": json.loads(row.prompt),
        "chosen": row.chosen,
        "rejected": row.rejected,
        "tie": False,
        "annotator": person.name,
        "authored": True,
        "teaches": row.teaches,
        "bias": row.bias,
        "authored_id": row.id,
        "voted_at": row.created_at,
        "chosen_length": words(row.chosen),
        "rejected_length": words(row.rejected),
        "length_unit": "words",
    }


def export_rows(session: Session, *, include_both_bad: bool = False, authored: bool = True) -> list[dict]:
    rows = [vote_row(v, p, a) for v, p, a in store.all_votes(session) if include_both_bad or v.choice != "both_bad"]
    if authored:
        rows += [authored_row(r, a) for r, a in store.all_authored(session)]
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
