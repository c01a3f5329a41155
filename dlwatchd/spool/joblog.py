"""jobs/<id>/log.txt: the human-readable history of one job, appended line by line."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("dlwatchd.job")


def append_job_log(path: Path, message: str) -> None:
    """Append one timestamped line; a failure to log never fails the job (it is logged to stderr)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message}\n")
    except OSError as exc:
        logger.warning("cannot append to %s: %s", path, exc)
