"""The model-agnostic evaluator: any :class:`Ranker` is scored on the same histories and candidates.

A ranker sees a :class:`RankingBatch` (users, their last ``ranker.max_history`` items before the
target, and candidate item indices) and returns one score per candidate, higher is better. It never
sees the target. The evaluator builds the batches from the split and the cached candidate lists,
and computes every metric in one place (:mod:`mixllm.metrics`).

Plugging in a new model (an LLM ranker, say)::

    class MyRanker(Ranker):
        name = "my-ranker"
        max_history = 10            # H: items of history it reads
        def score(self, batch):     # (B, C) from batch.history (B, H) and batch.candidates (B, C)
            ...

    results = evaluate_protocols(MyRanker(), split, seed=0)

Rankers that can score the whole catalog cheaply also implement :meth:`Ranker.score_all` and set
``supports_full_ranking = True``; the others are simply not run on the full-ranking protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixllm.data.protocols import PROTOCOLS, CandidateLists, EvalProtocol, get_candidates
from mixllm.data.split import PAD, SPLITS, LeaveOneOutSplit, Split
from mixllm.metrics import ranking_metrics

log = logging.getLogger(__name__)


@dataclass
class RankingBatch:
    """What a ranker may read about a batch of users."""

    users: torch.Tensor
    """``(B,)`` int64 ``user_idx``."""
    history: torch.Tensor
    """``(B, H)`` int64 item indices before the target, left-padded with ``PAD`` (-1); column -1 is
    the most recent item. ``H = ranker.max_history`` (may be 0)."""
    candidates: torch.Tensor | None
    """``(B, C)`` int64 item indices to score, or None when the whole catalog is ranked."""

    @property
    def history_mask(self) -> torch.Tensor:
        """``(B, H)`` bool, True on real (non-padding) history items."""
        return self.history != PAD


class Ranker:
    """Interface every recommender implements to be evaluated (and, later, served).

    Subclasses override :meth:`score`, :meth:`score_all` or both. The default :meth:`score`
    gathers from :meth:`score_all`, so a catalog scorer gets candidate scoring for free.
    """

    name: str = "ranker"
    """Row label in reports."""
    max_history: int = 10
    """How many of the most recent history items the ranker reads (0 = none)."""
    supports_full_ranking: bool = False
    """True if :meth:`score_all` is implemented (and cheap enough to run on every user)."""

    def score(self, batch: RankingBatch) -> torch.Tensor:
        """``(B, C)`` float scores for ``batch.candidates``; higher ranks first."""
        if batch.candidates is None:
            raise ValueError("score() needs candidates; use score_all() to rank the whole catalog")
        return self.score_all(batch).gather(1, batch.candidates)

    def score_all(self, batch: RankingBatch) -> torch.Tensor:
        """``(B, num_items)`` float scores for every item in the catalog."""
        raise NotImplementedError(f"{type(self).__name__} does not rank the whole catalog")


def make_batch(split: LeaveOneOutSplit, which: Split, users: np.ndarray, max_history: int, candidates=None) -> RankingBatch:
    """The :class:`RankingBatch` of ``users`` for the ``which`` target."""
    return RankingBatch(
        users=torch.as_tensor(users, dtype=torch.long),
        history=torch.from_numpy(split.histories(which, max_history, users)),
        candidates=None if candidates is None else torch.as_tensor(candidates, dtype=torch.long),
    )


@torch.inference_mode()
def evaluate(
    ranker: Ranker,
    split: LeaveOneOutSplit,
    protocol: EvalProtocol,
    which: Split,
    candidates: CandidateLists | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean of each of ``protocol.metrics`` over all users for the ``which`` target.

    Args:
        candidates: the sampled lists for this protocol and split (required unless full ranking).
        batch_size: users scored per call.

    Returns:
        ``{metric: mean over users}``.
    """
    if protocol.is_full_ranking:
        if not ranker.supports_full_ranking:
            raise ValueError(f"{ranker.name} does not support full ranking")
    elif candidates is None or candidates.protocol != protocol.name or candidates.split != which:
        raise ValueError(f"{protocol.name}/{which} needs its candidate lists (see get_candidates)")

    was_training = isinstance(ranker, torch.nn.Module) and ranker.training
    if isinstance(ranker, torch.nn.Module):
        ranker.eval()
    sums = {metric: 0.0 for metric in protocol.metrics}
    try:
        for start in range(0, split.num_users, batch_size):
            users = np.arange(start, min(start + batch_size, split.num_users))
            values = score_users(ranker, split, protocol, which, users, candidates)
            for metric, per_user in values.items():
                sums[metric] += float(per_user.sum())
    finally:
        if was_training:
            ranker.train()
    return {metric: total / split.num_users for metric, total in sums.items()}


def score_users(
    ranker: Ranker,
    split: LeaveOneOutSplit,
    protocol: EvalProtocol,
    which: Split,
    users: np.ndarray,
    candidates: CandidateLists | None = None,
) -> dict[str, torch.Tensor]:
    """Per-user metric values ``{metric: (B,)}`` for one batch of ``users`` (the evaluator's step;
    training loops call it for validation). The ranker's mode (train/eval) is left as it is."""
    targets = split.targets(which)
    if protocol.is_full_ranking:
        batch = make_batch(split, which, users, ranker.max_history)
        scores = ranker.score_all(batch)  # (B, N)
        target_index = torch.from_numpy(targets[users])
        mask = torch.from_numpy(split.full_ranking_mask(which, users))  # the target stays in
        expected = (len(users), split.num_items)
    else:
        batch = make_batch(split, which, users, ranker.max_history, candidates.candidates[users])
        scores = ranker.score(batch)  # (B, C)
        target_index = torch.from_numpy(candidates.target_index[users])
        mask = None
        expected = tuple(batch.candidates.shape)
    if tuple(scores.shape) != expected:
        raise ValueError(f"{ranker.name} returned scores of shape {tuple(scores.shape)}, expected {expected}")
    return ranking_metrics(scores.detach().float().cpu(), target_index, protocol.metrics, mask)


def evaluate_protocols(
    ranker: Ranker,
    split: LeaveOneOutSplit,
    seed: int,
    protocols: Iterable[EvalProtocol] = PROTOCOLS.values(),
    splits: Iterable[Split] = SPLITS,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
) -> dict[str, dict[str, dict[str, float]]]:
    """Run ``ranker`` on every protocol and split with the cached candidate lists of ``seed``.

    Full ranking is skipped (with a log line) for rankers that do not support it.

    Returns:
        ``{split: {protocol: {metric: value}}}``.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    for which in splits:
        results[which] = {}
        for protocol in protocols:
            if protocol.is_full_ranking and not ranker.supports_full_ranking:
                log.info("%s: skipping %s (no full-ranking scorer)", ranker.name, protocol.name)
                continue
            lists = None if protocol.is_full_ranking else get_candidates(split, protocol, which, seed, cache_dir)
            start = time.perf_counter()
            results[which][protocol.name] = evaluate(ranker, split, protocol, which, lists, batch_size)
            log.debug("%s %s/%s in %.2fs", ranker.name, which, protocol.name, time.perf_counter() - start)
    return results
