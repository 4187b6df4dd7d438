import math

import pytest
import torch

from mmm4rec.metrics import RankingMetrics, random_ranking_hr, target_ranks


def test_ranks_and_metrics_by_hand():
    # item 0 is padding (-inf); targets: row0 -> item 2 (rank 0), row1 -> item 1 (rank 2)
    scores = torch.tensor([[float("-inf"), 0.1, 0.9, 0.3],
                           [float("-inf"), 0.2, 0.5, 0.4]])
    ranks = target_ranks(scores, torch.tensor([2, 1]))
    assert ranks.tolist() == [0, 2]
    m = RankingMetrics(ks=(1, 3))
    m.update(ranks)
    out = m.compute()
    assert out["hr@1"] == pytest.approx(0.5)
    assert out["hr@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1.0 + 1 / math.log2(4)) / 2)
    assert out["mrr@3"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert out["ndcg@1"] == pytest.approx(0.5)


def test_history_masking_and_weights():
    scores = torch.tensor([[float("-inf"), 0.9, 0.8, 0.1]])
    hist = torch.tensor([[1, 0, 0]])
    assert target_ranks(scores, torch.tensor([2])).item() == 1
    assert target_ranks(scores, torch.tensor([2]), hist).item() == 0
    # the target itself is never masked even if it is in the history
    assert target_ranks(scores, torch.tensor([1]), hist).item() == 0
    m = RankingMetrics(ks=(1,))
    m.update(torch.tensor([0, 5]), torch.tensor([1.0, 0.0]))   # padding row ignored
    assert m.compute()["hr@1"] == 1.0 and m.compute()["count"] == 1.0


def test_random_ranking_baseline():
    assert random_ranking_hr(10, 1000) == 0.01
