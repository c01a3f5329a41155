"""What the supervisor does to keep every job owned: after a worker death, at start, and for dead peers.

The rules themselves live in spool/recovery.py; these functions apply them to the supervisor's state
(its paused set, queue and counters).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dlwatchd.errors import ErrorCode
from dlwatchd.spool.claims import own_claims
from dlwatchd.spool.intake import IntakeReport
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.recovery import reconcile, take_over
from dlwatchd.spool.status_file import read_status
from dlwatchd.supervisor.slurm_lane import SlurmLane

if TYPE_CHECKING:
    from dlwatchd.supervisor.daemon import Supervisor
    from dlwatchd.supervisor.lanes import Lane, RunningJob

logger = logging.getLogger("dlwatchd.supervisor")


def on_worker_death(sup: Supervisor, lane: Lane) -> None:
    """Schedule the lane's restart and bring the job it was running to a defined state."""
    sup.counters.worker_restarts += 1
    for job in lane.reap():
        _reconcile_dead_worker_job(sup, lane, job)


def _reconcile_dead_worker_job(sup: Supervisor, lane: Lane, job: RunningJob) -> None:
    append_job_log(sup.layout.log_path(job.job_id), f"the {lane.name} worker died ({lane.last_error})")
    outcome = reconcile(sup.layout, sup.registry, job.job_id, Path(job.claim), sup.me, ErrorCode.WORKER_DIED)
    logger.error("job %s: worker of lane %s died; %s", job.job_id, lane.name, outcome)
    sup.counters.failed += outcome == "failed"
    if outcome == "paused":
        sup.paused.add(job.job_id)
    elif outcome == "requeued":
        sup.refresh_queue()
    else:
        sup.forget(job.job_id)


def recover_own(sup: Supervisor) -> None:
    """After a restart: finish interrupted intakes, then reconcile every claim this daemon id holds."""
    report = IntakeReport()
    sup.intake.recover_claims(sup.me, report)
    sup.count(report)
    for job_id, claim in own_claims(sup.layout, sup.me).items():
        if _adopt_slurm_job(sup, job_id, claim):
            continue
        outcome = reconcile(sup.layout, sup.registry, job_id, claim, sup.me, ErrorCode.INTERRUPTED)
        if outcome == "paused":
            sup.paused.add(job_id)
        logger.info("restart: job %s %s", job_id, outcome)


def _adopt_slurm_job(sup: Supervisor, job_id: str, claim: Path) -> bool:
    """A claimed job still (or recently) running as a Slurm job is followed again, never submitted twice."""
    status = read_status(sup.layout.status_path(job_id))
    if status is None or status.kind is None or status.state.terminal or status.kind not in sup.registry:
        return False
    lane = sup.lanes.get(sup.registry.get(status.kind).lane or "")
    if not isinstance(lane, SlurmLane):
        return False
    return lane.adopt(job_id, status.kind, claim, status.attempt, sup.me)


def adopt_orphans(sup: Supervisor) -> None:
    """Claims under this daemon's name that no lane runs and that are not paused get reconciled."""
    busy = {job.job_id for lane in sup.lanes.values() for job in lane.jobs} | sup.paused
    if sup.gpu_clear is not None:
        busy.add(sup.gpu_clear.job_id)
    for job_id, claim in own_claims(sup.layout, sup.me).items():
        if job_id not in busy:
            outcome = reconcile(sup.layout, sup.registry, job_id, claim, sup.me, ErrorCode.INTERRUPTED)
            if outcome == "paused":
                sup.paused.add(job_id)


def take_over_dead_peers(sup: Supervisor) -> None:
    """Fence and reconcile the claims (and unfinished intakes) of daemons whose heartbeat stopped."""
    for dead in sup.peers.dead_peers():
        report = IntakeReport()
        sup.intake.recover_claims(dead, report)
        sup.count(report)
        outcomes = take_over(sup.layout, sup.registry, dead, sup.me)
        for lane in sup.lanes.values():
            if isinstance(lane, SlurmLane):
                for job_id in outcomes:
                    lane.cancel_stale(job_id)  # the dead daemon's Slurm job would only be fenced later
        for job_id, outcome in outcomes.items():
            if outcome == "paused":
                sup.paused.add(job_id)
        if outcomes or report.accepted:
            sup.counters.takeovers += 1
            logger.warning("took over from dead daemon %s: %s", dead, outcomes)
            sup.refresh_queue()
