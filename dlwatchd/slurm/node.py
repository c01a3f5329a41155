"""`dlwatchd exec-job`: run one claimed job on a Slurm node, exactly as a local worker would.

The process writes status.json, outputs and checkpoints itself and fences on the claim file like a worker.
SIGTERM (Slurm's time limit, preemption, scancel) asks a training to checkpoint at its next batch and stop,
so a requeued training loses at most one batch of work.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from dlwatchd.jobs._registry import build_registry
from dlwatchd.jobs.runner import run_job
from dlwatchd.journal import configure_stderr_logging
from dlwatchd.slurm.ticket import read_ticket
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout

logger = logging.getLogger("dlwatchd.node")


def exec_job(spool: Path, job_id: str) -> int:
    """Run the job; 0 when it reached an end the status records (success or not), 2 when it cannot start."""
    layout = SpoolLayout(spool)
    ticket = read_ticket(layout, job_id)
    if ticket is None:
        logger.error("job %s has no readable %s; nothing to run", job_id, "slurm.json")
        return 2
    configure_stderr_logging(ticket.log_level, source=f"node[{socket.gethostname()}] %(name)s")
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    slurm_id = os.environ.get("SLURM_JOB_ID", "?")
    append_job_log(layout.log_path(job_id), f"Slurm job {slurm_id} started on {socket.gethostname()}")
    registry = build_registry(ticket.plugins)
    state = run_job(ticket.message, registry, lambda message: None, stop.is_set, {})
    if stop.is_set():
        append_job_log(layout.log_path(job_id), f"Slurm job {slurm_id} was asked to stop (SIGTERM); it ended {state}")
    logger.info("job %s ended %s", job_id, state)
    return 0
