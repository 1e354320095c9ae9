"""The container every recommender in mixllm reads: time-ordered interactions over dense indices.

Users and items are addressed by dense 0-based indices (``user_idx``, ``item_idx``). ``item_idx``
is the row of the item in :attr:`InteractionDataset.items`; ``user_idx`` follows the sorted
original user ids. Models never see the original ids; :attr:`user_ids` and ``items["item_id"]``
map back.

Interactions are sorted by ``(user_idx, timestamp, item_id)``: time order, with ties (several items
at the same timestamp, common in MovieLens where a user rates many films in one second) broken by
the original item id. The tie-break depends only on the data, not on the row order of the file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mixllm.errors import DataError

log = logging.getLogger(__name__)

MIN_INTERACTIONS_PER_USER = 3
"""Leave-one-out needs one training item (a non-empty history), a validation and a test target."""


@dataclass
class InteractionDataset:
    """Users, items and their time-ordered interactions.

    Build one with :meth:`from_frames` (or the loaders in :mod:`mixllm.data`), not directly.
    """

    name: str
    """Short name used in reports and cache paths, e.g. ``"ml-100k"``."""
    interactions: pd.DataFrame
    """Columns ``user_idx, item_idx, timestamp`` (int64) and ``rating`` (float, NaN if absent);
    sorted by user, then time, then original item id."""
    items: pd.DataFrame
    """One row per item, row ``i`` is ``item_idx == i``. Columns ``item_id`` (original id), ``text``
    (see :func:`mixllm.data.item_text`) and ``image_path`` (None where the item has no image)."""
    user_ids: np.ndarray
    """``user_ids[user_idx]`` is the original user id."""
    source: str = ""
    """Where the data came from (a path or an asset name), for provenance."""
    _indptr: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        counts = np.bincount(self.interactions["user_idx"].to_numpy(), minlength=self.num_users)
        self._indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_frames(
        cls,
        name: str,
        interactions: pd.DataFrame,
        items: pd.DataFrame,
        source: str = "",
    ) -> InteractionDataset:
        """Index and sort validated frames.

        Args:
            interactions: columns ``user_id, item_id, timestamp`` and optionally ``rating``. Every
                ``item_id`` must be in ``items``; timestamps must be integers (e.g. epoch seconds).
                A repeated ``(user_id, item_id)`` keeps its earliest interaction (logged).
            items: columns ``item_id, text`` and optionally ``image_path``; ids unique.
        """
        items = items.reset_index(drop=True)
        item_index = pd.Index(items["item_id"])
        if not item_index.is_unique:
            raise DataError(f"{name}: item ids are not unique")
        item_idx = item_index.get_indexer(interactions["item_id"])
        if (item_idx < 0).any():
            raise DataError(f"{name}: {int((item_idx < 0).sum())} interactions refer to unknown items")

        user_ids = np.sort(pd.unique(interactions["user_id"]))
        user_idx = pd.Index(user_ids).get_indexer(interactions["user_id"])
        frame = pd.DataFrame(
            {
                "user_idx": user_idx.astype(np.int64),
                "item_idx": item_idx.astype(np.int64),
                "timestamp": interactions["timestamp"].to_numpy(dtype=np.int64),
                "rating": (
                    interactions["rating"].to_numpy(dtype=np.float64)
                    if "rating" in interactions
                    else np.full(len(interactions), np.nan)
                ),
            }
        )
        # item_idx follows the items table, so break timestamp ties by the original id explicitly.
        frame["_tie"] = pd.Index(items["item_id"]).argsort().argsort()[frame["item_idx"].to_numpy()]
        frame = frame.sort_values(["user_idx", "timestamp", "_tie"], kind="stable").drop(columns="_tie")
        duplicated = frame.duplicated(["user_idx", "item_idx"], keep="first")
        if duplicated.any():
            log.warning(
                "%s: dropped %d repeated (user, item) interactions, keeping each pair's earliest",
                name,
                int(duplicated.sum()),
            )
            frame = frame[~duplicated]
        frame = frame.reset_index(drop=True)

        image_paths = items["image_path"].tolist() if "image_path" in items else [None] * len(items)
        out_items = pd.DataFrame(
            {
                "item_id": items["item_id"].to_numpy(),
                "text": items["text"].astype(str).to_numpy(),
                "image_path": pd.Series([None if pd.isna(p) else str(p) for p in image_paths], dtype=object),
            }
        )
        dataset = cls(name=name, interactions=frame, items=out_items, user_ids=user_ids, source=source)
        short = np.flatnonzero(dataset.user_lengths < MIN_INTERACTIONS_PER_USER)
        if len(short):
            raise DataError(
                f"{name}: {len(short)} users have fewer than {MIN_INTERACTIONS_PER_USER} distinct items "
                f"(e.g. user {user_ids[short[0]]!r}); leave-one-out needs a non-empty training history"
            )
        return dataset

    # --- views ---------------------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return len(self.interactions)

    @property
    def item_texts(self) -> list[str]:
        """``item_texts[item_idx]``: the text the teacher and the item text encoder read."""
        return self.items["text"].tolist()

    @property
    def user_lengths(self) -> np.ndarray:
        """``(num_users,)`` number of interactions per user."""
        return np.diff(self._indptr)

    @property
    def indptr(self) -> np.ndarray:
        """CSR row pointer: user ``u``'s items are ``item_sequence[indptr[u]:indptr[u + 1]]``."""
        return self._indptr

    @property
    def item_sequence(self) -> np.ndarray:
        """``(num_interactions,)`` item indices, grouped by user and time-ordered within a user."""
        return self.interactions["item_idx"].to_numpy()

    def user_sequence(self, user_idx: int) -> np.ndarray:
        """The user's items in time order."""
        return self.item_sequence[self._indptr[user_idx] : self._indptr[user_idx + 1]]

    def fingerprint(self) -> str:
        """A hash of users, items and interaction order: caches keyed on it go stale when data changes."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        digest.update(np.ascontiguousarray(self._indptr).tobytes())
        digest.update(np.ascontiguousarray(self.item_sequence).tobytes())
        digest.update(str(self.num_items).encode())
        return digest.hexdigest()

    def stats(self) -> dict[str, float]:
        """Counts and history-length summary, for reports."""
        lengths = self.user_lengths
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": self.num_interactions / (self.num_users * self.num_items),
            "interactions_per_user_min": int(lengths.min()),
            "interactions_per_user_median": float(np.median(lengths)),
            "interactions_per_user_max": int(lengths.max()),
        }
