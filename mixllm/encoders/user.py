"""User encoder (User-LLM): a history of item vectors -> m summary tokens.

A small transformer reads the history (with learned positions, padding masked), then m learned
queries cross-attend to it (a one-layer perceiver), giving a fixed number of tokens per user
however long the history is.
"""

from __future__ import annotations

import torch
from torch import nn

from mixllm.config import UserConfig


class UserEncoder(nn.Module):
    def __init__(self, config: UserConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.output_dim = d
        self.in_proj = nn.Linear(config.item_dim, d)
        self.position = nn.Embedding(config.max_history, d)
        layer = nn.TransformerEncoderLayer(d, config.num_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.history = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(config.num_tokens, d) * 0.02)
        self.cross = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor | None = None) -> torch.Tensor:
        """history: (U, L, item_dim), most recent item last; history_mask: (U, L) bool, True = real item.

        Returns (U, m, hidden_dim).
        """
        n_users, length, width = history.shape
        if width != self.config.item_dim:
            raise ValueError(f"user history items must have width {self.config.item_dim}, got {width}")
        if length > self.config.max_history:
            raise ValueError(f"user history has {length} items; this encoder accepts at most {self.config.max_history}")
        if history_mask is None:
            history_mask = torch.ones(n_users, length, dtype=torch.bool, device=history.device)
        if not bool(history_mask.any(dim=1).all()):
            raise ValueError("every user needs at least one history item (a row of history_mask is all False)")
        pos = torch.arange(length, device=history.device)
        x = self.in_proj(history.to(self.in_proj.weight.dtype)) + self.position(pos)  # (U, L, d)
        pad = ~history_mask.bool()  # (U, L) True = ignore
        x = self.history(x, src_key_padding_mask=pad)  # (U, L, d)
        q = self.queries.unsqueeze(0).expand(n_users, -1, -1)  # (U, m, d)
        summary, _ = self.cross(q, x, x, key_padding_mask=pad, need_weights=False)  # (U, m, d)
        return self.norm(summary + q)
