"""What a running job sees: its request, status writer, control markers and output folder.

A handler receives a JobContext and returns its result dict, or raises: DlwatchdError (failed with that
code), JobCancelled (cancelled), JobPaused (paused, after writing its checkpoint). The worker maps these
to status.json in one place (jobs/runner.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dlwatchd.protocol.status import JobState
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile


class JobCancelled(Exception):
    """Raised by a handler (through `check_cancel`) when the job was cancelled; nothing is published."""


class JobPaused(Exception):
    """Raised by a handler after it wrote its checkpoint in answer to a pause marker."""


class JobSuspended(Exception):
    """Raised by a handler after it wrote its checkpoint because the daemon is stopping; it resumes later."""


class JobFenced(Exception):
    """This daemon's claim on the job is gone (another daemon took it over): discard the work."""


def require_claim(claim: Path) -> None:
    """Raise JobFenced unless `claim` (running/<id>@<me>.json) still exists."""
    if not claim.exists():
        raise JobFenced(f"claim {claim.name} is gone")


@dataclass
class JobContext:
    """The running job's view of the spool; built by the worker for one run."""

    job_id: str
    kind: str
    request: BaseModel | None
    attempt: int
    layout: SpoolLayout
    status: StatusFile
    claim: Path
    read_roots: list[Path]
    write_roots: list[Path]
    weights_dir: Path
    model_dirs: list[Path]
    send: Callable[[dict[str, Any]], None] = field(default=lambda message: None)
    suspend_requested: Callable[[], bool] = field(default=lambda: False)
    resources: dict[str, Any] = field(default_factory=dict)  # the worker's long-lived objects (model cache)
    marker_poll_s: float = 0.2
    _last_poll: float = field(default=0.0, init=False)
    _cancel_seen: bool = field(default=False, init=False)

    @property
    def job_dir(self) -> Path:
        return self.layout.job_dir(self.job_id)

    @property
    def outputs_dir(self) -> Path:
        return self.job_dir / "outputs"

    def log(self, message: str) -> None:
        append_job_log(self.layout.log_path(self.job_id), message)

    def warn(self, code: str, message: str) -> None:
        self.log(f"warning {code}: {message}")
        self.status.warn(code, message)

    def progress(self, force: bool = False, **fields: Any) -> None:
        """Publish progress (throttled to about one write a second unless forced)."""
        if self.status.progress(fields, force=force):
            self.send({"op": "progress", "job_id": self.job_id, "progress": fields})

    def marker(self, name: str) -> bool:
        return self.layout.marker_path(self.job_id, name).exists()

    def check_cancel(self) -> None:
        """Raise JobCancelled if a cancel marker exists (polled at most every `marker_poll_s`).

        The first sighting also sets the state to `cancelling`, so clients see the request was heard.
        """
        now = time.monotonic()
        if not self._cancel_seen and now - self._last_poll < self.marker_poll_s:
            return
        self._last_poll = now
        if self._cancel_seen or self.marker("cancel"):
            if not self._cancel_seen:
                self._cancel_seen = True
                self.status.update(state=JobState.CANCELLING)
                self.log("cancel requested")
            raise JobCancelled()

    def check_fence(self) -> None:
        """Raise JobFenced when this daemon no longer holds the claim; called before publishing anything."""
        require_claim(self.claim)
