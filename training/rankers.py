"""Train the Mix-LLM rankers with Lightning: the textual teacher, and the student distilled from it.

    mixllm train teacher --config training/configs/teacher.yaml
    mixllm train student --config training/configs/student.yaml      # scores its lists with the teacher once

One loop, two roles. The parts live in their own modules: the recipe (:mod:`training.ranker_recipe`),
the lists and the data module (:mod:`training.ranking_lists`), the stored teacher scores
(:mod:`training.teacher_scores`), building and saving the ranker (:mod:`training.ranker_build`). Here:
the listwise loss, the thin LightningModule, and the run.

Outputs under ``output_dir``: ``ranker/`` (``MixLLMRanker.save_pretrained`` + ``training_run.json``
with recipe and provenance), ``checkpoints/last.ckpt`` (Lightning, for ``--resume``; it holds the
trainable parameters only, the frozen base LLM is referenced), ``logs/`` (CSVLogger).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from mixllm.data import leave_one_out
from mixllm.metrics import ranking_metrics
from mixllm.ranking import MixLLMRanker, RankingInputs
from training.ranker_build import build_ranker, recipe_retriever, history_width, load_recipe_dataset, save_ranker
from training.ranker_recipe import RankerRecipe
from training.ranking_lists import RankerDataModule, build_training_lists, build_validation_lists
from training.recipe import RecipeError, keep_trainable_only, parse_overrides, start_run
from training.teacher_scores import ensure_teacher_scores

log = logging.getLogger(__name__)


# --- loss and the LightningModule ----------------------------------------------------------------
def ranking_loss(
    scores: torch.Tensor, target_index: torch.Tensor, teacher_scores: torch.Tensor | Sequence[torch.Tensor] | None = None,
    temperature: float = 1.0, alpha: float = 0.0, weighting: str = "uniform",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Listwise loss over each candidate list.

    CE = -log softmax(s)[target]; KL = T^2 * KL(softmax(t / T) || softmax(s / T)) (batch mean);
    loss = alpha * KL + (1 - alpha) * CE, or CE alone without teacher scores or with alpha = 0.
    Several teachers (a sequence of (B, C) tensors): their KL terms are averaged. ``weighting``
    "confidence": list i's KL is weighted by w_i = softmax(t_i)[target_i] / mean_j softmax(t_j)[target_j].
    """
    ce = F.cross_entropy(scores.float(), target_index)
    if teacher_scores is None or alpha == 0:
        return ce, {"ce": ce}
    teachers = [teacher_scores] if isinstance(teacher_scores, torch.Tensor) else list(teacher_scores)
    student = F.log_softmax(scores.float() / temperature, dim=-1)
    terms = []
    for teacher in teachers:
        per_list = F.kl_div(student, F.log_softmax(teacher.float() / temperature, dim=-1), log_target=True,
                            reduction="none").sum(-1) * temperature**2  # (B,)  # fmt: skip
        if weighting == "confidence":
            confidence = teacher.float().softmax(-1).gather(1, target_index[:, None])[:, 0]  # (B,)
            per_list = per_list * confidence / confidence.mean().clamp_min(1e-12)
        terms.append(per_list.mean())
    kl = torch.stack(terms).mean()
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

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            datamodule.set_epoch(self.current_epoch)  # which pool negatives this epoch's lists draw

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scores = self.ranker(batch["inputs"])  # (B, C)
        alpha = self.recipe.alpha if self.recipe.role == "student" else 0.0
        teachers = [t for t in (batch["teacher_scores"], batch.get("retriever_scores") if self.recipe.teacher != "llm" else None)
                    if t is not None]  # fmt: skip
        loss, parts = ranking_loss(scores, batch["target_index"], teachers or None, self.recipe.temperature, alpha,
                                   self.recipe.teacher_weighting)  # fmt: skip
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
    width = history_width(recipe)
    retriever, retriever_id = recipe_retriever(recipe, dataset)
    train_lists = build_training_lists(split, recipe, width, retriever, retriever_id, scored=recipe.needs_retriever_scores)
    val_lists = build_validation_lists(split, recipe, width, retriever if recipe.fusion else None)
    del retriever
    teacher_scores = None
    if recipe.uses_llm_teacher:
        if not Path(recipe.teacher_scores).is_file() and not _is_global_zero():
            raise RecipeError("teacher_scores", "missing on a non-zero rank: score the lists before launching DDP")
        _, teacher_scores = ensure_teacher_scores(recipe, train_lists, dataset.item_texts)  # checked: the same lists
    ranker = build_ranker(recipe, dataset)
    module = RankerModule(ranker, recipe)
    data = RankerDataModule(ranker, recipe, train_lists, val_lists, teacher_scores)
    checkpoints = output_dir / "checkpoints"
    trainer = L.Trainer(
        accelerator=recipe.accelerator, devices=recipe.devices, strategy=recipe.strategy, precision=recipe.precision,
        max_epochs=recipe.max_epochs, max_steps=recipe.max_steps, fast_dev_run=recipe.fast_dev_run or False,
        max_time=None if recipe.max_time_s is None else {"seconds": recipe.max_time_s},
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
            "role": recipe.role, "recipe": recipe.to_dict(), "dataset": {"name": dataset.name, "source": dataset.source,
            "fingerprint": dataset.fingerprint()}, "seed": recipe.seed, "train_lists": {"key": train_lists.key,
            "digest": train_lists.digest(), "count": len(train_lists)}, "val_lists": {"protocol": recipe.val_protocol,
            "key": val_lists.key, "count": len(val_lists)}, "teacher_scores": recipe.teacher_scores if teacher_scores
            is not None else None, "metrics": metrics, "global_step": trainer.global_step, "train_time_s": train_time,
            "resumed_from": None if resume is None else str(resume), "world_size": trainer.world_size,
        }  # fmt: skip
        save_ranker(ranker, ranker_dir, provenance)
    log.info("ranker checkpoint: %s (step %d, %.1fs)", ranker_dir, trainer.global_step, train_time)
    return TrainResult(ranker_dir, last, metrics, trainer.global_step, ranker)


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
