"""Tiny synthetic datasets for tests, examples and smoke runs (no files, milliseconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixllm.data.dataset import InteractionDataset
from mixllm.data.text import item_text


def make_synthetic_dataset(
    num_users: int = 20,
    num_items: int = 50,
    min_length: int = 5,
    max_length: int = 15,
    pattern: str = "random",
    seed: int = 0,
) -> InteractionDataset:
    """A dataset named ``"synthetic"`` with ``num_users`` users and ``num_items`` items.

    Args:
        pattern: ``"random"``: each user picks distinct items uniformly at random;
            ``"next-item"``: each user walks ``s, s+1, s+2, ...`` (mod ``num_items``) from a random
            start, so the next item is predictable from the last one (a sequential model can learn
            it; popularity cannot).
        seed: numpy seed; the same arguments always give the same dataset.

    Timestamps increase by one per interaction, except that every user's first two interactions
    share a timestamp (to exercise tie-breaking). Items have ids ``100 + i`` and text
    ``item_text(f"Item {i}", [genre])``.
    """
    if pattern not in ("random", "next-item"):
        raise ValueError(f"pattern must be 'random' or 'next-item', got {pattern!r}")
    if not 3 <= min_length <= max_length <= num_items:
        raise ValueError("need 3 <= min_length <= max_length <= num_items")
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        length = int(rng.integers(min_length, max_length + 1))
        if pattern == "random":
            items = rng.choice(num_items, size=length, replace=False)
        else:
            items = (int(rng.integers(num_items)) + np.arange(length)) % num_items
        times = 1_000 + np.arange(length)
        times[1] = times[0]
        rows += [(f"u{user}", 100 + int(item), int(t), float(rng.integers(1, 6))) for item, t in zip(items, times)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    genres = ("Comedy", "Drama", "Action")
    items = pd.DataFrame(
        {
            "item_id": 100 + np.arange(num_items),
            "text": [item_text(f"Item {i}", [genres[i % 3]]) for i in range(num_items)],
        }
    )
    return InteractionDataset.from_frames("synthetic", interactions, items, source=f"synthetic(seed={seed})")
