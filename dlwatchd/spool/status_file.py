"""Writing jobs/<id>/status.json: one writer at a time, atomic versions, strictly increasing `seq`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dlwatchd.protocol.status import ErrorInfo, JobState, JobStatus, WarningInfo, utc_now
from dlwatchd.spool.atomic import write_json_atomic


def read_status(path: Path) -> JobStatus | None:
    """The current status at `path`, or None when it is missing or not a valid status."""
    try:
        return JobStatus.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError, ValidationError):
        return None


class StatusFile:
    """The writer of one job's status.json.

    Ownership passes between processes (supervisor while queued or terminal, worker while running); each
    new owner re-reads the file so `seq` keeps increasing. Progress writes are throttled; state changes
    are always written, durably and with a directory fsync. `guard`, when given, runs before every write
    and raises to stop it: a worker's writer checks that its daemon still holds the claim, so a daemon
    that was frozen and taken over never writes over its successor's status.
    """

    def __init__(self, path: Path, *, progress_interval: float = 1.0, guard: Callable[[], None] | None = None) -> None:
        self.path = path
        self.progress_interval = progress_interval
        self.guard = guard
        self._current: JobStatus | None = read_status(path)
        self._last_progress = float("-inf")

    @property
    def current(self) -> JobStatus | None:
        return self._current

    def create(self, *, job_id: str, kind: str | None, state: JobState, daemon: str | None, **fields: Any) -> JobStatus:
        """Write the first version (or the next one if a status already exists for this id)."""
        if self._current is not None:
            return self.update(state=state, daemon=daemon, kind=kind, **fields)
        now = utc_now()
        if state.terminal:
            fields.setdefault("finished_at", now)
        status = JobStatus(
            job_id=job_id,
            kind=kind,
            state=state,
            seq=1,
            daemon=daemon,
            created_at=now,
            updated_at=now,
            **fields,
        )
        self._write(status, state_change=True)
        return status

    def update(self, **changes: Any) -> JobStatus:
        """Write the next version with `changes` applied; sets finished_at on a terminal state."""
        current = self._current or read_status(self.path)
        if current is None:
            raise FileNotFoundError(f"no status to update at {self.path}")
        state_change = "state" in changes and changes["state"] != current.state
        data = current.model_dump()
        data.update(changes)
        data["seq"] = current.seq + 1
        data["updated_at"] = utc_now()
        new_state = JobState(data["state"])
        if state_change and new_state is JobState.RUNNING and not data.get("started_at"):
            data["started_at"] = data["updated_at"]
        if state_change and new_state.terminal:
            data["finished_at"] = data["updated_at"]
        status = JobStatus.model_validate(data)
        self._write(status, state_change=state_change)
        return status

    def progress(self, progress: dict[str, Any], *, force: bool = False) -> bool:
        """Write progress at most once per `progress_interval` unless forced; True when written."""
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_interval:
            return False
        self._last_progress = now
        self.update(progress=progress)
        return True

    def fail(self, error: ErrorInfo, *, state: JobState = JobState.FAILED, **changes: Any) -> JobStatus:
        return self.update(state=state, error=error, **changes)

    def warn(self, code: str, message: str) -> JobStatus:
        current = self._current or read_status(self.path)
        warnings = list(current.warnings) if current else []
        warnings.append(WarningInfo(code=code, message=message))
        return self.update(warnings=warnings)

    def _write(self, status: JobStatus, *, state_change: bool) -> None:
        if self.guard is not None:
            self.guard()
        write_json_atomic(self.path, status.model_dump(mode="json"), durable=state_change, dir_sync=state_change)
        self._current = status
