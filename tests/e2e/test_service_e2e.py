"""The daemon as a service: sd_notify readiness and watchdog, SIGTERM with a training, SIGHUP reload, journald logs."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import runs, step_of, wait_for, wait_state


class NotifyServer:
    """A fake service manager: collects every sd_notify datagram with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, line: str) -> list[float]:
        return [at for at, text in self.messages if line in text.splitlines()]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    server = NotifyServer(tmp_path / "notify.sock")
    yield server
    server.close()


def test_ready_after_the_startup_scan_then_watchdog_pings(make_daemon, notify, client, spool, tmp_path) -> None:
    daemon = make_daemon(start=False, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "incoming").mkdir(exist_ok=True)
    early = spool / "incoming" / "published-before-start.json"
    early.write_text(json.dumps({"kind": "health"}))
    daemon.start()
    ready_at = wait_for(lambda: notify.times("READY=1"), timeout=30)[0]
    # the request published before start was taken in by the startup scan, before READY
    status = client.status("published-before-start")
    assert status is not None
    ready_text = next(text for _, text in notify.messages if "READY=1" in text)
    assert "STATUS=" in ready_text and f"MAINPID={daemon.proc.pid}" in ready_text
    time.sleep(3.0)
    pings = [t for t in notify.times("WATCHDOG=1") if t > ready_at]
    assert 3 <= len(pings) <= 12, pings  # every 0.5 s (half of WATCHDOG_USEC)


def test_no_watchdog_ping_while_the_loop_is_blocked(make_daemon, notify, client, tmp_path) -> None:
    make_daemon(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 2)
    job = client.submit({"kind": "test-block", "seconds": 3.0})  # runs inside the supervisor's loop
    wait_state(client, job, {"succeeded"}, timeout=30)
    time.sleep(1.5)
    pings = notify.times("WATCHDOG=1")
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) >= 2.5, f"the blocked loop must not ping; gaps {gaps}"
    assert sorted(gaps)[len(gaps) // 2] < 1.0, "pings resume at the normal period afterwards"


def test_sigterm_sends_stopping_and_checkpoints_a_training(make_daemon, notify, client, spool, tmp_path) -> None:
    daemon = make_daemon(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    training = client.submit({"kind": "test-train", "steps": 300, "step_s": 0.05})
    wait_for(lambda: step_of(client, training) >= 3)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10, "a training must yield at its next step, not run to the end"
    assert notify.times("STOPPING=1")
    status = client.status(training)
    assert status.state.value == "queued" and "suspended_for_shutdown" in status.notes
    assert (spool / "queued" / f"{training}.json").exists()
    assert daemon.heartbeat()["state"] == "stopping"
    checkpoint_step = json.loads((spool / "jobs" / training / "checkpoint.pt").read_text())["step"]
    make_daemon("test-1")
    done = wait_state(client, training, {"succeeded", "failed"}, timeout=60)
    assert done.state.value == "succeeded" and done.result["resumed_from"] == checkpoint_step
    assert len(runs(spool, training)) == 2


def test_sighup_reloads_the_config_file(make_daemon, client, tmp_path) -> None:
    config = tmp_path / "dlwatchd.toml"
    config.write_text("dead_after = 30\nmax_request_bytes = 1048576\n")
    daemon = make_daemon(args=("--config", str(config)))
    config.write_text("dead_after = 12\nmax_request_bytes = 2097152\nhttp_port = 8765\n")
    daemon.proc.send_signal(1)  # SIGHUP
    log = daemon.log
    wait_for(lambda: "SIGHUP: dead_after: 30.0 -> 12.0" in log.read_text(), timeout=10)
    text = log.read_text()
    assert "max_request_bytes: 1048576 -> 2097152" in text
    assert "http_port: None -> 8765 (takes effect at the next restart)" in text
    job = client.submit({"kind": "health"})
    assert wait_state(client, job, {"succeeded"}).result["state"] == "ready"
    config.write_text("dead_after = 'soon'\n")
    daemon.proc.send_signal(1)
    wait_for(lambda: "keeping the running one" in log.read_text(), timeout=10)


def test_journald_priority_prefixes(make_daemon, client) -> None:
    daemon = make_daemon(env={"JOURNAL_STREAM": "8:12345"})
    client.submit({"kind": "health", "bogus": 1}, job_id="bad-request")
    wait_state(client, "bad-request", {"rejected"})
    lines = daemon.log.read_text().splitlines()
    assert any(line.startswith("<6>dlwatchd.supervisor: ready") for line in lines)
    assert any(line.startswith("<4>dlwatchd.intake: rejected bad-request") for line in lines)
