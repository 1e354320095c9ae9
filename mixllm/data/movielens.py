"""MovieLens-100K (943 users, 1,682 movies, 100,000 ratings) from the packaged asset.

Every rating counts as an interaction (implicit feedback, as in LLaRA); the rating is kept in the
``rating`` column. Item text is :func:`mixllm.data.item_text` of the title (with its year) and the
genre flags in the catalog's column order. Two catalog quirks are kept as they are: movie 267 is
titled ``"unknown"`` (and has only the "unknown" genre), and 18 titles appear under two movie ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mixllm.data.dataset import InteractionDataset
from mixllm.data.text import item_text
from mixllm.errors import DataError

log = logging.getLogger(__name__)

ASSET_NAME = "movielens-100k"
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip


def movielens_item_texts(items: pd.DataFrame) -> pd.Series:
    """``item_text(title, genres)`` for each row of the ML-100K item table (genre columns are 0/1)."""
    flags = items[list(GENRES)].to_numpy().astype(bool)
    return pd.Series(
        [item_text(str(title), [g for g, on in zip(GENRES, row) if on]) for title, row in zip(items["movie_title"], flags)],
        index=items.index,
    )


def load_movielens_100k(root: str | Path | None = None) -> InteractionDataset:
    """Load ML-100K as an :class:`InteractionDataset` named ``"ml-100k"``.

    Args:
        root: directory holding ``ratings.parquet`` and ``items.parquet``; None = the packaged
            asset (``mixllm.assets.asset_path("movielens-100k")``).
    """
    if root is None:
        from mixllm.assets import asset_path

        root = asset_path(ASSET_NAME)
    root = Path(root)
    ratings_path, items_path = root / "ratings.parquet", root / "items.parquet"
    for path in (ratings_path, items_path):
        if not path.is_file():
            raise DataError(f"{path}: MovieLens-100K file not found (run `mixllm assets fetch {ASSET_NAME}`)")
    ratings = pd.read_parquet(ratings_path)
    items = pd.read_parquet(items_path)
    for path, frame, columns in (
        (ratings_path, ratings, ("user_id", "movie_id", "rating", "timestamp")),
        (items_path, items, ("movie_id", "movie_title", *GENRES)),
    ):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    items = items.sort_values("movie_id", kind="stable")
    dataset = InteractionDataset.from_frames(
        name="ml-100k",
        interactions=ratings.rename(columns={"movie_id": "item_id"})[["user_id", "item_id", "timestamp", "rating"]],
        items=pd.DataFrame({"item_id": items["movie_id"].to_numpy(), "text": movielens_item_texts(items).to_numpy()}),
        source=str(root),
    )
    log.info(
        "loaded %s: %d users, %d items, %d interactions",
        dataset.name, dataset.num_users, dataset.num_items, dataset.num_interactions,
    )  # fmt: skip
    return dataset
