"""Raters who cannot judge: annotators who know only some facts, and the oversight aid that helps them."""

from __future__ import annotations

import hashlib
import json

import pytest

from preflab.world.annotators import (
    Aid,
    Annotator,
    annotator_pool,
    describe_pool,
    false_alarm_rate,
    known_facts,
    simulate_votes,
    surface_utility,
    world_pairs,
)
from preflab.world.tutor import all_facts, answer_form, fact_of, task_for, true_utility

# sha256 of the rows below, written by the annotators before knowledge existed (main at 37c7eb2)
TODAY = "38bf22015e04826aa4603ecce4d415665d095d96ca7f7db660ac92f981d6b87a"


def today_rows(**pool_options):
    pool = annotator_pool(
        8, seed=0, temperature=(0.2, 0.5), length_bias=0.05, position_bias=0.2, bias_spread=0.5, tie_rate=0.5,
        **pool_options,
    )  # fmt: skip
    return simulate_votes(world_pairs(300, seed=0), pool, seed=0, votes_per_pair=2)


def test_full_knowledge_reproduces_todays_votes_exactly(tmp_path):
    rows = today_rows(knowledge=1.0, knowledge_overlap=0.7)
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == TODAY
    assert sum(r["tie"] for r in rows) > 0  # the tie draws are covered too
    assert rows == today_rows()  # knowledge=1.0 is the default
    pool = annotator_pool(3, seed=0, length_bias=0.05)
    assert all(a.knows is None for a in pool)
    assert set(describe_pool(pool)[0]) == {"name", "temperature", "length_bias", "position_bias", "tie_rate"}


def test_known_facts_are_seeded_sized_and_overlap_as_asked():
    facts = all_facts()
    assert len(facts) == len(set(facts)) == 40 + 25 + 12
    assert fact_of(task_for("Name the capital of Peru.")) == fact_of(task_for("What is the capital of Peru?"))
    a = known_facts(4, 0.5, 0.0, seed=1)
    assert a == known_facts(4, 0.5, 0.0, seed=1) and a != known_facts(4, 0.5, 0.0, seed=2)
    assert all(len(k) == round(0.5 * 77) for k in a) and len(set(a)) == 4  # independent subsets differ
    assert len(set(known_facts(4, 0.5, 1.0, seed=1))) == 1  # full overlap: common knowledge
    assert known_facts(2, 0.0, 0.0, seed=0) == [frozenset()] * 2
    with pytest.raises(ValueError, match="1.5"):
        known_facts(2, 1.5, 0.0, seed=0)
    pool = annotator_pool(4, seed=1, knowledge=0.5)
    assert [a.knows for a in pool] == a
    # the other draws of the pool do not move
    assert [a.temperature for a in pool] == [a.temperature for a in annotator_pool(4, seed=1)]


PROMPT = "What is the capital of France?"
RIGHT = "Sure! The capital of France is Paris."
WRONG = "Sure! The capital of France is Rome."
HEDGE = "Sure! I am not sure."


def test_surface_form_of_hand_made_responses():
    assert [answer_form(PROMPT, r) for r in (RIGHT, WRONG, HEDGE)] == ["answer", "answer", "hedge"]
    assert answer_form(PROMPT, "Sure! Paris, I think.") == "none"
    assert answer_form("What is 2 + 3?", "2 + 3 = 9.") == "answer"
    assert answer_form("What is the capital of Oz?", "The capital of Oz is Lima.") == "answer"
    # tone and concision stay, correctness and honesty become the surface cue
    assert surface_utility(PROMPT, WRONG, true_utility(PROMPT, WRONG).total, 0.5) == pytest.approx(0.5 + 0.5)
    assert surface_utility(PROMPT, RIGHT, true_utility(PROMPT, RIGHT).total, 0.5) == pytest.approx(0.5 + 0.5)
    assert surface_utility(PROMPT, HEDGE, true_utility(PROMPT, HEDGE).total, 0.5) == pytest.approx(0.5)
    assert surface_utility(PROMPT, RIGHT, 1.5, 0.5, flagged=True) == pytest.approx(0.5 - 1)


def test_raters_who_do_not_know_prefer_a_confident_bluff_and_ignore_correctness():
    blind = Annotator("blind", temperature=0.2, knows=frozenset())
    sees = Annotator("sees", temperature=0.2)
    assert not blind.knows_fact(PROMPT) and sees.knows_fact(PROMPT)
    bluff = simulate_votes([(PROMPT, WRONG, HEDGE)] * 400, [blind], seed=0)
    assert sum(r["chosen"] == WRONG for r in bluff) / 400 > 0.8  # P = sigmoid(0.5 / 0.2 + 0.05 * 2) = 0.93
    assert all(r["knew"] is False and r["aid"] is None for r in bluff)
    honest = simulate_votes([(PROMPT, WRONG, HEDGE)] * 400, [sees], seed=0)
    assert sum(r["chosen"] == HEDGE for r in honest) / 400 > 0.95  # who knows prefers the hedge
    coin = simulate_votes([(PROMPT, RIGHT, WRONG)] * 2000, [blind], seed=0)
    assert sum(r["chosen"] == RIGHT for r in coin) / 2000 == pytest.approx(0.5, abs=0.035)
    assert blind.p_first(1.0, 1.0, 6, 6, guessing=True) == 0.5
    # a rater who knows the fact judges correctness even in a pool of people who do not
    half = Annotator("half", temperature=0.2, knows=frozenset({"capital:France"}))
    assert all(r["chosen"] == RIGHT for r in simulate_votes([(PROMPT, RIGHT, WRONG)] * 50, [half], seed=0))


def test_perfect_aid_makes_limited_raters_vote_like_full_raters_on_wrong_answers():
    pairs = world_pairs(400, seed=3)
    full = annotator_pool(6, seed=2, length_bias=0.05, position_bias=0.2)
    limited = annotator_pool(6, seed=2, length_bias=0.05, position_bias=0.2, knowledge=0.0)
    aided = simulate_votes(pairs, limited, seed=5, aid=Aid(recall=1.0, precision=1.0))
    truth = simulate_votes(pairs, full, seed=5)
    alone = simulate_votes(pairs, limited, seed=5)
    has_wrong = [i for i, r in enumerate(truth) if any(_wrong(r["prompt"], t) for t in (r["chosen"], r["rejected"]))]
    assert len(has_wrong) > 100
    key = ("chosen", "rejected", "chosen_position", "annotator")
    assert all([aided[i][k] for k in key] == [truth[i][k] for k in key] for i in has_wrong)
    assert all(aided[i]["aid"] == "critique" for i in has_wrong)
    assert any([alone[i][k] for k in key] != [truth[i][k] for k in key] for i in has_wrong)  # without it they differ
    # recall 0 is no aid at all
    assert simulate_votes(pairs, limited, seed=5, aid=Aid(recall=0.0)) == alone


def _wrong(prompt, text):
    u = true_utility(prompt, text)
    return u.correctness < 0 or u.honesty < 0


def test_an_imprecise_aid_raises_false_alarms_at_the_asked_rate():
    pairs = world_pairs(600, seed=4)
    blind = [Annotator("blind", temperature=0.3, knows=frozenset())]
    aid = Aid(recall=0.5, precision=0.6)
    rows = simulate_votes(pairs, blind, seed=0, aid=aid)
    flags = [r["aid"] for r in rows]
    realised = flags.count("critique") / (flags.count("critique") + flags.count("false_alarm"))
    assert flags.count("false_alarm") > 20 and realised == pytest.approx(0.6, abs=0.08)
    assert 0 < false_alarm_rate(pairs, aid) < 1 and false_alarm_rate(pairs, Aid(0.5, 1.0)) == 0.0
    # a false alarm makes the right answer lose to a hedge (f = min(1, 1 * 1 * 0.999 / (0.001 * 200)) = 1)
    alarmed = simulate_votes(
        [(PROMPT, WRONG, HEDGE)] + [(PROMPT, RIGHT, HEDGE)] * 200, blind, seed=0, aid=Aid(1, 0.001)
    )
    assert all(r["aid"] == "false_alarm" for r in alarmed[1:])
    assert sum(r["chosen"] == HEDGE for r in alarmed[1:]) / 200 > 0.9  # P = sigmoid(1 / 0.3 - 0.05 * 2) = 0.96
    unaided = simulate_votes([(PROMPT, RIGHT, HEDGE)] * 200, blind, seed=0)
    assert sum(r["chosen"] == HEDGE for r in unaided) / 200 < 0.3
    with pytest.raises(ValueError, match="precision"):
        Aid(recall=0.5, precision=0.0)
