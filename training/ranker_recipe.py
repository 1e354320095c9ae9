"""The ranker training recipe (:class:`RankerRecipe`): what one teacher or student run depends on.

YAML recipes in ``training/configs/`` (``teacher*.yaml``, ``student*.yaml``) set these fields; a
variant ``extends:`` its base and names only what it changes. The model's own config sections are
nested, never copied: ``lora:`` is a :class:`mixllm.lora.LoRAConfig`, ``item:`` a
:class:`mixllm.config.ItemConfig` and ``user:`` a :class:`mixllm.config.UserConfig`; the widths that
come from the data (``item.feature_dim``, ``item.num_items``, ``user.item_dim``) are filled in when
the ranker is built and may not be set in a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixllm.config import ItemConfig, UserConfig
from mixllm.data import PROTOCOLS
from mixllm.errors import DataError
from mixllm.features import parse_feature_spec
from mixllm.lora import LoRAConfig
from training.recipe import RecipeError, read_recipe

ROLES = ("teacher", "student")
TEACHERS = ("llm", "sasrec", "both")
WEIGHTINGS = ("uniform", "confidence")
DATA_WIDTHS = {"item": ("feature_dim", "num_items"), "user": ("item_dim",)}
"""Section fields the ranker builder sets from the data (a recipe that sets them is refused)."""


def _section(name: str, value: Any, cls: type, optional: bool):
    """A nested config section: a mapping (from YAML) becomes ``cls``, validated once by ``cls`` itself."""
    if value is None:
        if optional:
            return None
        raise RecipeError(name, "is required (a mapping of its fields)")
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise RecipeError(name, f"must be a mapping of {cls.__name__} fields or null, got {value!r}")
    for key in DATA_WIDTHS.get(name, ()):
        if key in value:
            raise RecipeError(f"{name}.{key}", "comes from the data when the ranker is built; remove it from the recipe")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise RecipeError(f"{name}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**value)
    except (TypeError, ValueError) as error:
        message = str(error)
        field = message.split(" ", 1)[0] if message.startswith(f"{name}.") else name
        raise RecipeError(field, message.removeprefix(f"{field} ").removeprefix(f"{field}: ")) from None


@dataclass
class RankerRecipe:
    """Everything one ranker training run depends on."""

    role: str = "teacher"
    """"teacher" (items as text) or "student" (items as embedding tokens); must match the CLI role."""
    dataset: str = "ml-100k"
    """"ml-100k", "synthetic" (``make_synthetic_dataset(seed=seed)``, for smoke runs) or a folder with
    interactions/items files (see ``mixllm.data.load_dataset``)."""

    # --- the training lists (training.ranking_lists) ---
    max_history: int = 10
    """H: the most recent items before the target that the ranker reads as item tokens (or texts)."""
    num_negatives: int = 9
    """Negatives per training list (list size = 1 + num_negatives), items the user never interacted with."""
    targets_per_user: int | None = 5
    """Positions of each user's training sequence used as targets (a seeded sample; fewer if short);
    None = every position from the second on (sliding windows, as SASRec trains)."""
    negative_pool: int | None = None
    """Negatives stored per list; each epoch draws ``num_negatives`` of them afresh (seeded by epoch and
    list). None = ``num_negatives``: the same list every epoch. With distillation the teacher scores the
    whole pool once."""
    hard_negatives: float = 0.0
    """Share of each list's negatives taken from the retriever's (SASRec's) top ``hard_pool`` for that
    list's own history: the candidates a reranker actually sees. 0 = all random."""
    hard_pool: int = 50
    """k of the retriever's top-k that hard negatives come from."""
    limit_train_users: int | None = None
    """Only the first N users make training lists (tiny runs); None = all."""
    val_protocol: str = "sampled-20"
    """Validation candidate lists: a sampled protocol of ``mixllm.data.PROTOCOLS`` (validation targets)."""
    limit_val_users: int | None = None
    """Only the first N users are validated; None = all."""

    # --- the model (training.ranker_build) ---
    base_model: str = "smollm2-135m-instruct"
    """Base LLM: a packaged asset name or a local transformers directory."""
    freeze_language_model: bool = True
    """Keep the LLM's weights fixed (with ``lora``: only the adapters train); False = full fine-tuning."""
    lora: LoRAConfig | None = None
    """Low-rank adapters on the LLM (``mixllm.lora.LoRAConfig`` fields); null = none."""
    item_features: str = "minilm"
    """Student only. "minilm" (MiniLM-L6 embeddings of the item texts, computed once and cached),
    "sasrec" (the baselines' SASRec item embeddings for ``seed``; trained first if missing), a path to
    a (num_items, F) table (.npy, .pt, a one-tensor .safetensors, or a SASRec checkpoint folder),
    several of these joined with "+" (concatenated, e.g. "minilm+sasrec"), or "ids" (no features: a
    learned id embedding only)."""
    item_id_embedding: bool = False
    """Student only: add a learned item-id embedding to the features (always on with "ids")."""
    item: ItemConfig = dataclasses.field(default_factory=ItemConfig)
    """Student only: the item modality (``mixllm.config.ItemConfig``: tokens_per_item, projector, id_dim)."""
    user: UserConfig | None = None
    """Student only: user-history tokens (``mixllm.config.UserConfig``: num_tokens m, max_history, ...);
    null = none."""
    cold_item_rate: float = 0.0
    """Share of item occurrences (as history or candidate tokens) whose SASRec part of the features is
    zeroed while training -- the service's rule for an item added later, which has text but no
    collaborative vector -- so the student learns to rank such items too. 0 = off; needs "sasrec" in
    ``item_features``."""
    fusion: bool = False
    """Score fusion: the ranker's score plus a learned gate (starting at 0) times the retriever's
    (SASRec's) score of each candidate. False = the LLM's score alone."""

    # --- optimisation and distillation ---
    lr: float = 1e-3
    """AdamW learning rate (constant) over trainable parameters only."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_epochs: int = 1
    """Epochs over the training lists."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = no limit)."""
    max_time_s: float | None = None
    """Stop after this many seconds of training and write the ranker as it is then; None = no limit.
    A budget for a lent GPU: the run's ``global_step`` is recorded, and a reproducible recipe then
    names that ``max_steps``."""
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
    teacher: str = "llm"
    """Whose scores the student distils (alpha > 0): "llm" (the textual teacher's stored scores),
    "sasrec" (the retriever's score of each candidate: no LLM teacher needed) or "both" (the two KL
    terms averaged)."""
    teacher_weighting: str = "uniform"
    """"uniform", or "confidence": each list's KL term weighted by the teacher's softmax probability of
    the target (T = 1), normalised to mean 1 over the batch, so lists the teacher gets wrong teach less."""

    # --- where and how it runs ---
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
    num_workers: int = 0
    """DataLoader worker processes that build the training batches (tokenising prompts is Python work
    that can keep a GPU waiting); 0 = in the training process."""
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
        self.lora = _section("lora", self.lora, LoRAConfig, optional=True)
        self.item = _section("item", self.item, ItemConfig, optional=False)
        self.user = _section("user", self.user, UserConfig, optional=True)
        if self.role not in ROLES:
            raise RecipeError("role", f"must be one of {ROLES}, got {self.role!r}")
        for name in ("max_history", "num_negatives", "batch_size", "max_epochs", "hard_pool", "teacher_batch_size",
                     "checkpoint_every_n_steps", "log_every_n_steps"):  # fmt: skip
            _check_int(name, getattr(self, name))
        if self.max_time_s is not None and (isinstance(self.max_time_s, bool) or not isinstance(self.max_time_s, (int, float))
                                            or self.max_time_s <= 0):  # fmt: skip
            raise RecipeError("max_time_s", f"must be a number of seconds > 0 or null, got {self.max_time_s!r}")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise RecipeError("num_workers", f"must be an integer >= 0, got {self.num_workers!r}")
        for name in ("targets_per_user", "negative_pool", "limit_train_users", "limit_val_users", "num_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), "or null")
        if self.negative_pool is not None and self.negative_pool < self.num_negatives:
            raise RecipeError("negative_pool", f"must be >= num_negatives ({self.num_negatives}) or null, got {self.negative_pool}")
        if not 0 <= self.cold_item_rate < 1:
            raise RecipeError("cold_item_rate", f"must be a share in [0, 1), got {self.cold_item_rate!r}")
        if self.cold_item_rate > 0 and "sasrec" not in parse_feature_spec(self.item_features):
            raise RecipeError("cold_item_rate", f"zeroes the SASRec part of the features, but item_features is {self.item_features!r}")
        if not 0 <= self.hard_negatives <= 1:
            raise RecipeError("hard_negatives", f"must be a share in [0, 1], got {self.hard_negatives!r}")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise RecipeError("max_steps", f"must be >= 1 or -1 (no limit), got {self.max_steps!r}")
        if not isinstance(self.fast_dev_run, int) or self.fast_dev_run < 0:
            raise RecipeError("fast_dev_run", f"must be an integer >= 0, got {self.fast_dev_run!r}")
        if self.val_protocol not in PROTOCOLS or PROTOCOLS[self.val_protocol].is_full_ranking:
            sampled = [n for n, p in PROTOCOLS.items() if not p.is_full_ranking]
            raise RecipeError("val_protocol", f"must be a sampled protocol {sampled}, got {self.val_protocol!r}")
        if self.lora is not None and not self.freeze_language_model:
            raise RecipeError("lora", "adapters train on a frozen LLM: set freeze_language_model: true, or lora: null for full fine-tuning")
        if self.user is not None and self.role == "teacher":
            raise RecipeError("user", "the teacher reads text only; user tokens belong to the student (user: null)")
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
        if self.teacher not in TEACHERS:
            raise RecipeError("teacher", f"must be one of {TEACHERS}, got {self.teacher!r}")
        if self.teacher_weighting not in WEIGHTINGS:
            raise RecipeError("teacher_weighting", f"must be one of {WEIGHTINGS}, got {self.teacher_weighting!r}")
        if self.role == "student" and self.alpha > 0 and self.uses_llm_teacher and not self.teacher_scores:
            raise RecipeError("teacher_scores", "distillation (alpha > 0) needs the path of the stored teacher scores")

    @property
    def uses_llm_teacher(self) -> bool:
        """Distillation from the stored scores of the textual teacher."""
        return self.role == "student" and self.alpha > 0 and self.teacher in ("llm", "both")

    @property
    def needs_retriever_scores(self) -> bool:
        """The lists must carry SASRec's score of every candidate (score fusion, or SASRec as a teacher)."""
        return self.fusion or (self.role == "student" and self.alpha > 0 and self.teacher in ("sasrec", "both"))

    @property
    def list_size(self) -> int:
        return 1 + self.num_negatives

    @property
    def pool_size(self) -> int:
        """Negatives stored per list (``negative_pool``, or ``num_negatives`` when it is null)."""
        return self.num_negatives if self.negative_pool is None else self.negative_pool

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RankerRecipe:
        """Read a recipe (a bare file name is looked up in ``training/configs``); ``overrides`` win."""
        return read_recipe(cls, path, overrides)

    def replace(self, **changes: Any) -> RankerRecipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a mapping that reads back (the data-given widths left out)."""
        out = dataclasses.asdict(self)
        for section, keys in DATA_WIDTHS.items():
            for key in keys:
                if out.get(section) is not None:
                    out[section].pop(key, None)
        return out


def _check_int(name: str, value: Any, extra: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecipeError(name, f"must be an integer >= 1{' ' + extra if extra else ''}, got {value!r}")
