"""Item encoder: per-item vectors -> k tokens per item (Mix-LLM's "one embedding token per item")."""

from __future__ import annotations

import torch
from torch import nn

from mixllm.config import ItemConfig


class ItemEncoder(nn.Module):
    """Concatenates an item's precomputed feature vector (e.g. the MiniLM embedding of its text or
    a SASRec item embedding) with a learned id embedding, then splits it into k tokens.

    Output: (N, k, output_dim) where output_dim = feature_dim + (id_dim if num_items else 0).
    """

    def __init__(self, config: ItemConfig):
        super().__init__()
        self.config = config
        self.id_embedding = nn.Embedding(config.num_items, config.id_dim) if config.num_items > 0 else None
        self.output_dim = max(config.feature_dim, 0) + (config.id_dim if config.num_items > 0 else 0)
        k = config.tokens_per_item
        # k > 1: one linear map to k vectors; k == 1 keeps the raw features (the projector maps them).
        self.expand = nn.Linear(self.output_dim, k * self.output_dim) if k > 1 else None

    def forward(
        self, item_features: torch.Tensor | None = None, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """item_features: (N, feature_dim) float; item_ids: (N,) long in [0, num_items)."""
        parts = []
        if self.config.feature_dim > 0:
            if item_features is None:
                raise ValueError(f"item_features of width {self.config.feature_dim} are required")
            if item_features.dim() != 2 or item_features.shape[-1] != self.config.feature_dim:
                raise ValueError(
                    f"item_features must be (num_items, {self.config.feature_dim}), got {tuple(item_features.shape)}"
                )
            parts.append(item_features)
        if self.id_embedding is not None:
            if item_ids is None:
                raise ValueError("item_ids are required: this item encoder has an id embedding")
            if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= self.config.num_items):
                raise ValueError(
                    f"item_ids must lie in [0, {self.config.num_items}), got min {int(item_ids.min())} max {int(item_ids.max())}"
                )
            parts.append(self.id_embedding(item_ids))  # (N, id_dim)
        dtype = next((p.dtype for p in self.parameters()), parts[0].dtype)
        x = torch.cat([p.to(dtype) for p in parts], dim=-1)  # (N, output_dim)
        if self.expand is None:
            return x.unsqueeze(1)  # (N, 1, output_dim)
        return self.expand(x).view(x.shape[0], self.config.tokens_per_item, self.output_dim)  # (N, k, output_dim)
