"""Projectors: encoder features -> the language model's hidden size, one per modality."""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def grid_codes(grid: int) -> torch.Tensor:
    """(grid*grid, 2*grid): token i of a raster-order grid -> one-hot of its row, then one-hot of its column."""
    index = torch.arange(grid * grid)
    eye = torch.eye(grid)
    return torch.cat([eye[index // grid], eye[index % grid]], dim=-1)


class Projector(nn.Module):
    """``linear``: one Linear. ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5).

    Parameter names follow transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``)
    so llava-hf weights load without renaming. ``output_rms``: end with an RMS norm (``norm``) whose
    learnable gain starts at this value, so every output token has that root-mean-square to begin with.
    ``standardize``: first map each input channel to zero mean and unit variance with fixed statistics
    (buffers ``input_mean``, ``input_std``; identity until :meth:`fit_input_statistics` sets them, and stored
    in checkpoints), so channels of very different scales (two tower stages side by side) all reach the MLP.
    ``positions``: a learned table (``positions``, ``(positions, out_dim)``, zeros until set) added to the
    output, one row per token of an input of exactly that many tokens: where each token sits (the image grid's
    cell), which a per-token MLP cannot see.
    ``grid``: append each token's row and column on a ``grid`` x ``grid`` token grid (raster order), one-hot,
    to its (standardised) features, so the MLP itself sees where the token sits and can mark it only where
    there is something to mark (``linear_1`` takes ``in_dim + 2 * grid`` channels).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu", bias: bool = True,
                 output_rms: float | None = None, standardize: bool = False, positions: int | None = None,
                 grid: int | None = None):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"projector type {kind!r} is not one of {PROJECTOR_TYPES}")
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.kind = kind
        self.grid = None
        if grid is not None:
            if grid < 1:
                raise ValueError(f"projector grid must be >= 1, got {grid}")
            self.grid = grid
            self.register_buffer("grid_codes", grid_codes(grid), persistent=False)
        self.linear_1 = nn.Linear(in_dim + (2 * grid if grid else 0), out_dim, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self.standardize = standardize
        if standardize:
            self.register_buffer("input_mean", torch.zeros(in_dim))
            self.register_buffer("input_std", torch.ones(in_dim))
        self.positions = None
        if positions is not None:
            if positions < 1:
                raise ValueError(f"projector positions must be >= 1, got {positions}")
            self.positions = nn.Parameter(torch.zeros(positions, out_dim))
        self.norm = None
        if output_rms is not None:
            if not output_rms > 0:
                raise ValueError(f"projector output_rms must be positive, got {output_rms}")
            self.norm = nn.RMSNorm(out_dim, eps=1e-6)
            with torch.no_grad():
                self.norm.weight.fill_(output_rms)

    @torch.no_grad()
    def fit_input_statistics(self, features: torch.Tensor, eps: float = 1e-3) -> None:
        """Set the standardisation from (..., in_dim) features: per-channel mean and std (+ ``eps``, so a
        channel that never varies passes through finite)."""
        if not self.standardize:
            raise ValueError("this projector was built with standardize=False")
        flat = features.detach().reshape(-1, features.shape[-1]).float()
        if flat.shape[-1] != self.input_mean.numel() or flat.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors of width {self.input_mean.numel()}, got {tuple(features.shape)}")
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0) + eps)

    def forward(self, features: torch.Tensor, add_positions: bool = True) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        """``add_positions=False``: the content only, without the position table (stage 1's cell alignment)."""
        if self.standardize:
            features = (features - self.input_mean.to(features.dtype)) / self.input_std.to(features.dtype)
        if self.grid is not None:
            if features.shape[-2] != self.grid_codes.shape[0]:
                raise ValueError(f"the projector's grid is {self.grid}x{self.grid} = {self.grid_codes.shape[0]} tokens "
                                 f"but the input has {features.shape[-2]}")
            codes = self.grid_codes.to(features.dtype).expand(*features.shape[:-1], -1)
            features = torch.cat([features, codes], dim=-1)
        hidden = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            hidden = self.linear_2(self.act(hidden))
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.positions is not None and add_positions:
            if hidden.shape[-2] != self.positions.shape[0]:
                raise ValueError(f"the projector's position table has {self.positions.shape[0]} rows but the input has {hidden.shape[-2]} tokens")
            hidden = hidden + self.positions.to(hidden.dtype)
        return hidden
