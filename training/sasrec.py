"""Train SASRec on the leave-one-out training split with Lightning; early-stop on validation.

One recipe per YAML file (``training/configs/sasrec.yaml``, ``sasrec_tiny.yaml``); each key mirrors
a field of :class:`SASRecTrainConfig`. :func:`train_sasrec` is the whole loop::

    model, info = train_sasrec(split, SASRecTrainConfig.from_yaml("training/configs/sasrec.yaml"), seed=0)
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from mixllm.baselines.sasrec import SASRec, SASRecConfig, training_windows
from mixllm.data import PAD, PROTOCOLS, LeaveOneOutSplit, get_candidates
from mixllm.data.evaluation import score_users
from mixllm.errors import MixLLMError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class SASRecTrainConfig:
    """A SASRec recipe: model shape, optimisation and early stopping."""

    hidden_size: int = 64
    """Width of item embeddings and hidden states."""
    num_blocks: int = 2
    """Self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block."""
    max_history: int = 50
    """History positions the model reads (training windows and evaluation histories)."""
    ffn_size: int = 256
    """Feed-forward width inside each block."""
    dropout: float = 0.2
    """Dropout on embeddings, attention and block outputs."""
    lr: float = 3e-3
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 128
    """Training windows per step."""
    max_epochs: int = 200
    """Upper bound on epochs; early stopping usually ends training first."""
    patience: int = 15
    """Validation checks without improvement before stopping."""
    check_val_every_n_epoch: int = 1
    """Epochs between validation checks."""
    monitor_protocol: str = "full"
    """Protocol whose validation metric drives early stopping and the kept weights ("full", "sampled-100", ...)."""
    monitor_metric: str = "ndcg@10"
    """Metric of monitor_protocol to maximise."""
    num_threads: int = 2
    """torch CPU threads."""
    max_time_s: float | None = None
    """Hard wall-clock cap on training in seconds (None = no cap)."""

    def __post_init__(self) -> None:
        if self.monitor_protocol not in PROTOCOLS:
            raise ValueError(f"monitor_protocol must be one of {list(PROTOCOLS)}, got {self.monitor_protocol!r}")
        if self.monitor_metric not in PROTOCOLS[self.monitor_protocol].metrics:
            raise ValueError(
                f"monitor_metric {self.monitor_metric!r} is not reported by {self.monitor_protocol} "
                f"({', '.join(PROTOCOLS[self.monitor_protocol].metrics)})"
            )
        for name in ("batch_size", "max_epochs", "patience", "check_val_every_n_epoch", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise ValueError("max_time_s must be > 0 or None")
        self.model_config(num_items=1)  # validates the model fields

    def model_config(self, num_items: int) -> SASRecConfig:
        return SASRecConfig(
            num_items=num_items,
            hidden_size=self.hidden_size,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            max_history=self.max_history,
            ffn_size=self.ffn_size,
            dropout=self.dropout,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SASRecTrainConfig:
        """Read a recipe; unknown keys and invalid values are errors naming the file."""
        path = Path(path)
        if not path.is_file() and (CONFIG_DIR / path).is_file():
            path = CONFIG_DIR / path
        if not path.is_file():
            raise MixLLMError(f"{path}: SASRec recipe not found (recipes: {', '.join(p.name for p in CONFIG_DIR.glob('*.yaml'))})")
        raw = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MixLLMError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as err:
            raise MixLLMError(f"{path}: {err}") from None


class SASRecDataModule(L.LightningDataModule):
    """Training windows from the training split; validation users for the monitored protocol."""

    def __init__(self, split: LeaveOneOutSplit, config: SASRecTrainConfig, seed: int) -> None:
        super().__init__()
        self.split, self.config, self.seed = split, config, seed
        inputs, targets = training_windows(split.train_sequences(), config.max_history)  # (M, L) each
        self.train_set = TensorDataset(torch.from_numpy(inputs), torch.from_numpy(targets))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(self.split.num_users), batch_size=512, shuffle=False)


class SASRecModule(L.LightningModule):
    """Thin wrapper: full-softmax next-item cross-entropy; validation through the library evaluator."""

    def __init__(self, model: SASRec, split: LeaveOneOutSplit, config: SASRecTrainConfig, seed: int, cache_dir=None) -> None:
        super().__init__()
        self.model, self.split, self.config = model, split, config
        self.protocol = PROTOCOLS[config.monitor_protocol]
        self.val_candidates = (
            None if self.protocol.is_full_ranking else get_candidates(split, self.protocol, "valid", seed, cache_dir)
        )
        self.monitor = f"val/{self.protocol.name}/{config.monitor_metric}"

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch  # (B, L), (B, L)
        real = targets != PAD  # (B, L); padded positions have no next item
        hidden = self.model(inputs)[real]  # (M, D), M real positions
        logits = hidden @ self.model.item_embeddings().T  # (M, N) full softmax over the catalog
        loss = F.cross_entropy(logits, targets[real])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(inputs))
        return loss

    def validation_step(self, users: torch.Tensor, batch_idx: int) -> None:
        values = score_users(self.model, self.split, self.protocol, "valid", users.numpy(), self.val_candidates)
        metric = values[self.config.monitor_metric].mean()
        self.log(self.monitor, metric.float(), prog_bar=True, batch_size=len(users))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)


class BestWeights(L.Callback):
    """Keep the weights of the best validation check in memory, and a per-check history."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best_score = -float("inf")
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.time_to_best_s = 0.0
        self.history: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score = float(trainer.callback_metrics[self.monitor])
        elapsed = time.perf_counter() - self._start
        self.history.append({"epoch": trainer.current_epoch, "score": score, "elapsed_s": elapsed})
        if score > self.best_score:
            self.best_score, self.best_epoch, self.time_to_best_s = score, trainer.current_epoch, elapsed
            self.best_state = copy.deepcopy(pl_module.model.state_dict())


def train_sasrec(
    split: LeaveOneOutSplit,
    config: SASRecTrainConfig,
    seed: int,
    cache_dir: str | Path | None = None,
    progress_bar: bool = True,
) -> tuple[SASRec, dict]:
    """Train SASRec on ``split``'s training split, early-stopping on its validation targets.

    Deterministic given ``seed`` (``seed_everything`` and deterministic algorithms).

    Returns:
        The model with its best validation weights (eval mode), and a dict with ``best_epoch``,
        ``best_val`` (the monitored metric), ``epochs``, ``train_time_s``, ``time_to_best_s``,
        ``history`` and ``config``.
    """
    torch.set_num_threads(config.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)
    model = SASRec(config.model_config(split.num_items))
    module = SASRecModule(model, split, config, seed, cache_dir)
    data = SASRecDataModule(split, config, seed)
    best = BestWeights(module.monitor)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config.max_epochs,
        max_time=None if config.max_time_s is None else {"seconds": config.max_time_s},
        check_val_every_n_epoch=config.check_val_every_n_epoch,
        callbacks=[L.pytorch.callbacks.EarlyStopping(module.monitor, mode="max", patience=config.patience), best],
        num_sanity_val_steps=0,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_time = time.perf_counter() - start
    if best.best_state is None:
        raise RuntimeError("training ended before the first validation check")
    model.load_state_dict(best.best_state)
    model.eval()
    info = {
        "best_epoch": best.best_epoch,
        "best_val": {"protocol": config.monitor_protocol, "metric": config.monitor_metric, "value": best.best_score},
        "epochs": trainer.current_epoch,
        "train_time_s": train_time,
        "time_to_best_s": best.time_to_best_s,
        "training_windows": len(data.train_set),
        "history": best.history,
        "config": asdict(config),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    log.info(
        "SASRec seed %d: best %s %s = %.4f at epoch %d (%.1fs to best, %.1fs total, %d epochs)",
        seed, config.monitor_protocol, config.monitor_metric, best.best_score, best.best_epoch,
        best.time_to_best_s, train_time, trainer.current_epoch,
    )  # fmt: skip
    return model, info

