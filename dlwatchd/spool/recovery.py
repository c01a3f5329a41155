"""Recovery of interrupted jobs: after a worker death, at restart, and when taking over a dead daemon.

One rule for all three (PROTOCOL.md section 9): a job whose status is already terminal only needs its
final move; a job of a retry kind runs again while attempts remain; a resumable job resumes from its
checkpoint; anything else fails with a clear code. Nothing stays in running/ without an owner.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry
from dlwatchd.protocol.status import ErrorInfo, JobState
from dlwatchd.spool.atomic import rename_claim
from dlwatchd.spool.claims import claims_by_daemon, commit_terminal, release_to_queue
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile, read_status

logger = logging.getLogger("dlwatchd.recovery")

CHECKPOINT_NAME = "checkpoint.pt"

_CAUSES = {
    ErrorCode.WORKER_DIED: ("worker_death", "the worker process running it died"),
    ErrorCode.INTERRUPTED: ("restart", "the daemon running it stopped"),
}


def reconcile(
    layout: SpoolLayout,
    registry: KindRegistry,
    job_id: str,
    claim: Path,
    daemon_id: str,
    code: ErrorCode,
) -> str:
    """Bring one claimed, no longer running job to a defined state; returns what was done.

    `code` is E_WORKER_DIED or E_INTERRUPTED, used when the job cannot run again. Returns one of
    "committed", "requeued", "failed", "cancelled", "paused", "lost" (the claim was taken meanwhile).
    """
    tag, cause = _CAUSES[code]
    status_path = layout.status_path(job_id)
    status = read_status(status_path)
    log = layout.log_path(job_id)
    if status is None:
        layout.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        error = DlwatchdError(code, f"The job was interrupted because {cause}, and its status was lost.")
        StatusFile(status_path).create(
            job_id=job_id,
            kind=None,
            state=JobState.FAILED,
            daemon=daemon_id,
            error=ErrorInfo.from_error(error),
        )
        return "failed" if commit_terminal(layout, claim, job_id, "failed") else "lost"
    if status.state.terminal:
        return "committed" if commit_terminal(layout, claim, job_id, status.state.value) else "lost"
    if status.state is JobState.PAUSED:
        return "paused"
    writer = StatusFile(status_path)
    if status.state is JobState.CANCELLING:
        mark_cancelled(layout, job_id, writer, f"{cause} while it was being cancelled", daemon=daemon_id)
        return "cancelled" if commit_terminal(layout, claim, job_id, "cancelled") else "lost"
    if status.state is JobState.QUEUED:
        # Claimed but never started: put it back without spending an attempt.
        return "requeued" if release_to_queue(layout, claim, job_id) else "lost"

    kind = registry.get(status.kind) if status.kind is not None and status.kind in registry else None
    policy = kind.on_interrupt if kind else "fail"
    attempts_left = kind is not None and status.attempt < kind.max_attempts
    has_checkpoint = (layout.job_dir(job_id) / CHECKPOINT_NAME).exists()
    if policy == "retry" and attempts_left:
        note = f"retried_after_{tag}"
    elif policy == "resume" and has_checkpoint and (code is ErrorCode.INTERRUPTED or attempts_left):
        # A stopped daemon may resume a training any number of times; a crashing worker only once.
        note = f"resumed_after_{tag}"
    else:
        note = None
    if note is not None:
        writer.update(
            state=JobState.QUEUED,
            daemon=None,
            attempt=status.attempt + 1,
            notes=[*status.notes, note],
        )
        append_job_log(log, f"queued again ({note}): {cause}")
        logger.warning("job %s queued again: %s", job_id, cause)
        return "requeued" if release_to_queue(layout, claim, job_id) else "lost"

    if policy == "resume" and not has_checkpoint:
        message = f"The training was interrupted before its first checkpoint because {cause}."
    elif policy in ("retry", "resume"):
        message = f"The job was interrupted because {cause}, on its last allowed attempt ({status.attempt})."
    else:
        message = f"The job was interrupted because {cause}."
    error = DlwatchdError(code, message, hint="Submit the request again with a new job id.")
    writer.update(state=JobState.FAILED, daemon=daemon_id, error=ErrorInfo.from_error(error))
    append_job_log(log, f"failed: {code.value}: {message}")
    logger.error("job %s failed: %s", job_id, message)
    return "failed" if commit_terminal(layout, claim, job_id, "failed") else "lost"


def mark_cancelled(layout: SpoolLayout, job_id: str, writer: StatusFile, why: str, daemon: str | None = None) -> None:
    """Write the `cancelled` status of a job that could not write it itself; a cancelled job leaves no work files."""
    changes: dict[str, object] = {"state": JobState.CANCELLED}
    if daemon is not None:
        changes["daemon"] = daemon
    writer.update(**changes)
    (layout.job_dir(job_id) / CHECKPOINT_NAME).unlink(missing_ok=True)
    append_job_log(layout.log_path(job_id), f"cancelled ({why})")


def take_over(layout: SpoolLayout, registry: KindRegistry, dead_id: str, my_id: str) -> dict[str, str]:
    """Fence and reconcile every claim of a dead daemon; job id -> what was done."""
    outcomes: dict[str, str] = {}
    for job_id, claim in claims_by_daemon(layout).get(dead_id, {}).items():
        mine = layout.claim_path(job_id, my_id)
        if not rename_claim(claim, mine):  # renaming the claim is the fence against a zombie owner
            continue
        append_job_log(layout.log_path(job_id), f"taken over by {my_id} from {dead_id}")
        outcomes[job_id] = reconcile(layout, registry, job_id, mine, my_id, ErrorCode.INTERRUPTED)
    return outcomes
