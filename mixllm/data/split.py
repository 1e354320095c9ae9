"""Leave-one-out split by time, and the histories models read.

For each user's time-ordered items ``s_1 .. s_n``:

- training split: ``s_1 .. s_{n-2}``;
- validation target ``s_{n-1}``, scored from the history ``s_1 .. s_{n-2}``;
- test target ``s_n``, scored from the history ``s_1 .. s_{n-1}`` (the validation item is in the past
  by then, as in SASRec).

A model reads the last ``H`` items of that history (:data:`DEFAULT_HISTORY_LENGTH` = 10 unless
the model asks for more or fewer), left-padded with :data:`PAD` so the most recent item is
always the last column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mixllm.data.dataset import InteractionDataset

PAD = -1
"""History padding value. Not a valid item index: an embedding lookup on it fails loudly."""
DEFAULT_HISTORY_LENGTH = 10
"""H: how many most recent items a model reads unless it says otherwise."""
SPLITS = ("valid", "test")

Split = Literal["valid", "test"]


@dataclass
class LeaveOneOutSplit:
    """Leave-one-out view of an :class:`InteractionDataset` (build with :func:`leave_one_out`)."""

    dataset: InteractionDataset

    def __post_init__(self) -> None:
        indptr = self.dataset.indptr
        self._items = self.dataset.item_sequence
        self._start = indptr[:-1]  # (U,) first interaction of each user
        self._end = indptr[1:]  # (U,) one past the last
        self.valid_targets = self._items[self._end - 2]  # (U,)
        self.test_targets = self._items[self._end - 1]  # (U,)

    @property
    def num_users(self) -> int:
        return self.dataset.num_users

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    # --- training split ------------------------------------------------------------------------
    def train_sequence(self, user_idx: int) -> np.ndarray:
        """The user's training items in time order (all but the last two interactions)."""
        return self._items[self._start[user_idx] : self._end[user_idx] - 2]

    def train_sequences(self) -> list[np.ndarray]:
        """:meth:`train_sequence` for every user."""
        return [self.train_sequence(u) for u in range(self.num_users)]

    def train_interactions(self) -> pd.DataFrame:
        """Rows of ``dataset.interactions`` in the training split (same columns, time-ordered)."""
        frame = self.dataset.interactions
        position = np.arange(len(frame)) - np.repeat(self._start, self.dataset.user_lengths)
        keep = position < np.repeat(self.dataset.user_lengths - 2, self.dataset.user_lengths)
        return frame[keep].reset_index(drop=True)

    def train_item_counts(self) -> np.ndarray:
        """``(num_items,)`` training interactions per item (popularity)."""
        return np.bincount(self.train_interactions()["item_idx"].to_numpy(), minlength=self.num_items)

    # --- evaluation ----------------------------------------------------------------------------
    def targets(self, split: Split) -> np.ndarray:
        """``(U,)`` held-out item of every user for ``"valid"`` or ``"test"``."""
        return {"valid": self.valid_targets, "test": self.test_targets}[_check_split(split)]

    def history_end(self, split: Split) -> np.ndarray:
        """``(U,)`` index into the interaction sequence one past each user's last history item."""
        return self._end - (2 if _check_split(split) == "valid" else 1)

    def sequence_before(self, split: Split, user_idx: int) -> np.ndarray:
        """Everything the user did before the ``split`` target, in time order."""
        return self._items[self._start[user_idx] : self.history_end(split)[user_idx]]

    def histories(self, split: Split, max_length: int = DEFAULT_HISTORY_LENGTH, users: np.ndarray | None = None) -> np.ndarray:
        """``(len(users), max_length)`` int64: the last ``max_length`` items before each target.

        Left-padded with :data:`PAD`; column ``-1`` is the most recent item. ``max_length = 0`` gives
        an empty ``(len(users), 0)`` array (for models that read no history).
        """
        users = np.arange(self.num_users) if users is None else np.asarray(users, dtype=np.int64)
        end = self.history_end(split)[users]  # (B,)
        start = np.maximum(self._start[users], end - max_length)  # (B,)
        offsets = np.arange(-max_length, 0)  # (L,) positions relative to end
        index = end[:, None] + offsets[None, :]  # (B, L)
        valid = index >= start[:, None]
        out = np.full((len(users), max_length), PAD, dtype=np.int64)
        out[valid] = self._items[index[valid]]
        return out

    def interacted_items(self, user_idx: int) -> np.ndarray:
        """All items the user ever interacted with (training, validation and test)."""
        return self._items[self._start[user_idx] : self._end[user_idx]]

    def interaction_mask(self, users: np.ndarray) -> np.ndarray:
        """``(len(users), num_items)`` bool, True where the user ever interacted with the item."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self._end[users] - self._start[users]
        rows = np.repeat(np.arange(len(users)), lengths)
        cols = np.concatenate([self.interacted_items(u) for u in users]) if len(users) else np.zeros(0, np.int64)
        mask = np.zeros((len(users), self.num_items), dtype=bool)
        mask[rows, cols] = True
        return mask

    def full_ranking_mask(self, which: Split, users: np.ndarray) -> np.ndarray:
        """``(len(users), num_items)`` bool: what full ranking ranks the ``which`` target among --
        every item the user never interacted with, plus the target itself."""
        users = np.asarray(users, dtype=np.int64)
        mask = ~self.interaction_mask(users)
        mask[np.arange(len(users)), self.targets(which)[users]] = True
        return mask


def leave_one_out(dataset: InteractionDataset) -> LeaveOneOutSplit:
    """Split every user's time-ordered interactions: last = test, second to last = validation."""
    return LeaveOneOutSplit(dataset)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
