"""Job kinds for the end-to-end tests: slow, crashing and resumable jobs with observable side effects.

Loaded by the daemon under test through DLWATCHD_PLUGINS; never part of the product.
Every run appends a line to jobs/<id>/runs.txt, so tests can count how often a job really ran.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Literal

from pydantic import Field

from dlwatchd.jobs._registry import JobKind, KindRegistry
from dlwatchd.jobs.context import JobContext, JobPaused, JobSuspended
from dlwatchd.protocol.requests import RequestBase


class SleepRequest(RequestBase):
    kind: Literal["test-sleep"] = "test-sleep"
    steps: int = Field(1, ge=1, le=100000)
    step_s: float = Field(0.0, ge=0, le=60)
    crash: Literal["none", "exit", "kill", "raise"] = "none"
    crash_at_step: int = Field(0, ge=0)
    crash_attempts: list[int] = Field(default_factory=lambda: [1, 2, 3])


class TrainLikeRequest(SleepRequest):
    kind: Literal["test-train"] = "test-train"  # type: ignore[assignment]


def _record_run(ctx: JobContext) -> None:
    with open(ctx.job_dir / "runs.txt", "a") as handle:
        handle.write(f"{ctx.attempt} {os.getpid()} {time.time()}\n")


def _maybe_crash(request: SleepRequest, ctx: JobContext, step: int) -> None:
    if request.crash == "none" or step != request.crash_at_step or ctx.attempt not in request.crash_attempts:
        return
    if request.crash == "exit":
        os._exit(7)
    if request.crash == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("test crash")


def run_sleep(ctx: JobContext, request: SleepRequest) -> dict:
    _record_run(ctx)
    for step in range(request.steps):
        _maybe_crash(request, ctx, step)
        ctx.check_cancel()
        time.sleep(request.step_s)
        ctx.progress(step=step + 1, steps=request.steps, fraction=(step + 1) / request.steps)
    return {"steps": request.steps, "pid": os.getpid(), "attempt": ctx.attempt}


def run_train_like(ctx: JobContext, request: TrainLikeRequest) -> dict:
    """Steps with a checkpoint after each one; pause at a step boundary; resumes from the checkpoint."""
    _record_run(ctx)
    checkpoint = ctx.job_dir / "checkpoint.pt"
    start = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    for step in range(start, request.steps):
        _maybe_crash(request, ctx, step)
        ctx.check_cancel()
        time.sleep(request.step_s)
        tmp = checkpoint.with_name(".checkpoint.tmp")
        tmp.write_text(json.dumps({"step": step + 1}))
        os.replace(tmp, checkpoint)
        if ctx.suspend_requested() and step + 1 < request.steps:
            ctx.progress(force=True, step=step + 1, steps=request.steps, fraction=(step + 1) / request.steps)
            raise JobSuspended()
        pausing = ctx.marker("pause") and step + 1 < request.steps
        ctx.progress(force=pausing, step=step + 1, steps=request.steps, fraction=(step + 1) / request.steps)
        if pausing:
            raise JobPaused()
    return {"steps": request.steps, "resumed_from": start}


class BlockRequest(RequestBase):
    kind: Literal["test-block"] = "test-block"
    seconds: float = Field(1.0, ge=0, le=60)


def run_block(ctx: JobContext, request: BlockRequest) -> dict:
    """Runs inside the supervisor (no lane): it blocks the supervisor's loop on purpose."""
    time.sleep(request.seconds)
    return {"blocked_s": request.seconds}


class UnavailableRequest(RequestBase):
    kind: Literal["test-unavailable"] = "test-unavailable"


def register_kinds(registry: KindRegistry) -> None:
    registry.register(JobKind("test-block", BlockRequest, None, f"{__name__}:run_block"))
    # A kind whose engine "is not in this version": it must be rejected, never answered.
    registry.register(JobKind("test-unavailable", UnavailableRequest, "infer", None))
    registry.register(JobKind("test-sleep", SleepRequest, "infer", f"{__name__}:run_sleep"))
    registry.register(
        JobKind("test-train", TrainLikeRequest, "train", f"{__name__}:run_train_like", on_interrupt="resume")
    )
