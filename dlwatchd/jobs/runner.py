"""Running one claimed job inside a worker, and mapping every way it can end to status.json (one place)."""

from __future__ import annotations

import errno
import functools
import json
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry, resolve_handler
from dlwatchd.jobs.context import JobCancelled, JobContext, JobFenced, JobPaused, JobSuspended, require_claim
from dlwatchd.protocol.status import ErrorInfo, JobState
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile

logger = logging.getLogger("dlwatchd.runner")

SUSPENDED = "suspended"  # not a protocol state: the job is queued again and resumes from its checkpoint
FENCED = "fenced"  # not a protocol state: the claim was taken away, nothing of this run is published

# A final status that cannot be written (disk full, share gone) is retried with these pauses, then every
# _RECORD_RETRY_MAX_S until it lands: the job keeps its claim meanwhile and health says why.
_RECORD_RETRY_FIRST_S = 0.2
_RECORD_RETRY_MAX_S = 5.0


def error_for_exception(exc: BaseException) -> DlwatchdError:
    """The protocol error for any exception a handler raised."""
    if isinstance(exc, DlwatchdError):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return DlwatchdError(
            ErrorCode.OUT_OF_MEMORY,
            "The job ran out of memory.",
            hint="Use a smaller batch size or tile size, or free memory with a gpu-clear request.",
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DlwatchdError(
                ErrorCode.DISK_FULL,
                f"The disk is full{where}.",
                hint="Free disk space, then submit the job again.",
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return DlwatchdError(
                ErrorCode.PERMISSION,
                f"Permission denied{where}.",
                hint="Give the daemon's user access to that file or folder.",
            )
        if exc.errno == errno.ENOENT:
            return DlwatchdError(ErrorCode.NOT_FOUND, f"A file or folder does not exist{where}.")
    return DlwatchdError(
        ErrorCode.INTERNAL,
        f"An internal error stopped the job: {type(exc).__name__}: {exc}.",
        hint="See log.txt in the job folder and report it with that file.",
    )


def start_job(
    job: dict[str, Any],
    registry: KindRegistry,
    send: Callable[[dict[str, Any]], None],
    suspend: Callable[[], bool] = lambda: False,
    resources: dict[str, Any] | None = None,
) -> JobContext | None:
    """Mark a claimed job running and build its context; None when the claim is already gone (fenced)."""
    layout = SpoolLayout(Path(job["spool"]))
    job_id = job["job_id"]
    claim = Path(job["claim"])
    kind = registry.get(job["kind"])
    if not claim.exists():
        return None
    status = StatusFile(layout.status_path(job_id), guard=functools.partial(require_claim, claim))
    ctx = JobContext(
        job_id=job_id,
        kind=kind.name,
        request=None,  # set by load_request once the request parsed
        attempt=job["attempt"],
        layout=layout,
        status=status,
        claim=claim,
        read_roots=[Path(p) for p in job["read_roots"]],
        write_roots=[Path(p) for p in job["write_roots"]],
        weights_dir=Path(job["weights_dir"]),
        model_dirs=[Path(p) for p in job["model_dirs"]],
        send=send,
        suspend_requested=suspend,
        resources=resources if resources is not None else {},
    )
    return ctx


def mark_running(ctx: JobContext, job: dict[str, Any]) -> None:
    """The first status write of a run; an OSError here fails the job like any other (see conclude)."""
    ctx.status.update(state=JobState.RUNNING, daemon=job["daemon"], attempt=job["attempt"], error=None)
    ctx.log(f"started by {job['daemon']} (attempt {job['attempt']}, lane {job['lane']})")


def load_request(ctx: JobContext, registry: KindRegistry) -> Any:
    """The job's accepted request, as its kind's model."""
    model = registry.get(ctx.kind).request_model
    ctx.request = model.model_validate(json.loads(ctx.layout.request_path(ctx.job_id).read_bytes()))
    return ctx.request


def conclude(ctx: JobContext, outcome: Any) -> str:
    """Write the final status for a handler's result dict or the exception it raised; returns the end state.

    Returns FENCED (nothing written) when the claim was taken away meanwhile. A final status that cannot be
    written (the disk is full, say) turns into a failure with that error, recorded as soon as it can be.
    """
    try:
        return _conclude(ctx, outcome)
    except JobFenced as exc:
        logger.warning("job %s: %s; its work is discarded", ctx.job_id, exc)
        return FENCED
    except OSError as exc:
        return _fail(ctx, exc)


def _conclude(ctx: JobContext, outcome: Any) -> str:
    status = ctx.status
    try:
        if isinstance(outcome, BaseException):
            raise outcome
        ctx.check_fence()
        status.update(state=JobState.SUCCEEDED, result=outcome)
        ctx.log("succeeded")
        return JobState.SUCCEEDED.value
    except JobCancelled:
        ctx.check_fence()
        status.update(state=JobState.CANCELLED)
        ctx.log("cancelled")
        return JobState.CANCELLED.value
    except JobPaused:
        ctx.check_fence()
        status.update(state=JobState.PAUSED)
        ctx.log("paused")
        return JobState.PAUSED.value
    except JobSuspended:
        ctx.check_fence()
        current = status.current
        notes = [*(current.notes if current else []), "suspended_for_shutdown"]
        status.update(state=JobState.QUEUED, daemon=None, notes=notes)
        ctx.log("checkpointed and queued again: the daemon is stopping")
        return SUSPENDED
    except JobFenced:
        raise
    except Exception as exc:  # every failure ends in a status with a code, never in silence
        return _fail(ctx, exc)


def _fail(ctx: JobContext, exc: BaseException) -> str:
    """Record the failure `exc` stands for; retried until the status file takes it (or the claim is gone)."""
    error = error_for_exception(exc)
    if error.code is ErrorCode.INTERNAL:
        _log_quietly(ctx, "internal error:\n" + "".join(traceback.format_exception(exc)))
        logger.error("job %s failed with an internal error", ctx.job_id, exc_info=exc)
    else:
        _log_quietly(ctx, f"failed: {error.code.value}: {error.message}")
    pause = _RECORD_RETRY_FIRST_S
    stuck = False
    while True:
        try:
            ctx.status.update(state=JobState.FAILED, error=ErrorInfo.from_error(error))
        except JobFenced:
            return FENCED
        except OSError as write_error:
            reason = f"cannot record the end of job {ctx.job_id}: {write_error.strerror or write_error}"
            if not stuck:
                logger.error("%s; retrying until it can be written", reason)
                ctx.send({"op": "problem", "job_id": ctx.job_id, "problem": reason})
                stuck = True
            time.sleep(pause)
            pause = min(pause * 2, _RECORD_RETRY_MAX_S)
            continue
        if stuck:
            logger.info("job %s: its failure is recorded", ctx.job_id)
            ctx.send({"op": "problem", "job_id": ctx.job_id, "problem": None})
        return JobState.FAILED.value


def _log_quietly(ctx: JobContext, message: str) -> None:
    """log.txt is a courtesy; a full disk must not stop the failure from being recorded."""
    try:
        ctx.log(message)
    except OSError:
        logger.warning("job %s: log.txt cannot be written: %s", ctx.job_id, message.splitlines()[0])


def run_job(
    job: dict[str, Any],
    registry: KindRegistry,
    send: Callable[[dict[str, Any]], None],
    suspend: Callable[[], bool] = lambda: False,
    resources: dict[str, Any] | None = None,
) -> str:
    """Run the job described by `job` (from the supervisor) to its end; returns the state it ended in."""
    ctx = start_job(job, registry, send, suspend, resources)
    if ctx is None:
        return FENCED
    try:
        mark_running(ctx, job)
        request = load_request(ctx, registry)
        outcome: Any = resolve_handler(registry.get(ctx.kind).handler or "")(ctx, request)
    except Exception as exc:  # cancel, pause, errors: concluded below like every other ending
        outcome = exc
    return conclude(ctx, outcome)


def run_group(
    jobs: list[dict[str, Any]],
    registry: KindRegistry,
    send: Callable[[dict[str, Any]], None],
    resources: dict[str, Any],
) -> list[tuple[str, str]]:
    """Run jobs of one kind family together through the kind's group handler; (job id, end state) each.

    A job whose request cannot be loaded fails alone; the others still run.
    """
    contexts: list[JobContext] = []
    states: list[tuple[str, str]] = []
    for job in jobs:
        ctx = start_job(job, registry, send, resources=resources)
        if ctx is None:
            states.append((job["job_id"], FENCED))
            continue
        try:
            mark_running(ctx, job)
            load_request(ctx, registry)
        except Exception as exc:
            states.append((ctx.job_id, conclude(ctx, exc)))
            continue
        contexts.append(ctx)
    if contexts:
        group_handler = registry.get(contexts[0].kind).group_handler
        try:
            outcomes = resolve_handler(group_handler or "")(contexts)
        except Exception as exc:  # the whole group failed the same way
            outcomes = [exc] * len(contexts)
        states += [(ctx.job_id, conclude(ctx, outcome)) for ctx, outcome in zip(contexts, outcomes, strict=True)]
    return states
