"""Ranking metrics on hand-made rankings (msif.eval.metrics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from msif.eval import metrics as M


def test_reciprocal_rank_and_recalls_by_hand():
    # ranking by score: c0 (0.9), c3 (0.8), c1 (0.5), c4 (0.2), c2 (0.1); gold = c1, c2
    scores = [0.9, 0.5, 0.1, 0.8, 0.2]
    gold = [False, True, True, False, False]
    assert M.ranking(scores, gold).tolist() == [0, 3, 1, 4, 2]
    assert M.gold_ranks(scores, gold).tolist() == [3, 5]
    assert M.reciprocal_rank(scores, gold) == pytest.approx(1 / 3)
    assert M.recall_any_at_k(scores, gold, 2) == 0.0
    assert M.recall_any_at_k(scores, gold, 3) == 1.0
    assert M.recall_frac_at_k(scores, gold, 3) == pytest.approx(0.5)
    assert M.recall_frac_at_k(scores, gold, 5) == pytest.approx(1.0)
    # the fact has 4 sources, only 2 of them among the candidates: the fraction is out of 4
    assert M.recall_frac_at_k(scores, gold, 5, n_gold=4) == pytest.approx(0.5)
    q = M.query_metrics(scores, gold, n_gold=4, ks=(1, 3))
    assert q == {"mrr": pytest.approx(1 / 3), "recall_any@1": 0.0, "recall_frac@1": 0.0,
                 "recall_any@3": 1.0, "recall_frac@3": pytest.approx(0.25)}


def test_gold_as_positions_equals_mask():
    scores = [0.3, 0.7, 0.1, 0.5]
    assert M.reciprocal_rank(scores, [2, 3]) == M.reciprocal_rank(scores, [False, False, True, True]) == 0.5
    with pytest.raises(ValueError):
        M.reciprocal_rank(scores, [7])


def test_no_gold_in_list_contributes_zero():
    scores = [0.3, 0.2, 0.1]
    gold = [False, False, False]
    assert M.reciprocal_rank(scores, gold) == 0.0
    assert M.recall_any_at_k(scores, gold, 10) == 0.0
    assert M.recall_frac_at_k(scores, gold, 10, n_gold=5) == 0.0
    assert M.recall_frac_at_k(scores, gold, 10) == 0.0  # no gold at all: 0, not a division by zero
    # and it still counts in the mean over queries
    per_q = [M.query_metrics([1.0, 0.0], [True, False]), M.query_metrics(scores, gold, n_gold=2)]
    assert M.mean_metrics(per_q)["mrr"] == pytest.approx(0.5)


def test_ties_are_deterministic_and_pessimistic_by_default():
    scores = [1.0, 1.0, 1.0, 1.0]
    gold = [True, False, False, False]
    # a constant scorer must not get the gold document first just because it is listed first
    assert M.gold_ranks(scores, gold).tolist() == [4]
    assert M.reciprocal_rank(scores, gold) == 0.25
    assert M.reciprocal_rank(scores, gold, ties="optimistic") == 1.0
    assert M.reciprocal_rank(scores, gold, ties="order") == 1.0
    # partial tie: gold tied with one non-gold, behind a clear winner
    s2 = [0.5, 0.9, 0.5]
    g2 = [True, False, False]
    assert M.gold_ranks(s2, g2).tolist() == [3]
    assert M.gold_ranks(s2, g2, ties="optimistic").tolist() == [2]
    # repeated calls give the same ranking
    assert M.ranking(s2, g2).tolist() == M.ranking(s2, g2).tolist() == [1, 2, 0]
    with pytest.raises(ValueError):
        M.ranking(s2, g2, ties="random")


def test_nan_scores_rank_last():
    scores = [float("nan"), 0.1, 0.2]
    assert M.gold_ranks(scores, [True, False, False]).tolist() == [3]
    assert M.reciprocal_rank(scores, [False, True, False]) == 0.5


def test_bad_inputs():
    with pytest.raises(ValueError):
        M.reciprocal_rank([0.1, 0.2], [True])
    with pytest.raises(ValueError):
        M.recall_any_at_k([0.1], [True], 0)
    with pytest.raises(ValueError):
        M.recall_frac_at_k([0.1, 0.2], [True, True], 1, n_gold=1)


@pytest.mark.parametrize("n,g,k", [(5, 1, 2), (6, 2, 3), (7, 3, 1), (6, 0, 2), (4, 4, 2), (5, 2, 10)])
def test_chance_levels_equal_the_average_over_all_orders(n, g, k):
    gold = np.array([True] * g + [False] * (n - g))
    rr, ra, rf = [], [], []
    for perm in itertools.permutations(range(n)):
        scores = -np.array(perm, dtype=float)  # candidate i gets rank perm[i] + 1
        rr.append(M.reciprocal_rank(scores, gold))
        ra.append(M.recall_any_at_k(scores, gold, k))
        rf.append(M.recall_frac_at_k(scores, gold, k, n_gold=g + 1))
    assert M.chance_mrr(n, g) == pytest.approx(np.mean(rr))
    assert M.chance_recall_any(n, g, k) == pytest.approx(np.mean(ra))
    assert M.chance_recall_frac(n, g, k, n_gold=g + 1) == pytest.approx(np.mean(rf))


def test_mean_std_and_format():
    assert M.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof=1)
    assert M.mean_std([0.5]) == (0.5, 0.0)
    m, s = M.mean_std([])
    assert math.isnan(m) and math.isnan(s)
    d = M.summarize([0.2, 0.4])
    assert d["mean"] == pytest.approx(0.3) and d["std"] == pytest.approx(math.sqrt(0.02)) and d["values"] == [0.2, 0.4]
    assert M.fmt_mean_std(0.51234, 0.0234) == "0.512 ± 0.023"
    assert M.fmt_mean_std(float("nan"), 0.0) == "–"
