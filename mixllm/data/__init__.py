"""Recommendation data: datasets, the leave-one-out split, item text, evaluation protocols.

Typical use::

    from mixllm.data import load_dataset, leave_one_out, evaluate_protocols
    split = leave_one_out(load_dataset("ml-100k"))
    results = evaluate_protocols(my_ranker, split, seed=0)   # {split: {protocol: {metric: value}}}
"""

from __future__ import annotations

from pathlib import Path

from mixllm.data.dataset import MIN_INTERACTIONS_PER_USER, InteractionDataset
from mixllm.data.evaluation import Ranker, RankingBatch, evaluate, evaluate_protocols, make_batch
from mixllm.data.movielens import load_movielens_100k
from mixllm.data.protocols import (
    FULL_RANKING,
    PROTOCOLS,
    SAMPLED_20,
    SAMPLED_100,
    CandidateLists,
    EvalProtocol,
    default_cache_dir,
    get_candidates,
    sample_candidates,
)
from mixllm.data.split import DEFAULT_HISTORY_LENGTH, PAD, SPLITS, LeaveOneOutSplit, leave_one_out
from mixllm.data.synthetic import make_synthetic_dataset
from mixllm.data.text import item_text
from mixllm.data.user_data import find_user_dataset_files, load_user_dataset
from mixllm.errors import DataError

DATASETS = ("ml-100k",)


def load_dataset(name_or_path: str | Path) -> InteractionDataset:
    """A named dataset (``"ml-100k"``) or a folder with ``interactions.{csv,parquet}`` and
    ``items.{csv,parquet}`` (see :func:`load_user_dataset`)."""
    if str(name_or_path) == "ml-100k":
        return load_movielens_100k()
    path = Path(name_or_path)
    if path.is_dir():
        return load_user_dataset(*find_user_dataset_files(path), name=path.resolve().name)
    raise DataError(
        f"unknown dataset {str(name_or_path)!r}: use one of {', '.join(DATASETS)} or a folder holding "
        "interactions.csv|parquet and items.csv|parquet"
    )


__all__ = [
    "DATASETS", "DEFAULT_HISTORY_LENGTH", "FULL_RANKING", "MIN_INTERACTIONS_PER_USER", "PAD", "PROTOCOLS",
    "SAMPLED_20", "SAMPLED_100", "SPLITS", "CandidateLists", "EvalProtocol", "InteractionDataset",
    "LeaveOneOutSplit", "Ranker", "RankingBatch", "default_cache_dir", "evaluate", "evaluate_protocols",
    "find_user_dataset_files", "get_candidates", "item_text", "leave_one_out", "load_dataset",
    "load_movielens_100k", "load_user_dataset", "make_batch", "make_synthetic_dataset", "sample_candidates",
]  # fmt: skip
