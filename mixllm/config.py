"""Configuration of a mixllm model: which language model, and per modality an encoder, a projector
and a placeholder token. Every field is JSON-serialisable so a checkpoint's ``config.json`` is the
config itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mixllm.lora import LoRAConfig
from mixllm.projector import PROJECTOR_TYPES

MODALITIES = ("image", "item", "user")


@dataclass
class ImageConfig:
    """The image modality: a vision tower, LLaVA-1.5 feature selection, a projector."""

    encoder: str = "efficientnet-lite0"
    """"efficientnet-lite0" (pure torch, packaged weights) or "hf" (a transformers vision model)."""
    path: str | None = None
    """Weights: for efficientnet-lite0 a .pth file (None = the packaged asset); for "hf" a local
    directory of a CLIP/SigLIP (or any vision) model, or a llava-hf checkpoint directory."""
    vision_feature_layer: int | list[int] | None = None
    """Layer(s) the features come from; a list concatenates them along the feature axis. "hf": hidden-state
    indices (None = -2, LLaVA-1.5's penultimate layer). efficientnet-lite0: feature stages, 0-15 the MBConv
    blocks and 16 (or -1) the 1280-channel head (None = the head); stages finer than the head's grid are
    average-pooled to it (block 7, 80 channels at 14x14, keeps the colours the head loses)."""
    vision_feature_select_strategy: str | None = None
    """"default" drops the CLS token, "full" keeps every token; None = "full" for towers without
    a CLS token (SigLIP), else "default"."""
    image_size: int = 224
    """Input resolution fed to the tower (efficientnet-lite0: 224 gives a 7x7 grid)."""
    pooled_grid: int | None = None
    """Average-pool the tower's square grid of tokens to ``pooled_grid x pooled_grid`` before the projector
    (e.g. 4: 49 -> 16 image tokens); None keeps every token."""
    freeze_encoder: bool = True
    """Keep the vision tower's weights fixed (LLaVA stage 1)."""
    projector: str = "mlp2x_gelu"
    """Projector type: "linear" or "mlp2x_gelu"."""
    projector_bias: bool = True
    """Bias terms in the projector's linear layers."""
    projector_norm: bool = False
    """End the projector with an RMS norm whose gain starts at the language model's word-embedding RMS, so
    image tokens enter at the scale of words (a trained MLP's reach ~100x a word's norm). In the binding probe
    (``python -m training.qa_binding_probe``) word-like oracle tokens were learned at a word's norm and not
    at the MLP's; a normed projector alone did not raise held-out accuracy (README). False keeps LLaVA's
    projector (and llava-hf weights) as they are."""
    standardize_features: bool = False
    """Standardise each feature channel (fixed mean and std, fitted on stage 1's training features and stored
    in the checkpoint) before the projector. Blocks 7 and 14 of EfficientNet-Lite0 differ in scale so much
    that an MLP on the raw concatenation did not learn the colour (README, "Standardised features"). False
    keeps LLaVA's projector (and llava-hf weights) as they are."""
    position_embedding: bool = False
    """A learned vector per image token (grid cell), added after the projector, so the LLM can tell where a
    token sits without counting positions (position questions). Stage-1 training starts it at words naming
    the cell's side (:func:`training.cell_alignment.position_words`). False keeps llava-hf weights loadable."""
    position_input: bool = False
    """Give the projector each image token's grid row and column (one-hot, beside its features), so the MLP
    can write where a shape sits into that shape's token and leave empty cells empty (left/right questions:
    raster order alone marks the row, not the column). Stage 1's cell alignment then also targets the side
    words (:func:`training.cell_alignment.side_words`). Needs a square token grid. False keeps llava-hf
    weights loadable."""
    token: str = "<image>"
    """Placeholder token the processor expands to one copy per feature vector."""

    def feature_layers(self) -> int | list[int]:
        """``vision_feature_layer`` with None resolved: the head (-1) for EfficientNet, -2 for "hf" towers."""
        if self.vision_feature_layer is not None:
            return self.vision_feature_layer
        return -1 if self.encoder == "efficientnet-lite0" else -2


@dataclass
class ItemConfig:
    """The item modality: per-item vectors (text embedding and/or learned id) -> k tokens."""

    feature_dim: int = 384
    """Width of a precomputed per-item feature vector (MiniLM: 384; SASRec: its hidden size);
    0 = no precomputed features."""
    num_items: int = 0
    """Size of the learned id-embedding table; 0 = no id embedding."""
    id_dim: int = 64
    """Width of the learned id embedding (used when num_items > 0)."""
    tokens_per_item: int = 1
    """k: tokens each item becomes in the prompt."""
    projector: str = "mlp2x_gelu"
    """Projector type: "linear" or "mlp2x_gelu"."""
    token: str = "<item>"
    """Placeholder token, one per item before expansion."""

    def __post_init__(self) -> None:
        if self.tokens_per_item < 1:
            raise ValueError(f"item.tokens_per_item must be >= 1, got {self.tokens_per_item}")
        if self.projector not in PROJECTOR_TYPES:
            raise ValueError(f"item.projector {self.projector!r} is not one of {PROJECTOR_TYPES}")


@dataclass
class UserConfig:
    """The user modality (User-LLM): a history of item vectors -> m summary tokens."""

    item_dim: int = 384
    """Width of each history item vector (a ranker reads them from ``ItemCatalog.user_features``,
    else its ``features``)."""
    num_tokens: int = 4
    """m: summary tokens per user."""
    hidden_dim: int = 128
    """Width of the history transformer and the summary tokens."""
    num_layers: int = 1
    """Self-attention layers over the history before the summary cross-attention."""
    num_heads: int = 4
    """Attention heads in the history encoder."""
    max_history: int = 50
    """Longest history (positions) the encoder accepts. A ranker feeds it this many of a request's
    most recent items, independently of (and typically more than) its H item tokens."""
    projector: str = "mlp2x_gelu"
    """Projector type: "linear" or "mlp2x_gelu"."""
    token: str = "<user>"
    """Placeholder token, one per user before expansion."""

    def __post_init__(self) -> None:
        for name in ("num_tokens", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"user.{name} must be >= 1, got {getattr(self, name)}")
        if self.projector not in PROJECTOR_TYPES:
            raise ValueError(f"user.projector {self.projector!r} is not one of {PROJECTOR_TYPES}")


@dataclass
class MixLLMConfig:
    """A language model plus the modalities fused into it."""

    language_model: str = "smollm2-135m-instruct"
    """Base LLM: a packaged asset name or a local transformers directory. Referenced, never copied
    into a mixllm checkpoint."""
    language_model_source: str = "pretrained"
    """"pretrained" (a causal-LM directory) or "llava" (the language model inside a llava-hf
    checkpoint directory)."""
    freeze_language_model: bool = True
    """Keep the LLM's weights fixed; only encoders and projectors train."""
    image: ImageConfig | None = None
    """Image modality, or None."""
    item: ItemConfig | None = None
    """Item modality, or None."""
    user: UserConfig | None = None
    """User modality, or None."""
    lora: LoRAConfig | None = None
    """Low-rank adapters on the (frozen) language model, trained and saved with the checkpoint; None = none."""
    token_ids: dict[str, int] = field(default_factory=dict)
    """Placeholder token id per modality, filled in when the processor registers the tokens."""

    def __post_init__(self) -> None:
        for name, cls in (("image", ImageConfig), ("item", ItemConfig), ("user", UserConfig), ("lora", LoRAConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        if self.lora is not None and not self.freeze_language_model:
            raise ValueError("lora needs freeze_language_model=True: the adapters train, the base weights stay fixed")
        if self.language_model_source not in ("pretrained", "llava"):
            raise ValueError(f"language_model_source must be 'pretrained' or 'llava', got {self.language_model_source!r}")
        for name in self.modalities:
            kind = getattr(self, name).projector
            if kind not in PROJECTOR_TYPES:
                raise ValueError(f"{name}.projector {kind!r} is not one of {PROJECTOR_TYPES}")
        if self.image is not None and self.image.encoder not in ("efficientnet-lite0", "hf"):
            raise ValueError(f"image.encoder must be 'efficientnet-lite0' or 'hf', got {self.image.encoder!r}")
        if self.image is not None:
            layers = self.image.vision_feature_layer
            if isinstance(layers, list) and (not layers or not all(isinstance(i, int) for i in layers)):
                raise ValueError(f"image.vision_feature_layer must be an integer, a non-empty list of them or null, got {layers!r}")
        if self.image is not None and self.image.pooled_grid is not None and self.image.pooled_grid < 1:
            raise ValueError(f"image.pooled_grid must be >= 1 or null, got {self.image.pooled_grid}")
        if self.item is not None and self.item.feature_dim <= 0 and self.item.num_items <= 0:
            raise ValueError("item modality needs feature_dim > 0 or num_items > 0 (or both)")

    @property
    def modalities(self) -> list[str]:
        """The configured modalities, in the fixed order image, item, user."""
        return [name for name in MODALITIES if getattr(self, name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixLLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
