"""The `dlwatchd` command against a running daemon: submit, wait, status, markers, list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import step_of, wait_for, wait_state

from dlwatchd.client import SpoolClient


def cli(spool: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlwatchd", args[0], "--spool", str(spool), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_prints_the_id_and_the_result(daemon, spool: Path, tmp_path: Path) -> None:
    request = tmp_path / "health.json"
    request.write_text(json.dumps({"kind": "health"}))
    done = cli(spool, "submit", str(request), "--wait", "--id", "cli-health")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cli-health"
    assert '"daemon_id": "test-1"' in done.stdout


def test_submit_wait_exits_non_zero_with_the_error(daemon, spool: Path, tmp_path: Path) -> None:
    request = tmp_path / "bad.json"
    request.write_text(json.dumps({"kind": "health", "nonsense": True}))
    done = cli(spool, "submit", str(request), "--wait")
    assert done.returncode == 1
    assert "E_SCHEMA" in done.stderr and "nonsense" in done.stderr


def test_status_list_and_markers(daemon, spool: Path, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-train", "steps": 400, "step_s": 0.05})
    wait_for(lambda: step_of(client, job) >= 1)
    shown = cli(spool, "status", job)
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "running"
    listed = cli(spool, "list", "--json")
    assert job in json.loads(listed.stdout)["running"]
    assert cli(spool, "pause", job).returncode == 0
    wait_state(client, job, {"paused"})
    assert cli(spool, "resume", job).returncode == 0
    wait_state(client, job, {"running"})
    assert cli(spool, "cancel", job).returncode == 0
    followed = cli(spool, "status", job, "--follow", "--timeout", "30")
    assert followed.returncode == 1 and "cancelled" in followed.stdout


def test_status_of_an_unknown_job_is_a_usage_error(daemon, spool: Path) -> None:
    shown = cli(spool, "status", "no-such-job")
    assert shown.returncode == 2 and "no status" in shown.stderr
