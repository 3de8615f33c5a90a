"""Ranking metrics (ties, non-finite scores, k beyond the catalog), the split rule and the baselines on hand-made
cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from ebbtide.evaluate import (
    EvalSet,
    EvaluationError,
    most_popular,
    rank_metrics,
    sar,
    transition,
    transition_popular,
)
from ebbtide.split import SplitPlan

DAY = 86_400.0


def eval_set(targets, seen, n_items, full=None, train=None) -> EvalSet:
    return EvalSet(batch=None, t_query=torch.zeros(len(targets), dtype=torch.float64), targets=np.array(targets),
                   seen=[np.array(s, dtype=np.int64) for s in seen], full=full, train=train, n_items=n_items)


def test_rank_metrics_on_known_ranks():
    es = eval_set([0, 1, 2], [[4], [], []], 5)
    scores = torch.tensor([[5.0, 1, 1, 1, 9],     # target 0 ranks first once item 4 (seen) is masked
                           [5.0, 4, 1, 1, 1],     # target 1 ranks second
                           [1.0, 2, 0, 3, 4]])    # target 2 ranks last (5th)
    m = rank_metrics([(0, scores)], es, ks=(1, 2), exclude_seen=True)
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["mrr@2"] == pytest.approx((1 + 0.5) / 3)


def test_ties_count_against_the_target():
    es = eval_set([3, 0], [[], []], 10)
    constant = torch.zeros(2, 10)                      # every item tied: the target ranks after all of them
    m = rank_metrics([(0, constant)], es, ks=(1, 10), exclude_seen=False)
    assert m["hr@1"] == 0.0 and m["hr@10"] == pytest.approx(1.0)   # rank 10 of 10: inside the top 10 only
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(11))
    tied_top = torch.tensor([[0.0, 0, 0, 5, 5, 0, 0, 0, 0, 0], [5.0, 5, 5, 0, 0, 0, 0, 0, 0, 0]])
    m = rank_metrics([(0, tied_top)], es, ks=(1, 2, 3), exclude_seen=False)
    assert m["hr@1"] == 0.0 and m["hr@2"] == pytest.approx(0.5) and m["hr@3"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_fail_the_evaluation(bad):
    es = eval_set([0], [[]], 4)
    scores = torch.tensor([[1.0, 2.0, bad, 0.5]])
    with pytest.raises(EvaluationError, match="non-finite"):
        rank_metrics([(0, scores)], es, ks=(2,))
    with pytest.raises(EvaluationError):
        rank_metrics([(0, torch.full((1, 4), float("nan")))], es, ks=(2,))


def test_k_beyond_the_catalog():
    es = eval_set([1, 2], [[], [0]], 3)
    m = rank_metrics([(0, torch.tensor([[3.0, 2, 1], [3.0, 2, 1]]))], es, ks=(10, 20), curve_max_k=50)
    assert m["hr@10"] == 1.0 and m["hr@20"] == 1.0 and m["coverage@20"] == 1.0
    assert len(m["ndcg_curve"]) == 50


def test_split_rule():
    ts = np.array([0.0, 1, 2, 3, 4]) * DAY
    loo = SplitPlan("leave_one_out")
    assert loo.train_end(ts) == 3 and loo.target(ts, "val") == 3 and loo.target(ts, "test") == 4
    assert loo.target(ts[:1], "test") == -1                         # no history before the target
    temporal = SplitPlan("temporal", 2.5 * DAY, (2.5 * DAY, 3.5 * DAY), (3.5 * DAY, 4.5 * DAY))
    assert temporal.train_end(ts) == 3
    assert temporal.target(ts, "val") == 3 and temporal.target(ts, "test") == 4
    assert temporal.target(ts[:3], "val") == -1                     # nothing in the window
    assert SplitPlan.from_dict(temporal.as_dict()) == temporal


def _frame(histories):
    return pd.DataFrame({"items": [np.array(h, dtype=np.int64) for h in histories],
                         "ts": [np.arange(len(h), dtype=np.float64) * DAY for h in histories],
                         "types": [np.zeros(len(h), dtype=np.int64) for h in histories]})


def test_baselines_on_a_hand_made_case():
    train = _frame([[0, 1, 2], [0, 1, 3], [4, 2], [1, 2]])
    full = _frame([[0], [2], [3]])                                  # the eval users' histories: last items 0, 2, 3
    es = eval_set([1, 3, 4], [[0], [2], [3]], 5, full=full, train=train)
    pop = next(iter(most_popular(es)))[1][0]
    assert pop.tolist() == [2, 3, 3, 1, 1]                          # training counts
    trans = torch.cat([s for _, s in transition(es)])
    assert trans[0].tolist() == [0, 2, 0, 0, 0]                     # 0 -> 1 twice
    assert trans[1].tolist() == [0, 0, 0, 0, 0]                     # nothing ever followed 2
    m = rank_metrics(transition(es), es, ks=(1,))
    assert m["hr@1"] == pytest.approx(1 / 3)                        # user 0 right; ties ruin the others
    popular = torch.cat([s for _, s in transition_popular(es)])
    assert popular[1, 1] > popular[1, 0] > popular[1, 3]           # no transition from 2: popularity decides
    assert popular[0, 1] > popular[0, 2]                            # a transition count beats any popularity
    sar_scores = torch.cat([s for _, s in sar(es, half_life_days=1000.0)])
    assert sar_scores[0, 1] > sar_scores[0, 4]                      # 0 co-occurs with 1, never with 4
