"""Ranking prompts: how a request becomes text (:class:`RankingTemplate`) and token ids
(:class:`RankingPromptBuilder` -> :class:`RankingPrompt`), for the teacher (items as text) and the
student (items as ``<item>`` placeholders). See :mod:`mixllm.ranking` for the layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixllm.errors import DataError


@dataclass
class RankingTemplate:
    """How a request becomes text. The teacher and the student share it; only items differ.

    With the defaults and MovieLens items (~16 SmolLM2 tokens each) the prefix is ~10 tokens plus
    the history, and a candidate segment is the item alone: 1 token for the student, ~17 for the
    teacher.
    """

    prefix: str = "A user's history, oldest first:{history}\nNext item:"
    """The shared prefix; ``{history}`` (exactly once) becomes the rendered history items."""
    segment: str = "{item}"
    """One candidate segment; ``{item}`` (exactly once) becomes the rendered candidate. Add a
    question here (e.g. ``"{item}\\nWould the user like it? Answer:"``) for answer-token scoring;
    every extra token is paid once per candidate."""
    text_item: str = "\n{text}"
    """How the teacher writes one item (history or candidate); ``{text}`` is the item text. The
    student writes the bare placeholder instead."""
    user: str = "User profile:{user}\n"
    """The user's summary (User-LLM), written just before the history items, i.e. after the prefix
    text that precedes ``{history}``; ``{user}`` (exactly once) becomes the ``<user>`` placeholder,
    which the processor expands to ``UserConfig.num_tokens`` (m) tokens. Written only for a student
    whose model has the user modality and a request with history: every other prompt is
    byte-identical to one from a template without this field (checkpoints saved before it load
    with this default)."""

    def __post_init__(self) -> None:
        slots = (("prefix", "{history}"), ("segment", "{item}"), ("text_item", "{text}"), ("user", "{user}"))
        for name, slot in slots:
            if getattr(self, name).count(slot) != 1:
                raise ValueError(f"RankingTemplate.{name} must contain {slot} exactly once, got {getattr(self, name)!r}")

    def render(
        self, history: Sequence[str], candidates: Sequence[str], user: str | None = None
    ) -> tuple[str, list[str]]:
        """Rendered items (text or placeholders) -> (prefix text, one text per candidate); ``user``:
        the user placeholder, written with :attr:`user` before the history (None: no user part)."""
        user_part = "" if user is None else self.user.replace("{user}", user)
        prefix = self.prefix.replace("{history}", user_part + "".join(history))
        return prefix, [self.segment.replace("{item}", c) for c in candidates]


@dataclass
class RankingPrompt:
    """One request, tokenized: what a forward needs, before batching."""

    prefix_ids: list[int]
    """Prefix token ids, placeholders already expanded (P ids)."""
    segment_ids: list[list[int]]
    """One list of token ids per candidate, placeholders expanded."""
    item_features: torch.Tensor | None = None
    """(H + C, F) one row per item placeholder in order: history items, then candidates (student)."""
    item_ids: torch.Tensor | None = None
    """(H + C,) item ids for the id embedding, same order (student)."""
    user_history: torch.Tensor | None = None
    """(L, F_user) the item vectors the user encoder reads, oldest first, for the prefix's one
    ``<user>`` placeholder (a student with the user modality and a non-empty history), else None."""
    retriever_scores: torch.Tensor | None = None
    """(C,) float32 the request's retriever scores, one per candidate (score fusion), else None."""

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def segment_lens(self) -> list[int]:
        return [len(s) for s in self.segment_ids]

    @property
    def num_tokens(self) -> int:
        """What the request costs: prefix + sum of candidate segments."""
        return self.prefix_len + sum(self.segment_lens)

    @property
    def input_ids(self) -> list[int]:
        """The request's sequence: prefix then every segment."""
        return [t for part in (self.prefix_ids, *self.segment_ids) for t in part]


class RankingPromptBuilder:
    """Renders requests with a :class:`RankingTemplate` and tokenizes them with the processor.

    The processor does the tokenizing, the ``<item>`` expansion (each placeholder -> its
    ``tokens_per_item`` copies) and the placeholder/feature count checks, with the prefix and each
    segment as separate rows, so items are gathered in placeholder order (history, then candidates).
    """

    def __init__(self, processor, template: RankingTemplate | None = None):
        self.processor = processor
        self.template = template or RankingTemplate()

    def teacher(self, history_texts: Sequence[str], candidate_texts: Sequence[str]) -> RankingPrompt:
        """Items as text."""
        if not candidate_texts:
            raise DataError("candidates: the candidate list is empty")
        render = self.template.text_item.replace
        prefix, segments = self.template.render(
            [render("{text}", t) for t in history_texts], [render("{text}", t) for t in candidate_texts]
        )
        return self._tokenize(prefix, segments)

    def student(
        self,
        history_features: torch.Tensor | None = None,
        candidate_features: torch.Tensor | None = None,
        history_ids: Sequence[int] | torch.Tensor | None = None,
        candidate_ids: Sequence[int] | torch.Tensor | None = None,
        history_text: str | None = None,
        user_history: torch.Tensor | None = None,
    ) -> RankingPrompt:
        """Items as placeholders; give features (rows) and/or ids per item, as the item encoder needs.

        ``history_text`` instead of history items: the user's context as text, written where the
        history goes the way the teacher writes an item (``template.text_item``); e.g. the
        ``query`` of a rerank request.

        ``user_history`` (L, F_user): the item vectors the user encoder reads, oldest first; the
        prefix then carries one ``<user>`` placeholder (``template.user``) before the history.
        None or empty: no user part.

        Raises:
            DataError: no candidates, features and ids disagree on how many items there are, or
                ``user_history`` is given to a model without the user modality.
        """
        n_history = _count_items("history", history_features, history_ids)
        n_candidates = _count_items("candidates", candidate_features, candidate_ids)
        if n_candidates == 0:
            raise DataError("candidates: the candidate list is empty")
        if history_text is not None and n_history:
            raise DataError("history: give history items or history_text, not both")
        users = None if user_history is None or len(user_history) == 0 else [user_history]
        if users is not None and "user" not in self.processor.token_ids:
            raise DataError("user_history: this model has no user modality (MixLLMConfig.user)")
        token = self.processor.token("item")
        history = [token] * n_history if history_text is None else [self.template.text_item.replace("{text}", history_text)]
        user = None if users is None else self.processor.token("user")
        prefix, segments = self.template.render(history, [token] * n_candidates, user)
        features = _concat_rows("features", history_features, candidate_features, n_history, n_candidates)
        ids = _concat_rows("ids", history_ids, candidate_ids, n_history, n_candidates)
        return self._tokenize(prefix, segments, features, ids, users)

    def _tokenize(self, prefix: str, segments: list[str], item_features=None, item_ids=None, user_history=None) -> RankingPrompt:
        batch = self.processor([prefix, *segments], item_features=item_features, item_ids=item_ids,
                               user_history=user_history, padding_side="right")  # fmt: skip
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        empty = [i for i, row in enumerate(rows[1:]) if not row]
        if empty:
            raise DataError(f"candidates: segment(s) {empty} tokenize to nothing; check RankingTemplate.segment")
        user = batch["user_history"][0] if "user_history" in batch else None  # (L, F_user): one user, no padding
        return RankingPrompt(rows[0], rows[1:], batch.get("item_features"), batch.get("item_ids"), user)


def _count_items(side: str, features, ids) -> int:
    if features is None and ids is None:
        if side == "history":
            return 0
        raise DataError("candidates: give candidate features and/or ids")
    n_feat = None if features is None else int(torch.as_tensor(features).shape[0])
    n_ids = None if ids is None else len(ids)
    if n_feat is not None and n_ids is not None and n_feat != n_ids:
        raise DataError(f"{side}: {n_feat} feature row(s) but {n_ids} id(s); give one of each per item")
    return n_feat if n_feat is not None else n_ids


def _concat_rows(what: str, history, candidates, n_history: int, n_candidates: int) -> torch.Tensor | None:
    if candidates is None and history is None:
        return None
    if candidates is None or (history is None and n_history > 0):
        raise DataError(f"item {what} given for only one of history and candidates; give them for both or neither")
    dtype = torch.long if what == "ids" else torch.float32
    parts = [torch.as_tensor(history, dtype=dtype)] if history is not None and n_history > 0 else []
    return torch.cat([*parts, torch.as_tensor(candidates, dtype=dtype)])
