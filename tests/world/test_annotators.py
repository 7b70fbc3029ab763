"""Simulated annotators: the vote formula, the comparison rows they write, the accuracy ceiling."""

from __future__ import annotations

import math

import pytest

from preflab.data import load_preferences
from preflab.data.text import n_words
from preflab.world import true_utility
from preflab.world.annotators import (
    Annotator,
    annotator_pool,
    ceiling_accuracy,
    simulate_votes,
    world_pairs,
    write_votes,
)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_vote_probability_is_the_formula():
    a = Annotator("x", temperature=0.5, length_bias=0.1, position_bias=0.2)
    # (1 - 0) / 0.5 + 0.1 * (5 - 3) + 0.2 = 2.4
    assert a.p_first(1.0, 0.0, 5, 3) == pytest.approx(sigmoid(2.4))
    assert Annotator("y").p_first(0.3, 0.3, 4, 4) == pytest.approx(0.5)
    assert n_words("Sure!  The capital of France is Paris.") == 7


def test_pool_is_seeded_and_in_range():
    pool = annotator_pool(6, seed=3, temperature=(0.2, 0.4), length_bias=0.1, bias_spread=0.5)
    assert pool == annotator_pool(6, seed=3, temperature=(0.2, 0.4), length_bias=0.1, bias_spread=0.5)
    assert len({a.name for a in pool}) == 6
    assert all(0.2 <= a.temperature <= 0.4 and 0.05 <= a.length_bias <= 0.15 for a in pool)
    assert len({a.temperature for a in pool}) == 6  # each annotator has its own noise
    with pytest.raises(ValueError, match="n=0"):
        annotator_pool(0)


def test_world_pairs_are_distinct_seeded_and_from_the_world():
    pairs = world_pairs(30, seed=1)
    assert pairs == world_pairs(30, seed=1) and pairs != world_pairs(30, seed=2)
    assert len(pairs) == 30
    for prompt, a, b in pairs:
        assert a != b
        true_utility(prompt, a), true_utility(prompt, b)  # both are world responses to a world question


def test_votes_are_comparison_rows_that_load(tmp_path):
    pairs = world_pairs(40, seed=0)
    rows = simulate_votes(pairs, annotator_pool(4), seed=0, votes_per_pair=2)
    assert len(rows) == 80
    for r in rows:
        assert r["chosen_position"] in ("A", "B") and r["tie"] is False and r["length_unit"] == "words"
        assert r["chosen_length"] == n_words(r["chosen"]) and r["rejected_length"] == n_words(r["rejected"])
    assert {r["chosen_position"] for r in rows} == {"A", "B"}
    assert len({(r["annotator"], str(r["prompt"]), r["chosen"] + r["rejected"]) for r in rows[:2]}) == 2  # two voters
    data = load_preferences(write_votes(tmp_path / "votes.jsonl", rows))
    assert len(data) == 80 and data.rows[0].annotator == rows[0]["annotator"]


def test_a_noiseless_annotator_always_picks_the_better_response():
    pairs = [p for p in world_pairs(60, seed=2) if true_utility(p[0], p[1]).total != true_utility(p[0], p[2]).total]
    rows = simulate_votes(pairs, [Annotator("oracle", temperature=1e-4)], seed=0)
    assert all(
        true_utility(r["prompt"], r["chosen"]).total > true_utility(r["prompt"], r["rejected"]).total for r in rows
    )


def test_position_bias_shows_in_the_votes():
    # temperature huge: quality is invisible, so P(first chosen) = sigmoid(1) = 0.731
    rows = simulate_votes(world_pairs(500, seed=0) * 4, [Annotator("left", temperature=1e6, position_bias=1.0)], seed=0)
    share = sum(r["chosen_position"] == "A" for r in rows) / len(rows)
    assert abs(share - sigmoid(1.0)) < 3 * math.sqrt(0.2 / len(rows))


def test_ties_when_utilities_are_equal():
    prompt, a, _ = world_pairs(1, seed=0)[0]
    rows = simulate_votes([(prompt, a, a + " ")], [Annotator("t", tie_rate=1.0)], seed=0, swap=False)
    assert rows[0]["tie"] is True


def test_ceiling_accuracy():
    pairs = world_pairs(300, seed=0)
    differ = [p for p in pairs if true_utility(p[0], p[1]).total != true_utility(p[0], p[2]).total]
    assert ceiling_accuracy(differ, [Annotator("sharp", temperature=1e-3)]) == pytest.approx(1.0)
    assert ceiling_accuracy(pairs, [Annotator("blind", temperature=1e6)]) == pytest.approx(0.5, abs=1e-4)
    # the ceiling is what an oracle that orders pairs the way most votes go actually scores on drawn votes
    pool = annotator_pool(5, seed=0, temperature=(0.5, 1.5), position_bias=0.5)
    ceiling = ceiling_accuracy(pairs, pool)
    rows = simulate_votes(pairs * 10, pool, seed=1)
    u = {(str(p), t): true_utility(p, t).total for p, a, b in pairs for t in (a, b)}
    ties = sum(u[(str(r["prompt"]), r["chosen"])] == u[(str(r["prompt"]), r["rejected"])] for r in rows)
    hits = sum(u[(str(r["prompt"]), r["chosen"])] > u[(str(r["prompt"]), r["rejected"])] for r in rows)
    assert 0.5 < ceiling < 1.0
    assert (hits + ties / 2) / len(rows) == pytest.approx(ceiling, abs=0.02)


def test_lengths_in_words_are_whitespace_pieces_everywhere():
    """One word count for the annotators, the bias audit and the known length rewards."""
    from preflab.world.rewards import length_closeness, word_count

    text = "Sure! 2 + 3 = 5, the capital. Capital"
    assert n_words(text) == 9
    assert length_closeness(None, text, target=12) == pytest.approx(1 - 3 / 12)
    assert word_count(None, text) == 2.0  # "capital." and "Capital" match; punctuation and case ignored
    assert Annotator("x", temperature=1.0, length_bias=0.5).p_first(
        0.0, 0.0, n_words(text), n_words("Paris.")
    ) == pytest.approx(1 / (1 + math.exp(-0.5 * 8)))
