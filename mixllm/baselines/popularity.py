"""Most-popular: score every item by its number of training interactions, whoever the user is."""

from __future__ import annotations

import numpy as np
import torch

from mixllm.data.evaluation import Ranker, RankingBatch
from mixllm.data.split import LeaveOneOutSplit


class PopularityRanker(Ranker):
    """Scores are training-split interaction counts; equal counts tie (see :mod:`mixllm.metrics`)."""

    name = "popularity"
    max_history = 0
    supports_full_ranking = True

    def __init__(self, item_counts: np.ndarray | torch.Tensor) -> None:
        self.item_counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float32)  # (N,)

    @classmethod
    def fit(cls, split: LeaveOneOutSplit) -> PopularityRanker:
        """Count each item's interactions in the training split only (no validation/test targets)."""
        return cls(split.train_item_counts())

    def score_all(self, batch: RankingBatch) -> torch.Tensor:
        return self.item_counts.expand(len(batch.users), -1)  # (B, N)

    def score(self, batch: RankingBatch) -> torch.Tensor:
        return self.item_counts[batch.candidates]  # (B, C)
