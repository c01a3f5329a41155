"""Lanes: one long-lived worker process each (spawned), so a query never waits behind a training."""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dlwatchd.supervisor.worker import worker_main

logger = logging.getLogger("dlwatchd.lanes")

# A worker that dies within this many seconds of its start counts towards a crash loop.
_EARLY_DEATH_S = 5.0
_MAX_BACKOFF_S = 30.0


@dataclass
class RunningJob:
    job_id: str
    kind: str
    claim: str
    attempt: int
    started: float = field(default_factory=time.monotonic)
    progress: dict[str, Any] | None = None


@dataclass
class Lane:
    """One worker process and the job it is running, as the supervisor sees them."""

    name: str
    plugins: list[str]
    warm: bool
    log_level: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    jobs: list[RunningJob] = field(default_factory=list)  # more than one when inferences run as a group
    memory: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    started_at: float = 0.0
    restarts: int = 0
    early_deaths: int = 0
    not_before: float = 0.0
    last_error: str | None = None
    suspend: Any = None  # a multiprocessing Event: set at shutdown so a training checkpoints and yields
    groups = True  # inference requests on one model may run together in the worker
    outlives_supervisor = False  # a stopping supervisor waits for the worker's jobs (bounded)
    problem: str | None = None  # set when the lane cannot run jobs for a reason health should show

    @property
    def job(self) -> RunningJob | None:
        """The first job the worker runs (the one a group was formed around), or None when idle."""
        return self.jobs[0] if self.jobs else None

    @property
    def idle(self) -> bool:
        return self.ready and not self.jobs and self.alive

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self) -> None:
        """Spawn the worker; it reports `ready` on its pipe."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        self.suspend = context.Event()
        process = context.Process(
            target=worker_main,
            args=(child, self.name, self.plugins, self.warm, self.log_level, self.suspend),
            name=f"dlwatchd-worker-{self.name}",
            daemon=True,
        )
        process.start()
        child.close()
        self.process, self.conn, self.ready, self.jobs = process, parent, False, []
        self.started_at = time.monotonic()
        logger.info("lane %s: worker started (pid %s)", self.name, process.pid)

    def run(self, messages: list[dict[str, Any]], running: list[RunningJob]) -> None:
        """Send one job, or a group of jobs the worker runs together."""
        assert self.conn is not None
        self.jobs = list(running)
        self.conn.send({"op": "run", "jobs": messages})

    def poll(self) -> list[tuple[RunningJob, str]]:
        """Jobs that ended without a message on the pipe: none for a worker (its death is seen by the sentinel)."""
        return []

    def finish(self, job_id: str) -> RunningJob | None:
        """Forget one job the worker reported done; returns it (None if unknown)."""
        for index, job in enumerate(self.jobs):
            if job.job_id == job_id:
                return self.jobs.pop(index)
        return None

    def reap(self) -> list[RunningJob]:
        """Forget a dead worker; returns the jobs it was running. Schedules the restart with backoff."""
        jobs, self.jobs, self.ready, self.problem = self.jobs, [], False, None
        code = self.process.exitcode if self.process is not None else None
        self.last_error = f"worker exited with code {code}"
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None
        if time.monotonic() - self.started_at < _EARLY_DEATH_S:
            self.early_deaths += 1
        else:
            self.early_deaths = 0
        delay = min(_MAX_BACKOFF_S, 0.5 * (2**self.early_deaths)) if self.early_deaths else 0.0
        self.not_before = time.monotonic() + delay
        self.restarts += 1
        logger.error("lane %s: %s; restarting in %.1f s", self.name, self.last_error, delay)
        return jobs

    def stop(self, timeout: float) -> list[RunningJob]:
        """Ask the worker to exit, then terminate and kill it if it does not within `timeout`.

        Returns the jobs it was still running (the caller reconciles them).
        """
        jobs = self.jobs
        if self.process is None:
            return jobs
        try:
            if self.conn is not None:
                self.conn.send({"op": "stop"})
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn, self.ready, self.jobs = None, None, False, []
        return jobs

    def describe(self) -> dict[str, Any]:
        """The lane's line in the health answer."""
        return {
            "pid": self.process.pid if self.process is not None else None,
            "alive": self.alive,
            "ready": self.ready,
            "job": self.job.job_id if self.job else None,
            "jobs": [job.job_id for job in self.jobs],
            "restarts": self.restarts,
            "last_error": self.last_error,
        }
