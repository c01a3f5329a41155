"""A real daemon process on a temporary spool, driven only through the file protocol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlwatchd.client import SpoolClient
from dlwatchd.protocol.status import JobStatus

PLUGINS = Path(__file__).parent / "plugins"
REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """One `dlwatchd run` subprocess; logs go to <spool>/../<id>.log."""

    def __init__(
        self, spool: Path, daemon_id: str = "test-1", watch: str = "native", args: tuple[str, ...] = (), **env: str
    ) -> None:
        self.spool = spool
        self.args = args
        self.daemon_id = daemon_id
        self.watch = watch
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = spool.parent / f"{daemon_id}.log"

    def start(self, wait_ready: bool = True, rescan_interval: float = 0.5) -> Daemon:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(PLUGINS), str(REPO), env.get("PYTHONPATH", "")]),
            DLWATCHD_PLUGINS="dlwatchd_testkinds",
            DLWATCHD_WARM_WORKERS="0",
            DLWATCHD_HEARTBEAT_INTERVAL="0.5",
            DLWATCHD_STOP_TIMEOUT="10",
        )
        env.update(self.env)
        command = [
            sys.executable,
            "-m",
            "dlwatchd",
            "run",
            "--spool",
            str(self.spool),
            "--daemon-id",
            self.daemon_id,
            "--watch",
            self.watch,
            "--rescan-interval",
            str(rescan_interval),
            *self.args,
        ]
        with open(self.log, "ab") as handle:
            self.proc = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def heartbeat(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.spool / "daemons" / f"{self.daemon_id}.json").read_bytes())
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            beat = self.heartbeat()
            ready = beat and beat.get("pid") == self.proc.pid and beat.get("state") in ("ready", "degraded")
            if ready and all(lane["ready"] for lane in beat["lanes"].values()):
                return beat
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def worker_pids(self) -> dict[str, int]:
        beat = self.heartbeat() or {}
        return {name: lane["pid"] for name, lane in beat.get("lanes", {}).items() if lane.get("pid")}


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def client(spool: Path) -> SpoolClient:
    return SpoolClient(spool)


@pytest.fixture
def daemon(spool: Path) -> Iterator[Daemon]:
    started = Daemon(spool).start()
    yield started
    started.stop()


@pytest.fixture
def make_daemon(spool: Path) -> Iterator[Any]:
    made: list[Daemon] = []

    def factory(daemon_id: str = "test-1", watch: str = "native", start: bool = True, **kwargs: Any) -> Daemon:
        env = kwargs.pop("env", {})
        instance = Daemon(spool, daemon_id, watch, kwargs.pop("args", ()), **env)
        made.append(instance)
        return instance.start(**kwargs) if start else instance

    yield factory
    for instance in made:
        try:
            instance.stop()
        except subprocess.TimeoutExpired:
            instance.kill()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_state(client: SpoolClient, job_id: str, states: set[str], timeout: float = 30.0) -> JobStatus:
    def check() -> JobStatus | None:
        status = client.status(job_id)
        return status if status is not None and status.state.value in states else None

    return wait_for(check, timeout)


def wait_filed(spool: Path, job_id: str, folder: str, timeout: float = 30.0) -> None:
    """Wait until the job's request file is in `folder` (done/, failed/, ...): the daemon moves it there just
    after it writes the terminal status, so a test that saw the status may look a moment too early."""
    wait_for(lambda: (spool / folder / f"{job_id}.json").exists(), timeout)


def runs(spool: Path, job_id: str) -> list[str]:
    path = spool / "jobs" / job_id / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def step_of(client: SpoolClient, job_id: str) -> int:
    """The `step` a test job last reported (0 before its first progress write)."""
    status = client.status(job_id)
    return int(((status.progress if status else None) or {}).get("step", 0))


def epoch_of(client: SpoolClient, job_id: str) -> int:
    """The last completed epoch a training reported (0 before the first one ends or before pickup)."""
    status = client.status(job_id)
    return int(((status.progress if status else None) or {}).get("epoch") or 0)
