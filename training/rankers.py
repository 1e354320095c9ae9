"""Train the Mix-LLM rankers with Lightning: the textual teacher, and the student distilled from it.

One loop, two roles, one recipe dataclass (:class:`RankerRecipe`) mirrored 1:1 by the YAML files in
``training/configs/`` (``teacher*.yaml``, ``student*.yaml``)::

    mixllm train teacher --config training/configs/teacher.yaml
    mixllm train student --config training/configs/student.yaml      # scores its lists with the teacher once

Training lists come from the leave-one-out *training* split: per user, ``targets_per_user`` positions
of the training sequence are targets, the ``history_length`` items before each are its history, and
``num_negatives`` items the user never interacted with are drawn (seeded) as negatives. The target
lands at a random column of its list (the ranker is order-invariant, so this only guards the loss
and the metrics against a fixed answer column).

Distillation never runs the teacher during training: :func:`score_lists_with_teacher` scores the
student's lists once and :func:`save_teacher_scores` writes lists + scores to one ``.pt`` file keyed
by the lists' fingerprint; the student trains on exactly the stored lists (checked element-wise).

Outputs under ``output_dir``: ``ranker/`` (``MixLLMRanker.save_pretrained`` + ``training_run.json``
with recipe and provenance), ``checkpoints/last.ckpt`` (Lightning, for ``--resume``; it holds the
trainable parameters only, the frozen base LLM is referenced), ``logs/`` (CSVLogger).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.data import PAD, PROTOCOLS, InteractionDataset, LeaveOneOutSplit, get_candidates, leave_one_out, load_dataset
from mixllm.errors import DataError
from mixllm.features import item_feature_table, load_sasrec, parse_feature_spec, sasrec_checkpoint_dir
from mixllm.lora import LoRAConfig, is_lora_key
from mixllm.metrics import ranking_metrics
from mixllm.provenance import atomic_write, atomic_write_text, git_revision
from mixllm.ranking import ItemCatalog, MixLLMRanker, RankingInputs, RankingRequest
from training.recipe import CONFIG_DIR, RecipeError, keep_trainable_only, parse_overrides, read_recipe, start_run

log = logging.getLogger(__name__)

TINY_BASE_MODEL = "tiny-random-llama"
"""``base_model`` value meaning: a 2-layer, 32-wide random Llama (seeded) with the SmolLM2 tokenizer,
built in memory. Its weights are written next to the ranker checkpoint (``ranker/base_model``) so
the checkpoint reloads like any other."""
SMOLLM2_TOKENIZER = "smollm2-135m-instruct"
LISTS_VERSION = 1
"""Bump when :func:`build_training_lists` changes, so stored teacher scores of old lists are refused."""
ROLES = ("teacher", "student")
FINE_TUNING = ("frozen", "lora", "full")
RUN_INFO_NAME = "training_run.json"


# --- the recipe ----------------------------------------------------------------------------------
@dataclass
class RankerRecipe:
    """Everything one ranker training run depends on. YAML recipes mirror these fields 1:1."""

    role: str = "teacher"
    """"teacher" (items as text) or "student" (items as embedding tokens); must match the CLI role."""
    dataset: str = "ml-100k"
    """"ml-100k", "synthetic" (``make_synthetic_dataset(seed=seed)``, for smoke runs) or a folder with
    interactions/items files (see ``mixllm.data.load_dataset``)."""
    history_length: int = 10
    """H: most recent items before the target that the ranker reads."""
    num_negatives: int = 9
    """Negatives per training list (list size = 1 + num_negatives), drawn from items the user never
    interacted with."""
    targets_per_user: int = 5
    """Positions of each user's training sequence used as targets (seeded sample; fewer if short)."""
    limit_train_users: int | None = None
    """Only the first N users make training lists (tiny runs); None = all."""
    val_protocol: str = "sampled-20"
    """Validation candidate lists: a sampled protocol of ``mixllm.data.PROTOCOLS`` (validation targets)."""
    limit_val_users: int | None = None
    """Only the first N users are validated; None = all."""
    base_model: str = "smollm2-135m-instruct"
    """Base LLM: a packaged asset name, a local transformers directory, or "tiny-random-llama"."""
    item_features: str = "minilm"
    """Student only. "minilm" (MiniLM-L6 embeddings of the item texts, computed once and cached),
    "sasrec" (the baselines' SASRec item embeddings for ``seed``; trained first if missing), a path to
    a (num_items, F) table (.npy, .pt, a one-tensor .safetensors, or a SASRec checkpoint folder),
    several of these joined with "+" (concatenated, e.g. "minilm+sasrec"), or "ids" (no features: a
    learned id embedding only)."""
    item_id_embedding: bool = False
    """Student only: add a learned item-id embedding to the features (always on with "ids")."""
    id_dim: int = 64
    """Width of the learned id embedding."""
    tokens_per_item: int = 1
    """Student only: k tokens each item becomes."""
    projector: str = "mlp2x_gelu"
    """Item projector: "linear" or "mlp2x_gelu"."""
    fine_tuning: str = "frozen"
    """"frozen": the LLM is fixed; encoders, projector and score head train. "lora": low-rank
    adapters on the LLM's ``lora_targets`` train too (the checkpoint stores the adapters only; the
    base LLM stays referenced). "full": the whole LLM trains (and goes into the checkpoint)."""
    lora_rank: int = 8
    """LoRA r (fine_tuning: lora)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: adapter output x alpha / r."""
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layers of the LLM that get adapters (last name component)."""
    lr: float = 1e-3
    """AdamW learning rate (constant) over trainable parameters only."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_epochs: int = 1
    """Epochs over the training lists."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = no limit)."""
    batch_size: int = 8
    """Lists per step (per device)."""
    gradient_clip_val: float | None = 1.0
    """Gradient norm clipping; None = off."""
    temperature: float = 2.0
    """T of the distillation KL (student only)."""
    alpha: float = 0.5
    """Weight of the distillation KL: loss = alpha * T^2 * KL + (1 - alpha) * CE. 0 = labels only
    (the ablation; no teacher scores needed). Must be 0 for the teacher."""
    teacher_scores: str | None = None
    """Student with alpha > 0: the stored teacher scores (.pt). Read if it exists; otherwise written
    once by scoring the student's lists with ``teacher_checkpoint``."""
    teacher_checkpoint: str | None = None
    """Student: the teacher ranker checkpoint (``ranker/`` of a teacher run) used to make
    ``teacher_scores`` when that file does not exist yet."""
    teacher_batch_size: int = 8
    """Lists per teacher forward when scoring."""
    output_dir: str = "runs/ranker"
    """Where ``ranker/``, ``checkpoints/`` and ``logs/`` go."""
    cache_dir: str | None = None
    """Root for cached item features and validation candidate lists; None = ``$MIXLLM_HOME``."""
    seed: int = 0
    """Seeds lists, initialisation and data order."""
    accelerator: str = "auto"
    """Lightning accelerator ("cpu", "gpu", "auto")."""
    devices: int | str = 1
    """Lightning devices (an int or "auto")."""
    strategy: str = "auto"
    """Lightning strategy ("auto", "ddp", ...)."""
    precision: str = "32-true"
    """Lightning precision ("32-true", "bf16-mixed", ...)."""
    num_threads: int | None = None
    """torch CPU threads per process; None = torch's default."""
    val_check_interval: float | int = 1.0
    """Lightning val_check_interval (fraction of an epoch or a step count)."""
    checkpoint_every_n_steps: int = 200
    """Write ``checkpoints/last.ckpt`` every N steps (and always at the end)."""
    log_every_n_steps: int = 10
    """Logging interval in steps."""
    fast_dev_run: int = 0
    """Lightning fast_dev_run: N > 0 runs N train + N val batches and nothing else (smoke tests)."""
    progress_bar: bool = True
    """Lightning's progress bar."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RecipeError("role", f"must be one of {ROLES}, got {self.role!r}")
        for name in ("history_length", "num_negatives", "targets_per_user", "batch_size", "max_epochs",
                     "tokens_per_item", "id_dim", "teacher_batch_size", "checkpoint_every_n_steps", "log_every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("limit_train_users", "limit_val_users", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RecipeError(name, f"must be an integer >= 1 or null, got {value!r}")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise RecipeError("max_steps", f"must be >= 1 or -1 (no limit), got {self.max_steps!r}")
        if not isinstance(self.fast_dev_run, int) or self.fast_dev_run < 0:
            raise RecipeError("fast_dev_run", f"must be an integer >= 0, got {self.fast_dev_run!r}")
        if self.val_protocol not in PROTOCOLS or PROTOCOLS[self.val_protocol].is_full_ranking:
            sampled = [n for n, p in PROTOCOLS.items() if not p.is_full_ranking]
            raise RecipeError("val_protocol", f"must be a sampled protocol {sampled}, got {self.val_protocol!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise RecipeError("lora_rank", f"must be an integer >= 1, got {self.lora_rank!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise RecipeError("lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        if (isinstance(self.lora_targets, str) or not self.lora_targets
                or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise RecipeError("lora_targets", f"must be a non-empty list of layer names, got {self.lora_targets!r}")
        if self.fine_tuning not in FINE_TUNING:
            raise RecipeError("fine_tuning", f"must be one of {FINE_TUNING}, got {self.fine_tuning!r}")
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise RecipeError("projector", f"must be 'linear' or 'mlp2x_gelu', got {self.projector!r}")
        if not self.lr > 0:
            raise RecipeError("lr", f"must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise RecipeError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if not self.temperature > 0:
            raise RecipeError("temperature", f"must be > 0, got {self.temperature!r}")
        if not 0 <= self.alpha <= 1:
            raise RecipeError("alpha", f"must be in [0, 1], got {self.alpha!r}")
        try:
            parse_feature_spec(self.item_features)
        except DataError as error:
            raise RecipeError("item_features", str(error)) from None
        if self.role == "teacher" and self.alpha != 0:
            raise RecipeError("alpha", "the teacher trains on labels only; set alpha: 0")
        if self.role == "student" and self.alpha > 0 and not self.teacher_scores:
            raise RecipeError("teacher_scores", "distillation (alpha > 0) needs the path of the stored teacher scores")
        if self.batch_size < 1:
            raise RecipeError("batch_size", "must be >= 1")

    @property
    def list_size(self) -> int:
        return 1 + self.num_negatives

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RankerRecipe:
        """Read a recipe (a bare file name is looked up in ``training/configs``); ``overrides`` win."""
        return read_recipe(cls, path, overrides)

    def replace(self, **changes: Any) -> RankerRecipe:
        return dataclasses.replace(self, **changes)


# --- data ----------------------------------------------------------------------------------------
def load_recipe_dataset(recipe: RankerRecipe) -> InteractionDataset:
    if recipe.dataset == "synthetic":
        from mixllm.data import make_synthetic_dataset

        return make_synthetic_dataset(seed=recipe.seed)
    return load_dataset(recipe.dataset)


@dataclass
class CandidateListSet:
    """Ranking lists: one user, history and candidate list per row."""

    users: np.ndarray
    """(N,) user index of each list."""
    histories: np.ndarray
    """(N, H) history items, left-padded with PAD, most recent last."""
    candidates: np.ndarray
    """(N, C) candidate items."""
    target_index: np.ndarray
    """(N,) column of the target in ``candidates``."""
    key: str = ""
    """Hash of what the lists were built from (dataset, list settings, seed)."""

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


def training_lists_key(split: LeaveOneOutSplit, recipe: RankerRecipe) -> str:
    payload = {
        "dataset": split.dataset.fingerprint(), "history_length": recipe.history_length,
        "num_negatives": recipe.num_negatives, "targets_per_user": recipe.targets_per_user,
        "limit_train_users": recipe.limit_train_users, "seed": recipe.seed, "version": LISTS_VERSION,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_training_lists(split: LeaveOneOutSplit, recipe: RankerRecipe) -> CandidateListSet:
    """Lists from the training split: target positions t >= 1 per user (seeded), history = the H
    items before t, negatives = ``num_negatives`` items the user never interacted with; each list is
    shuffled so the target's column is random."""
    rng = np.random.default_rng([recipe.seed, LISTS_VERSION])
    num_users = split.num_users if recipe.limit_train_users is None else min(recipe.limit_train_users, split.num_users)
    H, n_neg = recipe.history_length, recipe.num_negatives
    all_items = np.arange(split.num_items)
    users, histories, candidates, targets = [], [], [], []
    for user in range(num_users):
        sequence = split.train_sequence(user)
        positions = np.arange(1, len(sequence))
        if len(positions) == 0:
            continue
        chosen = np.sort(rng.choice(positions, size=min(recipe.targets_per_user, len(positions)), replace=False))
        pool = np.setdiff1d(all_items, split.interacted_items(user))
        if len(pool) < n_neg:
            raise RecipeError("num_negatives", f"user {user} has only {len(pool)} items they never interacted with")
        for t in chosen:
            history = np.full(H, PAD, dtype=np.int64)
            past = sequence[max(0, t - H) : t]
            history[H - len(past) :] = past
            row = np.concatenate([[sequence[t]], rng.choice(pool, size=n_neg, replace=False)])
            order = rng.permutation(len(row))
            users.append(user)
            histories.append(history)
            candidates.append(row[order])
            targets.append(int(np.argmax(order == 0)))
    if not users:
        raise RecipeError("limit_train_users", "no training lists: no user has two or more training items")
    return CandidateListSet(
        np.asarray(users, dtype=np.int64), np.stack(histories), np.stack(candidates).astype(np.int64),
        np.asarray(targets, dtype=np.int64), training_lists_key(split, recipe),
    )  # fmt: skip


def build_validation_lists(split: LeaveOneOutSplit, recipe: RankerRecipe) -> CandidateListSet:
    """The validation targets with the protocol's cached candidate lists (``val_protocol``)."""
    cache = None if recipe.cache_dir is None else Path(recipe.cache_dir) / "candidates"
    lists = get_candidates(split, PROTOCOLS[recipe.val_protocol], "valid", recipe.seed, cache)
    n = split.num_users if recipe.limit_val_users is None else min(recipe.limit_val_users, split.num_users)
    users = np.arange(n)
    return CandidateListSet(
        users, split.histories("valid", recipe.history_length, users), lists.candidates[:n], lists.target_index[:n], lists.key
    )


class _Rows(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class ListCollator:
    """List indices -> ``{"inputs": RankingInputs, "target_index": (B,), "teacher_scores": (B, C) | None}``."""

    def __init__(self, ranker: MixLLMRanker, lists: CandidateListSet, teacher_scores: torch.Tensor | None = None):
        self.ranker, self.lists, self.teacher_scores = ranker, lists, teacher_scores

    def __call__(self, rows: list[int]) -> dict[str, Any]:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        return {
            "inputs": self.ranker.prepare([self.lists.request(i) for i in rows]),
            "target_index": torch.from_numpy(self.lists.target_index[rows]),
            "teacher_scores": None if self.teacher_scores is None else self.teacher_scores[rows_t],
        }


class RankerDataModule(L.LightningDataModule):
    """Training lists (with stored teacher scores for distillation) and validation lists."""

    def __init__(self, ranker: MixLLMRanker, recipe: RankerRecipe, train_lists: CandidateListSet,
                 val_lists: CandidateListSet, teacher_scores: torch.Tensor | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.train_collate = ListCollator(ranker, train_lists, teacher_scores)
        self.val_collate = ListCollator(ranker, val_lists)
        self.num_train, self.num_val = len(train_lists), len(val_lists)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return DataLoader(_Rows(self.num_train), batch_size=self.recipe.batch_size, shuffle=True,
                          generator=generator, collate_fn=self.train_collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.num_val), batch_size=self.recipe.batch_size, collate_fn=self.val_collate)


# --- teacher scores, computed once ---------------------------------------------------------------
@torch.no_grad()
def score_lists_with_teacher(teacher: MixLLMRanker, lists: CandidateListSet, batch_size: int = 8,
                             progress: bool = True, bf16: bool = False) -> torch.Tensor:
    """(N, C) float32 teacher scores of every list, in the lists' candidate order; ``bf16`` runs the
    forwards under bfloat16 autocast (the precision the recipe trains in; ~1.6x faster on CPU)."""
    from tqdm.auto import tqdm

    teacher.eval()
    device = next(teacher.parameters()).device
    out = torch.empty(len(lists), lists.candidates.shape[1])
    for start in tqdm(range(0, len(lists), batch_size), desc="teacher scoring", unit="batch", disable=not progress):
        rows = range(start, min(start + batch_size, len(lists)))
        inputs = teacher.prepare([lists.request(i) for i in rows]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out[start : start + len(rows)] = teacher(inputs).float().cpu()
    return out


def save_teacher_scores(path: str | Path, lists: CandidateListSet, scores: torch.Tensor, meta: dict | None = None) -> Path:
    """Write the lists and their teacher scores together (atomically)."""
    path = Path(path)
    payload = {
        "key": lists.key, "digest": lists.digest(), "users": torch.from_numpy(lists.users),
        "histories": torch.from_numpy(lists.histories), "candidates": torch.from_numpy(lists.candidates),
        "target_index": torch.from_numpy(lists.target_index), "scores": scores.float(), "meta": meta or {},
    }  # fmt: skip
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    log.info("wrote teacher scores of %d lists to %s", len(lists), path)
    return path


def load_teacher_scores(path: str | Path, expected: CandidateListSet) -> tuple[CandidateListSet, torch.Tensor]:
    """The stored lists and scores; refuses a file whose lists are not exactly ``expected``."""
    stored = torch.load(Path(path), weights_only=True)
    lists = CandidateListSet(
        stored["users"].numpy(), stored["histories"].numpy(), stored["candidates"].numpy(),
        stored["target_index"].numpy(), stored["key"],
    )  # fmt: skip
    if lists.key != expected.key or not lists.equals(expected):
        raise RecipeError(
            "teacher_scores",
            f"{path} holds scores of other lists (key {lists.key[:12]}, this recipe's lists {expected.key[:12]}); "
            "delete it to score this recipe's lists with teacher_checkpoint",
        )
    return lists, stored["scores"]


def ensure_teacher_scores(recipe: RankerRecipe, lists: CandidateListSet, catalog_texts: list[str]) -> tuple[CandidateListSet, torch.Tensor]:
    """Load the stored teacher scores, scoring the lists once with ``teacher_checkpoint`` if missing."""
    path = Path(recipe.teacher_scores)
    if not path.is_file():
        if not recipe.teacher_checkpoint:
            raise RecipeError("teacher_checkpoint", f"{path} does not exist; give the teacher checkpoint to score the lists")
        teacher = MixLLMRanker.from_pretrained(recipe.teacher_checkpoint, ItemCatalog(texts=catalog_texts))
        if teacher.mode != "teacher":
            raise RecipeError("teacher_checkpoint", f"{recipe.teacher_checkpoint} is a {teacher.mode} ranker, not a teacher")
        if recipe.accelerator == "gpu" or (recipe.accelerator == "auto" and torch.cuda.is_available()):
            teacher.to("cuda")
        bf16 = recipe.precision.startswith("bf16")
        start = time.perf_counter()
        scores = score_lists_with_teacher(teacher, lists, recipe.teacher_batch_size, recipe.progress_bar, bf16)
        meta = {"teacher_checkpoint": str(recipe.teacher_checkpoint), "bf16": bf16, "time_s": time.perf_counter() - start}
        save_teacher_scores(path, lists, scores, meta)
        del teacher
    return load_teacher_scores(path, lists)


# --- the model -----------------------------------------------------------------------------------
def make_tiny_base_model(seed: int = 0):
    """A 2-layer, 32-wide random Llama over the SmolLM2 tokenizer (built in memory, seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from mixllm.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2_TOKENIZER))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


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


def build_ranker(recipe: RankerRecipe, dataset: InteractionDataset) -> MixLLMRanker:
    """A fresh ranker for the recipe's role: the base LLM, the item modality (student), a score head."""
    from mixllm.loading import build, load_language_model

    if recipe.base_model == TINY_BASE_MODEL:
        language_model, tokenizer = make_tiny_base_model(recipe.seed)
    else:
        language_model, tokenizer = load_language_model(recipe.base_model)
    texts = dataset.item_texts
    item, features = None, None
    if recipe.role == "student":
        features = load_item_features(recipe, dataset)
        use_ids = features is None or recipe.item_id_embedding
        item = ItemConfig(
            feature_dim=0 if features is None else int(features.shape[1]), num_items=dataset.num_items if use_ids else 0,
            id_dim=recipe.id_dim, tokens_per_item=recipe.tokens_per_item, projector=recipe.projector,
        )  # fmt: skip
    lora = None
    if recipe.fine_tuning == "lora":
        lora = LoRAConfig(rank=recipe.lora_rank, alpha=float(recipe.lora_alpha), target_modules=list(recipe.lora_targets))
    config = MixLLMConfig(
        language_model=recipe.base_model, freeze_language_model=recipe.fine_tuning != "full", item=item, lora=lora
    )
    try:
        model, processor = build(config, language_model=language_model, tokenizer=tokenizer)
    except ValueError as error:
        if "lora" in str(error):
            raise RecipeError("lora_targets", str(error)) from None
        raise
    return MixLLMRanker(
        model, processor, ItemCatalog(texts=texts, features=features), mode=recipe.role, max_history=recipe.history_length
    )


# --- loss and the LightningModule ----------------------------------------------------------------
def ranking_loss(
    scores: torch.Tensor, target_index: torch.Tensor, teacher_scores: torch.Tensor | None = None,
    temperature: float = 1.0, alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Listwise loss over each candidate list.

    CE = -log softmax(s)[target]; KL = T^2 * KL(softmax(t / T) || softmax(s / T)) (batch mean);
    loss = alpha * KL + (1 - alpha) * CE, or CE alone without teacher scores or with alpha = 0.
    """
    ce = F.cross_entropy(scores.float(), target_index)
    if teacher_scores is None or alpha == 0:
        return ce, {"ce": ce}
    kl = F.kl_div(
        F.log_softmax(scores.float() / temperature, dim=-1), F.log_softmax(teacher_scores.float() / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    ) * temperature**2  # fmt: skip
    return alpha * kl + (1 - alpha) * ce, {"ce": ce, "kl": kl}


VAL_METRICS = ("hr@1", "ndcg@5", "mrr")


class RankerModule(L.LightningModule):
    """Thin: the library ranker, the listwise loss, logging, AdamW over trainable parameters."""

    def __init__(self, ranker: MixLLMRanker, recipe: RankerRecipe) -> None:
        super().__init__()
        self.ranker, self.recipe = ranker, recipe
        self.strict_loading = False  # Lightning checkpoints hold the trainable parameters only
        self.ranker.train()  # build() returns eval mode; Lightning keeps a module's mode

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        return {k: v.to(device) if isinstance(v, (torch.Tensor, RankingInputs)) else v for k, v in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scores = self.ranker(batch["inputs"])  # (B, C)
        alpha = self.recipe.alpha if self.recipe.role == "student" else 0.0
        loss, parts = ranking_loss(scores, batch["target_index"], batch["teacher_scores"], self.recipe.temperature, alpha)
        size = len(scores)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores = self.ranker(batch["inputs"])  # (B, C)
        values = ranking_metrics(scores.float(), batch["target_index"], VAL_METRICS)
        for name, value in values.items():
            self.log(f"val/{name}", value.mean().float(), prog_bar=name == "hr@1", batch_size=len(scores), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.recipe.lr, weight_decay=self.recipe.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_only(self, checkpoint)


# --- the loop ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Where a run's outputs went and what it measured."""

    ranker_dir: Path
    lightning_checkpoint: Path | None
    metrics: dict[str, float]
    global_step: int
    ranker: MixLLMRanker


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def train_ranker(recipe: RankerRecipe, resume: str | Path | None = None) -> TrainResult:
    """Build lists and the ranker for ``recipe``, train, and write the checkpoints (see module doc)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    start_run(recipe.num_threads, recipe.seed, resume)
    output_dir = Path(recipe.output_dir)
    dataset = load_recipe_dataset(recipe)
    split = leave_one_out(dataset)
    train_lists = build_training_lists(split, recipe)
    val_lists = build_validation_lists(split, recipe)
    teacher_scores = None
    if recipe.role == "student" and recipe.alpha > 0:
        if not Path(recipe.teacher_scores).is_file() and not _is_global_zero():
            raise RecipeError("teacher_scores", "missing on a non-zero rank: score the lists before launching DDP")
        train_lists, teacher_scores = ensure_teacher_scores(recipe, train_lists, dataset.item_texts)
    ranker = build_ranker(recipe, dataset)
    module = RankerModule(ranker, recipe)
    data = RankerDataModule(ranker, recipe, train_lists, val_lists, teacher_scores)
    checkpoints = output_dir / "checkpoints"
    trainer = L.Trainer(
        accelerator=recipe.accelerator, devices=recipe.devices, strategy=recipe.strategy, precision=recipe.precision,
        max_epochs=recipe.max_epochs, max_steps=recipe.max_steps, fast_dev_run=recipe.fast_dev_run or False,
        gradient_clip_val=recipe.gradient_clip_val, val_check_interval=recipe.val_check_interval,
        log_every_n_steps=recipe.log_every_n_steps, num_sanity_val_steps=0, default_root_dir=output_dir,
        logger=CSVLogger(output_dir, name="logs"), enable_progress_bar=recipe.progress_bar, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0,
                                   every_n_train_steps=recipe.checkpoint_every_n_steps)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=None if resume is None else str(resume))
    train_time = time.perf_counter() - start
    last = None
    if not recipe.fast_dev_run:
        last = checkpoints / "last.ckpt"
        trainer.save_checkpoint(last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ranker_dir = output_dir / "ranker"
    if trainer.is_global_zero:
        provenance = {
            "role": recipe.role, "recipe": asdict(recipe), "dataset": {"name": dataset.name, "source": dataset.source,
            "fingerprint": dataset.fingerprint()}, "seed": recipe.seed, "train_lists": {"key": train_lists.key,
            "digest": train_lists.digest(), "count": len(train_lists)}, "val_lists": {"protocol": recipe.val_protocol,
            "key": val_lists.key, "count": len(val_lists)}, "teacher_scores": recipe.teacher_scores if teacher_scores
            is not None else None, "metrics": metrics, "global_step": trainer.global_step, "train_time_s": train_time,
            "resumed_from": None if resume is None else str(resume), "world_size": trainer.world_size,
        }  # fmt: skip
        save_ranker(ranker, ranker_dir, provenance)
    log.info("ranker checkpoint: %s (step %d, %.1fs)", ranker_dir, trainer.global_step, train_time)
    return TrainResult(ranker_dir, last, metrics, trainer.global_step, ranker)


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


def cli_train(args) -> int:
    """``mixllm train teacher|student --config PATH [--resume CKPT]``."""
    recipe = RankerRecipe.from_yaml(args.config, **parse_overrides(getattr(args, "overrides", None) or []))
    if recipe.role != args.role:
        raise RecipeError("role", f"{args.config} is a {recipe.role} recipe but the command trains a {args.role}")
    result = train_ranker(recipe, resume=args.resume)
    if _is_global_zero():
        print(f"ranker checkpoint: {result.ranker_dir}")
        if result.lightning_checkpoint is not None:
            print(f"lightning checkpoint (--resume): {result.lightning_checkpoint}")
    return 0
