"""The evaluation statistics against hand-computed values."""

import numpy as np
import pytest
import torch

from preflab.reward.evaluate import calibration, disagreement, length_table, rank, spearman, subset_tables


def test_calibration_table_and_ece():
    # confidence of the predicted winner: .93 right, .83 wrong, .64 right, .55 wrong
    table, ece = calibration(np.array([0.93, 0.17, 0.64, 0.45]), bins=5)
    assert [row["n"] for row in table] == [1, 1, 1, 1]
    assert [row["bin"] for row in table] == ["[0.50, 0.60)", "[0.60, 0.70)", "[0.80, 0.90)", "[0.90, 1.00)"]
    assert [row["accuracy"] for row in table] == [0.0, 1.0, 0.0, 1.0]
    assert ece == pytest.approx((0.07 + 0.83 + 0.36 + 0.55) / 4)
    # three right and one wrong at confidence .75: perfectly calibrated
    _, ece = calibration(np.array([0.75, 0.75, 0.75, 0.25]), bins=5)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_spearman_and_average_ranks():
    np.testing.assert_allclose(rank(np.array([1, 2, 2, 3])), [1, 2.5, 2.5, 4])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_length_table_bins():
    delta = np.array([-40, -10, 0, 5, 50])
    rows = length_table(delta, np.array([1.0, 0.0, 1.0, 1.0, 0.0]), [-32, -8, 8, 32])
    assert [(r["bin"], r["n"], r["accuracy"], r["longer_wins"]) for r in rows] == [
        ("[-inf, -32)", 1, 1.0, 0.0),
        ("[-32, -8)", 1, 0.0, 0.0),
        ("[-8, 8)", 2, 1.0, 0.5),
        ("[32, inf)", 1, 0.0, 1.0),
    ]


def test_subsets_and_prompt_weighted_sections():
    subsets, sections, score = subset_tables(["a/x", "a/x", "a/y", "b/z", None], np.array([1.0, 0.0, 1.0, 1.0, 0.0]))
    assert [(r["subset"], r["n"], r["accuracy"]) for r in subsets] == [
        ("a/x", 2, 0.5),
        ("a/y", 1, 1.0),
        ("b/z", 1, 1.0),
    ]
    # section a pools its three pairs (2/3), not the mean of its subsets (3/4)
    assert [(r["section"], r["n"]) for r in sections] == [("a", 3), ("b", 1)]
    assert sections[0]["accuracy"] == pytest.approx(2 / 3)
    assert score == pytest.approx((2 / 3 + 1) / 2)


def test_ensemble_disagreement():
    margins = torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, 2.5]])  # [K=2, N=3]
    d = disagreement(margins, np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(d["per_pair"], [0.0, 1.0, 0.25])
    assert d["share_split"] == pytest.approx(1 / 3)
    assert d["accuracy_least_disputed_half"] == 1.0 and d["accuracy_most_disputed_half"] == 0.5
