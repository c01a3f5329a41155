"""Python client of the spool protocol: publish requests, read status, send control markers, read .bin maps.

It speaks only the file protocol (PROTOCOL.md), exactly as the QuPath extension does, so anything it
can do, any client can do.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.protocol.status import JobState, JobStatus
from dlwatchd.spool.atomic import dumps, write_bytes_atomic, write_json_atomic
from dlwatchd.spool.claims import locate_request
from dlwatchd.spool.heartbeat_view import read_heartbeats
from dlwatchd.spool.layout import (
    JOB_ID_RE,
    TERMINAL_DIRS,
    SpoolLayout,
    parse_claim_name,
    request_id_from_name,
)
from dlwatchd.spool.status_file import read_status

if TYPE_CHECKING:
    import numpy as np


def new_job_id() -> str:
    """A fresh lower-case UUID, the recommended job id."""
    return str(uuid.uuid4())


class SpoolClient:
    """A client of one spool folder."""

    def __init__(self, spool: Path) -> None:
        self.layout = SpoolLayout(Path(spool))

    def submit(self, request: dict[str, Any] | bytes, job_id: str | None = None) -> str:
        """Publish a request atomically (temp name, fsync, rename into incoming/); returns the job id.

        Raises DlwatchdError(E_SCHEMA) for an invalid id and E_DUPLICATE_ID when the id is already in use.
        """
        job_id = job_id or new_job_id()
        if not JOB_ID_RE.match(job_id):
            raise DlwatchdError(ErrorCode.SCHEMA, f"'{job_id}' is not a valid job id.", field="id")
        if self.layout.job_dir(job_id).exists() or (self.layout.incoming / f"{job_id}.json").exists():
            raise DlwatchdError(ErrorCode.DUPLICATE_ID, f"The job id '{job_id}' is already in use in this spool.")
        data = request if isinstance(request, bytes) else dumps(request)
        temp = self.layout.incoming / f".{job_id}.json.tmp"
        write_bytes_atomic(temp, data)
        os.rename(temp, self.layout.incoming / f"{job_id}.json")
        return job_id

    def status(self, job_id: str) -> JobStatus | None:
        """The job's current status, or None before the daemon has picked it up."""
        return read_status(self.layout.status_path(job_id))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 0.1,
        on_update: Callable[[JobStatus], None] | None = None,
        until_paused: bool = True,
    ) -> JobStatus:
        """Poll until the job is terminal (or paused, unless `until_paused` is False); calls `on_update` per new seq.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seq = 0
        while True:
            status = self.status(job_id)
            if status is not None and status.seq != last_seq:
                last_seq = status.seq
                if on_update is not None:
                    on_update(status)
                if status.state.terminal or (until_paused and status.state is JobState.PAUSED):
                    return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(poll)

    def _marker(self, job_id: str, name: str) -> None:
        job_dir = self.layout.job_dir(job_id)
        if not job_dir.is_dir():
            raise DlwatchdError(ErrorCode.NOT_FOUND, f"There is no job '{job_id}' in this spool.")
        temp = job_dir / f".{name}.tmp"
        write_bytes_atomic(temp, b"")
        os.rename(temp, job_dir / name)

    def cancel(self, job_id: str) -> None:
        self._marker(job_id, "cancel")

    def pause(self, job_id: str) -> None:
        self._marker(job_id, "pause")

    def finish(self, job_id: str) -> None:
        self._marker(job_id, "finish")

    def ack(self, job_id: str) -> None:
        """Tell the daemon the client has what it needs; the job may be cleaned up after an hour."""
        self._marker(job_id, "ack")

    def resume(self, job_id: str, overrides: dict[str, Any] | None = None) -> None:
        """Resume a paused training: write resume.json overrides first, then remove the pause marker."""
        if overrides:
            write_json_atomic(self.layout.job_dir(job_id) / "resume.json", overrides)
        self.layout.marker_path(job_id, "pause").unlink(missing_ok=True)

    def list_jobs(self) -> dict[str, list[str]]:
        """Job ids by where their request file is: queued, running (includes paused), and each terminal home."""
        jobs: dict[str, list[str]] = {"incoming": [], "queued": [], "running": []}
        for name in _listdir(self.layout.incoming):
            if request_id_from_name(name):
                jobs["incoming"].append(name[: -len(".json")])
        for name in _listdir(self.layout.queued):
            if request_id_from_name(name):
                jobs["queued"].append(name[: -len(".json")])
        for name in _listdir(self.layout.running):
            parsed = parse_claim_name(name)
            if parsed:
                jobs["running"].append(parsed[0])
        for directory in TERMINAL_DIRS.values():
            jobs[directory] = sorted(
                n[: -len(".json")] for n in _listdir(self.layout.root / directory) if request_id_from_name(n)
            )
        return {key: sorted(value) for key, value in jobs.items()}

    def where(self, job_id: str) -> Path | None:
        return locate_request(self.layout, job_id)

    def daemons(self) -> list[dict[str, Any]]:
        """Every heartbeat file in daemons/, as written."""
        return read_heartbeats(self.layout)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def read_probabilities(path: Path, num_classes: int, height: int, width: int) -> np.ndarray:
    """A .bin probability map as a float32 array of shape (C, H, W); raises ValueError on a size mismatch."""
    import numpy as np

    expected = 4 * num_classes * height * width
    size = Path(path).stat().st_size
    if size != expected:
        raise ValueError(f"{path} holds {size} bytes; C={num_classes} x H={height} x W={width} needs {expected}")
    return np.fromfile(path, dtype="<f4").reshape(num_classes, height, width).astype(np.float32, copy=False)


def format_error(status: JobStatus) -> str:
    """One or two lines for people: the error code, its message and hint."""
    if status.error is None:
        return f"job {status.job_id} ended {status.state.value}"
    text = f"{status.error.code.value}: {status.error.message}"
    if status.error.hint:
        text += f"\nhint: {status.error.hint}"
    return text


def load_request_file(path: Path) -> bytes:
    """A request file's bytes, checked to be JSON only as far as the daemon would need to publish it."""
    data = Path(path).read_bytes()
    json.loads(data.decode("utf-8-sig"))
    return data
