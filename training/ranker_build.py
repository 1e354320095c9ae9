"""Building a ranker from a recipe: the dataset, the base LLM, the item features (and the SASRec they
may need), the fused model and its :class:`~mixllm.ranking.MixLLMRanker`; and saving it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from mixllm.config import MixLLMConfig
from mixllm.data import InteractionDataset, leave_one_out, load_dataset
from mixllm.errors import DataError
from mixllm.features import item_feature_table, load_sasrec, parse_feature_spec, sasrec_checkpoint_dir
from mixllm.lora import is_lora_key
from mixllm.provenance import atomic_write_text, git_revision
from mixllm.ranking import ItemCatalog, MixLLMRanker
from training.ranker_recipe import RankerRecipe
from training.recipe import CONFIG_DIR, RecipeError

log = logging.getLogger(__name__)

TINY_BASE_MODEL = "tiny-random-llama"
"""``base_model`` value meaning: a 2-layer, 32-wide random Llama (seeded) with the SmolLM2 tokenizer,
built in memory. Its weights are written next to the ranker checkpoint (``ranker/base_model``) so
the checkpoint reloads like any other."""
RUN_INFO_NAME = "training_run.json"


def load_recipe_dataset(recipe: RankerRecipe) -> InteractionDataset:
    if recipe.dataset == "synthetic":
        from mixllm.data import make_synthetic_dataset

        return make_synthetic_dataset(seed=recipe.seed)
    return load_dataset(recipe.dataset)


def load_item_features(recipe: RankerRecipe, dataset: InteractionDataset) -> torch.Tensor | None:
    """(num_items, F) float32 item features for the student (``mixllm.features.item_feature_table``
    of ``recipe.item_features``), or None for "ids"; a missing SASRec is trained first."""
    try:
        if "sasrec" in parse_feature_spec(recipe.item_features):
            load_or_train_sasrec(dataset, recipe.seed, recipe.cache_dir, recipe.progress_bar)
        return item_feature_table(recipe.item_features, dataset, recipe.seed, recipe.cache_dir, recipe.progress_bar)
    except DataError as error:
        raise RecipeError("item_features", str(error)) from None


def load_or_train_sasrec(dataset: InteractionDataset, seed: int, cache_dir: str | None = None, progress: bool = True):
    """The baselines' SASRec for ``seed`` (``mixllm.features.load_sasrec``); if there is no checkpoint
    at ``mixllm.features.sasrec_checkpoint_dir`` yet, one is trained (on the training split,
    early-stopped on validation, ~2 min on CPU) and saved there first, as ``mixllm eval baselines`` does."""
    from mixllm.baselines.sasrec import CONFIG_NAME

    directory = sasrec_checkpoint_dir(dataset.name, seed, cache_dir)
    if not (directory / CONFIG_NAME).is_file():
        from training.sasrec import SASRecTrainConfig, train_sasrec

        log.info("no SASRec checkpoint at %s: training one (seed %d, ~2 min on CPU)", directory, seed)
        model, info = train_sasrec(leave_one_out(dataset), SASRecTrainConfig.from_yaml(CONFIG_DIR / "sasrec.yaml"), seed,
                                   progress_bar=progress)  # fmt: skip
        model.save_pretrained(directory, provenance={"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(),
                                                     "seed": seed, "train": {k: v for k, v in info.items() if k != "history"}})  # fmt: skip
    return load_sasrec(dataset, seed, cache_dir)


def recipe_retriever(recipe: RankerRecipe, dataset: InteractionDataset):
    """(retriever, name) when the recipe needs one (hard negatives, score fusion, SASRec as a teacher):
    FAISS over the baselines' SASRec of ``seed`` (the retriever the reranker serves behind), trained
    first if missing; else (None, None)."""
    if recipe.hard_negatives == 0 and not recipe.needs_retriever_scores:
        return None, None
    from mixllm.retrieval import FaissRetriever

    sasrec = load_or_train_sasrec(dataset, recipe.seed, recipe.cache_dir, recipe.progress_bar)
    return FaissRetriever(sasrec), f"sasrec:{dataset.name}:seed{recipe.seed}"


def history_width(recipe: RankerRecipe) -> int:
    """The longest history the recipe's model reads: H item tokens, or more for the user encoder."""
    return max(recipe.max_history, recipe.user.max_history if recipe.user is not None else 0)


def build_ranker(recipe: RankerRecipe, dataset: InteractionDataset) -> MixLLMRanker:
    """A fresh ranker for the recipe's role: the base LLM, the item (and user) modality of the student,
    a score head. The widths the recipe's sections leave to the data are set here."""
    from mixllm.loading import build, load_language_model, tiny_language_model

    if recipe.base_model == TINY_BASE_MODEL:
        with torch.random.fork_rng(devices=[]):  # the run's seeded draws stay as they were
            language_model, tokenizer = tiny_language_model(recipe.seed)
    else:
        language_model, tokenizer = load_language_model(recipe.base_model)
    item, user, features = None, None, None
    if recipe.role == "student":
        features = load_item_features(recipe, dataset)
        use_ids = features is None or recipe.item_id_embedding
        item = dataclasses.replace(recipe.item, feature_dim=0 if features is None else int(features.shape[1]),
                                   num_items=dataset.num_items if use_ids else 0)  # fmt: skip
        if recipe.user is not None:
            if features is None:
                raise RecipeError("user", "the user encoder reads item feature vectors; item_features: ids has none")
            user = dataclasses.replace(recipe.user, item_dim=int(features.shape[1]))
    config = MixLLMConfig(language_model=recipe.base_model, freeze_language_model=recipe.freeze_language_model,
                          item=item, user=user, lora=recipe.lora)  # fmt: skip
    try:
        model, processor = build(config, language_model=language_model, tokenizer=tokenizer)
    except ValueError as error:
        if "lora" in str(error):
            raise RecipeError("lora.target_modules", str(error)) from None
        raise
    catalog = ItemCatalog(texts=dataset.item_texts, features=features)
    return MixLLMRanker(model, processor, catalog, mode=recipe.role, max_history=recipe.max_history, fusion=recipe.fusion)


def save_ranker(ranker: MixLLMRanker, path: Path, provenance: dict[str, Any]) -> Path:
    """``MixLLMRanker.save_pretrained`` plus ``training_run.json``; a tiny random base LLM is written
    to ``path/base_model`` and referenced from there."""
    config = ranker.model.config
    if config.language_model == TINY_BASE_MODEL:
        base = path / "base_model"
        lm = ranker.model.language_model  # without its LoRA adapters: those live in the mixllm weights
        lm.save_pretrained(base, state_dict={k: v for k, v in lm.state_dict().items() if not is_lora_key(k)})
        ranker.processor.tokenizer.save_pretrained(base)
        config.language_model = str(base.resolve())
    ranker.save_pretrained(path, provenance=provenance)
    atomic_write_text(path / RUN_INFO_NAME, json.dumps({"git_revision": git_revision(), **provenance}, indent=2, default=str))
    return path
