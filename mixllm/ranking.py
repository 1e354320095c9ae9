"""Ranking core: score every candidate of a request in one forward of the language model.

A request is one user's history and C candidate items. The sequence is laid out as

    prefix (instruction + history) | cand_1 | cand_2 | ... | cand_C | padding

and a 4D additive block mask lets each candidate segment attend to the prefix and to itself only
(causally inside the prefix and inside each segment). Every segment's position ids continue from
the prefix length P, so each candidate is read exactly as if it were the only one after the prefix:
a request costs ``P + sum(segment lengths)`` tokens instead of ``C * (P + segment length)``, and
the scores do not depend on the candidates' order.

Two ways to read the items, one template:

* **teacher** (``mode="teacher"``): every history item and candidate is its text
  (:attr:`RankingTemplate.text_item`, about 16 SmolLM2 tokens per MovieLens item);
* **student** (``mode="student"``): every item is the ``<item>`` placeholder, which the processor
  expands to ``tokens_per_item`` copies and the model fills with the item encoder + projector's
  output (one token per item by default). A placeholder is its own delimiter, so the student
  writes no separator around it.

Typical use::

    ranker = MixLLMRanker(model, processor, ItemCatalog(features=item_vectors), mode="student")
    scores = ranker.score([RankingRequest(history=[3, 17, 5], candidates=[8, 2, 40])])  # [(3,)]

    inputs = ranker.prepare(requests)      # batch of requests -> RankingInputs
    scores = ranker(inputs)                # (B, C_max); inputs.candidate_mask marks real ones

Requests in a batch may have different histories and candidate counts: rows are right-padded to
the longest request, padded positions are masked out (they attend only to themselves), padded
candidate slots score 0 and are False in ``candidate_mask``.

User tokens (User-LLM): when the student's model has the user modality (``MixLLMConfig.user``),
the prefix also carries the user's ``<user>`` placeholder (:attr:`RankingTemplate.user`, before the
history items), which the processor expands to m tokens filled by the user encoder + projector.
The user encoder reads a longer window than the item tokens: of a request's history, the last
``max_history`` (H) items become item tokens and the last ``UserConfig.max_history`` items are
read, as rows of :attr:`ItemCatalog.user_item_features`, by the user encoder; a request may hold
up to :attr:`MixLLMRanker.max_request_history` items. Every candidate sees the user tokens: they
are in the prefix. The teacher has none.

Score fusion (``fusion=True``): the final score is ``score + fusion_gate * retriever_score``, with
the retriever's candidate scores (e.g. SASRec's) given per request
(:attr:`RankingRequest.retriever_scores`) and ``fusion_gate`` a learned scalar that starts at 0,
so a fused ranker starts exactly as the ranker alone.

Memory note: the mask is (B, 1, T, T) in the model's dtype, and eager attention materialises
(B, heads, T, T) weights per layer; a teacher request with H=10 and C=100 MovieLens items is
T ~ 1,900 tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixllm.data.evaluation import Ranker, RankingBatch
from mixllm.data.split import DEFAULT_HISTORY_LENGTH, PAD
from mixllm.errors import DataError
from mixllm.item_cache import ItemTokenCache
from mixllm.modeling import MixLLMForCausalLM
from mixllm.processor import pad_user_histories

logger = logging.getLogger(__name__)

RANKER_CONFIG_NAME = "ranker_config.json"
RANKER_HEAD_NAME = "ranker_head.safetensors"
CATALOG_FEATURES_NAME = "catalog_features.safetensors"
MODES = ("teacher", "student")
SCORE_HEAD_RULE = (
    "the score head has no bias: listwise losses are invariant to a shift shared by all candidates, "
    "so a bias gets zero gradient; a stored bias is dropped on load (rankings and softmax scores unchanged)"
)
SCORINGS = ("head", "answer_token")


# --- prompts -------------------------------------------------------------------------------------
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


# --- block attention -----------------------------------------------------------------------------
def _segment_index(prefix_len: int, segment_lens: Sequence[int], total_len: int) -> torch.Tensor:
    """(T,) 0 on the prefix, i + 1 on candidate i's segment, -1 on padding."""
    used = prefix_len + sum(segment_lens)
    if total_len < used:
        raise ValueError(f"total_len {total_len} is shorter than prefix + segments ({used})")
    parts = [torch.zeros(prefix_len, dtype=torch.long)]
    parts += [torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(segment_lens)]
    parts.append(torch.full((total_len - used,), -1, dtype=torch.long))
    return torch.cat(parts)


def build_block_mask(
    prefix_len: int, segment_lens: Sequence[int], dtype: torch.dtype = torch.float32, total_len: int | None = None
) -> torch.Tensor:
    """The additive attention mask of one request: (1, 1, T, T), 0 where allowed, dtype's min elsewhere.

    Query token q may attend to key k iff k <= q and k lies in the prefix or in q's own segment.
    Padding (positions past ``prefix_len + sum(segment_lens)``, up to ``total_len``) attends to
    itself only, so no row is fully masked (a fully masked softmax row is NaN in some kernels).
    """
    total_len = prefix_len + sum(segment_lens) if total_len is None else total_len
    seg = _segment_index(prefix_len, segment_lens, total_len)  # (T,)
    pos = torch.arange(total_len)
    q, k = seg[:, None], seg[None, :]  # (T, 1), (1, T)
    allowed = (pos[:, None] >= pos[None, :]) & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)  # (T, T)
    allowed |= torch.eye(total_len, dtype=torch.bool)
    mask = torch.zeros(total_len, total_len, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, T, T)


def block_position_ids(prefix_len: int, segment_lens: Sequence[int], total_len: int | None = None) -> torch.Tensor:
    """(1, T) positions: 0..P-1 on the prefix, P..P+S_i-1 on every segment i, 0 on padding."""
    total_len = prefix_len + sum(segment_lens) if total_len is None else total_len
    parts = [torch.arange(prefix_len)] + [torch.arange(prefix_len, prefix_len + n) for n in segment_lens]
    used = prefix_len + sum(segment_lens)
    parts.append(torch.zeros(total_len - used, dtype=torch.long))
    return torch.cat(parts)[None]  # (1, T)


def segment_last_index(prefix_len: int, segment_lens: Sequence[int]) -> torch.Tensor:
    """(C,) index of each segment's last token, where its score is read."""
    return prefix_len + torch.as_tensor(list(segment_lens), dtype=torch.long).cumsum(0) - 1


@dataclass
class RankingInputs:
    """A padded batch of requests, ready for :meth:`MixLLMRanker.forward`."""

    input_ids: torch.Tensor
    """(B, T) token ids, right-padded with the pad id."""
    attention_mask: torch.Tensor
    """(B, 1, T, T) additive block mask in the model's dtype."""
    position_ids: torch.Tensor
    """(B, T) block position ids."""
    score_index: torch.Tensor
    """(B, C_max) index of each candidate's last token (0 on padded candidate slots)."""
    candidate_mask: torch.Tensor
    """(B, C_max) bool, True on real candidates."""
    item_features: torch.Tensor | None = None
    """(N, F) item features in placeholder order across the batch (student)."""
    item_ids: torch.Tensor | None = None
    """(N,) item ids in the same order (student)."""
    num_tokens: list[int] = field(default_factory=list)
    """Tokens each request costs (prefix + segments), before padding."""
    user_history: torch.Tensor | None = None
    """(U, L_max, F_user) the user encoder's histories, one per request that has user tokens, in
    batch order, right-padded (student with the user modality)."""
    user_history_mask: torch.Tensor | None = None
    """(U, L_max) bool, True on real history items."""
    retriever_scores: torch.Tensor | None = None
    """(B, C_max) float32 retriever scores of the candidates (0 on padded slots), for a ranker with
    score fusion (``MixLLMRanker(fusion=True)``); a ranker without fusion refuses them."""

    def to(self, device: torch.device | str) -> RankingInputs:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return RankingInputs(**moved)


def collate_prompts(prompts: Sequence[RankingPrompt], pad_token_id: int, dtype: torch.dtype = torch.float32) -> RankingInputs:
    """Right-pad requests to the longest one and stack their block masks and positions."""
    if not prompts:
        raise DataError("requests: the batch is empty")
    total = max(p.num_tokens for p in prompts)
    c_max = max(len(p.segment_ids) for p in prompts)
    batch = len(prompts)
    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    mask = torch.empty(batch, 1, total, total, dtype=dtype)
    position_ids = torch.empty(batch, total, dtype=torch.long)
    score_index = torch.zeros(batch, c_max, dtype=torch.long)
    candidate_mask = torch.zeros(batch, c_max, dtype=torch.bool)
    for b, p in enumerate(prompts):
        lens = p.segment_lens
        input_ids[b, : p.num_tokens] = torch.tensor(p.input_ids, dtype=torch.long)
        mask[b] = build_block_mask(p.prefix_len, lens, dtype, total)[0]
        position_ids[b] = block_position_ids(p.prefix_len, lens, total)[0]
        score_index[b, : len(lens)] = segment_last_index(p.prefix_len, lens)
        candidate_mask[b, : len(lens)] = True

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
        return torch.cat(parts) if parts else None

    users = [p.user_history for p in prompts if p.user_history is not None]  # placeholder order = batch order
    user_history, user_history_mask = pad_user_histories(users) if users else (None, None)
    return RankingInputs(
        input_ids, mask, position_ids, score_index, candidate_mask, cat("item_features"), cat("item_ids"),
        [p.num_tokens for p in prompts], user_history=user_history, user_history_mask=user_history_mask,
        retriever_scores=pad_retriever_scores(prompts, candidate_mask.shape[1]),
    )


def pad_retriever_scores(prompts: Sequence[RankingPrompt], c_max: int) -> torch.Tensor | None:
    """(B, C_max) float32 the prompts' ``retriever_scores``, 0 on padded candidate slots; None when
    no prompt has any.

    Raises:
        DataError: only some requests of the batch have them.
    """
    given = [p.retriever_scores is not None for p in prompts]
    if not any(given):
        return None
    if not all(given):
        raise DataError(
            f"request {given.index(False)}: no retriever_scores while other requests of the batch have them; "
            "give them for every request or none"
        )
    out = torch.zeros(len(prompts), c_max)
    for b, p in enumerate(prompts):
        out[b, : len(p.retriever_scores)] = p.retriever_scores
    return out


def _request_retriever_scores(request: RankingRequest, index: int) -> torch.Tensor | None:
    """(C,) float32 ``request.retriever_scores`` checked: one per candidate, all finite (``gate * inf``
    would poison the score even with the gate at 0); None when the request has none."""
    if request.retriever_scores is None:
        return None
    row = torch.as_tensor(request.retriever_scores, dtype=torch.float32).reshape(-1)
    if row.shape[0] != len(request.candidates):
        raise DataError(
            f"request {index}: {row.shape[0]} retriever_scores for {len(request.candidates)} candidates; give one per candidate"
        )
    if not bool(torch.isfinite(row).all()):
        raise DataError(f"request {index}: retriever_scores hold a non-finite value: {row.tolist()}")
    return row


# --- the ranker ----------------------------------------------------------------------------------
@dataclass
class RankingRequest:
    """One user's history (oldest first) and the candidates to score, as catalog item indices."""

    history: Sequence[int]
    candidates: Sequence[int]
    retriever_scores: Sequence[float] | None = None
    """One score per candidate from the retriever that proposed them (e.g. SASRec's dot products),
    for a ranker with score fusion; None for every other ranker."""

    @classmethod
    def from_padded(cls, history_row, candidates, max_history: int | None = None) -> RankingRequest:
        """The request of one row of a padded history batch: ``history_row`` is ``(H,)`` item indices
        left-padded with ``PAD`` (-1), most recent last (``RankingBatch.history``,
        ``LeaveOneOutSplit.histories``); PAD entries are dropped and only the ``max_history`` most
        recent real items kept (None: all). The one way a padded history becomes a request."""
        history = [int(i) for i in history_row if int(i) != PAD]
        if max_history is not None:
            history = history[-max_history:] if max_history > 0 else []
        return cls(history=history, candidates=[int(i) for i in candidates])


@dataclass
class ItemCatalog:
    """What the ranker knows about each item; item index i is row i.

    The teacher needs ``texts``; the student needs ``features`` when its item encoder reads
    precomputed vectors (``ItemConfig.feature_dim > 0``) and passes the indices themselves to the
    id embedding when it has one (``ItemConfig.num_items > 0``). A student whose model has the
    user modality reads each history item's row of :attr:`user_item_features` too.
    """

    texts: Sequence[str] | None = None
    """Item texts (e.g. ``InteractionDataset.item_texts``)."""
    features: torch.Tensor | None = None
    """(N, F) precomputed item vectors (e.g. MiniLM embeddings of the texts)."""
    user_features: torch.Tensor | None = None
    """(N, F_user) the vectors the user encoder reads per history item (``UserConfig.item_dim``
    wide), when they differ from ``features`` (e.g. SASRec item embeddings for the user, MiniLM for
    the item tokens); None = ``features`` (see :attr:`user_item_features`)."""

    def __post_init__(self) -> None:
        if self.texts is None and self.features is None and self.user_features is None:
            raise DataError("ItemCatalog needs texts and/or features")
        for name in ("features", "user_features"):
            value = getattr(self, name)
            if value is not None:
                value = torch.as_tensor(value)
                setattr(self, name, value)
                if value.dim() != 2:
                    raise DataError(f"ItemCatalog.{name} must be (num_items, dim), got shape {tuple(value.shape)}")
        if self.texts is not None and self.features is not None and len(self.texts) != self.features.shape[0]:
            raise DataError(f"ItemCatalog has {len(self.texts)} texts but {self.features.shape[0]} feature rows")
        if self.user_features is not None and self.user_features.shape[0] != self.num_items:
            raise DataError(f"ItemCatalog has {self.num_items} items but {self.user_features.shape[0]} user_features rows")

    @property
    def num_items(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return int((self.features if self.features is not None else self.user_features).shape[0])

    @property
    def user_item_features(self) -> torch.Tensor | None:
        """(N, F_user) what the user encoder reads per item: ``user_features``, else ``features``."""
        return self.user_features if self.user_features is not None else self.features

    def check(self, ids: Sequence[int], what: str) -> list[int]:
        """``ids`` as a list of ints, or DataError naming the first id outside the catalog."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.num_items]
        if bad:
            raise DataError(f"{what}: item id {bad[0]} is not in the catalog (ids 0..{self.num_items - 1})")
        return ids


class MixLLMRanker(nn.Module):
    """Scores a request's candidates in one forward of a :class:`MixLLMForCausalLM`.

    Args:
        model: the fused model; the student needs its item modality, the teacher reads text only.
        processor: the model's :class:`~mixllm.processor.MixLLMProcessor`.
        catalog: item texts (teacher) and/or features (student).
        mode: "teacher" (items as text) or "student" (items as ``<item>`` tokens).
        template: how requests become text (shared by both modes).
        scoring: "head" (default) or "answer_token".

            * "head": a ``nn.Linear(hidden, 1, bias=False)`` on the final hidden state of each
              candidate segment's last token — the one token that has seen the prefix and its own
              candidate and nothing else. It gives an unbounded scalar per candidate, which is what
              listwise training over candidate lists (softmax / KL against the teacher's
              distribution) needs, it is trained with the item projector while the LLM stays
              frozen, and it needs no question text per candidate. It has **no bias**: every loss
              in mixllm is listwise (a softmax over one request's candidates), and softmax(s + b)
              = softmax(s), so a bias shared by all candidates has exactly zero gradient and would
              never train; scores are therefore meaningful only relative to the other candidates
              of the same request (see :data:`SCORE_HEAD_RULE`).
            * "answer_token": the LM head's logit of ``answer_token`` (e.g. "Yes") at that same
              token; zero new parameters, usable zero-shot, but reads best with a question in
              ``template.segment``, which every candidate pays for. Only the C gathered positions
              go through the LM head.
        answer_token: the text of the answer token; must tokenize to exactly one token.
        max_history: H, the most recent history items read as item tokens (the H the ranker was
            trained with); None = every history item, limited only by the model's positions. A
            student whose model has the user modality also feeds the last
            :attr:`user_max_history` items to the user encoder, so a request may hold up to
            :attr:`max_request_history` items.
        fusion: add a learned scalar :attr:`fusion_gate` (0 at init) times the candidates'
            retriever scores to the scores, so a trained ranker can lean on the retriever that
            proposed the candidates; starting at 0, it begins exactly as the ranker alone.
    """

    def __init__(
        self,
        model: MixLLMForCausalLM,
        processor,
        catalog: ItemCatalog,
        mode: str = "student",
        template: RankingTemplate | None = None,
        scoring: str = "head",
        answer_token: str = "Yes",
        max_history: int | None = None,
        fusion: bool = False,
    ):
        super().__init__()
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be >= 1 or None, got {max_history!r}")
        self.max_history = max_history
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.model = model
        self.processor = processor
        self.catalog = catalog
        self.mode = mode
        self.scoring = scoring
        self.answer_token = answer_token
        self.prompts = RankingPromptBuilder(processor, template)
        self._check_catalog()
        text_config = model.language_model.config.get_text_config()
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        dtype = next(model.language_model.parameters()).dtype
        self.score_head = nn.Linear(text_config.hidden_size, 1, bias=False).to(dtype) if scoring == "head" else None
        self.token_cache: ItemTokenCache | None = None
        """Student only: when set, requests name rows of this cache (the catalog's projected item
        tokens, :mod:`mixllm.item_cache`) and the item encoder and projector never run."""
        self.answer_token_id: int | None = None
        if scoring == "answer_token":
            ids = processor.tokenizer(answer_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"answer_token {answer_token!r} is {len(ids)} tokens; it must be exactly one")
            self.answer_token_id = ids[0]
        # A float32 scalar whatever the model's dtype: bf16 keeps ~3 digits, and small steps of a
        # slowly learned gate would round away. Fused scores are float32 for the same reason.
        self.fusion_gate: nn.Parameter | None = nn.Parameter(torch.zeros((), dtype=torch.float32)) if fusion else None
        """Fusion only: final score = ranker score + ``fusion_gate`` * retriever score."""

    @property
    def user_max_history(self) -> int:
        """How many of a request's most recent history items the user encoder reads
        (``UserConfig.max_history``); 0 when the prompt has no user tokens (a teacher, or a model
        without the user modality)."""
        user = self.model.config.user
        return user.max_history if self.mode == "student" and user is not None else 0

    @property
    def max_request_history(self) -> int | None:
        """The longest history a request may hold: H (``max_history``) item tokens or the user
        encoder's :attr:`user_max_history`, whichever is longer; None when ``max_history`` is
        None (every history item becomes a token)."""
        return None if self.max_history is None else max(self.max_history, self.user_max_history)

    def _check_catalog(self) -> None:
        if self.mode == "teacher":
            if self.catalog.texts is None:
                raise DataError("the teacher reads item texts: give ItemCatalog(texts=...)")
            return
        if "item" not in self.model.encoders:
            raise DataError("the student needs a model with the item modality (MixLLMConfig.item)")
        item = self.model.config.item
        if item.feature_dim > 0:
            if self.catalog.features is None:
                raise DataError(f"the item encoder reads {item.feature_dim}-wide features: give ItemCatalog(features=...)")
            if self.catalog.features.shape[1] != item.feature_dim:
                raise DataError(
                    f"ItemCatalog.features have width {self.catalog.features.shape[1]} but the item encoder "
                    f"expects {item.feature_dim}"
                )
        if item.num_items > 0 and self.catalog.num_items > item.num_items:
            raise DataError(
                f"the catalog has {self.catalog.num_items} items but the id embedding holds {item.num_items}"
            )
        user, table = self.model.config.user, self.catalog.user_item_features
        if user is None:
            if self.catalog.user_features is not None:
                raise DataError(
                    f"ItemCatalog.user_features ({self.catalog.user_features.shape[1]} wide) were given but the model has "
                    "no user modality (MixLLMConfig.user), so no user encoder would read them"
                )
            return
        if table is None:
            raise DataError(
                f"the user encoder reads {user.item_dim}-wide item vectors: give ItemCatalog(user_features=...) or features"
            )
        if table.shape[1] != user.item_dim:
            name = "user_features" if self.catalog.user_features is not None else "features (read as user_features)"
            raise DataError(
                f"ItemCatalog.{name} have width {table.shape[1]} but the user encoder expects {user.item_dim} "
                "(UserConfig.item_dim)"
            )

    # --- requests -> inputs ----------------------------------------------------------------------
    def build_prompt(self, request: RankingRequest, index: int = 0) -> RankingPrompt:
        """Tokenize one request (``index`` only names it in error messages).

        The last ``max_history`` (H) history items become item tokens; with user tokens, the last
        :attr:`user_max_history` items are read by the user encoder, from the catalog's
        :attr:`ItemCatalog.user_item_features` (with a token cache too, so those items must be
        catalog rows). A request with no history gets no user tokens."""
        if len(request.candidates) == 0:
            raise DataError(f"request {index}: the candidate list is empty")
        retriever_scores = _request_retriever_scores(request, index)
        limit = self.max_request_history
        if limit is not None and len(request.history) > limit:
            limits = "max_history"
            if self.user_max_history:
                limits = (
                    f"max_history {self.max_history} as item tokens, "
                    f"user.max_history {self.user_max_history} for the user encoder"
                )
            raise DataError(
                f"request {index}: the history has {len(request.history)} items but this ranker reads at most "
                f"{limit} ({limits}); pass the {limit} most recent"
            )
        history_ids = [int(i) for i in request.history]
        item_history = history_ids if self.max_history is None else history_ids[-self.max_history :]
        user_history = history_ids[-self.user_max_history :] if self.user_max_history else []
        cached = self.mode == "student" and self.token_cache is not None
        check = self.token_cache.check_rows if cached else self.catalog.check
        history = check(item_history, f"request {index} history")
        candidates = check([int(i) for i in request.candidates], f"request {index} candidates")
        user = self._user_history(self.catalog.check(user_history, f"request {index} history"))
        try:
            if cached:  # placeholders carry cache rows; forward gathers their tokens
                prompt = self.prompts.student(history_ids=history, candidate_ids=candidates, user_history=user)
            elif self.mode == "teacher":
                texts = self.catalog.texts
                prompt = self.prompts.teacher([texts[i] for i in history], [texts[i] for i in candidates])
            else:
                prompt = self.prompts.student(**self._item_inputs(history, candidates), user_history=user)
        except DataError as err:
            raise DataError(f"request {index}: {err}") from None
        longest = prompt.prefix_len + max(prompt.segment_lens)
        if self.max_positions is not None and longest > self.max_positions:
            raise DataError(
                f"request {index}: the prefix ({prompt.prefix_len} tokens, {len(history)} history items) plus the "
                f"longest candidate ({max(prompt.segment_lens)} tokens) needs {longest} positions but the model "
                f"allows {self.max_positions}; shorten the history"
            )
        prompt.retriever_scores = retriever_scores
        return prompt

    def _item_inputs(self, history: list[int], candidates: list[int]) -> dict[str, Any]:
        item = self.model.config.item
        out: dict[str, Any] = {}
        if item.feature_dim > 0:
            out["history_features"] = self.catalog.features[history]  # (H, F)
            out["candidate_features"] = self.catalog.features[candidates]  # (C, F)
        if item.num_items > 0:
            out["history_ids"], out["candidate_ids"] = history, candidates
        return out

    def _user_history(self, history: list[int]) -> torch.Tensor | None:
        """(L, F_user) the user encoder's vectors of ``history`` (oldest first), None when empty."""
        return self.catalog.user_item_features[history] if history else None

    def prepare(self, requests: Sequence[RankingRequest]) -> RankingInputs:
        """Tokenize and pad a batch of requests (on the CPU; call ``.to(device)`` as needed); the
        requests' ``retriever_scores``, if any, travel in their prompts to ``RankingInputs.retriever_scores``."""
        if not requests:
            raise DataError("requests: the batch is empty")
        return self.collate([self.build_prompt(r, i) for i, r in enumerate(requests)])

    def collate(self, prompts: Sequence[RankingPrompt]) -> RankingInputs:
        """Pad tokenized prompts (:meth:`build_prompt`, or the prompt builder's own) into a batch in
        the model's dtype (on the CPU; call ``.to(device)`` as needed)."""
        return collate_prompts(prompts, self.processor.pad_token_id, self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.language_model.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.model.language_model.parameters()).device

    # --- scoring ---------------------------------------------------------------------------------
    def gather_item_tokens(self, inputs: RankingInputs) -> torch.Tensor | None:
        """(N, k, D) the cached tokens of ``inputs``' items (a student with ``token_cache``), else None."""
        if self.mode == "student" and self.token_cache is not None and inputs.item_ids is not None:
            return self.token_cache.gather(inputs.item_ids)  # rows of the catalog's tokens
        return None

    def forward(self, inputs: RankingInputs, item_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_max) scores; padded candidate slots hold 0 (see ``inputs.candidate_mask``).

        ``item_embeds``: the items' tokens gathered beforehand (:meth:`gather_item_tokens`), so a
        caller can read a cache that others write under its own lock and run the forward outside it.

        With fusion the scores are float32 ``score + fusion_gate * inputs.retriever_scores``.

        Raises:
            DataError: a fused ranker got no ``retriever_scores`` or ones of another shape, or a
                ranker without fusion got some (it would ignore them, so it refuses them).
        """
        self._check_retriever_scores(inputs)
        if item_embeds is None:
            item_embeds = self.gather_item_tokens(inputs)
        inputs_embeds = self.model.embed_inputs(
            inputs.input_ids, item_features=inputs.item_features, item_ids=inputs.item_ids, item_embeds=item_embeds,
            user_history=inputs.user_history, user_history_mask=inputs.user_history_mask,
        )  # (B, T, D)
        backbone = self.model.language_model.base_model  # the decoder stack, without the LM head
        hidden = backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=inputs.attention_mask.to(inputs_embeds.dtype),  # (B, 1, T, T)
            position_ids=inputs.position_ids,  # (B, T)
            use_cache=False,
        ).last_hidden_state  # (B, T, D)
        index = inputs.score_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, C, D)
        last = hidden.gather(1, index)  # (B, C, D)
        if self.score_head is not None:
            scores = self.score_head(last).squeeze(-1)  # (B, C)
        else:
            lm_head = self.model.language_model.get_output_embeddings()
            scores = last @ lm_head.weight[self.answer_token_id]  # (B, C): one row of the LM head only
            if getattr(lm_head, "bias", None) is not None:
                scores = scores + lm_head.bias[self.answer_token_id]
        if self.fusion_gate is not None:
            retriever = inputs.retriever_scores.to(device=scores.device, dtype=torch.float32)  # (B, C)
            scores = scores + self.fusion_gate * retriever  # (B, C) float32
        return scores.masked_fill(~inputs.candidate_mask, 0.0)

    def _check_retriever_scores(self, inputs: RankingInputs) -> None:
        given = inputs.retriever_scores
        if self.fusion_gate is None:
            if given is not None:
                raise DataError(
                    "retriever_scores: this ranker has no score fusion (built with fusion=False), so it would ignore "
                    "them; drop them or use a ranker built with fusion=True"
                )
            return
        if given is None:
            raise DataError(
                "retriever_scores: this ranker fuses the retriever's scores (fusion=True) but none were given; "
                "set RankingRequest.retriever_scores (one per candidate) or RankingInputs.retriever_scores (B, C)"
            )
        if tuple(given.shape) != tuple(inputs.candidate_mask.shape):
            raise DataError(
                f"retriever_scores: shape {tuple(given.shape)} but the batch has candidates of shape "
                f"{tuple(inputs.candidate_mask.shape)} (B, C_max)"
            )

    def score(self, requests: Sequence[RankingRequest]) -> list[torch.Tensor]:
        """One (C_i,) tensor of scores per request, in the request's candidate order."""
        inputs = self.prepare(requests).to(self._device)
        scores = self(inputs)
        return [row[mask] for row, mask in zip(scores, inputs.candidate_mask)]

    # --- checkpoints -----------------------------------------------------------------------------
    def ranker_config(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "scoring": self.scoring, "answer_token": self.answer_token,
            "template": asdict(self.prompts.template), "max_history": self.max_history,
            "fusion": self.fusion_gate is not None,
        }  # fmt: skip

    def save_pretrained(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """The model's checkpoint (``MixLLMForCausalLM.save_pretrained``) plus ``ranker_config.json``
        and ``ranker_head.safetensors`` (the score head's ``weight`` and, with fusion, the
        ``fusion_gate``); a student also stores its catalog's item features and user features
        (``catalog_features.safetensors``: ``features``, ``user_features`` when the catalog has its
        own), so it reloads without recomputing them."""
        path = self.model.save_pretrained(path, provenance=provenance)
        if self.mode == "student":
            tables = {name: getattr(self.catalog, name) for name in ("features", "user_features")}
            tables = {name: t.detach().float().contiguous().cpu() for name, t in tables.items() if t is not None}
            if tables:
                save_file(tables, str(path / CATALOG_FEATURES_NAME))
        (path / RANKER_CONFIG_NAME).write_text(json.dumps(self.ranker_config(), indent=2))
        head = {} if self.score_head is None else dict(self.score_head.state_dict())
        if self.fusion_gate is not None:
            head["fusion_gate"] = self.fusion_gate
        if head:
            save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / RANKER_HEAD_NAME))
        return path

    def load_score_head(self, path: str | Path) -> None:
        """Load ``ranker_head.safetensors`` from a checkpoint directory into this ranker's head and
        fusion gate.

        Checkpoints written before the head lost its bias store a ``bias`` too; it is dropped
        (:data:`SCORE_HEAD_RULE`): it added the same constant to every candidate, so every ranking
        and every listwise probability is unchanged, only raw scores shift by that constant."""
        if self.score_head is None and self.fusion_gate is None:
            raise ValueError("this ranker scores with the answer token; it has no score head")
        state = load_file(str(Path(path) / RANKER_HEAD_NAME))
        gate = state.pop("fusion_gate", None)
        if (gate is None) != (self.fusion_gate is None):
            raise DataError(
                f"{path}: {RANKER_HEAD_NAME} {'holds no' if gate is None else 'holds a'} fusion_gate but the ranker was "
                f"built with fusion={self.fusion_gate is not None}"
            )
        if gate is not None:
            with torch.no_grad():
                self.fusion_gate.copy_(gate.reshape(()))
        if self.score_head is None:
            return
        bias = state.pop("bias", None)
        if bias is not None:
            logger.info("%s: dropping the stored score-head bias %.4g (%s)", path, float(bias.flatten()[0]), SCORE_HEAD_RULE)
        self.score_head.load_state_dict(state)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, catalog: ItemCatalog | None = None, dtype: torch.dtype = torch.float32
    ) -> MixLLMRanker:
        """Load what :meth:`save_pretrained` wrote (the base LLM is loaded from its reference).

        ``catalog`` may be left out for a student that stored its item features; a teacher needs
        ``ItemCatalog(texts=...)``. Stored features (and user features) fill in a catalog given
        without them."""
        from mixllm.loading import from_pretrained

        path = Path(path)
        config_file = path / RANKER_CONFIG_NAME
        if not config_file.is_file():
            raise DataError(f"{path} is not a ranker checkpoint: {RANKER_CONFIG_NAME} is missing")
        stored_file = path / CATALOG_FEATURES_NAME
        stored = load_file(str(stored_file)) if stored_file.is_file() else {}
        given = {} if catalog is None else {"features": catalog.features, "user_features": catalog.user_features}
        missing = [name for name in stored if given.get(name) is None]
        if missing:
            tables = {**stored, **{name: t for name, t in given.items() if t is not None}}
            catalog = ItemCatalog(texts=None if catalog is None else catalog.texts, **tables)
        if catalog is None:
            raise DataError(f"{path} stores no item features: give ItemCatalog(texts=...) (and features for a student)")
        meta = json.loads(config_file.read_text())
        max_history = meta.get("max_history")
        run_info = path / "training_run.json"
        if max_history is None and run_info.is_file():  # checkpoints written before max_history was stored
            max_history = json.loads(run_info.read_text()).get("recipe", {}).get("history_length")
        model, processor = from_pretrained(path, dtype=dtype)
        ranker = cls(
            model, processor, catalog, mode=meta["mode"], template=RankingTemplate(**meta["template"]),
            scoring=meta["scoring"], answer_token=meta["answer_token"], max_history=max_history,
            fusion=meta.get("fusion", False),
        )  # fmt: skip
        if ranker.score_head is not None or ranker.fusion_gate is not None:
            ranker.load_score_head(path)
        return ranker.eval()


# --- the evaluator's interface -------------------------------------------------------------------
class ProtocolRanker(Ranker):
    """A :class:`MixLLMRanker` behind the evaluator's :class:`~mixllm.data.evaluation.Ranker`
    interface (``evaluate_protocols``, ``mixllm eval ranker``): batches of padded histories and
    candidates become requests (:meth:`RankingRequest.from_padded`), scored ``batch_size`` at a time.

    Two history lengths: :attr:`max_history` (the evaluator's: how many of the most recent items
    ``make_batch`` supplies, the longest the ranker reads) and :attr:`max_item_history` (H, how
    many of them become item tokens). They differ only for a student with user tokens, whose user
    encoder reads ``UserConfig.max_history`` items."""

    supports_full_ranking = False

    def __init__(self, ranker: MixLLMRanker, name: str, batch_size: int = 8, retriever=None) -> None:
        self.ranker, self.name, self.batch_size = ranker.eval(), name, batch_size
        # A ranker without max_history makes every history item a token: it gets the default H.
        self.max_item_history: int = ranker.max_history or DEFAULT_HISTORY_LENGTH
        """H: the most recent history items the ranker reads as item tokens."""
        self.reads: int = self.max_item_history if ranker.max_history is None else ranker.max_request_history
        """The most recent history items the ranker itself reads (item tokens and user encoder)."""
        fused = ranker.fusion_gate is not None
        if fused and retriever is None:
            raise DataError(f"{name}: this ranker fuses the retriever's scores; give ProtocolRanker the retriever")
        self.retriever = retriever if fused else None
        """A fused ranker's retriever (``mixllm.retrieval.FaissRetriever``): its candidate scores go with each request."""
        self.max_history: int = max(self.reads, self.retriever.max_history if self.retriever is not None else 0)
        """What the evaluator supplies: the longest history the ranker or its retriever reads."""

    def requests(self, batch: RankingBatch) -> list[RankingRequest]:
        """One request per row, each history cut to the most recent items the ranker reads; a fused
        ranker's requests carry the retriever's scores of their candidates (from the full history)."""
        requests = [RankingRequest.from_padded(h, c, self.reads) for h, c in zip(batch.history, batch.candidates)]
        if self.retriever is not None:
            fused = self.retriever.candidate_scores(batch.history[:, -self.retriever.max_history :], batch.candidates)
            for request, row in zip(requests, fused.tolist()):
                request.retriever_scores = row
        return requests

    @torch.inference_mode()
    def score(self, batch: RankingBatch) -> torch.Tensor:
        """(B, C) scores of ``batch.candidates``."""
        requests = self.requests(batch)
        out = [self.ranker.score(requests[i : i + self.batch_size]) for i in range(0, len(requests), self.batch_size)]
        return torch.stack([row.float().cpu() for part in out for row in part])  # (B, C)
