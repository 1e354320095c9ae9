"""Item features: the per-item vectors a student ranker reads, one implementation for training,
evaluation and serving.

A feature *spec* names the parts of the table, joined with ``"+"`` and concatenated in that order:

* ``"minilm"``: MiniLM-L6 embeddings of the item texts (:data:`MINILM_DIM` wide), computed once
  and cached on disk by the dataset's fingerprint (:func:`minilm_item_features`);
* ``"sasrec"``: the item embeddings of the baselines' SASRec for a seed, stored at
  :func:`sasrec_checkpoint_dir` by ``mixllm eval baselines`` (:func:`sasrec_item_features`);
* a path: a stored ``(num_items, F)`` table (``.npy``, ``.pt``, a one-tensor ``.safetensors``, or a
  SASRec checkpoint folder; :func:`load_feature_table`);
* ``"ids"`` alone: no features at all (a learned id embedding only).

So ``"minilm+sasrec"`` is a ``(num_items, 384 + D_sasrec)`` table; :class:`FeatureLayout` says
which columns of a checkpoint's stored features came from which part.

Row i of every table is item index i of the dataset. Cached files live under the cache root:
``cache_dir`` when given, else ``$MIXLLM_HOME`` (:func:`mixllm.assets.mixllm_home`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixllm.errors import DataError
from mixllm.provenance import atomic_write

if TYPE_CHECKING:
    from mixllm.data import InteractionDataset

log = logging.getLogger(__name__)

MINILM_DIM = 384
"""Width of a MiniLM-L6 (all-MiniLM-L6-v2) sentence embedding: the ``"minilm"`` part's columns."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` when given, else ``$MIXLLM_HOME`` (the asset cache)."""
    from mixllm.assets import mixllm_home

    return Path(cache_dir) if cache_dir else mixllm_home()


# --- the spec ------------------------------------------------------------------------------------
def parse_feature_spec(spec: str) -> list[str]:
    """``"minilm+sasrec"`` -> ``["minilm", "sasrec"]``; ``"ids"`` -> ``[]`` (no features).

    Raises:
        DataError: an empty spec or part, or "ids" combined with features.
    """
    parts = spec.split("+") if isinstance(spec, str) else []
    if not parts or not all(parts):
        raise DataError(f"must be 'minilm', 'sasrec', 'ids', a path, or a '+'-joined list of them, got {spec!r}")
    if "ids" in parts:
        if spec != "ids":
            raise DataError("'ids' cannot be combined with features; use item_id_embedding: true")
        return []
    return parts


def item_feature_table(
    spec: str, dataset: InteractionDataset, seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True
) -> torch.Tensor | None:
    """The ``(num_items, F)`` float32 table ``spec`` names (parts concatenated in order), or None for "ids".

    ``seed`` picks the SASRec checkpoint of a "sasrec" part.

    Raises:
        DataError: a bad spec, a missing SASRec checkpoint or table, or a table of the wrong shape.
    """
    parts = parse_feature_spec(spec)
    if not parts:
        return None
    tables = []
    for part in parts:
        if part == "minilm":
            tables.append(minilm_item_features(dataset, cache_dir, progress))
        elif part == "sasrec":
            tables.append(sasrec_item_features(dataset, seed, cache_dir))
        else:
            tables.append(load_feature_table(part, dataset.num_items))
    return torch.cat(tables, dim=1)


# --- MiniLM --------------------------------------------------------------------------------------
def minilm_item_features(
    dataset: InteractionDataset, cache_dir: str | Path | None = None, progress: bool = True
) -> torch.Tensor:
    """(num_items, 384) MiniLM-L6 embeddings of ``dataset.item_texts``, cached on disk by the dataset
    fingerprint (``<cache root>/item_features/<name>_<fingerprint>_minilm.pt``)."""
    path = cache_root(cache_dir) / "item_features" / f"{dataset.name}_{dataset.fingerprint()[:16]}_minilm.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from mixllm.encoders.text import SentenceEncoder

    features = SentenceEncoder.from_pretrained().encode(dataset.item_texts, show_progress=progress)
    with atomic_write(path) as tmp:
        torch.save(features, tmp)
    log.info("cached MiniLM item features %s", path)
    return features


# --- SASRec --------------------------------------------------------------------------------------
def sasrec_checkpoint_dir(dataset_name: str, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Where the baselines' SASRec of ``seed`` on ``dataset_name`` lives:
    ``<cache root>/checkpoints/sasrec-<dataset>-seed<seed>`` (written by ``mixllm eval baselines``)."""
    return cache_root(cache_dir) / "checkpoints" / f"sasrec-{dataset_name}-seed{seed}"


def load_sasrec(dataset: InteractionDataset, seed: int, cache_dir: str | Path | None = None):
    """The stored SASRec of ``seed`` for ``dataset`` (:func:`sasrec_checkpoint_dir`), in eval mode.

    Raises:
        DataError: no checkpoint there, or one trained on another version of the dataset (its
            recorded fingerprint differs).
    """
    from mixllm.baselines.sasrec import CONFIG_NAME, SASRec

    directory = sasrec_checkpoint_dir(dataset.name, seed, cache_dir)
    config = directory / CONFIG_NAME
    if not config.is_file():
        where = "" if cache_dir is None else f" --checkpoint-dir {directory.parent}"
        raise DataError(
            f"no SASRec checkpoint for {dataset.name} seed {seed} at {directory}: train it with "
            f"`mixllm eval baselines --dataset {dataset.source or dataset.name} --seed {seed} --models sasrec{where}`"
        )
    recorded = json.loads(config.read_text()).get("provenance", {}).get("dataset_fingerprint")
    if recorded is not None and recorded != dataset.fingerprint():
        raise DataError(f"{directory} was trained on another version of {dataset.name}; delete it to retrain")
    return SASRec.from_pretrained(directory)


def sasrec_item_features(dataset: InteractionDataset, seed: int, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(num_items, D) float32 item embeddings of :func:`load_sasrec`'s model."""
    return load_sasrec(dataset, seed, cache_dir).item_embeddings().detach().float().clone()


# --- stored tables -------------------------------------------------------------------------------
def load_feature_table(path: str | Path, num_items: int | None) -> torch.Tensor:
    """A stored ``(num_items, F)`` float32 table: ``.npy``, ``.pt`` (one tensor), a ``.safetensors``
    holding one tensor, or a SASRec checkpoint folder (its ``item_embeddings.safetensors``).
    ``num_items=None`` accepts any row count.

    Raises:
        DataError: naming the path: missing, not one table, not 2-D with ``num_items`` rows, or not finite.
    """
    path = Path(path)
    if path.is_dir():
        from mixllm.baselines.sasrec import ITEM_EMBEDDINGS_NAME

        path = path / ITEM_EMBEDDINGS_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no such file (a part of the item features is 'minilm', 'sasrec', or a .npy, .pt or "
            ".safetensors table or SASRec checkpoint folder; 'ids' stands alone)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tables = load_file(path)
        if len(tables) != 1:
            raise DataError(f"{path} holds {sorted(tables)}; expected one (num_items, F) table")
        table = next(iter(tables.values()))
    elif path.suffix == ".npy":
        table = np.load(path)
    else:
        table = torch.load(path, weights_only=True)
    if not isinstance(table, (torch.Tensor, np.ndarray)):
        raise DataError(f"{path} holds a {type(table).__name__}; expected one (num_items, F) tensor")
    table = torch.as_tensor(table, dtype=torch.float32)
    rows = "num_items" if num_items is None else num_items
    if table.dim() != 2 or (num_items is not None and table.shape[0] != num_items):
        raise DataError(f"{path} has shape {tuple(table.shape)}; expected ({rows}, F)")
    if not torch.isfinite(table).all():
        raise DataError(f"{path} holds NaN or infinite values")
    return table


# --- which columns are which ---------------------------------------------------------------------
@dataclass
class FeatureLayout:
    """Which columns of a feature table each spec part fills.

    Example: ``FeatureLayout.from_spec("minilm+sasrec", 448).parts == [("minilm", 0, 384),
    ("sasrec", 384, 448)]``, and ``table[:, layout.slice("sasrec")]`` is the SASRec part.
    """

    parts: list[tuple[str, int, int]]
    """(spec part, first column, column after the last), in column order."""

    @property
    def names(self) -> list[str]:
        """The parts' names, in column order."""
        return [name for name, _, _ in self.parts]

    @property
    def width(self) -> int:
        """F: the table's total width (0 without features)."""
        return self.parts[-1][2] if self.parts else 0

    def slice(self, name: str) -> slice:
        """The columns of part ``name`` (e.g. ``"minilm"``).

        Raises:
            KeyError: no part has that name (the message lists the parts).
        """
        for part, start, stop in self.parts:
            if part == name:
                return slice(start, stop)
        raise KeyError(f"no feature part {name!r}; this layout has {self.names}")

    @classmethod
    def from_spec(cls, spec: str, total_width: int) -> FeatureLayout:
        """The layout of a ``total_width``-wide table made from ``spec``.

        "minilm" is :data:`MINILM_DIM` wide, a path part as wide as its table (read only when its
        width is needed: one part of unknown width takes the rest), "sasrec" the rest.

        Raises:
            DataError: a bad spec, widths that cannot add up to ``total_width``, or more than one
                part of unknown width.
        """
        names = parse_feature_spec(spec)
        widths: list[int | None] = [MINILM_DIM if n == "minilm" else None for n in names]
        unknown = [i for i, w in enumerate(widths) if w is None]
        if len(unknown) > 1:  # read the path tables' widths; only SASRec may still take "the rest"
            for i in unknown:
                if names[i] != "sasrec":
                    widths[i] = int(load_feature_table(names[i], None).shape[1])
            unknown = [i for i, w in enumerate(widths) if w is None]
        if len(unknown) > 1:
            raise DataError(f"item features {spec!r}: cannot tell the widths of {[names[i] for i in unknown]} apart")
        known = sum(w for w in widths if w is not None)
        if unknown:
            widths[unknown[0]] = total_width - known
        if any(w < 1 for w in widths) or sum(widths) != total_width:
            raise DataError(f"item features {spec!r} ({dict(zip(names, widths))}) do not add up to width {total_width}")
        starts = np.cumsum([0, *widths]).tolist()
        return cls([(name, start, stop) for name, start, stop in zip(names, starts[:-1], starts[1:])])

    @classmethod
    def from_checkpoint(cls, ranker_dir: str | Path) -> FeatureLayout:
        """The layout of a ranker checkpoint's item features: the spec from ``training_run.json``
        (``recipe.item_features``), the width from ``mixllm_config.json`` (``item.feature_dim``).
        A checkpoint without item features (a teacher, an "ids" student) has an empty layout.

        Raises:
            DataError: a file is missing or holds no spec, or the spec does not fit the width.
        """
        from mixllm.modeling import CONFIG_NAME

        ranker_dir = Path(ranker_dir)
        config_file, run_file = ranker_dir / CONFIG_NAME, ranker_dir / "training_run.json"
        for file in (config_file, run_file):
            if not file.is_file():
                raise DataError(f"{ranker_dir} is not a trained ranker checkpoint: {file.name} is missing")
        item = json.loads(config_file.read_text()).get("config", {}).get("item") or {}
        width = int(item.get("feature_dim", 0))
        if width == 0:
            return cls([])
        spec = json.loads(run_file.read_text()).get("recipe", {}).get("item_features")
        if not spec:
            raise DataError(f"{run_file} records no recipe.item_features for the {width}-wide item features")
        try:
            return cls.from_spec(spec, width)
        except DataError as error:
            raise DataError(f"{run_file}: {error}") from None


# --- items the collaborative model never saw ------------------------------------------------------
NEIGHBOURS = 10
"""How many text neighbours a cold item's collaborative vector is mixed from (retrieval)."""


def neighbour_weights(query: torch.Tensor, keys: torch.Tensor, k: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n, k), weights (n, k)) of each query's k most cosine-similar keys; weights are
    max(cos, 0) normalised to sum 1, or uniform when no neighbour is positive.

    ``query`` (n, d) and ``keys`` (N, d) are L2-normalised (MiniLM's vectors are)."""
    sims = query.float() @ keys.float().T  # (n, N)
    top, rows = sims.topk(min(k, keys.shape[0]), dim=-1)  # (n, k)
    weights = top.clamp(min=0)
    total = weights.sum(-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return rows, torch.where(total > 0, weights / total.clamp(min=1e-12), uniform)


def neighbour_mean(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """(n, c) the :func:`neighbour_weights`-weighted mean of ``values`` (N, c) (row i belongs to key i)."""
    rows, weights = neighbour_weights(query, keys, k)
    return torch.einsum("nk,nkc->nc", weights, values[rows].float())
