"""Classical recommenders, each a :class:`mixllm.data.Ranker`: popularity, SASRec, item-text similarity."""

from mixllm.baselines.popularity import PopularityRanker
from mixllm.baselines.sasrec import SASRec, SASRecConfig, load_item_embeddings, training_windows
from mixllm.baselines.text_similarity import TextSimilarityRanker

__all__ = [
    "PopularityRanker", "SASRec", "SASRecConfig", "TextSimilarityRanker", "load_item_embeddings", "training_windows",
]  # fmt: skip
