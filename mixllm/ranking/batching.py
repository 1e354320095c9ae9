"""Block attention and batching: the (1, 1, T, T) block mask and per-candidate position ids of
one request, and the padded batch of requests (:class:`RankingInputs`) a ranker's forward reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mixllm.errors import DataError
from mixllm.processor import pad_user_histories
from mixllm.ranking.prompts import RankingPrompt


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
