"""The body of a lane's worker process (started with spawn): receive a job, run it, report, repeat.

This module is imported in the child only through `worker_main`; heavy libraries are imported by the
job handlers, never here, so a worker starts fast and the supervisor stays free of torch.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from dlwatchd.jobs._registry import build_registry
from dlwatchd.jobs.runner import run_group, run_job
from dlwatchd.journal import configure_stderr_logging

_ORPHAN_POLL_S = 0.5
WARM_MODULES = {
    "train": "dlwatchd.jobs.train_setup",
    "infer": "dlwatchd.engine.inference",
    "query": "dlwatchd.engine.models",
}


def die_with_parent() -> None:
    """End this worker as soon as the supervisor is gone (even by SIGKILL), so no orphan keeps writing.

    Linux delivers SIGKILL through prctl(PR_SET_PDEATHSIG) at once; elsewhere a thread notices that the
    parent changed within half a second.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def memory_snapshot(resources: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """This process's device memory figures and cached model count, when torch is loaded here (never loads it)."""
    if "torch" not in sys.modules:
        return None
    from dlwatchd.engine.device import memory_info

    info = memory_info()
    cache = (resources or {}).get("models")
    info["cached_models"] = len(cache) if cache is not None else 0
    return info


def worker_main(conn: Connection, lane: str, plugins: list[str], warm: bool, log_level: int, suspend: Any) -> None:
    """Serve jobs from `conn` until told to stop or the supervisor goes away."""
    # Ctrl-C reaches the whole process group; only the supervisor decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    configure_stderr_logging(log_level, source=f"worker[{lane}] %(name)s")
    registry = build_registry(plugins)
    resources: dict[str, Any] = {}  # long-lived per worker: the model cache of the infer lane lives here

    def send(message: dict[str, Any]) -> None:
        conn.send(message)

    send({"op": "ready", "pid": os.getpid(), "memory": memory_snapshot()})
    if warm:
        # Load the runtime and this lane's engine now, before the first job arrives (so even a job that
        # fails its preflight answers at once), and tell the supervisor what device it found.
        from dlwatchd.engine.device import device_summary

        importlib.import_module(WARM_MODULES[lane])
        send({"op": "warm", "memory": memory_snapshot(), "device": device_summary()})
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message.get("op") == "stop":
            return
        if message.get("op") == "device":
            from dlwatchd.engine.device import device_info

            send({"op": "device", "info": device_info()})
        elif message.get("op") == "memory":
            from dlwatchd.engine.device import memory_info, release_device_memory

            release_device_memory()
            send({"op": "memory", "memory": memory_info()})
        elif message.get("op") == "run":
            jobs = message["jobs"]
            if len(jobs) == 1:
                states = [(jobs[0]["job_id"], run_job(jobs[0], registry, send, suspend.is_set, resources))]
            else:
                states = run_group(jobs, registry, send, resources)
            for job_id, state in states:
                send({"op": "done", "job_id": job_id, "state": state, "memory": memory_snapshot(resources)})
