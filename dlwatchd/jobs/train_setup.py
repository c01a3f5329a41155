"""Everything a training needs before epoch 1: weights, paths, data preflight, normalization, model, device."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlwatchd.catalog.architectures import resolve_architecture
from dlwatchd.catalog.encoders import weights_tag
from dlwatchd.engine.dataset import DatasetIndex, discover, preflight
from dlwatchd.engine.device import cpu_description, detect_device_type
from dlwatchd.engine.freezing import apply_freezing
from dlwatchd.engine.io import read_image, read_mask, select_channels
from dlwatchd.engine.models import build_model
from dlwatchd.engine.normalization import NormalizationConfig, Normalizer, fit_dataset_stats, summary_stats
from dlwatchd.engine.schedules import apply_learning_rate_override, rebuild_onecycle
from dlwatchd.engine.tiles import TileSet, build_tileset
from dlwatchd.engine.training import FitConfig, Trainer
from dlwatchd.engine.weights import WeightsStore, missing_weights_error
from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs.context import JobContext
from dlwatchd.protocol.requests import TrainRequest
from dlwatchd.protocol.train_request import ResumeOverrides
from dlwatchd.spool.paths import resolve_read_path

if TYPE_CHECKING:
    from dlwatchd.engine.dataset import PreflightReport


@dataclass
class TrainSetup:
    model: torch.nn.Module
    train: TileSet
    validation: TileSet
    fit_config: FitConfig
    normalization: NormalizationConfig
    normalization_stats: list[dict[str, Any]]
    index: DatasetIndex
    report: PreflightReport
    in_channels: int
    unlabeled_index: int
    class_weights: list[float] | None
    frozen_applied: list[str]
    weights_info: dict[str, Any]
    overrides: ResumeOverrides
    checkpoint_extra: dict[str, Any]
    progress_base: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def reapply_after_resume(self, trainer: Trainer) -> None:
        """Freezing again (load_state_dict does not restore requires_grad), then the resume overrides."""
        apply_freezing(trainer.model, self.frozen_applied, self.in_channels)
        changed = self.overrides.model_dump(exclude_none=True)
        if trainer.start_batch and ("batch_size" in changed or "data_path" in changed):
            trainer.start_batch, trainer.permutation = 0, None  # a new batching restarts the interrupted epoch
        if trainer.schedule.name == "onecycle" and changed:
            # the number of steps left changes with epochs, batch size or data: rebuild and fast-forward
            trainer.scheduler, trainer.schedule = rebuild_onecycle(
                trainer.optimizer,
                trainer.schedule,
                steps_done=trainer.global_step,
                epochs=self.fit_config.epochs - trainer.start_epoch,
                batches_per_epoch=trainer.batches_per_epoch,
                scheduler_state=trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
                batch_in_epoch=trainer.start_batch,
            )
        if self.overrides.learning_rate is not None:
            trainer.schedule = apply_learning_rate_override(
                trainer.optimizer,
                trainer.scheduler,
                trainer.schedule,
                self.overrides.learning_rate,
                self.fit_config.scheduler_config,
            )


def resolve_device(requested: str) -> str:
    """`auto` → the detected device (cuda:0 > mps > cpu); an unavailable explicit device is an error."""
    detected = detect_device_type()
    if requested == "auto":
        return "cuda:0" if detected == "cuda" else detected
    if requested.startswith("cuda") and detected != "cuda":
        raise DlwatchdError(
            ErrorCode.SCHEMA, "The training asks for a CUDA device, but none is available.", field="training.device"
        )
    if requested == "mps" and detected != "mps":
        raise DlwatchdError(
            ErrorCode.SCHEMA, "The training asks for Apple MPS, which is not available.", field="training.device"
        )
    return "cuda:0" if requested == "cuda" else requested


def resolve_precision(requested: str, device: str, mixed_precision: bool) -> tuple[str, str | None]:
    """The autocast precision actually used, and a warning when the request could not be honoured."""
    if device.startswith("cuda"):
        if requested == "fp32" and not mixed_precision:
            return "fp32", None
        return ("bf16", None) if torch.cuda.is_bf16_supported() else ("fp16", None)
    if device == "mps":
        return "fp32", ("mixed precision is not used on Apple MPS" if requested == "bf16" or mixed_precision else None)
    warning = "mixed_precision applies to CUDA only and was ignored" if mixed_precision else None
    if requested == "auto":
        return ("bf16" if cpu_description()["bf16_native"] else "fp32"), warning
    return requested, warning


def _seed(params_seed: int | None, resume_state: dict[str, Any] | None) -> int:
    if resume_state is not None and resume_state.get("seed") is not None:
        return int(resume_state["seed"])
    seed = params_seed if params_seed is not None else random.SystemRandom().randrange(2**32)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def prepare(
    ctx: JobContext, request: TrainRequest, resume_state: dict[str, Any] | None, overrides: ResumeOverrides
) -> TrainSetup:
    """Preflight in the order that fails fastest; raises DlwatchdError naming the field or file at fault."""
    params = request.training
    encoder = request.architecture.backbone
    store = WeightsStore(ctx.weights_dir)
    if request.architecture.use_pretrained and store.resolve(encoder) is None:
        raise missing_weights_error(encoder, weights_tag(encoder))  # before a single image is read
    data_path = resolve_read_path(overrides.data_path or request.data_path, ctx.read_roots, field="data_path")
    index = discover(data_path)
    classes = list(request.classes)
    unlabeled = index.config.unlabeled_index
    class_weights = params.class_weights or index.config.class_weights
    in_channels = request.input_config.num_channels
    selected = request.input_config.selected_channels or None
    report = preflight(
        index,
        num_channels=in_channels,
        selected_channels=selected,
        class_names=classes,
        class_weights=class_weights,
        architecture=request.model_type,
        bit_depth=request.input_config.bit_depth,
    )
    warnings = list(report.warnings)
    stored = (resume_state or {}).get("training_config", {}).get("normalization")
    normalization = NormalizationConfig.from_dict(stored or request.input_config.normalization.model_dump())

    def raw(sample: Any) -> np.ndarray:
        return select_channels(read_image(sample.image), selected, name=sample.image.name)

    if stored is None and normalization.scope == "dataset":
        normalization = fit_dataset_stats((raw(s) for s in index.train), normalization)
    normalizer = Normalizer(normalization)
    divisor = resolve_architecture(request.model_type).size_divisor
    raw_train: list[np.ndarray] = []
    degenerate = 0

    def loader(sample: Any, keep: bool) -> tuple[str, Any, Any]:
        def load_image() -> np.ndarray:
            nonlocal degenerate
            image = raw(sample)
            if keep:
                raw_train.append(image)
            normalized, count = normalizer.apply(image)
            degenerate += count
            return normalized

        return sample.stem, load_image, lambda: read_mask(sample.mask)

    train = build_tileset([loader(s, True) for s in index.train], divisor=divisor, unlabeled_index=unlabeled)
    validation = build_tileset([loader(s, False) for s in index.validation], divisor=divisor, unlabeled_index=unlabeled)
    stats = summary_stats(raw_train)
    raw_train.clear()
    if degenerate:
        warnings.append(f"{degenerate} image channel(s) were constant and were set to 0.0 by normalization.")
    seed = _seed(params.seed, resume_state)  # before the model is built: its initial weights come from the seed
    model, model_warnings = build_model(
        request.model_type,
        encoder,
        in_channels,
        len(classes),
        use_pretrained=request.architecture.use_pretrained,
        store=store,
    )
    frozen, freeze_warnings = apply_freezing(model, request.architecture.frozen_layers, in_channels)
    warnings += model_warnings + freeze_warnings
    device = resolve_device(params.device)
    precision, precision_warning = resolve_precision(params.precision, device, params.mixed_precision)
    if precision_warning:
        warnings.append(precision_warning)
    fit_config = FitConfig(
        class_names=classes,
        unlabeled_index=unlabeled,
        class_weights=class_weights,
        epochs=overrides.epochs or params.epochs,
        batch_size=overrides.batch_size or params.batch_size,
        learning_rate=params.learning_rate,
        weight_decay=params.weight_decay,
        optimizer=params.optimizer,
        loss=params.loss,
        focal_gamma=params.focal_gamma,
        scheduler=params.scheduler,
        scheduler_config=params.scheduler_config.model_dump(exclude_none=True),
        early_stopping=params.early_stopping,
        patience=params.early_stopping_patience,
        min_delta=params.early_stopping_min_delta,
        monitor=params.early_stopping_metric,
        gradient_clip_norm=params.gradient_clip_norm,
        seed=seed,
        augmentation=params.augmentation,
        augmentation_config=params.augmentation_config.model_dump(exclude_none=True),
        checkpoint_every=params.checkpoint_every_epochs,
        device=device,
        precision=precision,
        channels_last=device != "mps",
    )
    for warning in warnings:
        ctx.warn("W_TRAINING", warning)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory = estimate_memory_mb(model, train, fit_config.batch_size, precision)
    ctx.log(
        f"model {request.model_type}/{encoder}: {parameters} parameters ({parameters * 4 / 2**20:.1f} MB), "
        f"{trainable} trainable; about {memory:.0f} MB for training at batch {fit_config.batch_size}; "
        f"device {device}, precision {precision}, seed {seed}; {len(train)} train / {len(validation)} validation tiles"
    )
    return TrainSetup(
        model=model,
        train=train,
        validation=validation,
        fit_config=fit_config,
        normalization=normalization,
        normalization_stats=stats,
        index=index,
        report=report,
        in_channels=in_channels,
        unlabeled_index=unlabeled,
        class_weights=class_weights,
        frozen_applied=frozen,
        weights_info={"use_pretrained": request.architecture.use_pretrained, "tag": weights_tag(encoder)},
        overrides=overrides,
        checkpoint_extra={
            "training_config": {
                "model_type": request.model_type,
                "normalization": normalization.to_dict(),
                "classes": classes,
                "data_path": str(data_path),
                "unlabeled_index": unlabeled,
                "class_weights": class_weights,
                "training_params": params.model_dump(mode="json"),
            },
            "frozen_layers": frozen,
        },
        progress_base={
            "model_params": parameters,
            "model_mb": round(parameters * 4 / 2**20, 1),
            "estimated_training_mb": round(memory),
            "device": device,
            "precision": precision,
        },
        warnings=warnings,
    )


def estimate_memory_mb(model: torch.nn.Module, tiles: TileSet, batch_size: int, precision: str) -> float:
    """Weights, gradients and Adam's two moments, plus activations measured by one forward pass of one tile."""
    parameters = sum(p.numel() for p in model.parameters())
    sizes: list[int] = []
    hooks = [
        module.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if isinstance(o, torch.Tensor) else 0))
        for module in model.modules()
        if not list(module.children())
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(tiles.images[0].unsqueeze(0))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    bytes_per_value = 2 if precision in ("bf16", "fp16") else 4
    activations = sum(sizes) * batch_size * bytes_per_value * 2  # kept for the backward pass, roughly doubled
    return (parameters * 4 * 4 + activations) / 2**20
