"""A lane whose jobs run as Slurm jobs: sbatch on dispatch, `scontrol show job` to follow, scancel to cancel.

It stands where a local Lane stands in the supervisor (same attributes and calls), so the queue, claims, markers
and recovery stay as they are; only how a claimed job is run differs. The Slurm job runs `dlwatchd exec-job`,
which writes the job's status itself; this lane only writes a status when Slurm ended the job before the job
could say how it ended (killed, time limit, cancelled from outside, node failure) or while it is still pending.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry
from dlwatchd.jobs.runner import SUSPENDED
from dlwatchd.protocol.status import ErrorInfo, JobState, utc_now
from dlwatchd.settings import Settings
from dlwatchd.slurm.commands import SlurmCommands, SlurmJob, SlurmRefused, SlurmUnreachable
from dlwatchd.slurm.ticket import SCRIPT_NAME, SlurmTicket, job_name, read_ticket, write_ticket
from dlwatchd.spool.atomic import write_bytes_atomic
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.recovery import CHECKPOINT_NAME, mark_cancelled
from dlwatchd.spool.status_file import StatusFile, read_status
from dlwatchd.supervisor.lanes import RunningJob

logger = logging.getLogger("dlwatchd.slurm")

_RETRY_S = 10.0  # after Slurm could not be reached, wait this long before submitting again
_LIMIT_STATES = ("TIMEOUT", "PREEMPTED", "DEADLINE")
REQUEUE_NOTE = "requeued_after_slurm_"
OUTAGE_PREFIX = "Slurm cannot be used"


class SlurmLane:
    """The train or infer lane of a daemon whose executor is Slurm."""

    groups = False  # each request is its own Slurm job
    outlives_supervisor = True  # a stopping supervisor leaves its Slurm jobs running and re-attaches later

    def __init__(
        self,
        name: str,
        settings: Settings,
        registry: KindRegistry,
        log_level: int,
        commands: SlurmCommands | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.registry = registry
        self.log_level = log_level
        self.layout = SpoolLayout(settings.spool)
        self.commands = commands or SlurmCommands()
        self.jobs: list[RunningJob] = []
        self.slurm_ids: dict[str, str | None] = {}
        self.cancel_sent: set[str] = set()
        self.ended: list[tuple[RunningJob, str]] = []
        self.problem: str | None = None
        self.not_before = 0.0
        self._next_poll = 0.0
        # Attributes of a local lane the supervisor reads; a Slurm lane has no process of its own.
        self.process = None
        self.conn = None
        self.suspend = None
        self.ready = True
        self.memory: dict[str, Any] | None = None
        self.device: dict[str, Any] | None = None
        self.restarts = 0
        self.last_error: str | None = None

    # ---- what the supervisor asks of every lane ---------------------------------------------------------------

    @property
    def job(self) -> RunningJob | None:
        return self.jobs[0] if self.jobs else None

    @property
    def alive(self) -> bool:
        return True

    @property
    def idle(self) -> bool:
        """True while another job may be submitted: below max_jobs and not waiting out a Slurm outage."""
        return len(self.jobs) < self.settings.slurm.max_jobs and time.monotonic() >= self.not_before

    def start(self) -> None:
        """Nothing to start: Slurm runs the jobs."""

    def stop(self, timeout: float) -> list[RunningJob]:
        """Slurm jobs go on without the supervisor; a restart re-attaches to them. Returns no job to reconcile."""
        return []

    def reap(self) -> list[RunningJob]:
        return []

    def finish(self, job_id: str) -> RunningJob | None:
        for index, job in enumerate(self.jobs):
            if job.job_id == job_id:
                self.slurm_ids.pop(job_id, None)
                self.cancel_sent.discard(job_id)
                return self.jobs.pop(index)
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "executor": "slurm",
            "alive": True,
            "ready": True,
            "job": self.job.job_id if self.job else None,
            "jobs": [job.job_id for job in self.jobs],
            "slurm_jobs": dict(self.slurm_ids),
            "max_jobs": self.settings.slurm.max_jobs,
            "restarts": 0,
            "last_error": self.problem,
        }

    # ---- submission --------------------------------------------------------------------------------------------

    def run(self, messages: list[dict[str, Any]], running: list[RunningJob]) -> None:
        """Submit each claimed job as its own Slurm job (held until its status names the Slurm id)."""
        for message, job in zip(messages, running, strict=True):
            self._submit(message, job)

    def _submit(self, message: dict[str, Any], job: RunningJob) -> None:
        job_id = job.job_id
        ticket = SlurmTicket(
            daemon=message["daemon"],
            lane=self.name,
            plugins=list(self.settings.plugins),
            log_level=self.log_level,
            message=message,
        )
        write_ticket(self.layout, job_id, ticket)
        script = self.layout.job_dir(job_id) / SCRIPT_NAME
        write_bytes_atomic(script, self._script(job_id).encode())
        script.chmod(0o755)
        try:
            slurm_id = self.commands.submit(script, self.sbatch_args(job_id))
        except SlurmUnreachable as exc:
            self._outage(str(exc))
            append_job_log(self.layout.log_path(job_id), f"not submitted to Slurm ({exc}); queued again")
            self.ended.append((job, SUSPENDED))
            return
        except SlurmRefused as exc:
            self.ended.append((job, self._fail(job, self._refused(str(exc)))))
            return
        self.problem = None
        write_ticket(
            self.layout, job_id, ticket.model_copy(update={"slurm_job_id": slurm_id, "submitted_at": utc_now()})
        )
        StatusFile(self.layout.status_path(job_id)).update(executor=_executor_info(slurm_id, "PENDING", None))
        append_job_log(self.layout.log_path(job_id), f"submitted to Slurm as job {slurm_id}")
        logger.info("job %s submitted to Slurm as job %s", job_id, slurm_id)
        self.jobs.append(job)
        self.slurm_ids[job_id] = slurm_id
        try:
            self.commands.release(slurm_id)
        except SlurmUnreachable as exc:  # the next poll releases it: it stays pending and held meanwhile
            self._outage(str(exc))

    def _script(self, job_id: str) -> str:
        command = self.settings.slurm.command or [sys.executable, "-m", "dlwatchd"]
        line = shlex.join([*command, "exec-job", "--spool", str(self.layout.root), job_id])
        return f"#!/bin/sh\n# dlwatchd job {job_id}, written by the daemon that claimed it\nexec {line}\n"

    def sbatch_args(self, job_id: str) -> list[str]:
        """The sbatch options of one job of this lane, from the [slurm] settings."""
        slurm = self.settings.slurm
        lane = getattr(slurm, self.name)
        args = [
            f"--job-name={job_name(job_id)}",
            f"--chdir={self.layout.root}",
            f"--output={self.layout.job_dir(job_id) / 'slurm-%j.out'}",
            "--hold",
            "--no-requeue",
        ]
        options = {
            "--partition": slurm.partition,
            "--account": slurm.account,
            "--qos": slurm.qos,
            "--time": lane.time_limit,
            "--gres": lane.gres,
            "--gpus": lane.gpus,
            "--cpus-per-task": lane.cpus,
            "--mem": lane.mem,
        }
        args += [f"{flag}={value}" for flag, value in options.items() if value is not None]
        return args + list(slurm.extra_args)

    def _refused(self, words: str) -> DlwatchdError:
        return DlwatchdError(
            ErrorCode.SCHEDULER,
            f"The Slurm scheduler refused the job: {words}.",
            hint=f"Check the daemon's [slurm] settings for the {self.name} lane (partition, account, qos, "
            "gres, gpus, time limit), then submit the request again.",
        )

    def _outage(self, text: str) -> None:
        self.problem = f"{OUTAGE_PREFIX}: {text}"
        self.not_before = time.monotonic() + _RETRY_S
        logger.error("%s", self.problem)

    # ---- following the jobs ------------------------------------------------------------------------------------

    def poll(self) -> list[tuple[RunningJob, str]]:
        """Jobs that ended since the last call, each with the state the supervisor should conclude it with."""
        ended, self.ended = self.ended, []
        now = time.monotonic()
        if now < self._next_poll:
            return ended
        self._next_poll = now + self.settings.slurm.poll_interval
        for job in list(self.jobs):
            slurm_id = self.slurm_ids.get(job.job_id)
            if slurm_id is None:
                continue
            try:
                if self.layout.marker_path(job.job_id, "cancel").exists() and job.job_id not in self.cancel_sent:
                    self.commands.cancel(slurm_id)
                    self.cancel_sent.add(job.job_id)
                    append_job_log(self.layout.log_path(job.job_id), f"cancel: scancel {slurm_id}")
                info = self.commands.show(slurm_id)
            except SlurmUnreachable as exc:
                self._outage(str(exc))
                break
            self.problem = None
            if info is not None and not info.ended:
                self._follow(job, slurm_id, info)
                continue
            state = self._conclude(job, slurm_id, info)
            self.finish(job.job_id)
            ended.append((job, state))
        return ended

    def _follow(self, job: RunningJob, slurm_id: str, info: SlurmJob) -> None:
        status = read_status(self.layout.status_path(job.job_id))
        if status is None:
            return
        if info.state == "PENDING":
            if info.reason == "JobHeldUser":  # submitted held, and the release did not get through then
                try:
                    self.commands.release(slurm_id)
                except SlurmUnreachable as exc:
                    self._outage(str(exc))
            wanted = _executor_info(slurm_id, info.state, info.reason)
            # Only while the node has not started: from then on the node owns status.json.
            if status.state is JobState.QUEUED and status.executor != wanted:
                StatusFile(self.layout.status_path(job.job_id)).update(executor=wanted)
        else:
            job.progress = status.progress

    def _conclude(self, job: RunningJob, slurm_id: str, info: SlurmJob | None) -> str:
        """The end of a Slurm job as a supervisor state; writes the status when the job could not."""
        if not Path(job.claim).exists():
            return "fenced"  # taken over meanwhile: the new owner decides
        status = read_status(self.layout.status_path(job.job_id))
        if status is not None and (status.state.terminal or status.state is JobState.PAUSED):
            return status.state.value
        slurm_state = info.state if info is not None else "UNKNOWN"
        log = self.layout.log_path(job.job_id)
        writer = StatusFile(self.layout.status_path(job.job_id))
        if self.layout.marker_path(job.job_id, "cancel").exists():
            mark_cancelled(self.layout, job.job_id, writer, f"Slurm job {slurm_id} ended {slurm_state}")
            return JobState.CANCELLED.value
        kind = self.registry.get(job.kind) if job.kind in self.registry else None
        has_checkpoint = (self.layout.job_dir(job.job_id) / CHECKPOINT_NAME).exists()
        notes = status.notes if status is not None else []
        requeues = sum(note.startswith(REQUEUE_NOTE) for note in notes)
        resumable = kind is not None and kind.on_interrupt == "resume" and has_checkpoint
        if slurm_state in _LIMIT_STATES and resumable and requeues < self.settings.slurm.requeue_limit:
            attempt = (status.attempt if status is not None else job.attempt) + 1
            note = REQUEUE_NOTE + slurm_state.lower()
            writer.update(state=JobState.QUEUED, daemon=None, attempt=attempt, notes=[*notes, note])
            append_job_log(log, f"Slurm job {slurm_id} ended {slurm_state}; queued again from the checkpoint")
            logger.warning("job %s: Slurm job %s ended %s; requeued", job.job_id, slurm_id, slurm_state)
            return SUSPENDED
        error = _slurm_error(slurm_id, slurm_state, info, requeues, has_checkpoint, self.name)
        return self._fail(job, error, writer)

    def _fail(self, job: RunningJob, error: DlwatchdError, writer: StatusFile | None = None) -> str:
        writer = writer or StatusFile(self.layout.status_path(job.job_id))
        writer.update(state=JobState.FAILED, error=ErrorInfo.from_error(error))
        append_job_log(self.layout.log_path(job.job_id), f"failed: {error.code.value}: {error.message}")
        logger.error("job %s failed: %s", job.job_id, error.message)
        return JobState.FAILED.value

    # ---- restart ---------------------------------------------------------------------------------------------

    def adopt(self, job_id: str, kind: str, claim: Path, attempt: int, me: str) -> bool:
        """Follow a Slurm job this daemon submitted before it stopped; False when there is none to follow."""
        ticket = read_ticket(self.layout, job_id)
        if ticket is None or ticket.daemon != me or ticket.lane != self.name:
            return False
        slurm_id = ticket.slurm_job_id
        if slurm_id is None:
            try:  # stopped between sbatch and recording the id: the job name finds it
                slurm_id = self.commands.find(job_name(job_id))
            except SlurmUnreachable as exc:
                self._outage(str(exc))
                return False
            if slurm_id is None:
                return False
            write_ticket(self.layout, job_id, ticket.model_copy(update={"slurm_job_id": slurm_id}))
        self.jobs.append(RunningJob(job_id, kind, str(claim), attempt))
        self.slurm_ids[job_id] = slurm_id
        append_job_log(self.layout.log_path(job_id), f"re-attached to Slurm job {slurm_id} after a restart")
        logger.info("job %s: re-attached to Slurm job %s", job_id, slurm_id)
        return True

    def cancel_stale(self, job_id: str) -> None:
        """scancel the Slurm job of a job taken over from a dead daemon (best effort; its claim is fenced)."""
        ticket = read_ticket(self.layout, job_id)
        if ticket is not None and ticket.slurm_job_id is not None:
            try:
                self.commands.cancel(ticket.slurm_job_id)
            except SlurmUnreachable as exc:
                logger.warning("job %s: cannot cancel stale Slurm job %s: %s", job_id, ticket.slurm_job_id, exc)


def _executor_info(slurm_id: str, state: str, reason: str | None) -> dict[str, Any]:
    return {"name": "slurm", "job_id": slurm_id, "state": state, "reason": reason}


def _slurm_error(
    slurm_id: str, state: str, info: SlurmJob | None, requeues: int, has_checkpoint: bool, lane: str
) -> DlwatchdError:
    """The error of a Slurm job that ended without the job reporting how."""
    output = f"jobs/<id>/slurm-{slurm_id}.out"
    if state == "CANCELLED":
        return DlwatchdError(
            ErrorCode.INTERRUPTED,
            f"Slurm job {slurm_id} was cancelled outside dlwatchd (state CANCELLED).",
            hint="Submit the request again with a new job id; cancel jobs with a cancel marker instead.",
        )
    if state in _LIMIT_STATES:
        why = (
            f"after {requeues} resubmissions from the checkpoint"
            if has_checkpoint
            else "before a checkpoint it could continue from was written"
        )
        return DlwatchdError(
            ErrorCode.INTERRUPTED,
            f"Slurm job {slurm_id} ended {state} {why}.",
            hint=f"Raise slurm.{lane}.time_limit (or slurm.requeue_limit), then submit the request again.",
        )
    exit_code = f" with exit code {info.exit_code}" if info is not None and info.exit_code else ""
    return DlwatchdError(
        ErrorCode.WORKER_DIED,
        f"Slurm job {slurm_id} ended {state}{exit_code} before the job reported a result.",
        hint=f"See {output} in the spool and the node's logs.",
    )
