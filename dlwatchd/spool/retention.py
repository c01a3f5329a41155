"""Retention (PROTOCOL.md section 10): remove old terminal jobs and stale temporary files.

Only jobs whose request file sits in a terminal home and whose status is terminal are touched; models
are never removed. Ages are measured from the commit (the terminal file's mtime is set at the move).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from dlwatchd.settings import Retention
from dlwatchd.spool.layout import SpoolLayout, request_id_from_name
from dlwatchd.spool.status_file import read_status

logger = logging.getLogger("dlwatchd.retention")

_DAY = 86400.0
_STATE_OF_DIR = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled", "rejected": "rejected"}


def _age(path: Path, now: float) -> float | None:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return None


def sweep(layout: SpoolLayout, policy: Retention, now: float | None = None) -> int:
    """Remove what the policy allows; returns how many entries were removed. Errors are logged, not raised."""
    now = time.time() if now is None else now
    removed = 0
    limits = {
        "done": policy.done_days * _DAY,
        "failed": policy.failed_days * _DAY,
        "rejected": policy.failed_days * _DAY,
        "cancelled": policy.cancelled_days * _DAY,
    }
    for directory, limit in limits.items():
        try:
            names = os.listdir(layout.root / directory)
        except FileNotFoundError:
            continue
        for name in names:
            path = layout.root / directory / name
            age = _age(path, now)
            if age is None:
                continue
            job_id = request_id_from_name(name)
            acked = job_id is not None and layout.marker_path(job_id, "ack").exists()
            if age < limit and not (acked and age >= policy.acked_hours * 3600):
                continue
            try:
                removed += _remove_job(layout, directory, name, job_id)
            except OSError as exc:
                logger.warning("retention could not remove %s: %s", path, exc)
    removed += _sweep_tmp(layout, policy.tmp_hours * 3600, now)
    return removed


def _remove_job(layout: SpoolLayout, directory: str, name: str, job_id: str | None) -> int:
    path = layout.root / directory / name
    if job_id is not None:
        status = read_status(layout.status_path(job_id))
        if status is not None and not status.state.terminal:
            return 0  # the folder belongs to a newer, live job with the same id: never touch it
        if status is not None and status.state.value != _STATE_OF_DIR[directory]:
            job_id = None  # a duplicate's copy: remove only the copy, not the original job
    _remove_path(path)
    sidecar = path.with_name(name[: -len(".json")] + ".error.json") if name.endswith(".json") else None
    if sidecar is not None and sidecar.exists():
        sidecar.unlink()
    if job_id is not None:
        shutil.rmtree(layout.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(layout.root / "inputs" / job_id, ignore_errors=True)
    logger.info("retention removed %s/%s", directory, name)
    return 1


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sweep_tmp(layout: SpoolLayout, limit: float, now: float) -> int:
    removed = 0
    try:
        names = os.listdir(layout.tmp)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith("intake."):
            continue  # an unfinished intake claim is a job, recovered by its owner or a taker-over
        path = layout.tmp / name
        age = _age(path, now)
        if age is not None and age >= limit:
            try:
                _remove_path(path)
                removed += 1
            except OSError as exc:
                logger.warning("retention could not remove %s: %s", path, exc)
    return removed
