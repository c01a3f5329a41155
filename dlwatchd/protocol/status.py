"""status.json, the error object and daemon health (PROTOCOL.md sections 4 and 9)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dlwatchd.errors import DlwatchdError, ErrorCode


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED})


def utc_now() -> str:
    """The current time as ISO-8601 UTC with a Z suffix (informational only: clients trust `seq`)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ErrorInfo(BaseModel):
    """The `error` object of a failed or rejected job."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str
    hint: str | None = None
    field: str | None = None
    line: int | None = Field(None, ge=1, description="E_BAD_JSON: 1-based line of the syntax error")
    column: int | None = Field(None, ge=1, description="E_BAD_JSON: 1-based column of the syntax error")

    @classmethod
    def from_error(cls, error: DlwatchdError) -> ErrorInfo:
        return cls(
            code=error.code,
            message=error.message,
            hint=error.hint,
            field=error.field,
            line=getattr(error, "line", None),
            column=getattr(error, "column", None),
        )


class WarningInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    message: str


class JobStatus(BaseModel):
    """One version of jobs/<id>/status.json; `seq` strictly increases across versions of one job."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal[1] = 1
    job_id: str
    kind: str | None
    state: JobState
    seq: int = Field(ge=1)
    attempt: int = Field(1, ge=1)
    daemon: str | None = None
    created_at: str
    started_at: str | None = None
    updated_at: str
    finished_at: str | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    warnings: list[WarningInfo] = Field(default_factory=list)
    client: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list, description="state-machine events such as resumed_after_restart")
    executor: dict[str, Any] | None = Field(
        None, description="where the job runs when not in a local worker, e.g. its Slurm job id, state and reason"
    )


DaemonState = Literal["starting", "ready", "degraded", "stopping"]


class DaemonCounters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accepted: int = 0
    rejected: int = 0
    ignored_files: int = 0
    event_overflows: int = 0
    rescans: int = 0
    completed: int = 0
    failed: int = 0
    worker_restarts: int = 0
    takeovers: int = 0


class DaemonHealth(BaseModel):
    """daemons/<id>.json, rewritten every few seconds; also the result of a `health` request."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal[1] = 1
    daemon_id: str
    beat: int = Field(ge=0)
    pid: int
    host: str
    version: str
    state: DaemonState
    reason: str | None = None
    started_at: str
    updated_at: str
    device: dict[str, Any] | None = None
    queues: dict[str, int] = Field(default_factory=dict)
    running_jobs: list[dict[str, Any]] = Field(default_factory=list)
    lanes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    watcher: Literal["native", "polling"]
    watcher_alive: bool = True
    watcher_reason: str | None = Field(None, description="why the watcher polls when native events were possible")
    last_full_scan: str | None = None
    rescan_interval_s: float
    counters: DaemonCounters = Field(default_factory=DaemonCounters)
