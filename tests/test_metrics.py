"""Ranking metrics against hand-computed values, brute-force tie enumeration and their invariances."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixllm.metrics import compute_metric, ranking_metrics, target_rank_counts


def metrics_of(scores, target, names, mask=None):
    values = ranking_metrics(
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(target),
        names,
        None if mask is None else torch.tensor(mask),
    )
    return {name: value.tolist() for name, value in values.items()}


def test_distinct_scores_hand_computed():
    # Target (0.5) is beaten by 0.9 and 0.7: 0-based rank 2.
    got = metrics_of([[0.9, 0.5, 0.7, 0.1]], [1], ["hr@1", "hr@3", "ndcg@2", "ndcg@5", "mrr", "recall@3"])
    assert got["hr@1"] == [0.0]
    assert got["hr@3"] == [1.0]
    assert got["ndcg@2"] == [0.0]
    assert got["ndcg@5"] == pytest.approx([0.5])  # 1 / log2(2 + 2)
    assert got["mrr"] == pytest.approx([1 / 3])
    assert got["recall@3"] == got["hr@3"]


def test_top_ranked_target_scores_one_everywhere():
    got = metrics_of([[0.1, 2.0, 0.3]], [1], ["hr@1", "ndcg@1", "ndcg@10", "mrr"])
    assert got == {"hr@1": [1.0], "ndcg@1": [1.0], "ndcg@10": [1.0], "mrr": [1.0]}


def test_all_tied_gives_chance_level():
    # Rank uniform on {0, 1, 2, 3}.
    got = metrics_of([[1.0, 1.0, 1.0, 1.0]], [0], ["hr@1", "hr@2", "mrr", "ndcg@2"])
    assert got["hr@1"] == pytest.approx([0.25])
    assert got["hr@2"] == pytest.approx([0.5])
    assert got["mrr"] == pytest.approx([(1 + 1 / 2 + 1 / 3 + 1 / 4) / 4])  # 25/48
    assert got["ndcg@2"] == pytest.approx([(1 + 1 / math.log2(3)) / 4])


def test_partial_ties_hand_computed():
    # One item above, two level with the target: rank uniform on {1, 2, 3}.
    got = metrics_of([[3.0, 2.0, 2.0, 1.0, 2.0]], [1], ["hr@1", "hr@2", "hr@3", "hr@4", "ndcg@3", "mrr"])
    assert got["hr@1"] == [0.0]
    assert got["hr@2"] == pytest.approx([1 / 3])
    assert got["hr@3"] == pytest.approx([2 / 3])
    assert got["hr@4"] == pytest.approx([1.0])
    assert got["ndcg@3"] == pytest.approx([(1 / math.log2(3) + 1 / math.log2(4)) / 3])
    assert got["mrr"] == pytest.approx([(1 / 2 + 1 / 3 + 1 / 4) / 3])  # 13/36


def test_mask_removes_candidates_from_competition():
    # Without the mask the target (3.0) is third; masking the two higher items makes it first.
    scores = [[5.0, 4.0, 3.0, 1.0]]
    assert metrics_of(scores, [2], ["mrr"])["mrr"] == pytest.approx([1 / 3])
    masked = metrics_of(scores, [2], ["hr@1", "mrr", "ndcg@2"], mask=[[False, False, True, True]])
    assert masked == {"hr@1": [1.0], "mrr": [1.0], "ndcg@2": [1.0]}
    partly = metrics_of(scores, [2], ["ndcg@2", "mrr"], mask=[[False, True, True, True]])
    assert partly["ndcg@2"] == pytest.approx([1 / math.log2(3)])
    assert partly["mrr"] == pytest.approx([0.5])


def test_batch_rows_are_independent():
    got = metrics_of([[0.9, 0.5, 0.7], [0.1, 0.2, 0.3], [1.0, 1.0, 0.0]], [1, 2, 0], ["hr@1", "mrr"])
    assert got["hr@1"] == pytest.approx([0.0, 1.0, 0.5])
    assert got["mrr"] == pytest.approx([1 / 3, 1.0, 0.75])


def brute_force(scores: list[float], target: int, name: str) -> float:
    """Average the metric over every order of the candidates, ranking by score with ties in that order."""
    values = []
    for order in itertools.permutations(range(len(scores))):
        ranked = sorted(order, key=lambda j: -scores[j])  # stable: ties keep the permutation's order
        rank = ranked.index(target)
        if name == "mrr":
            values.append(1 / (rank + 1))
        else:
            kind, k = name.split("@")
            hit = rank < int(k)
            values.append(float(hit) if kind in ("hr", "recall") else hit / math.log2(rank + 2))
    return sum(values) / len(values)


def test_ties_equal_expectation_over_random_tie_orders():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (40, 6), generator=generator).float()  # many ties
    target = torch.randint(0, 6, (40,), generator=generator)
    names = ["hr@1", "hr@3", "ndcg@2", "ndcg@5", "mrr", "recall@4"]
    got = ranking_metrics(scores, target, names)
    for row in range(40):
        for name in names:
            expected = brute_force(scores[row].tolist(), int(target[row]), name)
            assert got[name][row].item() == pytest.approx(expected), (row, name)


def test_target_position_does_not_matter():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (16, 10), generator=generator).float()
    target = torch.randint(0, 10, (16,), generator=generator)
    names = ["hr@1", "ndcg@5", "mrr"]
    before = ranking_metrics(scores, target, names)
    perm = torch.randperm(10, generator=generator)
    inverse = perm.argsort()
    after = ranking_metrics(scores[:, perm], inverse[target], names)
    for name in names:
        torch.testing.assert_close(before[name], after[name])


def test_counts_and_errors():
    greater, ties = target_rank_counts(torch.tensor([[2.0, 1.0, 2.0, 3.0]]), torch.tensor([0]))
    assert greater.tolist() == [1] and ties.tolist() == [1]
    with pytest.raises(ValueError, match="NaN"):
        target_rank_counts(torch.tensor([[float("nan"), 1.0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="excludes the target"):
        target_rank_counts(torch.tensor([[1.0, 2.0]]), torch.tensor([1]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("precision@5", greater, ties)
    with pytest.raises(ValueError, match="k must be"):
        compute_metric("hr@0", greater, ties)


def test_minus_inf_scores_rank_last_but_count():
    got = metrics_of([[float("-inf"), float("-inf"), 0.0]], [0], ["mrr"])
    assert got["mrr"] == pytest.approx([(1 / 2 + 1 / 3) / 2])
