"""Projectors: encoder features -> the language model's hidden size, one per modality."""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    """``linear``: one Linear. ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5).

    Parameter names follow transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``)
    so llava-hf weights load without renaming. ``output_rms``: end with an RMS norm (``norm``) whose
    learnable gain starts at this value, so every output token has that root-mean-square to begin with.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu", bias: bool = True,
                 output_rms: float | None = None):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"projector type {kind!r} is not one of {PROJECTOR_TYPES}")
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.kind = kind
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self.norm = None
        if output_rms is not None:
            if not output_rms > 0:
                raise ValueError(f"projector output_rms must be positive, got {output_rms}")
            self.norm = nn.RMSNorm(out_dim, eps=1e-6)
            with torch.no_grad():
                self.norm.weight.fill_(output_rms)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        hidden = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            hidden = self.linear_2(self.act(hidden))
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden
