"""Item-text similarity: cosine between the mean embedding of the history's item texts and each item.

No training. The item embeddings come from the item text encoder (MiniLM over
:func:`mixllm.data.item_text`), the same vectors the student ranker reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixllm.data.evaluation import Ranker, RankingBatch
from mixllm.data.split import DEFAULT_HISTORY_LENGTH, PAD


class TextSimilarityRanker(Ranker):
    """``score(i) = cos(mean_h e_h, e_i)`` over the last ``max_history`` history items."""

    name = "minilm-text"
    supports_full_ranking = True

    def __init__(self, item_embeddings: torch.Tensor, max_history: int = DEFAULT_HISTORY_LENGTH) -> None:
        if item_embeddings.dim() != 2:
            raise ValueError(f"item_embeddings must be (num_items, dim), got {tuple(item_embeddings.shape)}")
        self.item_embeddings = F.normalize(item_embeddings.float(), dim=-1)  # (N, D)
        self.max_history = max_history

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` normalized mean of the real history items' embeddings."""
        mask = (history != PAD).unsqueeze(-1).float()  # (B, H, 1)
        vectors = self.item_embeddings[history.clamp(min=0)] * mask  # (B, H, D)
        return F.normalize(vectors.sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)

    def score_all(self, batch: RankingBatch) -> torch.Tensor:
        return self.user_vectors(batch.history) @ self.item_embeddings.T  # (B, N)

    def score(self, batch: RankingBatch) -> torch.Tensor:
        user = self.user_vectors(batch.history)  # (B, D)
        return torch.einsum("bd,bcd->bc", user, self.item_embeddings[batch.candidates])  # (B, C)
