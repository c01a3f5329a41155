"""The `train` kind: preflight, build, fit, publish, with pause, resume, cancel, finish and shutdown.

Order matters for users: everything that can fail fast (weights, paths, data) fails before epoch 1;
a cancelled run publishes nothing; a paused or suspended run leaves a checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs.context import JobCancelled, JobContext, JobPaused, JobSuspended
from dlwatchd.protocol.decode import schema_error
from dlwatchd.protocol.requests import TrainRequest
from dlwatchd.protocol.train_request import ResumeOverrides
from dlwatchd.spool.atomic import write_json_atomic

logger = logging.getLogger("dlwatchd.train")

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


def read_resume_overrides(job_dir: Path) -> ResumeOverrides:
    """resume.json, validated; absent → no overrides. Raises E_BAD_JSON / E_SCHEMA naming the file."""
    path = job_dir / "resume.json"
    if not path.exists():
        return ResumeOverrides()
    try:
        return ResumeOverrides.model_validate(json.loads(path.read_bytes()))
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise schema_error(exc, "resume.json") from None
        raise DlwatchdError(ErrorCode.BAD_JSON, f"resume.json is not valid JSON: {exc}.") from None


def run_train(ctx: JobContext, request: TrainRequest) -> dict[str, Any]:
    """Train per the request; returns the reference result fields plus dlwatchd's additions."""
    from dlwatchd.engine.device import release_device_memory

    checkpoint_path = ctx.job_dir / CHECKPOINT
    try:
        return _train(ctx, request, checkpoint_path)
    except JobCancelled:
        checkpoint_path.unlink(missing_ok=True)  # a cancelled training leaves no work files behind
        raise
    finally:
        release_device_memory()


def _train(ctx: JobContext, request: TrainRequest, checkpoint_path: Path) -> dict[str, Any]:
    from dlwatchd.engine import checkpoint as ckpt
    from dlwatchd.engine.training import Trainer, TrainingHooks, TrainingInterrupted
    from dlwatchd.jobs.train_setup import prepare

    started = time.monotonic()
    resume_state = ckpt.load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    overrides = read_resume_overrides(ctx.job_dir) if resume_state is not None else ResumeOverrides()
    ctx.progress(force=True, phase="preflight", epoch=0, total_epochs=overrides.epochs or request.training.epochs)
    setup = prepare(ctx, request, resume_state, overrides)

    def progress(fields: dict[str, Any], force: bool) -> None:
        ctx.progress(force=force, **{**setup.progress_base, **fields})

    hooks = TrainingHooks(
        progress=progress,
        check_cancel=ctx.check_cancel,
        pause_requested=lambda: ctx.marker("pause"),
        finish_requested=lambda: ctx.marker("finish"),
        suspend_requested=ctx.suspend_requested,
        epoch_done=lambda history: write_json_atomic(ctx.job_dir / HISTORY, history, durable=False),
        log=ctx.log,
    )
    trainer = Trainer(
        setup.model,
        setup.train,
        setup.validation,
        setup.fit_config,
        hooks,
        checkpoint_path,
        setup.checkpoint_extra,
    )
    if resume_state is not None:
        trainer.resume_from(resume_state)
        setup.reapply_after_resume(trainer)
        ctx.log(f"resumed from the checkpoint at epoch {trainer.start_epoch + 1}, batch {trainer.start_batch}")
    try:
        result = trainer.fit()
    except TrainingInterrupted as interruption:
        if interruption.reason == "pause":
            raise JobPaused() from None
        raise JobSuspended() from None
    ctx.check_cancel()
    ctx.progress(force=True, phase="export", epoch=result.epochs_trained, total_epochs=setup.fit_config.epochs)
    from dlwatchd.jobs.train_publish import publish

    ctx.check_fence()
    model_id, model_path, onnx = publish(ctx, request, setup, result, time.monotonic() - started)
    checkpoint_path.unlink(missing_ok=True)
    best, last = result.best_metrics, result.last_metrics
    return {
        "model_id": model_id,
        "model_path": str(model_path),
        "final_loss": best["val_loss"],
        "final_accuracy": best["accuracy"],
        "best_epoch": result.best_epoch,
        "best_loss": min((h["val_loss"] for h in result.history if h["val_loss"] is not None), default=None),
        "epochs_trained": result.epochs_trained,
        "early_stopped": result.early_stopped,
        "stop_reason": result.stop_reason,
        "monitor": result.monitor,
        "mean_iou": best["mean_iou"],
        "per_class_iou": best["per_class_iou"],
        "best_mean_iou": best["mean_iou"],
        "last_loss": last["val_loss"],
        "last_accuracy": last["accuracy"],
        "precision": setup.fit_config.precision,
        "device": setup.fit_config.device,
        "onnx_verified": bool(onnx.get("verified")),
        "warnings": setup.warnings,
        "duration_s": round(time.monotonic() - started, 1),
    }
