"""Training and validation lists for the rankers, and the Lightning data module that serves them.

A training list is one target position ``t`` of a user's *training* sequence: the items before ``t``
are its history (nothing at or after ``t`` ever is), the item at ``t`` is the target, and negatives
are items the user never interacted with (in any split). Which positions:

* ``targets_per_user: N`` -- a seeded sample of N positions per user (the first rankers used 2);
* ``targets_per_user: null`` -- every position from the second on: sliding windows over the whole
  sequence, as SASRec and LLaRA train.

Each list stores a *pool* of ``negative_pool`` negatives; every epoch draws ``num_negatives`` of them
afresh (seeded by ``(seed, epoch, row)``, so a resumed run draws what the first run would have), and
with distillation the teacher scores the whole pool once (a candidate's score does not depend on the
others in its list: block attention), so every draw has teacher scores. With ``hard_negatives: s``
a share ``s`` of the pool (and of each draw) comes from the retriever's top ``hard_pool`` for that
list's own history -- the candidates a reranker actually sees -- the rest uniformly from the items the
user never interacted with. The target is never a negative: it is an interacted item.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mixllm.data import PAD, PROTOCOLS, LeaveOneOutSplit, get_candidates
from mixllm.features import FeatureLayout
from mixllm.ranking import MixLLMRanker, RankingRequest
from training.ranker_recipe import RankerRecipe
from training.recipe import RecipeError

LISTS_VERSION = 2
"""Bump when :func:`build_training_lists` changes, so stored teacher scores of old lists are refused."""



class Retriever(Protocol):
    """What hard negatives are taken from (``mixllm.retrieval.FaissRetriever`` over SASRec)."""

    max_history: int
    """The most recent items the retriever reads."""

    def top_k(self, history: torch.Tensor, allowed: np.ndarray, k: int) -> np.ndarray:
        """(B, k) item ids, best first, among ``allowed`` (B, N) bool; ``history`` (B, L) left-padded with PAD."""

    def candidate_scores(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, C) the retriever's score of each candidate (score fusion)."""


def retriever_scores(split: LeaveOneOutSplit, retriever: Retriever, users: np.ndarray, ends: np.ndarray | None,
                     candidates: np.ndarray, which: str = "train", batch_size: int = 512) -> np.ndarray:  # fmt: skip
    """(N, C) float32 retriever scores of ``candidates``, each row's retriever reading its own
    ``max_history`` items before the target: training position ``ends[i]`` of ``users[i]``'s training
    sequence (``which="train"``), or the ``which`` split's target (``ends`` None)."""
    out = np.empty(candidates.shape, dtype=np.float32)
    for start in range(0, len(users), batch_size):
        block = slice(start, start + batch_size)
        if which == "train":
            history = _histories(split, users[block], ends[block], retriever.max_history)
        else:
            history = split.histories(which, retriever.max_history, users[block])
        out[block] = retriever.candidate_scores(torch.from_numpy(history), torch.from_numpy(candidates[block])).numpy()
    return out


@dataclass
class CandidateListSet:
    """Ranking lists: one user, history and candidate pool per row."""

    users: np.ndarray
    """(N,) user index of each list."""
    histories: np.ndarray
    """(N, L) history items, left-padded with PAD, most recent last."""
    candidates: np.ndarray
    """(N, 1 + pool) the target and the list's negatives (the whole list when there is no larger pool)."""
    target_index: np.ndarray
    """(N,) column of the target in ``candidates``."""
    key: str = ""
    """Hash of what the lists were built from (dataset, list settings, seed)."""
    hard: np.ndarray | None = None
    """(N, 1 + pool) bool: True at negatives taken from the retriever's top-k; None = no hard negatives."""
    retriever_scores: np.ndarray | None = None
    """(N, 1 + pool) float32: the retriever's score of each candidate (for a fused ranker); None = none."""

    def __len__(self) -> int:
        return len(self.users)

    def request(self, i: int) -> RankingRequest:
        return RankingRequest.from_padded(self.histories[i], self.candidates[i])

    def digest(self) -> str:
        digest = hashlib.sha256()
        for array in (self.users, self.histories, self.candidates, self.target_index):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def equals(self, other: CandidateListSet) -> bool:
        return all(
            np.array_equal(getattr(self, name), getattr(other, name))
            for name in ("users", "histories", "candidates", "target_index")
        )

    def draw(self, rows: np.ndarray, epoch: int, num_negatives: int, hard_share: float, seed: int) -> np.ndarray:
        """(B, 1 + num_negatives) columns of ``candidates`` for ``rows`` in ``epoch``: the target plus
        ``num_negatives`` negatives from the pool, ``round(hard_share * num_negatives)`` of them hard
        (as many as the pool holds), in a seeded random order. A pool no larger than the list is the
        list itself, every epoch, in its stored order."""
        rows = np.asarray(rows, dtype=np.int64)
        width = self.candidates.shape[1]
        if width == 1 + num_negatives:
            return np.tile(np.arange(width), (len(rows), 1))
        n_hard = int(round(hard_share * num_negatives))
        out = np.empty((len(rows), 1 + num_negatives), dtype=np.int64)
        for k, row in enumerate(rows):
            rng = np.random.default_rng([seed, epoch, int(row), LISTS_VERSION])
            target = int(self.target_index[row])
            negatives = np.delete(np.arange(width), target)
            hard = self.hard[row, negatives] if self.hard is not None else np.zeros(len(negatives), dtype=bool)
            take_hard = min(n_hard, int(hard.sum()))
            chosen = np.concatenate([
                rng.choice(negatives[hard], size=take_hard, replace=False),
                rng.choice(negatives[~hard], size=num_negatives - take_hard, replace=False),
            ])  # fmt: skip
            out[k] = rng.permutation(np.concatenate([[target], chosen]))
        return out


def training_lists_key(split: LeaveOneOutSplit, recipe: RankerRecipe, history_width: int, retriever_id: str | None) -> str:
    payload = {
        "dataset": split.dataset.fingerprint(), "max_history": history_width, "num_negatives": recipe.num_negatives,
        "pool": recipe.pool_size, "targets_per_user": recipe.targets_per_user, "hard_negatives": recipe.hard_negatives,
        "hard_pool": recipe.hard_pool, "retriever": retriever_id if recipe.hard_negatives > 0 else None,
        "limit_train_users": recipe.limit_train_users, "seed": recipe.seed, "version": LISTS_VERSION,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _target_positions(split: LeaveOneOutSplit, recipe: RankerRecipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(users, positions) of every training list, user by user, positions ascending."""
    num_users = split.num_users if recipe.limit_train_users is None else min(recipe.limit_train_users, split.num_users)
    users, positions = [], []
    for user in range(num_users):
        candidates = np.arange(1, len(split.train_sequence(user)))
        if len(candidates) == 0:
            continue
        if recipe.targets_per_user is not None and recipe.targets_per_user < len(candidates):
            candidates = np.sort(rng.choice(candidates, size=recipe.targets_per_user, replace=False))
        users.append(np.full(len(candidates), user))
        positions.append(candidates)
    if not users:
        raise RecipeError("limit_train_users", "no training lists: no user has two or more training items")
    return np.concatenate(users), np.concatenate(positions)


def _histories(split: LeaveOneOutSplit, users: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """(N, width) the ``width`` items before each position, left-padded with PAD."""
    out = np.full((len(users), width), PAD, dtype=np.int64)
    for row, (user, t) in enumerate(zip(users, positions)):
        past = split.train_sequence(int(user))[max(0, t - width) : t]
        if len(past):
            out[row, width - len(past) :] = past
    return out


def build_training_lists(split: LeaveOneOutSplit, recipe: RankerRecipe, history_width: int | None = None,
                         retriever: Retriever | None = None, retriever_id: str | None = None, scored: bool = False,
                         batch_size: int = 512) -> CandidateListSet:  # fmt: skip
    """The training lists of ``recipe`` (see the module doc). ``history_width`` is the longest history
    the model reads (default ``max_history``; longer with user tokens); ``retriever`` is needed when
    ``hard_negatives > 0`` or ``scored`` (its score of every pool candidate is stored) and reads its own
    ``max_history`` items before each target (``retriever_id`` names it in the lists' key)."""
    width = history_width or recipe.max_history
    pool = recipe.pool_size
    n_hard_pool = int(round(recipe.hard_negatives * pool))
    if n_hard_pool and retriever is None:
        raise RecipeError("hard_negatives", "needs a retriever (SASRec) to take hard negatives from")
    if scored and retriever is None:
        raise RecipeError("fusion", "score fusion and SASRec as a teacher need the retriever (SASRec) whose scores they use")
    if n_hard_pool > recipe.hard_pool:
        raise RecipeError("hard_pool", f"holds {recipe.hard_pool} items but a list's pool takes {n_hard_pool} hard negatives from it")
    rng = np.random.default_rng([recipe.seed, LISTS_VERSION])
    users, positions = _target_positions(split, recipe, rng)
    histories = _histories(split, users, positions, width)
    targets = np.array([split.train_sequence(int(u))[t] for u, t in zip(users, positions)], dtype=np.int64)
    never = {}  # user -> items the user never interacted with
    hard_items = np.zeros((len(users), 0), dtype=np.int64)
    if n_hard_pool:
        hard_items = np.empty((len(users), recipe.hard_pool), dtype=np.int64)
        for start in range(0, len(users), batch_size):
            block = slice(start, start + batch_size)
            seen = _histories(split, users[block], positions[block], retriever.max_history)
            allowed = ~split.interaction_mask(users[block])
            hard_items[block] = retriever.top_k(torch.from_numpy(seen), allowed, recipe.hard_pool)
    candidates = np.empty((len(users), 1 + pool), dtype=np.int64)
    hard = np.zeros((len(users), 1 + pool), dtype=bool) if n_hard_pool else None
    target_index = np.empty(len(users), dtype=np.int64)
    for row, user in enumerate(users):
        if user not in never:
            never[user] = np.setdiff1d(np.arange(split.num_items), split.interacted_items(int(user)))
        hard_row = rng.choice(hard_items[row], size=n_hard_pool, replace=False) if n_hard_pool else hard_items[row]
        random_pool = np.setdiff1d(never[user], hard_row) if n_hard_pool else never[user]
        if len(random_pool) < pool - n_hard_pool:
            raise RecipeError("num_negatives", f"user {user} has only {len(random_pool)} items they never interacted with")
        row_items = np.concatenate([[targets[row]], hard_row, rng.choice(random_pool, size=pool - n_hard_pool, replace=False)])
        order = rng.permutation(len(row_items))
        candidates[row] = row_items[order]
        target_index[row] = int(np.argmax(order == 0))
        if hard is not None:
            hard[row] = (order >= 1) & (order <= n_hard_pool)
    key = training_lists_key(split, recipe, width, retriever_id)
    fused = retriever_scores(split, retriever, users, positions, candidates, batch_size=batch_size) if scored else None
    return CandidateListSet(users.astype(np.int64), histories, candidates, target_index, key, hard, fused)


def build_validation_lists(split: LeaveOneOutSplit, recipe: RankerRecipe, history_width: int | None = None,
                           retriever: Retriever | None = None) -> CandidateListSet:  # fmt: skip
    """The validation targets with the protocol's cached candidate lists (``val_protocol``); with a
    ``retriever`` (score fusion) its scores of the candidates too."""
    cache = None if recipe.cache_dir is None else Path(recipe.cache_dir) / "candidates"
    lists = get_candidates(split, PROTOCOLS[recipe.val_protocol], "valid", recipe.seed, cache)
    n = split.num_users if recipe.limit_val_users is None else min(recipe.limit_val_users, split.num_users)
    users = np.arange(n)
    histories = split.histories("valid", history_width or recipe.max_history, users)
    candidates = lists.candidates[:n]
    fused = None if retriever is None else retriever_scores(split, retriever, users, None, candidates, "valid")
    return CandidateListSet(users, histories, candidates, lists.target_index[:n], lists.key, retriever_scores=fused)


class _Rows(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class ListCollator:
    """List indices -> ``{"inputs": RankingInputs, "target_index": (B,), "teacher_scores": (B, C) | None,
    "retriever_scores": (B, C) | None}`` (a fused ranker's requests carry the retriever's scores too).

    ``epoch`` (set by the training module at each epoch's start) seeds which pool negatives are drawn
    and, with ``cold_item_rate``, which item tokens lose their SASRec part (columns ``cold_columns``)."""

    def __init__(self, ranker: MixLLMRanker, lists: CandidateListSet, teacher_scores: torch.Tensor | None = None,
                 recipe: RankerRecipe | None = None, cold_columns: slice | None = None) -> None:  # fmt: skip
        self.ranker, self.lists, self.teacher_scores, self.recipe = ranker, lists, teacher_scores, recipe
        self.cold_columns = cold_columns
        self.epoch = 0

    def __call__(self, rows: list[int]) -> dict[str, Any]:
        rows_np = np.asarray(rows, dtype=np.int64)
        if self.recipe is None:  # validation: the stored lists as they are
            columns = np.tile(np.arange(self.lists.candidates.shape[1]), (len(rows_np), 1))
        else:
            columns = self.lists.draw(rows_np, self.epoch, self.recipe.num_negatives, self.recipe.hard_negatives, self.recipe.seed)
        candidates = np.take_along_axis(self.lists.candidates[rows_np], columns, 1)
        target_index = np.argmax(columns == self.lists.target_index[rows_np, None], axis=1)
        requests = [RankingRequest.from_padded(self.lists.histories[r], c) for r, c in zip(rows_np, candidates)]
        retriever = None
        if self.lists.retriever_scores is not None:
            retriever = torch.from_numpy(np.take_along_axis(self.lists.retriever_scores[rows_np], columns, 1))
            if self.ranker.fusion_gate is not None:
                for request, row in zip(requests, retriever.tolist()):
                    request.retriever_scores = row
        teacher = None
        if self.teacher_scores is not None:
            teacher = torch.gather(self.teacher_scores[torch.from_numpy(rows_np)], 1, torch.from_numpy(columns))
        inputs = self.ranker.prepare(requests)
        if self.cold_columns is not None and inputs.item_features is not None:
            rng = np.random.default_rng([self.recipe.seed, self.epoch, int(rows_np[0]), len(rows_np), LISTS_VERSION])
            cold = torch.from_numpy(rng.random(len(inputs.item_features)) < self.recipe.cold_item_rate)
            inputs.item_features = inputs.item_features.clone()
            inputs.item_features[cold, self.cold_columns] = 0.0
        return {"inputs": inputs, "target_index": torch.from_numpy(target_index), "teacher_scores": teacher,
                "retriever_scores": retriever}  # fmt: skip


class RankerDataModule(L.LightningDataModule):
    """Training lists (with stored teacher scores for distillation) and validation lists."""

    def __init__(self, ranker: MixLLMRanker, recipe: RankerRecipe, train_lists: CandidateListSet,
                 val_lists: CandidateListSet, teacher_scores: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.recipe = recipe
        cold = None
        if recipe.cold_item_rate > 0:
            width = ranker.catalog.features.shape[1]
            cold = FeatureLayout.from_spec(recipe.item_features, width).slice("sasrec")
        self.train_collate = ListCollator(ranker, train_lists, teacher_scores, recipe, cold)
        self.val_collate = ListCollator(ranker, val_lists)
        self.num_train, self.num_val = len(train_lists), len(val_lists)

    def set_epoch(self, epoch: int) -> None:
        self.train_collate.epoch = epoch

    def train_dataloader(self) -> DataLoader:
        # Workers copy the collator when an epoch's iterator starts: Lightning starts the first one (also
        # on resume) before on_train_epoch_start, so the epoch is set here as well.
        if self.trainer is not None:
            self.set_epoch(self.trainer.current_epoch)
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return DataLoader(_Rows(self.num_train), batch_size=self.recipe.batch_size, shuffle=True,
                          generator=generator, collate_fn=self.train_collate,
                          num_workers=self.recipe.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.num_val), batch_size=self.recipe.batch_size, collate_fn=self.val_collate)
