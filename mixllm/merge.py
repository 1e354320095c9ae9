"""The one merge step of the data path: modality features into the token embeddings.

For every modality the processor has already expanded each placeholder to as many copies of the
modality's token id as its encoder yields feature vectors, so merging is a pure scatter:

    mask = input_ids == token_id                      # (B, T)
    inputs_embeds[mask] = features.reshape(-1, D)     # row-major: batch, then position

PyTorch's ``masked_scatter`` silently ignores surplus source elements and reads garbage-free but
wrong rows when there are too few, so the counts are checked first and a mismatch names the
modality and both counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def placeholder_mask(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Boolean mask of the positions holding ``token_id``. (B, T) -> (B, T)."""
    return input_ids == token_id


def merge_modality_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    features: Mapping[str, torch.Tensor | None],
    token_ids: Mapping[str, int],
) -> torch.Tensor:
    """Scatter each modality's features into ``inputs_embeds`` at its placeholder positions.

    Args:
        inputs_embeds: (B, T, D) text embeddings; not modified in place.
        input_ids: (B, T) token ids; placeholder positions hold the modality's token id.
        features: modality name -> (N, k, D) or (M, D) features, in the order their placeholders
            appear in ``input_ids`` read row by row; ``None`` or a missing key means "no inputs
            of that modality in this batch".
        token_ids: modality name -> placeholder token id, for every modality the model knows.

    Returns:
        (B, T, D) embeddings with every placeholder replaced by its feature vector.

    Raises:
        ValueError: the number of placeholders and feature vectors differ for a modality (the
            message names the modality and both counts), a feature width differs from D, or
            features are given for a modality the model has no token for.
    """
    hidden = inputs_embeds.shape[-1]
    unknown = [name for name, f in features.items() if f is not None and name not in token_ids]
    if unknown:
        raise ValueError(f"features given for unknown modalities {unknown}; known: {sorted(token_ids)}")
    for name, token_id in token_ids.items():
        mask = placeholder_mask(input_ids, token_id)  # (B, T)
        n_tokens = int(mask.sum())
        feats = features.get(name)
        n_feats = 0 if feats is None else feats.numel() // max(feats.shape[-1], 1)
        if feats is not None and feats.shape[-1] != hidden:
            raise ValueError(
                f"{name} features have width {feats.shape[-1]} but the language model's hidden size is {hidden}"
            )
        if n_tokens != n_feats:
            raise ValueError(
                f"{name}: {n_tokens} placeholder tokens (id {token_id}) in input_ids but {n_feats} "
                f"feature vectors were given; the processor must expand each placeholder to the "
                f"number of tokens its encoder yields"
            )
        if n_tokens == 0:
            continue
        feats = feats.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), feats)  # (B, T, D)
    return inputs_embeds
