"""SASRec (Kang and McAuley, 2018): a causal self-attention model over a user's item-id sequence.

The hidden state at the last position is the user; an item's score is its dot product with the
item's input embedding (tied weights), so :meth:`SASRec.item_embeddings` is the collaborative item
feature the student ranker reads.

Differences from the paper, each a common modern choice: pre-LayerNorm blocks with GELU,
positions counted back from the most recent item (so a history of any length up to ``max_history``
lines up the same way), and training with a full softmax over the catalog (``training/sasrec.py``)
instead of one sampled negative with BCE.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mixllm.data.evaluation import Ranker, RankingBatch
from mixllm.data.split import PAD

WEIGHTS_NAME = "model.safetensors"
ITEM_EMBEDDINGS_NAME = "item_embeddings.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class SASRecConfig:
    """Shape of a SASRec model."""

    num_items: int
    """Catalog size N; item indices are 0..N-1 (index N+1 rows: row 0 of the table is padding)."""
    hidden_size: int = 64
    """Width D of item embeddings and hidden states."""
    num_blocks: int = 2
    """Self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block (must divide hidden_size)."""
    max_history: int = 50
    """Longest history the model reads; longer ones keep their most recent max_history items."""
    ffn_size: int = 256
    """Width of the feed-forward layer inside each block."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and block outputs."""

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.hidden_size < 1 or self.num_blocks < 1 or self.max_history < 1 or self.ffn_size < 1:
            raise ValueError("hidden_size, num_blocks, max_history and ffn_size must be >= 1")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SASRecBlock(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention, then a GELU feed-forward."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.attn_norm = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.ffn_size),
            nn.GELU(),
            nn.Linear(config.ffn_size, config.hidden_size),
        )
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, d)
        x = x + self.resid_dropout(self.attn_out(attn.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))  # (B, L, D)


class SASRec(nn.Module, Ranker):
    """Self-attentive sequential recommender over item ids; a :class:`~mixllm.data.Ranker`."""

    name = "sasrec"
    supports_full_ranking = True

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.max_history = config.max_history
        self.item_embedding = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)  # row 0 = PAD
        self.position_embedding = nn.Embedding(config.max_history, config.hidden_size)  # 0 = most recent
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.hidden_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Hidden state after each position of a left-padded history.

        Args:
            history: ``(B, L)`` item indices, ``PAD`` (-1) on the left; ``L <= max_history``.

        Returns:
            ``(B, L, D)``; position ``t`` has attended to real items at positions ``<= t``.
        """
        B, L = history.shape
        if L > self.config.max_history:
            raise ValueError(f"history length {L} exceeds max_history {self.config.max_history}")
        real = history != PAD  # (B, L)
        positions = torch.arange(L - 1, -1, -1, device=history.device)  # (L,) distance from the end
        x = self.item_embedding(history + 1) * math.sqrt(self.config.hidden_size)  # (B, L, D)
        x = self.embed_dropout(x + self.position_embedding(positions)) * real.unsqueeze(-1)  # (B, L, D)
        causal = torch.ones(L, L, dtype=torch.bool, device=history.device).tril()  # (L, L)
        # Queries see earlier real keys; every query also sees itself so padded rows never go all -inf.
        attn_mask = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=history.device)  # (B, L, L)
        attn_mask = attn_mask.unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask) * real.unsqueeze(-1)  # (B, L, D)
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        """``(num_items, D)`` item vectors, row ``i`` = ``item_idx`` i (the padding row dropped)."""
        return self.item_embedding.weight[1:]

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` hidden state at the most recent history position."""
        return self.forward(history[:, -self.config.max_history :])[:, -1]

    def logits(self, history: torch.Tensor) -> torch.Tensor:
        """``(B, L, N)`` next-item logits at every position (for training)."""
        return self.forward(history) @ self.item_embeddings().T

    def score_all(self, batch: RankingBatch) -> torch.Tensor:
        return self.user_vectors(batch.history) @ self.item_embeddings().T  # (B, N)

    def score(self, batch: RankingBatch) -> torch.Tensor:
        user = self.user_vectors(batch.history)  # (B, D)
        return torch.einsum("bd,bcd->bc", user, self.item_embeddings()[batch.candidates])  # (B, C)

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """Write ``model.safetensors``, ``item_embeddings.safetensors`` (key ``item_embeddings``,
        ``(num_items, D)``, row = ``item_idx``) and ``config.json`` (config + provenance)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        save_file({"item_embeddings": self.item_embeddings().detach().cpu().contiguous()}, directory / ITEM_EMBEDDINGS_NAME)
        payload = {"model_type": "sasrec", "config": asdict(self.config), "provenance": provenance or {}}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SASRec:
        """Load a model written by :meth:`save_pretrained` (eval mode)."""
        directory = Path(directory)
        payload = json.loads((directory / CONFIG_NAME).read_text())
        config = dict(payload["config"])
        if "max_len" in config:  # checkpoints written before H had one name everywhere
            config["max_history"] = config.pop("max_len")
        model = cls(SASRecConfig(**config))
        model.load_state_dict(load_file(directory / WEIGHTS_NAME))
        return model.eval()


def load_item_embeddings(directory: str | Path) -> torch.Tensor:
    """``(num_items, D)`` SASRec item embeddings exported by :meth:`SASRec.save_pretrained`."""
    return load_file(Path(directory) / ITEM_EMBEDDINGS_NAME)["item_embeddings"]


def training_windows(sequences: list[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-item training pairs from each user's training sequence, in windows of ``max_history``.

    A sequence ``s_1 .. s_n`` gives inputs ``s_1 .. s_{n-1}`` and targets ``s_2 .. s_n`` (target at
    position t = item after input t). Sequences longer than ``max_history + 1`` are cut from the end into
    consecutive windows, so every training interaction after the first is a target exactly once.
    Windows are left-padded with ``PAD`` in both arrays.

    Returns:
        ``(inputs, targets)``, both ``(num_windows, max_history)`` int64.
    """
    inputs, targets = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for end in range(len(seq) - 1, 0, -max_history):  # end = one past the last input position
            start = max(0, end - max_history)
            row_in = np.full(max_history, PAD, dtype=np.int64)
            row_out = np.full(max_history, PAD, dtype=np.int64)
            row_in[max_history - (end - start) :] = seq[start:end]
            row_out[max_history - (end - start) :] = seq[start + 1 : end + 1]
            inputs.append(row_in)
            targets.append(row_out)
    if not inputs:
        return np.zeros((0, max_history), np.int64), np.zeros((0, max_history), np.int64)
    return np.stack(inputs), np.stack(targets)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
