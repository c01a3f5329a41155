"""Start and stop a real `dlwatchd run` for the benchmarks (a throwaway spool, default settings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any


def start_daemon(
    spool: Path, *extra: str, env: dict[str, str] | None = None, daemon_id: str = "bench-1"
) -> subprocess.Popen[bytes]:
    """Start the daemon and return once its heartbeat says ready and every lane reported in."""
    command = [
        sys.executable,
        "-m",
        "dlwatchd",
        "run",
        "--spool",
        str(spool),
        "--daemon-id",
        daemon_id,
        *extra,
    ]
    log_path = spool.parent / f"{daemon_id}.log"
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    beat_path = spool / "daemons" / f"{daemon_id}.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            beat = json.loads(beat_path.read_bytes())
        except (OSError, ValueError):
            beat = {}
        if (
            beat.get("pid") == proc.pid
            and beat.get("state") == "ready"
            and all(lane["ready"] for lane in beat["lanes"].values())
        ):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {log_path.read_text()}")
        time.sleep(0.05)
    raise RuntimeError("daemon not ready in 120 s")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def publish(spool: Path, job_id: str, request: dict[str, Any]) -> float:
    """Write `request` under a temp name, rename it into incoming/ and return the wall-clock time of the rename."""
    temp = spool / "incoming" / f".{job_id}.tmp"
    temp.write_bytes(json.dumps(request).encode())
    published = time.time()
    os.rename(temp, spool / "incoming" / f"{job_id}.json")
    return published


def stamp_seconds(stamp: str) -> float:
    """A status.json time stamp (ISO-8601 UTC with a Z suffix) as seconds since the epoch, like time.time()."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
