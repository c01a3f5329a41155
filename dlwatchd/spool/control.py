"""Control markers (PROTOCOL.md section 5) for jobs that no worker is running: queued and paused ones.

Markers of a running job are the worker's business (JobContext.check_cancel, the training loop); this
module is what the supervisor does when it notices a marker on a job that is waiting.
"""

from __future__ import annotations

import logging

from dlwatchd.protocol.status import JobState
from dlwatchd.spool.claims import claim_queued, commit_terminal, own_claims, release_to_queue
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.recovery import CHECKPOINT_NAME
from dlwatchd.spool.status_file import StatusFile, read_status

logger = logging.getLogger("dlwatchd.control")

TRAIN_ONLY_MARKERS = ("pause", "finish")


def cancel_queued(layout: SpoolLayout, job_id: str, daemon_id: str) -> bool:
    """Cancel a queued job at once (claim it first, so no other daemon starts it); True when cancelled."""
    claim = claim_queued(layout, job_id, daemon_id)
    if claim is None:
        return False
    StatusFile(layout.status_path(job_id)).update(state=JobState.CANCELLED, daemon=daemon_id)
    append_job_log(layout.log_path(job_id), "cancelled while queued")
    commit_terminal(layout, claim, job_id, "cancelled")
    logger.info("cancelled queued job %s", job_id)
    return True


def settle_paused(layout: SpoolLayout, job_id: str, daemon_id: str) -> str:
    """Act on the markers of a paused job this daemon holds: "cancelled", "resumed" or "paused"."""
    claim = own_claims(layout, daemon_id).get(job_id)
    status = read_status(layout.status_path(job_id))
    if claim is None or status is None or status.state is not JobState.PAUSED:
        return "gone"
    writer = StatusFile(layout.status_path(job_id))
    if layout.marker_path(job_id, "cancel").exists():
        writer.update(state=JobState.CANCELLED, daemon=daemon_id)
        (layout.job_dir(job_id) / CHECKPOINT_NAME).unlink(missing_ok=True)
        append_job_log(layout.log_path(job_id), "cancelled while paused; checkpoint removed")
        commit_terminal(layout, claim, job_id, "cancelled")
        return "cancelled"
    if not layout.marker_path(job_id, "pause").exists():
        writer.update(state=JobState.QUEUED, daemon=None, notes=[*status.notes, "resumed"])
        append_job_log(layout.log_path(job_id), "resumed: queued again")
        release_to_queue(layout, claim, job_id)
        return "resumed"
    return "paused"


def misplaced_markers(layout: SpoolLayout, job_id: str, kind: str | None) -> list[str]:
    """Train-only markers found on a job of another kind (each deserves one warning)."""
    if kind == "train":
        return []
    return [name for name in TRAIN_ONLY_MARKERS if layout.marker_path(job_id, name).exists()]
