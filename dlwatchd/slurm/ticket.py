"""jobs/<id>/slurm.json: what a Slurm job needs to run one claimed job, and which Slurm job runs it.

The supervisor writes it before `sbatch` and again with the Slurm job id; `dlwatchd exec-job` on the node reads
the job message from it; a restarted supervisor reads the Slurm id back to re-attach instead of submitting again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlwatchd.spool.atomic import write_json_atomic
from dlwatchd.spool.layout import SpoolLayout

TICKET_NAME = "slurm.json"
SCRIPT_NAME = "slurm-job.sh"


class SlurmTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    daemon: str
    lane: str
    slurm_job_id: str | None = None
    submitted_at: str | None = None
    plugins: list[str] = Field(default_factory=list)
    log_level: int = 20
    message: dict[str, Any] = Field(description="the job message a local worker would get over its pipe")


def ticket_path(layout: SpoolLayout, job_id: str) -> Path:
    return layout.job_dir(job_id) / TICKET_NAME


def read_ticket(layout: SpoolLayout, job_id: str) -> SlurmTicket | None:
    """The job's ticket, or None when it has none (never sent to Slurm) or it is unreadable."""
    try:
        return SlurmTicket.model_validate(json.loads(ticket_path(layout, job_id).read_bytes()))
    except (OSError, ValueError, ValidationError):
        return None


def write_ticket(layout: SpoolLayout, job_id: str, ticket: SlurmTicket) -> None:
    write_json_atomic(ticket_path(layout, job_id), ticket.model_dump(mode="json"))


def job_name(job_id: str) -> str:
    """The Slurm job name of a dlwatchd job; squeue finds a submission by it after a crash."""
    return f"dlwatchd-{job_id}"
