"""LoRA (Hu et al., 2021) for the language model, in plain torch: no extra dependency.

A targeted ``nn.Linear`` becomes a :class:`LoRALinear` — the same module with the same ``weight``
and ``bias`` (so the base checkpoint's keys are unchanged and it is still *referenced*, not copied),
plus two small trainable matrices::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), B starts at 0

so a freshly wrapped model computes exactly what the base model computes. Only ``lora_A`` and
``lora_B`` train; a mixllm checkpoint stores them (r * (in + out) numbers per wrapped layer).
:func:`merge_lora` folds them into ``weight`` for inference at the base model's speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Llama/Qwen2-style attention projections (SmolLM2's names)."""


@dataclass
class LoRAConfig:
    """Which linear layers of the language model get low-rank adapters, and their size."""

    rank: int = 8
    """r: the adapter's inner width."""
    alpha: float = 16.0
    """Scale: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names (last component of the module path, e.g. "q_proj") of the nn.Linear layers to adapt."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):  # list("q_proj") would be its characters
            raise ValueError(f"lora.target_modules must be a list of layer names, got the string {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lora.target_modules must hold non-empty layer names, got {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one linear layer, e.g. ['q_proj', 'v_proj']")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update; ``weight``/``bias`` stay where they were."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged:
            return out
        return out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace the targeted linear layers of ``model`` in place; returns their module paths.

    Freezes everything in ``model`` except the adapters. Raises ValueError naming the targets when
    none matches (a typo would otherwise train nothing)."""
    targets = set(config.target_modules)
    found = [
        (name, module) for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
    ]  # fmt: skip
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules {sorted(targets)} match no linear layer of the model (its linear layers: {linear})")
    model.requires_grad_(False)
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, config.rank, config.alpha, config.dropout))
    return [name for name, _ in found]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += scaling * B A) for inference; returns the count.

    The merged model computes the same function as before (to rounding) without the extra matmuls.
    Do not train or save a merged model: its ``weight`` is no longer the referenced base weight."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and not module.merged:
            module.weight.add_(module.delta_weight().to(module.weight.dtype))
            module.merged = True
            count += 1
    return count


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key is an adapter tensor."""
    return key.endswith((".lora_A", ".lora_B"))
