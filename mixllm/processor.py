"""The processor: the only place that knows prompts.

It renders a prompt, tokenizes it with real added special tokens (``<image>``, ``<item>``,
``<user>``), expands each placeholder to the number of feature tokens its encoder yields, pads the
batch, and returns ``input_ids``, ``attention_mask`` and one tensor per modality, ordered as the
placeholders appear (row by row, left to right). After it, sequence length never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixllm.conversation import chat_messages, render_messages
from mixllm.errors import DataError


def register_placeholder_tokens(tokenizer, tokens: dict[str, str]) -> dict[str, int]:
    """Add each modality's placeholder as a special token (once) and return modality -> token id.

    Adding the same tokens in the same order to the same tokenizer always gives the same ids, so a
    checkpoint's recorded ids can be checked against a freshly loaded tokenizer.
    """
    missing = [tok for tok in tokens.values() if tok not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in tokens.items()}


def pad_user_histories(histories: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-user histories into one batch for the user encoder.

    Args:
        histories: one (L_u, F) tensor per user, most recent item last.

    Returns:
        (U, L_max, F) float32 histories (zeros past each user's length) and the (U, L_max) bool
        mask, True on real items; the encoder masks the rest, so padding never changes a user's tokens.

    Raises:
        DataError: no histories, a history is empty or not 2-D, or its item width differs from the first one's
            (the message names the user's index and both widths).
    """
    if len(histories) == 0:
        raise DataError("user_history: no histories were given")
    histories = [torch.as_tensor(h, dtype=torch.float32) for h in histories]
    for i, h in enumerate(histories):
        if h.dim() != 2 or h.shape[0] == 0:
            raise DataError(f"user_history[{i}] must be a non-empty (length, dim) tensor, got shape {tuple(h.shape)}")
    length = max(h.shape[0] for h in histories)
    dim = histories[0].shape[1]
    history = torch.zeros(len(histories), length, dim)  # (U, L_max, F)
    mask = torch.zeros(len(histories), length, dtype=torch.bool)  # (U, L_max)
    for i, h in enumerate(histories):
        if h.shape[1] != dim:
            raise DataError(f"user_history[{i}] has item width {h.shape[1]}, expected {dim}")
        history[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = True
    return history, mask


class MixLLMProcessor:
    """Text + per-modality inputs -> model inputs.

    Args:
        tokenizer: a transformers tokenizer with the placeholder tokens registered.
        token_ids: modality -> placeholder token id.
        num_tokens: modality -> feature tokens one input of that modality becomes (image: e.g. 49
            for a 7x7 grid; item: k; user: m).
        image_processor: callable PIL image(s) -> (N, 3, H, W) tensor, for the image modality.
        padding_side: "left" (generation) or "right".
    """

    def __init__(
        self,
        tokenizer,
        token_ids: dict[str, int],
        num_tokens: dict[str, int],
        image_processor=None,
        padding_side: str = "left",
    ):
        if set(token_ids) != set(num_tokens):
            raise ValueError(f"token_ids {sorted(token_ids)} and num_tokens {sorted(num_tokens)} name different modalities")
        self.tokenizer = tokenizer
        self.token_ids = dict(token_ids)
        self.num_tokens = dict(num_tokens)
        self.image_processor = image_processor
        self.padding_side = padding_side
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else pad
        self._ids_cache: dict[tuple, tuple[int, ...]] = {}

    _IDS_CACHE_SIZE = 8192
    """Texts whose token ids are remembered (ranking prompts repeat the same few segments)."""

    def text_ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The tokenizer's ids of ``text``, remembered per text (the vocabulary size is part of the key,
        so tokens added later are seen)."""
        key = (text, add_special_tokens, len(self.tokenizer))
        ids = self._ids_cache.get(key)
        if ids is None:
            if len(self._ids_cache) >= self._IDS_CACHE_SIZE:
                self._ids_cache.clear()
            ids = self._ids_cache[key] = tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return list(ids)

    # --- prompts ---------------------------------------------------------------------------
    def token(self, modality: str) -> str:
        """The placeholder string of a modality, to put in prompts."""
        return self.tokenizer.convert_ids_to_tokens(self.token_ids[modality])

    def chat_prompt(self, user_message: str, system: str | None = None, add_generation_prompt: bool = True) -> str:
        """One user turn rendered as :mod:`mixllm.conversation` renders every prompt (the tokenizer's chat
        template; ``role: content`` lines without one). ``system=None`` leaves the template's default."""
        return render_messages(self.tokenizer, chat_messages([(user_message, None)], system), add_generation_prompt)

    # --- batching --------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        item_features: torch.Tensor | None = None,
        item_ids: torch.Tensor | Sequence[int] | None = None,
        user_history: Sequence[torch.Tensor] | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = False,
        vision_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Build a batch.

        Args:
            text: one prompt or a batch; placeholders appear as the modality tokens.
            images: PIL images (one per ``<image>``, in order) or a (N, 3, H, W) tensor.
            item_features: (N_items, F) one row per ``<item>`` placeholder, in order.
            item_ids: (N_items,) one id per ``<item>`` placeholder, in order.
            user_history: one (L_u, F) tensor per ``<user>`` placeholder, most recent item last.
            padding_side: overrides the processor's default.
            vision_features: instead of images, (N, tower_tokens, D) vision-tower features computed earlier
                (one per ``<image>``); passed through as ``vision_features``.
            add_special_tokens: let the tokenizer add BOS/EOS (False for chat-template prompts,
                which already hold them).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise DataError("text: the batch is empty")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        rows = [self.text_ids(t, add_special_tokens) for t in texts]
        counts = {name: sum(row.count(tid) for row in rows) for name, tid in self.token_ids.items()}
        batch: dict[str, torch.Tensor] = {}
        if vision_features is not None:
            if images is not None:
                raise DataError("images and vision_features: give one or the other")
            self._check_count("image", vision_features.shape[0], counts.get("image", 0))
            batch["vision_features"] = vision_features
        else:
            batch.update(self._image_inputs(images, counts.get("image", 0)))
        batch.update(self._item_inputs(item_features, item_ids, counts.get("item", 0)))
        batch.update(self._user_inputs(user_history, counts.get("user", 0)))

        expanded = [self.expand(row) for row in rows]
        length = max(len(r) for r in expanded)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(expanded):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        batch["input_ids"] = input_ids  # (B, T)
        batch["attention_mask"] = attention_mask  # (B, T)
        return batch

    def expand(self, row: list[int]) -> list[int]:
        """Token ids with each placeholder repeated to its modality's number of feature tokens."""
        out: list[int] = []
        repeat = {self.token_ids[name]: self.num_tokens[name] for name in self.token_ids}
        for tid in row:
            out.extend([tid] * repeat.get(tid, 1))
        return out

    def _check_count(self, name: str, given: int, placeholders: int) -> None:
        if given != placeholders:
            raise DataError(
                f"{name}: the text has {placeholders} {self.token(name) if name in self.token_ids else name} "
                f"placeholder(s) but {given} input(s) were given"
            )

    def _image_inputs(self, images, placeholders: int) -> dict[str, torch.Tensor]:
        if images is None:
            self._check_count("image", 0, placeholders)
            return {}
        if "image" not in self.token_ids:
            raise DataError("images: this model has no image modality")
        if isinstance(images, torch.Tensor):
            pixel_values = images if images.dim() == 4 else images.unsqueeze(0)
        else:
            if self.image_processor is None:
                raise ValueError("images given as PIL images but the processor has no image_processor")
            pixel_values = self.image_processor(images)
        self._check_count("image", pixel_values.shape[0], placeholders)
        return {"pixel_values": pixel_values}

    def _item_inputs(self, item_features, item_ids, placeholders: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if item_features is None and item_ids is None:
            self._check_count("item", 0, placeholders)
            return out
        if "item" not in self.token_ids:
            raise DataError("items: this model has no item modality")
        if item_features is not None:
            feats = torch.as_tensor(item_features, dtype=torch.float32)
            if feats.dim() != 2:
                raise DataError(f"item_features must be (num_items, dim), got shape {tuple(feats.shape)}")
            self._check_count("item", feats.shape[0], placeholders)
            out["item_features"] = feats
        if item_ids is not None:
            ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1)
            self._check_count("item", ids.shape[0], placeholders)
            out["item_ids"] = ids
        return out

    def _user_inputs(self, user_history, placeholders: int) -> dict[str, torch.Tensor]:
        if user_history is None:
            self._check_count("user", 0, placeholders)
            return {}
        if "user" not in self.token_ids:
            raise DataError("user_history: this model has no user modality")
        self._check_count("user", len(user_history), placeholders)
        history, mask = pad_user_histories(user_history)
        return {"user_history": history, "user_history_mask": mask}

    def batch_decode(self, sequences: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
