"""Publishing a trained model: model.pt, model.onnx, metadata, preprocessing, history and report, atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlwatchd.artifacts.metadata import build_metadata, build_preprocessing
from dlwatchd.artifacts.model_store import new_model_id, publish_model
from dlwatchd.artifacts.report import write_training_report
from dlwatchd.catalog.architectures import resolve_architecture
from dlwatchd.catalog.encoders import encoder_base
from dlwatchd.engine.onnx_export import export_onnx
from dlwatchd.engine.quantize import INT8_NAME, MAX_CALIBRATION_TILES, quantize_onnx
from dlwatchd.engine.tiles import TileSet
from dlwatchd.engine.training import FitResult, copy_to_cpu
from dlwatchd.jobs.context import JobContext
from dlwatchd.protocol.requests import TrainRequest
from dlwatchd.spool.atomic import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from dlwatchd.jobs.train_setup import TrainSetup


def training_summary(request: TrainRequest, setup: TrainSetup, result: FitResult, duration_s: float) -> dict[str, Any]:
    """The metadata's `training` block (ENGINE.md section 11.3)."""
    best, last, config = result.best_metrics, result.last_metrics, setup.fit_config
    return {
        "epochs": config.epochs,
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "monitor": result.monitor,
        "early_stopped": result.early_stopped,
        "stop_reason": result.stop_reason,
        "final_loss": best["val_loss"],
        "final_accuracy": best["accuracy"],
        "last_loss": last["val_loss"],
        "last_accuracy": last["accuracy"],
        "best_mean_iou": best["mean_iou"],
        "per_class_iou": best["per_class_iou"],
        "confusion_matrix": best.get("confusion_matrix"),
        "loss": config.loss,
        "optimizer": config.optimizer,
        "scheduler": {"name": result.schedule.name, **result.schedule.params},
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "augmentation": config.augmentation,
        "augmentation_config": config.augmentation_config,
        "class_weights": setup.class_weights,
        "seed": config.seed,
        "precision": config.precision,
        "train_count": len(setup.train),
        "validation_count": len(setup.validation),
        "class_pixel_counts": setup.report.class_pixel_counts,
        "peak_memory_mb": result.peak_memory_mb,
        "duration_s": round(duration_s, 1),
        "device": config.device,
    }


def calibration_tiles(*tilesets: TileSet) -> list[np.ndarray]:
    """Normalized tiles for int8 calibration: the validation tiles first, then training tiles, up to the maximum."""
    tiles = [image.numpy() for tileset in tilesets for image in tileset.images]
    return tiles[:MAX_CALIBRATION_TILES]


def model_metadata(
    request: TrainRequest, setup: TrainSetup, model_id: str, training: dict[str, Any], onnx: dict[str, Any]
) -> dict[str, Any]:
    """metadata.json of a model trained by `request` with `setup`: the resolved normalization and architecture."""
    input_config = request.input_config.model_dump(mode="json")
    input_config["normalization"] = setup.normalization.to_dict()
    architecture = resolve_architecture(request.model_type)
    return build_metadata(
        model_id=model_id,
        model_type=request.model_type,
        architecture=request.architecture.model_dump(mode="json"),
        input_config=input_config,
        classes=list(request.classes),
        unlabeled_index=setup.unlabeled_index,
        normalization_stats=setup.normalization_stats,
        training=training,
        onnx=onnx,
        extra_architecture={
            "encoder_base": encoder_base(request.architecture.backbone),
            "encoder_weights": setup.weights_info["tag"] if setup.weights_info["use_pretrained"] else None,
            "in_channels": setup.in_channels,
            "num_classes": len(request.classes),
            "size_divisor": architecture.size_divisor,
            "frozen_layers_applied": setup.frozen_applied,
        },
    )


def publish(
    ctx: JobContext, request: TrainRequest, setup: TrainSetup, result: FitResult, duration_s: float
) -> tuple[str, Path, dict[str, Any]]:
    """Write the model folder under a temp name and rename it into models/; returns (id, path, onnx record)."""
    model = copy_to_cpu(setup.model)
    model.load_state_dict(result.best_state)
    model.eval()
    architecture = resolve_architecture(request.model_type)
    input_size = tuple(request.architecture.input_size)
    models_dir = ctx.layout.models
    onnx_record: dict[str, Any] = {}

    def files(folder: Path) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
        write_bytes_atomic(folder / "model.pt", buffer.getvalue())
        onnx_record.update(
            export_onnx(
                model,
                folder / "model.onnx",
                in_channels=setup.in_channels,
                input_size=(int(input_size[0]), int(input_size[1])),
                size_divisor=architecture.size_divisor,
            )
        )
        if not onnx_record.get("verified"):
            ctx.warn("W_ONNX", f"No model.onnx was published: {onnx_record.get('error')}")
        elif request.training.export_int8:
            onnx_record["int8"] = quantize_onnx(
                folder / "model.onnx", folder / INT8_NAME, calibration_tiles(setup.validation, setup.train)
            )
            if not onnx_record["int8"]["verified"]:
                ctx.warn("W_INT8", f"No {INT8_NAME} was published: {onnx_record['int8']['error']}.")
        metadata = model_metadata(
            request, setup, model_id, training_summary(request, setup, result, duration_s), onnx_record
        )
        write_json_atomic(folder / "metadata.json", metadata)
        write_json_atomic(folder / "preprocessing.json", build_preprocessing(metadata))
        write_json_atomic(folder / "training_history.json", result.history)
        write_training_report(
            folder / "training_report.png",
            result.history,
            list(request.classes),
            result.best_metrics.get("confusion_matrix"),
            result.best_epoch,
        )

    model_id = new_model_id(models_dir, request.model_type)
    path = publish_model(models_dir, model_id, files)
    ctx.log(f"published model {path.name} at {path}")
    return path.name, path, onnx_record
