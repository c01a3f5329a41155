"""The fit loop (ENGINE.md section 8.4): train, validate, select the best epoch, checkpoint, resume.

No spool, JSON or processes here: everything comes in as arguments, and progress, cancellation, pause,
finish and shutdown go through `TrainingHooks`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlwatchd.engine import checkpoint as ckpt
from dlwatchd.engine.augmentation import AugmentationConfig, TrainAugmentation, sample_generator
from dlwatchd.engine.freezing import trainable_parameters
from dlwatchd.engine.losses import build_loss
from dlwatchd.engine.metrics import EpochMetrics
from dlwatchd.engine.schedules import ScheduleSpec, build_scheduler, resolve_schedule, step_batch, step_epoch
from dlwatchd.engine.selection import EarlyStopping
from dlwatchd.engine.tiles import TileSet, batches, stack
from dlwatchd.errors import DlwatchdError, ErrorCode


@dataclass
class FitConfig:
    class_names: list[str]
    unlabeled_index: int = 255
    class_weights: list[float] | None = None
    epochs: int = 50
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    loss: str = "ce"
    focal_gamma: float = 2.0
    scheduler: str = "cosine"
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    early_stopping: bool = True
    patience: int = 10
    min_delta: float = 0.001
    monitor: str = "val_loss"
    gradient_clip_norm: float | None = None
    seed: int = 0
    augmentation: bool = True
    augmentation_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 1
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only, with a gradient scaler)
    channels_last: bool = True


@dataclass
class TrainingHooks:
    progress: Callable[[dict[str, Any], bool], None] = lambda fields, force: None
    check_cancel: Callable[[], None] = lambda: None
    pause_requested: Callable[[], bool] = lambda: False
    finish_requested: Callable[[], bool] = lambda: False
    suspend_requested: Callable[[], bool] = lambda: False
    epoch_done: Callable[[list[dict[str, Any]]], None] = lambda history: None
    log: Callable[[str], None] = lambda message: None


class TrainingInterrupted(Exception):
    """The run stopped at a safe point with a checkpoint written; `reason` is "pause" or "suspend"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int  # 1-based
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]
    epochs_trained: int
    early_stopped: bool
    stop_reason: str
    schedule: ScheduleSpec
    monitor: str
    peak_memory_mb: float | None
    duration_s: float


def _autocast(device: torch.device, precision: str) -> Any:
    if precision == "fp32" or device.type == "mps":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class Trainer:
    """One training run; `fit()` returns a FitResult or raises TrainingInterrupted / DlwatchdError."""

    def __init__(
        self,
        model: torch.nn.Module,
        train: TileSet,
        validation: TileSet,
        config: FitConfig,
        hooks: TrainingHooks,
        checkpoint_path: Path,
        checkpoint_extra: dict[str, Any],
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.train_set, self.val_set = train, validation
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        if config.channels_last and self.device.type != "mps":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.checkpoint_path = checkpoint_path
        self.checkpoint_extra = checkpoint_extra
        # A final batch of one is dropped for every architecture (ENGINE.md 3.6): BatchNorm on pooled
        # features cannot train on it, and the others lose nothing that matters.
        self.drop_singleton = True
        self.criterion = build_loss(
            config.loss,
            num_classes=len(config.class_names),
            class_weights=config.class_weights,
            ignore_index=config.unlabeled_index,
            focal_gamma=config.focal_gamma,
        )
        optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(
            trainable_parameters(self.model), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.batches_per_epoch = max(1, len(batches(range(len(train)), config.batch_size, self.drop_singleton)))
        self.schedule = resolve_schedule(
            config.scheduler,
            config.scheduler_config,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            batches_per_epoch=self.batches_per_epoch,
        )
        self.scheduler = build_scheduler(self.schedule, self.optimizer)
        self.scaler = (
            torch.amp.GradScaler("cuda") if config.precision == "fp16" and self.device.type == "cuda" else None
        )
        self.augment = (
            TrainAugmentation(AugmentationConfig.from_dict(config.augmentation_config), config.unlabeled_index)
            if config.augmentation
            else None
        )
        self.stopper = EarlyStopping(
            monitor=config.monitor, patience=config.patience, min_delta=config.min_delta, enabled=config.early_stopping
        )
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] = {}
        self.best_metrics: dict[str, Any] = {}
        self.best_loss = math.inf
        self.start_epoch, self.start_batch = 0, 0
        self.permutation: list[int] | None = None
        self.partial = (0.0, 0)
        self.global_step = 0
        self.nonfinite_epochs = 0

    # ---- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(
        self, epoch: int, batch_in_epoch: int, permutation: list[int] | None, partial: tuple[float, int]
    ) -> None:
        ckpt.save_checkpoint(
            self.checkpoint_path,
            {
                "model_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict() if self.scheduler is not None else None,
                "grad_scaler_state_dict": self.scaler.state_dict() if self.scaler is not None else None,
                "schedule": {
                    "name": self.schedule.name,
                    "params": self.schedule.params,
                    "step_per": self.schedule.step_per,
                },
                "training_history": self.history,
                "best_loss": self.best_loss,
                "best_model_state": self.best_state,
                "best_metrics": self.best_metrics,
                "early_stopping": self.stopper.state_dict(),
                "position": {
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "global_step": self.global_step,
                    "permutation": permutation or [],
                    "partial_loss_sum": partial[0],
                    "partial_batches": partial[1],
                },
                "nonfinite_epochs": self.nonfinite_epochs,
                "rng": ckpt.rng_state(),
                "seed": self.config.seed,
                **self.checkpoint_extra,
            },
        )

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, history, selection and position."""
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        if self.scheduler is not None and state.get("scheduler_state_dict") is not None:
            self.scheduler.load_state_dict(state["scheduler_state_dict"])
        if self.scaler is not None and state.get("grad_scaler_state_dict") is not None:
            self.scaler.load_state_dict(state["grad_scaler_state_dict"])
        self.history = list(state.get("training_history", []))
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_state = dict(state.get("best_model_state") or {})
        self.best_metrics = dict(state.get("best_metrics") or {})
        self.stopper.load_state_dict(state["early_stopping"])
        position = state["position"]
        self.start_epoch, self.start_batch = int(position["epoch"]), int(position["batch_in_epoch"])
        self.permutation = [int(i) for i in position["permutation"]] or None
        self.partial = (float(position["partial_loss_sum"]), int(position["partial_batches"]))
        self.global_step = int(position["global_step"])
        self.nonfinite_epochs = int(state.get("nonfinite_epochs", 0))
        ckpt.restore_rng(state["rng"])

    # ---- the loop ---------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_set), generator=generator).tolist()

    def _train_batch(self, epoch: int, indices: list[int]) -> float:
        losses = []
        self.optimizer.zero_grad(set_to_none=True)
        total = len(indices)
        for images, masks in self._augmented(epoch, indices):
            images = _to_device(images, self.device, self.config.channels_last)
            masks = masks.to(self.device)
            with _autocast(self.device, self.config.precision):
                logits = self.model(images)
            loss = self.criterion(logits.float(), masks)
            share = loss * (images.shape[0] / total)
            (self.scaler.scale(share) if self.scaler is not None else share).backward()
            losses.append(float(loss.detach()) * images.shape[0] / total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.gradient_clip_norm:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.config.gradient_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.global_step += 1
        step_batch(self.scheduler, self.schedule)
        return sum(losses)

    def _augmented(self, epoch: int, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.augment is None:
            return stack(self.train_set, indices)
        images, masks = [], []
        for index in indices:
            generator = sample_generator(self.config.seed, epoch, index)
            image, mask = self.augment(self.train_set.images[index], self.train_set.masks[index], generator)
            images.append(image)
            masks.append(mask)
        augmented = TileSet(images, masks, [self.train_set.names[i] for i in indices])
        return stack(augmented, range(len(indices)))

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        self.model.eval()
        metrics = EpochMetrics(len(self.config.class_names), self.config.unlabeled_index)
        try:
            for indices in batches(range(len(self.val_set)), self.config.batch_size, drop_singleton=False):
                self.hooks.check_cancel()
                for images, masks in stack(self.val_set, indices):
                    images = _to_device(images, self.device, self.config.channels_last)
                    masks = masks.to(self.device)
                    with _autocast(self.device, self.config.precision):
                        logits = self.model(images)
                    logits = logits.float()
                    metrics.add_batch_loss(float(self.criterion(logits, masks)))
                    metrics.update(logits, masks)
        finally:
            self.model.train()
        return metrics.result(self.config.class_names)

    def fit(self) -> FitResult:
        started = time.monotonic()
        config = self.config
        self.model.train()
        early_stopped, stop_reason = False, "epochs_done"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for epoch in range(self.start_epoch, config.epochs):
            epoch_started = time.monotonic()
            learning_rate = float(self.optimizer.param_groups[0]["lr"])
            resuming = epoch == self.start_epoch and self.start_batch > 0 and self.permutation is not None
            order = self.permutation if resuming and self.permutation is not None else self._order(epoch)
            chunks = batches(order, config.batch_size, self.drop_singleton)
            first = self.start_batch if resuming else 0
            loss_sum, done = self.partial if resuming else (0.0, 0)
            for batch_index in range(first, len(chunks)):
                self.hooks.check_cancel()
                if self.hooks.suspend_requested():
                    self._checkpoint(epoch, batch_index, order, (loss_sum, done))
                    raise TrainingInterrupted("suspend")
                loss_sum += self._train_batch(epoch, chunks[batch_index])
                done += 1
                elapsed = time.monotonic() - epoch_started
                per_batch = elapsed / max(1, done - (self.partial[1] if resuming else 0))
                remaining = (len(chunks) - batch_index - 1) + (config.epochs - epoch - 1) * len(chunks)
                self.hooks.progress(
                    {"phase": "train", "epoch": len(self.history), "batch": batch_index + 1,
                     "batches_per_epoch": len(chunks), "total_epochs": config.epochs,
                     "fraction": (epoch + (batch_index + 1) / len(chunks)) / config.epochs,
                     "eta_s": round(per_batch * remaining, 1)},
                    False,
                )  # fmt: skip
            train_loss = loss_sum / max(1, done)
            self.hooks.progress({"phase": "validate", "epoch": len(self.history)}, True)
            metrics = self._validate()
            record = self._record(epoch, train_loss, learning_rate, metrics, time.monotonic() - epoch_started)
            step_epoch(self.scheduler, self.schedule, epoch)
            if not (_finite(train_loss) and _finite(metrics.get("val_loss"))):
                self.nonfinite_epochs += 1
                if self.nonfinite_epochs >= 2:
                    raise DlwatchdError(
                        ErrorCode.NAN_LOSS,
                        f"The loss was not a finite number for two epochs in a row (epoch {epoch + 1}).",
                        hint="Lower the learning rate, or check the images for extreme values.",
                    )
                self.history.append(record)
                self.hooks.epoch_done(self.history)
                self.hooks.log(
                    f"epoch {epoch + 1}/{config.epochs}: the loss is not finite; the last good checkpoint stays"
                )
                continue  # the last good checkpoint stays as it is
            self.nonfinite_epochs = 0
            monitored = metrics["val_loss"] if self.stopper.monitor == "val_loss" else metrics["mean_iou"]
            improved = self.stopper.update(epoch, monitored)
            record["is_best"] = improved
            self.best_loss = min(self.best_loss, metrics["val_loss"])
            if improved:
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.best_metrics = dict(metrics, epoch=epoch + 1)
            self.history.append(record)
            self.hooks.epoch_done(self.history)
            self._publish_epoch(record)
            finished = self.hooks.finish_requested()
            if self.stopper.should_stop:
                early_stopped, stop_reason = True, "early_stopping"
            last_epoch = epoch + 1 >= config.epochs or early_stopped or finished
            if (
                config.checkpoint_every
                and (epoch + 1) % config.checkpoint_every == 0
                or (self.hooks.pause_requested() and not last_epoch)
            ):
                self._checkpoint(epoch + 1, 0, None, (0.0, 0))
            if finished:
                stop_reason = "finished_early"
                break
            if early_stopped:
                break
            if self.hooks.pause_requested() and not last_epoch:
                raise TrainingInterrupted("pause")
        if not self.best_state:
            raise DlwatchdError(
                ErrorCode.NAN_LOSS,
                "No epoch produced a finite validation loss, so there is no model to publish.",
                hint="Lower the learning rate, or check the images for extreme values.",
            )
        peak = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.device.type == "cuda" else None
        return FitResult(
            best_state=self.best_state,
            history=self.history,
            best_epoch=int(self.best_metrics["epoch"]),
            best_metrics=self.best_metrics,
            last_metrics=self.history[-1],
            epochs_trained=len(self.history),
            early_stopped=early_stopped,
            stop_reason=stop_reason,
            schedule=self.schedule,
            monitor=self.stopper.monitor,
            peak_memory_mb=peak,
            duration_s=round(time.monotonic() - started, 2),
        )

    def _record(
        self, epoch: int, train_loss: float, learning_rate: float, metrics: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss if _finite(train_loss) else None,
            "val_loss": metrics.get("val_loss"),
            "accuracy": metrics.get("accuracy"),
            "learning_rate": learning_rate,
            "per_class_iou": metrics.get("per_class_iou", {}),
            "per_class_loss": metrics.get("per_class_loss", {}),
            "mean_iou": metrics.get("mean_iou"),
            "epoch_time_s": round(seconds, 3),
            "is_best": False,
        }
        if self.device.type == "cuda":
            record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return record

    def _publish_epoch(self, record: dict[str, Any]) -> None:
        self.hooks.log(epoch_line(record, self.config.epochs))
        self.hooks.progress(
            {
                "phase": "train",
                "epoch": record["epoch"],
                "total_epochs": self.config.epochs,
                "fraction": record["epoch"] / self.config.epochs,
                "loss": record["val_loss"],
                "train_loss": record["train_loss"],
                "accuracy": record["accuracy"],
                "mean_iou": record["mean_iou"],
                "per_class_iou": record["per_class_iou"],
                "per_class_loss": record["per_class_loss"],
                "learning_rate": record["learning_rate"],
                "best_epoch": (self.stopper.best_epoch + 1) if self.stopper.best_epoch is not None else None,
                "best_value": self.stopper.best_value,
            },
            True,
        )


def epoch_line(record: dict[str, Any], total_epochs: int) -> str:
    """One readable line of an epoch's figures for the job's log.txt."""

    def figure(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "n/a"

    best = ", best so far" if record.get("is_best") else ""
    return (
        f"epoch {record['epoch']}/{total_epochs}: train loss {figure(record['train_loss'])}, "
        f"val loss {figure(record['val_loss'])}, accuracy {figure(record['accuracy'])}, "
        f"mean IoU {figure(record['mean_iou'])}, lr {record['learning_rate']:.3g}, "
        f"{record['epoch_time_s']:.1f} s{best}"
    )


def copy_to_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """A float32, contiguous-format CPU copy for export; the original is left untouched."""
    clone = copy.deepcopy(model).to("cpu").float()
    return clone.to(memory_format=torch.contiguous_format)
