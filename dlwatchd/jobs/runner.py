"""Running one claimed job inside a worker, and mapping every way it can end to status.json (one place)."""

from __future__ import annotations

import errno
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry, resolve_handler
from dlwatchd.jobs.context import JobCancelled, JobContext, JobFenced, JobPaused, JobSuspended
from dlwatchd.protocol.status import ErrorInfo, JobState
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile

logger = logging.getLogger("dlwatchd.runner")

SUSPENDED = "suspended"  # not a protocol state: the job is queued again and resumes from its checkpoint


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


def run_job(
    job: dict[str, Any],
    registry: KindRegistry,
    send: Callable[[dict[str, Any]], None],
    suspend: Callable[[], bool] = lambda: False,
) -> str:
    """Run the job described by `job` (from the supervisor) to its end; returns the state it ended in.

    Returns "fenced" when the claim was taken away, in which case nothing was published.
    """
    layout = SpoolLayout(Path(job["spool"]))
    job_id = job["job_id"]
    claim = Path(job["claim"])
    kind = registry.get(job["kind"])
    status = StatusFile(layout.status_path(job_id))
    if not claim.exists():
        return "fenced"
    request = kind.request_model.model_validate(json.loads(layout.request_path(job_id).read_bytes()))
    status.update(state=JobState.RUNNING, daemon=job["daemon"], attempt=job["attempt"], error=None)
    ctx = JobContext(
        job_id=job_id,
        kind=kind.name,
        request=request,
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
    )
    ctx.log(f"started by {job['daemon']} (attempt {job['attempt']}, pid lane {job['lane']})")
    try:
        handler = resolve_handler(kind.handler or "")
        result = handler(ctx, request)
        ctx.check_fence()
        status.update(state=JobState.SUCCEEDED, result=result)
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
    except JobFenced as exc:
        logger.warning("job %s: %s; its work is discarded", job_id, exc)
        return "fenced"
    except Exception as exc:  # every failure ends in a status with a code, never in silence
        error = error_for_exception(exc)
        if error.code is ErrorCode.INTERNAL:
            ctx.log("internal error:\n" + "".join(traceback.format_exception(exc)))
            logger.exception("job %s failed with an internal error", job_id)
        else:
            ctx.log(f"failed: {error.code.value}: {error.message}")
        if not claim.exists():
            return "fenced"
        status.update(state=JobState.FAILED, error=ErrorInfo.from_error(error))
        return JobState.FAILED.value
