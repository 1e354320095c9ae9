"""Image encoder: a vision tower plus LLaVA-1.5 feature selection -> (N, tokens, dim)."""

from __future__ import annotations

from pathlib import Path

import math

import torch
import torch.nn.functional as F
from torch import nn

from mixllm.config import ImageConfig


class ImageEncoder(nn.Module):
    """EfficientNet-Lite0 (its 7x7 grid flattened to 49 tokens: the 1280-channel head, or any blocks' outputs
    pooled to that grid) or any transformers vision model (hidden states of ``vision_feature_layer``, CLS dropped under the "default" strategy)."""

    def __init__(self, config: ImageConfig, tower: nn.Module | None = None):
        super().__init__()
        self.config = config
        if config.encoder == "efficientnet-lite0":
            from mixllm.encoders.efficientnet_lite import efficientnet_lite0

            self.tower = tower if tower is not None else efficientnet_lite0(weights=config.path or "default")
            layers = config.feature_layers()
            self.stages = [layers] if isinstance(layers, int) else list(layers)
            self.output_dim = sum(self.tower.stage_channels(i) for i in self.stages)
            self.grid = config.image_size // 32
            self.num_tokens = self.grid * self.grid
            self.strategy = "full"
        else:
            self.tower = tower if tower is not None else load_hf_vision_tower(config.path)
            vcfg = self.tower.config
            layers = config.feature_layers()
            n_layers = 1 if isinstance(layers, int) else len(layers)
            self.output_dim = vcfg.hidden_size * n_layers
            has_cls = not vcfg.model_type.startswith("siglip")
            self.strategy = config.vision_feature_select_strategy or ("default" if has_cls else "full")
            patches = (vcfg.image_size // vcfg.patch_size) ** 2
            self.num_tokens = patches + (1 if has_cls and self.strategy == "full" else 0)
        self.tower_tokens = self.num_tokens
        if config.pooled_grid is not None:
            side = math.isqrt(self.tower_tokens)
            if side * side != self.tower_tokens:
                raise ValueError(f"image.pooled_grid needs a square grid of tokens, the tower gives {self.tower_tokens}")
            if config.pooled_grid > side:
                raise ValueError(f"image.pooled_grid {config.pooled_grid} is larger than the tower's {side}x{side} grid")
            self.num_tokens = config.pooled_grid**2
        side = math.isqrt(self.num_tokens)
        self.token_grid = side if side * side == self.num_tokens else None
        """The side of the square grid the image tokens form (raster order); None when they form none."""
        if config.freeze_encoder:
            self.tower.requires_grad_(False)
            self.tower.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.config.freeze_encoder:
            self.tower.eval()  # frozen towers keep BatchNorm/dropout in inference mode
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, 3, H, W) -> (N, num_tokens, output_dim)."""
        return self.pool(self.tower_features(pixel_values))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(N, tower_tokens, D) tower features -> (N, num_tokens, D): the ``pooled_grid`` average pooling
        (identity without it). Training on cached tower features calls this, then the projector."""
        grid = self.config.pooled_grid
        if grid is None:
            return features
        n, tokens, dim = features.shape
        side = math.isqrt(tokens)
        square = features.transpose(1, 2).reshape(n, dim, side, side)  # row-major grid, as flattened
        return F.adaptive_avg_pool2d(square, grid).flatten(2).transpose(1, 2)  # (N, grid*grid, D)

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, 3, H, W) -> (N, tower_tokens, output_dim), before any pooling."""
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            if self.config.encoder == "efficientnet-lite0":
                stages = self.tower.stage_features(pixel_values, self.stages)  # (N, C_i, H_i, W_i) each
                grid = self.grid
                stages = [s if s.shape[-1] == grid else F.adaptive_avg_pool2d(s, grid) for s in stages]
                return torch.cat(stages, dim=1).flatten(2).transpose(1, 2)  # (N, grid*grid, sum C_i)
            out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
            layers = self.config.feature_layers()
            if isinstance(layers, int):
                selected = out.hidden_states[layers]  # (N, 1 + P, D)
                if self.strategy == "default":
                    selected = selected[:, 1:]
            else:
                pool = [out.hidden_states[i] for i in layers]
                if self.strategy == "default":
                    pool = [h[:, 1:] for h in pool]
                selected = torch.cat(pool, dim=-1)  # (N, P, D * len(layers))
            return selected


def load_hf_vision_tower(path: str | Path | None) -> nn.Module:
    """A transformers vision model from a local directory: a vision-only model (CLIPVisionModel,
    SiglipVisionModel, ...) or a dual model (CLIPModel, SiglipModel), of which the vision half."""
    from transformers import AutoConfig, AutoModel

    if path is None or not Path(path).is_dir():
        raise ValueError(f"image.path must be a local directory of a transformers vision model, got {path!r}")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config") and config.model_type not in ("llava",):
        # A dual-encoder directory: load only the vision half, as its own model class.
        from transformers import CLIPVisionModel, SiglipVisionModel

        cls = SiglipVisionModel if config.model_type.startswith("siglip") else CLIPVisionModel
        return cls.from_pretrained(path)
    return AutoModel.from_pretrained(path)
