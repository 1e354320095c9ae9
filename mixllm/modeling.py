"""MixLLMForCausalLM: any transformers causal LM, unmodified, plus per-modality encoders and
projectors whose outputs replace placeholder-token embeddings (LLaVA's fusion, generalized).

    input_ids ──embed──► inputs_embeds ─┐
    pixel_values ─► image encoder ─► projector ─┤ merge (masked_scatter per modality)
    item vectors ─► item encoder ──► projector ─┤ ──► language_model(inputs_embeds=...) ──► logits
    user history ─► user encoder ──► projector ─┘
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixllm.config import MixLLMConfig
from mixllm.encoders.image import ImageEncoder
from mixllm.encoders.item import ItemEncoder
from mixllm.encoders.user import UserEncoder
from mixllm.lora import apply_lora, is_lora_key
from mixllm.merge import merge_modality_features
from mixllm.projector import Projector
from mixllm.provenance import git_revision

logger = logging.getLogger(__name__)

CONFIG_NAME = "mixllm_config.json"
WEIGHTS_NAME = "mixllm_weights.safetensors"


MODALITY_INPUTS = (
    "pixel_values", "vision_features", "item_features", "item_ids", "item_embeds", "user_history", "user_history_mask",
)
"""The keyword arguments of :meth:`MixLLMForCausalLM.embed_inputs`, which ``forward`` and ``generate`` pass on."""


def _pop_modality_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: kwargs.pop(name) for name in MODALITY_INPUTS if name in kwargs}


def positions_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids that count real tokens only, so left padding does not shift them; None without a 2-D mask."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def word_embedding_rms(language_model: nn.Module) -> float:
    """Root-mean-square of the language model's input embeddings, averaged over the vocabulary: the scale
    of a word as the first layer sees it."""
    weight = language_model.get_input_embeddings().weight.detach().float()
    return float(weight.pow(2).mean(-1).sqrt().mean())


class MixLLMForCausalLM(nn.Module):
    def __init__(self, config: MixLLMConfig, language_model: nn.Module, image_tower: nn.Module | None = None):
        super().__init__()
        missing = [m for m in config.modalities if m not in config.token_ids]
        if missing:
            raise ValueError(f"config.token_ids has no placeholder id for {missing}; register the tokens first")
        self.config = config
        self.language_model = language_model
        hidden = language_model.config.get_text_config().hidden_size
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        if config.image is not None:
            self.encoders["image"] = ImageEncoder(config.image, tower=image_tower)
            grid = self.encoders["image"].token_grid
            if config.image.position_input and grid is None:
                raise ValueError("image.position_input needs a square grid of image tokens, but an image gives "
                                 f"{self.encoders['image'].num_tokens}")
            self.projectors["image"] = Projector(
                self.encoders["image"].output_dim, hidden, config.image.projector, config.image.projector_bias,
                output_rms=word_embedding_rms(language_model) if config.image.projector_norm else None,
                standardize=config.image.standardize_features,
                positions=self.encoders["image"].num_tokens if config.image.position_embedding else None,
                grid=grid if config.image.position_input else None,
            )
        if config.item is not None:
            self.encoders["item"] = ItemEncoder(config.item)
            self.projectors["item"] = Projector(self.encoders["item"].output_dim, hidden, config.item.projector)
        if config.user is not None:
            self.encoders["user"] = UserEncoder(config.user)
            self.projectors["user"] = Projector(self.encoders["user"].output_dim, hidden, config.user.projector)
        if config.freeze_language_model:
            self.language_model.requires_grad_(False)
        if config.lora is not None:
            apply_lora(self.language_model, config.lora)
        # Fresh modules in the language model's dtype, so a bf16 LLM gets bf16 projectors.
        lm_dtype = next(language_model.parameters()).dtype
        self.encoders.to(lm_dtype)
        self.projectors.to(lm_dtype)

    # --- per-modality features -----------------------------------------------------------------
    @property
    def num_tokens(self) -> dict[str, int]:
        """Feature tokens one input of each modality becomes (what the processor expands to)."""
        out = {}
        if "image" in self.encoders:
            out["image"] = self.encoders["image"].num_tokens
        if "item" in self.encoders:
            out["item"] = self.config.item.tokens_per_item
        if "user" in self.encoders:
            out["user"] = self.config.user.num_tokens
        return out

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
        add_positions: bool = True,
    ) -> torch.Tensor:
        """(N, 3, H, W) pixels, or (N, tower_tokens, D) tower features computed earlier (a training cache)
        -> (N, num_image_tokens, hidden). ``add_positions=False`` leaves out the projector's position table
        (``image.position_embedding``): the tokens' content only."""
        encoder, projector = self.encoders["image"], self.projectors["image"]
        if vision_features is None:
            vision_features = encoder.tower_features(pixel_values)
        return projector(encoder.pool(vision_features.to(projector.linear_1.weight.dtype)), add_positions=add_positions)

    def get_item_features(
        self, item_features: torch.Tensor | None = None, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, F) vectors and/or (N,) ids -> (N, k, hidden)."""
        return self.projectors["item"](self.encoders["item"](item_features, item_ids))

    def get_user_features(self, user_history: torch.Tensor, user_history_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(U, L, F) histories -> (U, m, hidden)."""
        return self.projectors["user"](self.encoders["user"](user_history, user_history_mask))

    def _require(self, modality: str) -> None:
        if modality not in self.encoders:
            raise ValueError(f"{modality} inputs were given but this model has no {modality} modality")

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        item_features: torch.Tensor | None = None,
        item_ids: torch.Tensor | None = None,
        user_history: torch.Tensor | None = None,
        user_history_mask: torch.Tensor | None = None,
        item_embeds: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its modality's projected features.

        ``item_embeds`` (N, k, D): item tokens already projected (``mixllm.item_cache``); when given,
        the item encoder and projector do not run and ``item_features``/``item_ids`` are ignored.
        ``vision_features`` (N, tower_tokens, D): the frozen vision tower's output computed earlier;
        when given, the tower does not run and ``pixel_values`` is ignored."""
        features: dict[str, torch.Tensor | None] = {}
        if pixel_values is not None or vision_features is not None:
            self._require("image")
            features["image"] = self.get_image_features(pixel_values, vision_features)
        if item_embeds is not None:
            self._require("item")
            features["item"] = item_embeds
        elif item_features is not None or item_ids is not None:
            self._require("item")
            features["item"] = self.get_item_features(item_features, item_ids)
        if user_history is not None:
            self._require("user")
            features["user"] = self.get_user_features(user_history, user_history_mask)
        embedding = self.language_model.get_input_embeddings()
        placeholders = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.config.token_ids.values():
            placeholders |= input_ids == token_id
        # Placeholder ids may lie outside the LLM's vocabulary (the LLM is not resized); their
        # rows are overwritten by the merge, so look up id 0 there.
        inputs_embeds = embedding(input_ids.masked_fill(placeholders, 0))  # (B, T, D)
        return merge_modality_features(inputs_embeds, input_ids, features, self.config.token_ids)

    # --- forward and generation --------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The language model's output (logits, loss when ``labels`` is given, hidden states...).

        Keyword arguments named in :data:`MODALITY_INPUTS` are the modalities' inputs (see
        :meth:`embed_inputs`); the others go to the language model."""
        inputs_embeds = self.embed_inputs(input_ids, **_pop_modality_inputs(kwargs))
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` on the merged embeddings (greedy, sampling, beam search...); modality
        inputs as in :meth:`forward`, the other keyword arguments are ``generate``'s.

        Returns only the new tokens, (B * num_return_sequences, new_len).
        """
        inputs_embeds = self.embed_inputs(input_ids, **_pop_modality_inputs(kwargs))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # --- checkpoints -------------------------------------------------------------------------
    def _is_referenced(self, key: str) -> bool:
        """Parameters that a checkpoint references instead of copying: the base LLM (unless it was
        trained; its LoRA adapters are always stored) and a frozen pretrained vision tower."""
        if key.startswith("language_model."):
            return self.config.freeze_language_model and not is_lora_key(key)
        image = self.config.image
        return key.startswith("encoders.image.tower.") and image is not None and image.freeze_encoder

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters a checkpoint stores. Tied tensors (a fully fine-tuned LLM's shared input and
        output embeddings) appear once, under their first name: reloading fills both, since they are
        one parameter, and safetensors refuses tensors that share memory."""
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for key, value in self.state_dict().items():
            if self._is_referenced(key):
                continue
            storage = (value.data_ptr(), tuple(value.shape))
            if value.numel() and storage in seen:
                continue
            seen.add(storage)
            out[key] = value
        return out

    def save_pretrained(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``mixllm_config.json`` (config + provenance) and the trained parts as safetensors."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME))
        meta = {"config": self.config.to_dict(), "provenance": {"git_revision": git_revision(), **(provenance or {})}}
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return path

    def load_trained_weights(self, path: str | Path) -> None:
        """Load what ``save_pretrained`` wrote; every non-referenced parameter must be present."""
        state = load_file(str(Path(path) / WEIGHTS_NAME))
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.load_state_dict(state, strict=False)
