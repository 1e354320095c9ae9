"""Ranking metrics for one held-out target per user, vectorized over a batch of users.

Every metric starts from where the target lands among the candidates. For a user with candidate
scores ``s`` (higher is better), target score ``s_t`` and candidates that count (``candidate_mask``):

    greater = #{j counted, j != target : s_j >  s_t}
    ties    = #{j counted, j != target : s_j == s_t}

**Ties** are resolved as the *expectation under a uniformly random order of the tied items*: the
target's 0-based rank ``r`` is uniform on ``{greater, ..., greater + ties}`` and each metric is the
mean over those ranks. So a model that scores every candidate the same gets the chance level
(HR@1 = 1/C on C candidates), never the best or the worst value, and where the target sits in the
candidate list cannot matter.

With a single relevant item the ideal DCG is 1, so NDCG@k is the discount of the target's rank.
Recall@k (relevant items found in the top k / relevant items) equals HR@k when there is one target;
both names are kept so protocols can report what the literature calls them.

All functions take torch tensors and return one value per user (shape ``(B,)``, float64); average
them for a split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

METRIC_PATTERN = re.compile(r"^(hr|ndcg|recall)@(\d+)$|^mrr$")


def target_rank_counts(
    scores: torch.Tensor, target_index: torch.Tensor, candidate_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count the candidates scored above and level with each user's target.

    Args:
        scores: ``(B, C)`` candidate scores, higher is better. NaN is an error.
        target_index: ``(B,)`` column of the target in ``scores``.
        candidate_mask: optional ``(B, C)`` bool, True where a candidate counts (full ranking masks
            out the user's other interactions this way). The target must be a counted candidate.

    Returns:
        ``(greater, ties)``, both ``(B,)`` int64: counted candidates other than the target with a
        strictly higher score, and with exactly the target's score.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, candidates), got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; a ranker must return a finite or -inf score per candidate")
    target_index = target_index.to(device=scores.device, dtype=torch.long)
    target_score = scores.gather(1, target_index[:, None])  # (B, 1)
    others = torch.ones_like(scores, dtype=torch.bool)
    others.scatter_(1, target_index[:, None], False)  # (B, C), the target does not compete with itself
    if candidate_mask is not None:
        candidate_mask = candidate_mask.to(scores.device)
        if not candidate_mask.gather(1, target_index[:, None]).all():
            raise ValueError("candidate_mask excludes the target of at least one user")
        others &= candidate_mask
    greater = ((scores > target_score) & others).sum(dim=1)  # (B,)
    ties = ((scores == target_score) & others).sum(dim=1)  # (B,)
    return greater, ties


def _expected_over_tied_ranks(
    greater: torch.Tensor, ties: torch.Tensor, gain_at_rank: torch.Tensor
) -> torch.Tensor:
    """Mean of ``gain_at_rank[r]`` over ``r`` in ``greater .. greater + ties`` (0-based ranks).

    ``gain_at_rank`` is a 1-D float64 table long enough for every rank; prefix sums make this one
    subtraction per user instead of a loop over the tied ranks.
    """
    prefix = torch.cat([gain_at_rank.new_zeros(1), gain_at_rank.cumsum(0)])  # prefix[n] = sum of ranks < n
    lo = greater.to(gain_at_rank.device)
    hi = (greater + ties + 1).to(gain_at_rank.device)
    return (prefix[hi] - prefix[lo]) / (ties + 1).to(gain_at_rank)


def hit_rate_at_k(greater: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """HR@k = 1 if the target ranks in the top k else 0, i.e. ``1[r < k]`` for 0-based rank ``r``.

    Expected over tied ranks this is ``clamp(k - greater, 0, ties + 1) / (ties + 1)``.
    """
    _check_k(k)
    return (k - greater).clamp(0, None).minimum(ties + 1).double() / (ties + 1).double()


def recall_at_k(greater: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """Recall@k = |relevant ∩ top-k| / |relevant|; with the single held-out target it equals HR@k."""
    return hit_rate_at_k(greater, ties, k)


def ndcg_at_k(greater: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k = ``1[r < k] / log2(r + 2)`` for 0-based rank ``r`` (ideal DCG of one relevant item = 1).

    Rank 0 scores 1, rank 1 scores 1/log2(3) ≈ 0.631, rank 2 scores 0.5. Averaged over tied ranks.
    """
    _check_k(k)
    max_rank = int((greater + ties).max().item()) + 1 if greater.numel() else 1
    ranks = torch.arange(max_rank, dtype=torch.float64)
    gain = torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    return _expected_over_tied_ranks(greater, ties, gain)


def mrr(greater: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """Reciprocal rank ``1 / (r + 1)`` for 0-based rank ``r``, averaged over tied ranks (no cut-off)."""
    max_rank = int((greater + ties).max().item()) + 1 if greater.numel() else 1
    gain = 1.0 / torch.arange(1, max_rank + 1, dtype=torch.float64)
    return _expected_over_tied_ranks(greater, ties, gain)


def compute_metric(name: str, greater: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """One metric by name: ``"hr@K"``, ``"ndcg@K"``, ``"recall@K"`` or ``"mrr"``; ``(B,)`` float64."""
    match = METRIC_PATTERN.match(name)
    if match is None:
        raise ValueError(f"unknown metric {name!r}; expected hr@K, ndcg@K, recall@K or mrr")
    if name == "mrr":
        return mrr(greater, ties)
    kind, k = match.group(1), int(match.group(2))
    return {"hr": hit_rate_at_k, "ndcg": ndcg_at_k, "recall": recall_at_k}[kind](greater, ties, k)


def ranking_metrics(
    scores: torch.Tensor,
    target_index: torch.Tensor,
    metrics: Sequence[str],
    candidate_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-user values of each named metric for a batch of scored candidate lists.

    Args:
        scores: ``(B, C)`` scores, higher is better.
        target_index: ``(B,)`` column of each user's target.
        metrics: names such as ``("hr@1", "ndcg@5", "mrr")``.
        candidate_mask: optional ``(B, C)`` bool of candidates that count.

    Returns:
        ``{name: (B,) float64}``.
    """
    greater, ties = target_rank_counts(scores, target_index, candidate_mask)
    return {name: compute_metric(name, greater, ties) for name in metrics}


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
