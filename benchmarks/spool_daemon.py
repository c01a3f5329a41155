"""Start and stop a real `dlwatchd run` for the benchmarks (a throwaway spool, default settings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_daemon(spool: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the daemon and return once its heartbeat says ready and every lane reported in."""
    command = [
        sys.executable,
        "-m",
        "dlwatchd",
        "run",
        "--spool",
        str(spool),
        "--daemon-id",
        "bench-1",
        *extra,
    ]
    with open(spool.parent / "daemon.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    beat_path = spool / "daemons" / "bench-1.json"
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
            raise RuntimeError(f"daemon exited: {(spool.parent / 'daemon.log').read_text()}")
        time.sleep(0.05)
    raise RuntimeError("daemon not ready in 120 s")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
