"""Image-caption training with Lightning: LLaVA's two stages on LLaVA-format conversations.

    mixllm train caption --config training/configs/caption_stage1.yaml   # projector only, captions
    mixllm train caption --config training/configs/caption_stage2.yaml   # projector + LoRA, questions

Stage 1 trains only the image projector (vision tower and LLM frozen) on captions; stage 2 starts from
stage 1's projector (``init_from``) and trains it with the LLM's LoRA adapters (or the whole LLM:
``model.freeze_language_model: false`` and no ``lora``) on question-answer conversations. The data is a
LLaVA JSON file plus an image folder (:mod:`mixllm.data.llava`); without one the built-in scene generator
(:mod:`mixllm.data.scenes`) writes the embedded default. The frozen tower's features are computed once
per dataset and cached (:mod:`training.vision_cache`), so an epoch pays only for the projector and the LLM.

The loss is cross-entropy on answer tokens only (:func:`answer_loss`): prompt, image and padding
positions are ``IGNORE_INDEX``, each answer's end-of-turn token is supervised, labels are shifted once,
and the LM head runs only where a label is. Outputs under ``output_dir``: ``model/`` (a mixllm checkpoint
with ``training_run.json``), ``checkpoints/last.ckpt`` (``--resume``), ``logs/`` (CSV).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mixllm.config import MixLLMConfig
from mixllm.conversation import IGNORE_INDEX, SYSTEM_PROMPT, encode_conversation
from mixllm.data.llava import Conversation, SkipReport, load_llava_conversations
from mixllm.modeling import WEIGHTS_NAME, MixLLMForCausalLM, positions_from_mask
from mixllm.provenance import atomic_write_text, git_revision, machine_info
from training.recipe import RecipeError, keep_trainable_only, parse_overrides, read_recipe, start_run

log = logging.getLogger(__name__)

RUN_INFO_NAME = "training_run.json"
ALIGN_OBJECTIVES = ("caption", "cell_words")
STAGE_FILES = {1: "captions", 2: "qa"}
"""Which of the scene generator's files a stage reads: ``{split}_captions.json`` or ``{split}_qa.json``."""


@dataclass
class CaptionRecipe:
    """One stage of image-caption training. YAML recipes mirror these fields; ``model`` is a
    :class:`mixllm.config.MixLLMConfig` section (``image:``, ``lora:`` nested as the model has them)."""

    stage: int = 1
    """1: projector only, captions. 2: projector + LLM (LoRA or full), question-answer conversations."""
    model: dict[str, Any] = field(default_factory=lambda: {"language_model": "smollm2-135m-instruct", "image": {}})
    """The model's config (``MixLLMConfig`` fields)."""
    init_from: str | None = None
    """A mixllm checkpoint whose trained weights (stage 1's projector) start this run."""
    train_data: str | None = None
    """LLaVA-format JSON of the training conversations; None = the built-in scenes (``scenes``)."""
    val_data: str | None = None
    """LLaVA-format JSON for validation loss; None = the scenes' validation split (or none with train_data)."""
    image_folder: str | None = None
    """Folder the records' image paths are relative to (default: the JSON file's folder)."""
    align: str = "caption"
    """Stage 1's objective. "caption": LLaVA's caption loss through the frozen LLM. "cell_words": each cell's
    image token regresses onto the word embeddings naming what the cell holds, no LLM forward
    (:mod:`training.cell_alignment`); needs the built-in scenes and the unpooled grid."""
    scenes: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 200, "test": 500, "seed": 0})
    """Built-in scene generator: scenes per split and the seed."""
    scenes_dir: str | None = None
    """Where the scenes are written (default ``$MIXLLM_HOME/scenes/seed{seed}-{train}-{val}-{test}``)."""
    max_length: int = 384
    """Longest sample in tokens (image tokens included); longer samples are dropped, never truncated."""
    branch_questions: bool = True
    """Train each question of a conversation as if asked alone, as ``mixllm eval caption`` and the API ask it:
    the image prefix is shared and each question-answer is a branch that sees the prefix and itself only
    (:func:`branch_attention_mask`), at one conversation's cost. False: the turns are one multi-turn
    conversation, where later answers can be read off earlier questions ("is the blue star left of...")."""
    strict: bool = False
    """Refuse the data on the first bad record instead of skipping bad records with a count."""
    lr: float = 1e-3
    """Learning rate of the image projector."""
    lm_lr: float = 2e-4
    """Learning rate of the LLM's trainable parameters (LoRA adapters, or all of it)."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Linear warm-up over this fraction of the steps, then cosine decay to 0 (LLaVA's schedule)."""
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    """Effective batch = batch_size x accumulate_grad_batches."""
    max_steps: int = -1
    """Optimizer steps; -1 = max_epochs epochs."""
    max_epochs: int = 1
    gradient_clip_val: float = 1.0
    val_every_n_steps: int = 100
    limit_val: int = 200
    """Validation conversations scored (loss only)."""
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "auto"
    """"auto": bf16-mixed on a GPU, 32-true (fp32) on a CPU; or any Lightning precision."""
    num_threads: int | None = None
    """torch CPU threads (default: torch's)."""
    feature_cache: str | None = None
    """Folder of cached vision features (default ``$MIXLLM_HOME/vision_features``)."""
    output_dir: str = "runs/caption_stage1"
    seed: int = 0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGE_FILES:
            raise RecipeError("stage", f"must be 1 or 2, got {self.stage!r}")
        try:
            config = self.model_config()
        except (TypeError, ValueError) as error:
            raise RecipeError("model", str(error)) from None
        if config.image is None:
            raise RecipeError("model.image", "caption training needs an image modality (image: {} for the defaults)")
        if self.stage == 1 and (config.lora is not None or not config.freeze_language_model):
            raise RecipeError("model", "stage 1 trains the projector only: no lora and freeze_language_model: true")
        for name in ("batch_size", "accumulate_grad_batches", "max_length", "max_epochs", "limit_val"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "limit_val" else 1):
                raise RecipeError(name, f"must be a positive integer, got {value!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise RecipeError("max_steps", f"must be -1 (epochs) or >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr", "lm_lr"):
            if not getattr(self, name) > 0:
                raise RecipeError(name, f"must be > 0, got {getattr(self, name)}")
        if self.init_from is not None and not (Path(self.init_from) / WEIGHTS_NAME).is_file():
            raise RecipeError("init_from", f"{self.init_from} is not a mixllm checkpoint ({WEIGHTS_NAME} missing)")
        if self.train_data is not None and not Path(self.train_data).is_file():
            raise RecipeError("train_data", f"{self.train_data} does not exist")
        if self.align not in ALIGN_OBJECTIVES:
            raise RecipeError("align", f"must be one of {ALIGN_OBJECTIVES}, got {self.align!r}")
        if self.align == "cell_words":
            if self.stage != 1:
                raise RecipeError("align", "cell_words is a stage-1 objective; stage 2 trains on question-answer conversations")
            if self.train_data is not None:
                raise RecipeError("align", "cell_words needs the built-in scenes (they know each shape's cell); drop train_data")
            if config.image.pooled_grid is not None:
                raise RecipeError("align", f"cell_words needs one token per grid cell; model.image.pooled_grid is {config.image.pooled_grid}")
        missing = {"train", "val", "test", "seed"} - set(self.scenes)
        if missing:
            raise RecipeError("scenes", f"needs train, val, test and seed; missing {sorted(missing)}")

    def model_config(self) -> MixLLMConfig:
        return MixLLMConfig.from_dict(json.loads(json.dumps(self.model)))  # a deep copy: build() fills token ids

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> CaptionRecipe:
        return read_recipe(cls, path, overrides)

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        gpu = self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())
        return "bf16-mixed" if gpu else "32-true"


# --- data ----------------------------------------------------------------------------------------
def scenes_dir(recipe: CaptionRecipe) -> Path:
    if recipe.scenes_dir:
        return Path(recipe.scenes_dir)
    from mixllm.assets import mixllm_home

    s = recipe.scenes
    return mixllm_home() / "scenes" / f"seed{s['seed']}-{s['train']}-{s['val']}-{s['test']}"


def data_files(recipe: CaptionRecipe, split: str = "train") -> tuple[Path | None, Path | None]:
    """(LLaVA JSON, image folder) of a split; the built-in scenes are written on first use."""
    if recipe.train_data is not None:
        json_path = recipe.train_data if split == "train" else recipe.val_data
        return (Path(json_path) if json_path else None), (Path(recipe.image_folder) if recipe.image_folder else None)
    from mixllm.data.scenes import write_scenes

    root = scenes_dir(recipe)
    counts = {k: int(v) for k, v in recipe.scenes.items() if k != "seed"}
    write_scenes(root, counts=counts, seed=int(recipe.scenes["seed"]), progress=recipe.progress_bar)
    return root / f"{split}_{STAGE_FILES[recipe.stage]}.json", root


@dataclass
class EncodedSample:
    """One conversation, tokenized: ``row`` indexes the vision features; placeholders not yet expanded."""

    id: str
    row: int
    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None
    """Branched samples: 0 on the shared prefix, k on the k-th question's branch; None = one sequence."""


class ConversationEncoder:
    """Conversations -> token ids and answer-only labels (and, branched, segments); knows the expanded
    length of each.

    ``branch=True`` encodes each (question, answer) turn as its own one-question conversation (the image tag
    opening every question, as at inference) and keeps their longest common prefix (system prompt, image)
    once: ``prefix + branch_1 + branch_2 + ...`` with ``segments`` 0 on the prefix and k on branch k. A
    conversation whose image tag is not in that shared prefix stays one sequence."""

    def __init__(self, tokenizer, image_tokens: int, image_token_id: int, system: str | None = SYSTEM_PROMPT,
                 branch: bool = False, image_token: str = "<image>"):  # fmt: skip
        self.tokenizer, self.image_tokens, self.image_token_id, self.system = tokenizer, image_tokens, image_token_id, system
        self.branch, self.image_token = branch, image_token
        # id(conversation) -> (conversation, (ids, labels, segments)); holding the conversation keeps its id
        # from being reused by another object while the entry lives.
        self._memo: dict[int, tuple[Conversation, tuple[list[int], list[int], list[int] | None]]] = {}

    def encode(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        ids, labels, _ = self.encode_segments(conversation)
        return ids, labels

    def encode_segments(self, conversation: Conversation) -> tuple[list[int], list[int], list[int] | None]:
        entry = self._memo.get(id(conversation))
        if entry is None or entry[0] is not conversation:
            entry = self._memo[id(conversation)] = (conversation, self._encode(conversation))
        return entry[1]

    def _encode(self, conversation: Conversation) -> tuple[list[int], list[int], list[int] | None]:
        turns = conversation.turns
        if not self.branch or len(turns) < 2:
            return (*encode_conversation(self.tokenizer, turns, self.system), None)
        tag = f"{self.image_token}\n"
        questions = [turns[0][0]] + [q if self.image_token in q else tag + q for q, _ in turns[1:]]
        singles = [encode_conversation(self.tokenizer, [(q, a)], self.system) for q, (_, a) in zip(questions, turns)]
        shared = 0  # the longest common prefix that every branch's first token (a prompt token) follows
        limit = min(next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) for _, labels in singles) - 1
        while shared < limit and all(ids[shared] == singles[0][0][shared] for ids, _ in singles):
            shared += 1
        if self.image_token_id not in singles[0][0][:shared]:
            return (*encode_conversation(self.tokenizer, turns, self.system), None)
        ids, labels = list(singles[0][0][:shared]), [IGNORE_INDEX] * shared
        segments = [0] * shared
        for k, (branch_ids, branch_labels) in enumerate(singles, start=1):
            ids += branch_ids[shared:]
            labels += branch_labels[shared:]
            segments += [k] * (len(branch_ids) - shared)
        return ids, labels, segments

    def length(self, conversation: Conversation) -> int:
        """Tokens after the image placeholder becomes ``image_tokens`` tokens."""
        ids, _ = self.encode(conversation)
        return len(ids) + ids.count(self.image_token_id) * (self.image_tokens - 1)

    def samples(self, conversations: list[Conversation], first_row: int = 0) -> list[EncodedSample]:
        out = []
        for i, conv in enumerate(conversations):
            ids, labels, segments = self.encode_segments(conv)
            out.append(EncodedSample(conv.id, first_row + i, ids, labels, segments))
        self._memo.clear()
        return out


def load_split(path: Path, image_folder: Path | None, encoder: ConversationEncoder, recipe: CaptionRecipe,
               limit: int | None = None) -> tuple[list[Conversation], SkipReport]:
    conversations, report = load_llava_conversations(
        path, image_folder=image_folder, strict=recipe.strict, image_token=recipe.model_config().image.token,
        max_length=recipe.max_length, length_fn=encoder.length,
    )  # fmt: skip
    if not conversations:
        raise RecipeError("train_data" if "train" in path.name else "val_data", f"{path}: no usable record ({report.summary()})")
    return conversations[:limit] if limit is not None else conversations, report


class CaptionCollator:
    """Encoded samples -> a right-padded batch: ``input_ids`` with each image placeholder expanded,
    ``labels`` (``IGNORE_INDEX`` on image tokens and padding), ``attention_mask`` and the samples'
    cached ``vision_features`` (float32). When a sample is branched, also ``segments`` (-1 on padding)
    and ``position_ids`` (each branch continues from the end of the shared prefix)."""

    def __init__(self, processor, features: torch.Tensor):
        self.processor, self.features = processor, features
        self.image_id = processor.token_ids["image"]
        self.image_tokens = processor.num_tokens["image"]

    def expand(self, sample: EncodedSample) -> tuple[list[int], list[int], list[int]]:
        ids, labels, segments = [], [], []
        for t, (token, label) in enumerate(zip(sample.input_ids, sample.labels)):
            n = self.image_tokens if token == self.image_id else 1
            ids += [token] * n
            labels += [IGNORE_INDEX if token == self.image_id else label] * n
            segments += [sample.segments[t] if sample.segments else 0] * n
        return ids, labels, segments

    def __call__(self, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
        rows = [self.expand(s) for s in samples]
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), self.processor.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        segments = torch.full((len(rows), length), -1, dtype=torch.long)
        for i, (ids, labs, segs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(labs)] = torch.tensor(labs)
            mask[i, : len(ids)] = 1
            segments[i, : len(segs)] = torch.tensor(segs)
        feats = self.features[torch.tensor([s.row for s in samples])].float()  # (B, tower_tokens, D)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "vision_features": feats}
        if any(s.segments for s in samples):
            batch["segments"] = segments
            batch["position_ids"] = branch_positions(segments)
        return batch


def branch_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of branched rows: the shared prefix (segment 0) counts 0, 1, ...; each branch
    counts on from the prefix's length, as if it followed the prefix alone; padding (-1) gets 0."""
    prefix = (segments == 0).sum(1, keepdim=True)  # (B, 1)
    positions = torch.zeros_like(segments)
    for k in segments.unique().tolist():
        member = segments == k
        if k < 0:
            continue
        offset = member.long().cumsum(1) - 1  # index within its segment
        positions = torch.where(member, offset + (prefix if k > 0 else 0), positions)
    return positions


def branch_attention_mask(segments: torch.Tensor, boolean: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) attention of branched rows: a token sees the earlier tokens of the shared prefix and of its
    own branch, never another branch's, nor padding (a padding row sees itself, so no row is empty). Boolean
    (True = attend) for sdpa, else additive (0 / dtype's min) for eager attention."""
    t = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


# --- the loss and the module ----------------------------------------------------------------------
def answer_loss(model: MixLLMForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over supervised tokens: the token at t+1 is predicted from position t (labels
    shifted once, here); the LM head runs only at the positions that have a label."""
    inputs_embeds = model.embed_inputs(batch["input_ids"], vision_features=batch.get("vision_features"),
                                       pixel_values=batch.get("pixel_values"))  # fmt: skip
    lm = model.language_model
    attention, positions = batch["attention_mask"], batch.get("position_ids")
    if "segments" in batch:  # branched questions: a 4D mask, passed through by transformers as given
        eager = getattr(lm.config, "_attn_implementation", None) == "eager"
        attention = branch_attention_mask(batch["segments"], boolean=not eager, dtype=inputs_embeds.dtype)
    hidden = lm.base_model(
        inputs_embeds=inputs_embeds, attention_mask=attention,
        position_ids=positions if positions is not None else positions_from_mask(batch["attention_mask"]),
    ).last_hidden_state  # (B, T, D)  # fmt: skip
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    if not keep.any():
        raise ValueError("the batch has no supervised token")
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (n, V)
    return F.cross_entropy(logits.float(), targets[keep])


def trainable_groups(model: MixLLMForCausalLM, recipe: CaptionRecipe) -> list[dict]:
    """AdamW parameter groups: the projector at ``lr``, everything else that trains at ``lm_lr``."""
    projector = [p for p in model.projectors.parameters() if p.requires_grad]
    ids = {id(p) for p in projector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": projector, "lr": recipe.lr, "name": "projector"}]
    if rest:
        groups.append({"params": rest, "lr": recipe.lm_lr, "name": "language_model"})
    return groups


class CaptionModule(L.LightningModule):
    """Thin: the library model, an objective (:func:`answer_loss`, or stage 1's
    :class:`training.cell_alignment.CellWordObjective`, which also returns metrics), AdamW with warm-up + cosine."""

    def __init__(self, model: MixLLMForCausalLM, recipe: CaptionRecipe, objective=answer_loss) -> None:
        super().__init__()
        self.model, self.recipe, self.objective = model, recipe, objective
        self.strict_loading = False  # Lightning checkpoints hold the trainable parameters only
        self.model.train()

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        result = self.objective(self.model, batch)
        result = result if isinstance(result, dict) else {"loss": result}
        size = len(batch["vision_features"])
        for name, value in result.items():
            self.log(f"{split}/{name}", value, prog_bar=name == "loss", batch_size=size)
        return result["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(trainable_groups(self.model, self.recipe), weight_decay=self.recipe.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.recipe.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_only(self, checkpoint)


# --- the run -------------------------------------------------------------------------------------
def build_model(recipe: CaptionRecipe):
    """The model and processor of a recipe, started from ``init_from``'s trained weights when given."""
    from safetensors.torch import load_file

    from mixllm.loading import build

    model, processor = build(recipe.model_config())
    if recipe.init_from is not None:
        state = load_file(str(Path(recipe.init_from) / WEIGHTS_NAME))
        own = model.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise RecipeError("init_from", f"{recipe.init_from} holds weights this model lacks: {unknown[:3]}")
        resized = [f"{k} {tuple(state[k].shape)} there, {tuple(own[k].shape)} here" for k in state if state[k].shape != own[k].shape]
        if resized:
            raise RecipeError("init_from", f"{recipe.init_from} does not fit this model (another grid, model.image.pooled_grid, or position_input?): {resized[:2]}")
        missing = [k for k in model.trainable_state_dict() if k.startswith("projectors.") and k not in state]
        if missing:  # a projector part this model has and init_from was trained without would start untrained
            raise RecipeError("init_from", f"{recipe.init_from} lacks the projector's {missing[:3]}: trained without "
                                           "model.image.standardize_features / position_embedding? Use stage 1's model.image")  # fmt: skip
        model.load_state_dict(state, strict=False)
        log.info("started from %s (%d tensors)", recipe.init_from, len(state))
    if processor is None:
        raise RecipeError("model.language_model", "has no tokenizer; caption training needs one")
    return model, processor


def start_projector(model: MixLLMForCausalLM, processor, train_features: torch.Tensor) -> None:
    """A fresh projector's fitted parts: the feature standardisation from the training images' (pooled)
    features, and the position table from the words naming each cell's side
    (:func:`training.cell_alignment.position_words`; a non-square token grid keeps zeros)."""
    projector = model.projectors["image"]
    if projector.standardize:
        projector.fit_input_statistics(train_features)
    if projector.positions is not None:
        from training.cell_alignment import position_words

        grid = model.encoders["image"].token_grid
        if grid is None:
            log.warning("the image tokens (%d) are not a square grid: the position table starts at zeros",
                        projector.positions.shape[0])
            return
        embedding = model.language_model.get_input_embeddings().weight.detach()
        with torch.no_grad():
            projector.positions.copy_(position_words(embedding, processor.tokenizer, grid))


@dataclass
class CaptionRun:
    model_dir: Path
    lightning_checkpoint: Path | None
    metrics: dict[str, float]
    global_step: int
    model: MixLLMForCausalLM


def train_caption(recipe: CaptionRecipe, resume: str | Path | None = None) -> CaptionRun:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from mixllm.assets import mixllm_home
    from training.vision_cache import cached_vision_features

    start_run(recipe.num_threads, recipe.seed, resume)
    output_dir = Path(recipe.output_dir)
    model, processor = build_model(recipe)
    encoder = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"],
                                  branch=recipe.branch_questions, image_token=recipe.model_config().image.token)  # fmt: skip
    train_json, image_folder = data_files(recipe, "train")
    train_convs, train_report = load_split(train_json, image_folder, encoder, recipe)
    val_json, val_folder = data_files(recipe, "val") if recipe.limit_val else (None, None)
    val_convs, val_report = ([], None)
    if val_json is not None:
        val_convs, val_report = load_split(val_json, val_folder, encoder, recipe, limit=recipe.limit_val)
    log.info("train: %s", train_report.summary())
    cache = Path(recipe.feature_cache) if recipe.feature_cache else mixllm_home() / "vision_features"
    features = cached_vision_features(model.encoders["image"], processor.image_processor,
                                      [c.image for c in train_convs + val_convs], cache, progress=recipe.progress_bar)  # fmt: skip
    if recipe.init_from is None:
        start_projector(model, processor, model.encoders["image"].pool(features[: len(train_convs)].float()))
    if recipe.align == "cell_words":
        from training.cell_alignment import CellCollator, CellWordObjective, conversation_labels, pair_vectors, side_words

        train_samples, val_samples = list(range(len(train_convs))), list(range(len(train_convs), len(features)))
        collate = CellCollator(features, conversation_labels(train_convs + val_convs, seed=int(recipe.scenes["seed"])))
        embedding = model.language_model.get_input_embeddings().weight.detach()
        grid = model.projectors["image"].grid  # set by model.image.position_input: the tokens also learn their sides
        objective = CellWordObjective(pair_vectors(embedding, processor.tokenizer),
                                      side_words(embedding, processor.tokenizer, grid) if grid else None)
    else:
        train_samples = encoder.samples(train_convs)
        val_samples = encoder.samples(val_convs, first_row=len(train_convs))
        collate, objective = CaptionCollator(processor, features), answer_loss
    loader = DataLoader(train_samples, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate)
    val_loader = DataLoader(val_samples, batch_size=recipe.batch_size, collate_fn=collate) if val_samples else None
    module = CaptionModule(model, recipe, objective)
    checkpoints = output_dir / "checkpoints"
    trainer = L.Trainer(
        accelerator=recipe.accelerator, devices=recipe.devices, precision=recipe.resolved_precision(),
        max_epochs=recipe.max_epochs, max_steps=recipe.max_steps, accumulate_grad_batches=recipe.accumulate_grad_batches,
        gradient_clip_val=recipe.gradient_clip_val, log_every_n_steps=recipe.log_every_n_steps,
        # every val_every_n_steps optimizer steps, counted across epochs (not restarting with each epoch)
        val_check_interval=recipe.val_every_n_steps * recipe.accumulate_grad_batches if val_loader else None,
        check_val_every_n_epoch=None, limit_val_batches=1.0 if val_loader else 0,
        num_sanity_val_steps=0, default_root_dir=output_dir, logger=CSVLogger(output_dir, name="logs"),
        enable_progress_bar=recipe.progress_bar, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0,
                                   every_n_train_steps=recipe.checkpoint_every_n_steps)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=None if resume is None else str(resume))
    train_time = time.perf_counter() - start
    last = checkpoints / "last.ckpt"
    trainer.save_checkpoint(last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if val_loader is not None and trainer.global_step % recipe.val_every_n_steps:  # the last steps were not validated
        metrics.update({k: float(v) for k, v in trainer.validate(module, dataloaders=val_loader, verbose=False)[0].items()})
    model.eval()
    model_dir = output_dir / "model"
    provenance = {
        "stage": recipe.stage, "recipe": asdict(recipe), "data": {"train": str(train_json), "train_records": train_report.total,
        "train_used": len(train_samples), "skipped": train_report.counts, "val": str(val_json) if val_json else None,
        "val_used": len(val_samples)}, "metrics": metrics, "global_step": trainer.global_step, "train_time_s": train_time,
        "precision": recipe.resolved_precision(), "resumed_from": None if resume is None else str(resume),
        "machine": machine_info(),
    }  # fmt: skip
    model.save_pretrained(model_dir, provenance=provenance)
    atomic_write_text(model_dir / RUN_INFO_NAME, json.dumps({"git_revision": git_revision(), **provenance}, indent=2, default=str))
    log.info("model checkpoint: %s (step %d, %.1fs)", model_dir, trainer.global_step, train_time)
    return CaptionRun(model_dir, last, metrics, trainer.global_step, model)


def cli_train(args) -> int:
    """``mixllm train caption --config PATH [--resume CKPT] [--set FIELD=VALUE ...]``."""
    recipe = CaptionRecipe.from_yaml(args.config, **parse_overrides(getattr(args, "overrides", None) or []))
    run = train_caption(recipe, resume=args.resume)
    print(f"model checkpoint: {run.model_dir}")
    if run.lightning_checkpoint is not None:
        print(f"lightning checkpoint (--resume): {run.lightning_checkpoint}")
    return 0
