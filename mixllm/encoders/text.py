"""Sentence encoder: all-MiniLM-L6-v2 (a 6-layer BERT) + attention-masked mean pooling + L2 normalization.

This reproduces the sentence-transformers pipeline of the packaged model (modules.json: Transformer ->
Pooling(mean tokens) -> Normalize) with transformers alone, reading only the local model directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixllm.errors import AssetError

logger = logging.getLogger(__name__)


def mean_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the token states where `attention_mask` is 1: (B, T, D), (B, T) -> (B, D).

    Padding positions contribute nothing, so a text's embedding does not depend on how much it was padded.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
    summed = (hidden_states * mask).sum(dim=1)  # (B, D)
    counts = mask.sum(dim=1).clamp_min(1e-9)  # (B, 1); an all-padding row gives zeros, not NaN
    return summed / counts


class SentenceEncoder(nn.Module):
    """Texts -> L2-normalized `dim`-d sentence embeddings (384 for all-MiniLM-L6-v2).

    `model` is a transformers encoder (a `BertModel` for MiniLM) returning `last_hidden_state`; `tokenizer`
    is its tokenizer, needed only by `encode`.
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.dim: int = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "SentenceEncoder":
        """Load from a local transformers directory; None = the packaged `asset_path("all-minilm-l6-v2")`.

        Never touches a model hub. If the directory has a sentence-transformers `1_Pooling/config.json`, it must
        ask for mean pooling, the only pooling implemented here.
        """
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            from mixllm.assets import asset_path

            path = asset_path("all-minilm-l6-v2")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise AssetError(f"no transformers model directory at {path} (config.json missing)")
        pooling_config = path / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            pooling = json.loads(pooling_config.read_text())
            if not pooling.get("pooling_mode_mean_tokens", False):
                raise ValueError(f"{pooling_config} asks for a pooling other than mean tokens: {pooling}")
        model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        logger.info("loaded sentence encoder from %s", path)
        return cls(model, tokenizer).eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) token ids and mask -> (B, dim) unit-norm embeddings."""
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return F.normalize(mean_pool(hidden_states, attention_mask), p=2, dim=-1)  # (B, D)

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int = 64, max_length: int = 128, show_progress: bool = False
    ) -> Tensor:
        """Texts -> (N, dim) float32 unit-norm embeddings on the CPU, in the order given.

        Texts are batched by length (less padding, same results) and truncated to `max_length` tokens.
        """
        if self.tokenizer is None:
            raise ValueError("encode needs a tokenizer: build the SentenceEncoder with one or use from_pretrained")
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] is a {type(text).__name__}, not a string")
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        if len(texts) == 0:
            return torch.empty(0, self.dim)
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        embeddings = torch.empty(len(texts), self.dim)  # (N, D)
        with tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not show_progress) as bar:
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                out = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (b, D)
                embeddings[idx] = out.float().cpu()
                bar.update(len(idx))
        return embeddings
