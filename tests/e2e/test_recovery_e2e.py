"""Crashes and restarts: every job ends in a defined state; none is lost, none is published twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import runs, step_of, wait_filed, wait_for, wait_state

from dlwatchd.client import SpoolClient

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def test_a_worker_crash_retries_an_inference_once(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-sleep", "crash": "exit", "crash_attempts": [1]})
    status = wait_state(client, job, TERMINAL, timeout=60)
    assert status.state.value == "succeeded"
    assert status.attempt == 2 and status.result["attempt"] == 2
    assert "retried_after_worker_death" in status.notes
    assert len(runs(client.layout.root, job)) == 2


def test_a_worker_crashing_every_time_fails_with_worker_died(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-sleep", "crash": "kill"})
    status = wait_state(client, job, TERMINAL, timeout=60)
    assert status.state.value == "failed"
    assert status.error.code.value == "E_WORKER_DIED"
    assert len(runs(client.layout.root, job)) == 2
    daemon.wait_ready()
    assert daemon.heartbeat()["counters"]["worker_restarts"] >= 2
    after = client.submit({"kind": "test-sleep"})
    assert wait_state(client, after, TERMINAL).state.value == "succeeded"


def test_an_exception_in_a_job_is_an_internal_error_with_a_log(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-sleep", "crash": "raise"})
    status = wait_state(client, job, TERMINAL)
    assert status.error.code.value == "E_INTERNAL"
    assert "RuntimeError: test crash" in status.error.message
    assert "Traceback" in (client.layout.job_dir(job) / "log.txt").read_text()
    assert len(runs(client.layout.root, job)) == 1


def test_requests_published_while_the_daemon_was_down_run_at_start(
    make_daemon, client: SpoolClient, spool: Path
) -> None:
    first = make_daemon()
    first.stop()
    jobs = [client.submit({"kind": "test-sleep"}) for _ in range(5)]
    make_daemon()
    for job in jobs:
        assert wait_state(client, job, TERMINAL).state.value == "succeeded"
        assert len(runs(spool, job)) == 1


def test_sigkill_of_the_daemon_then_restart(make_daemon, client: SpoolClient, spool: Path) -> None:
    daemon = make_daemon()
    inference = client.submit({"kind": "test-sleep", "steps": 400, "step_s": 0.05})
    training = client.submit({"kind": "test-train", "steps": 400, "step_s": 0.05})
    wait_for(lambda: step_of(client, inference) >= 3 and step_of(client, training) >= 3)
    queued = [client.submit({"kind": "test-sleep"}) for _ in range(3)]
    wait_for(lambda: all((client.status(j) or None) is not None for j in queued))
    workers = daemon.worker_pids()
    daemon.kill()
    # the workers die with their supervisor: nothing keeps writing behind the next daemon's back
    wait_for(lambda: not any(_alive(pid) for pid in workers.values()), timeout=10)
    published_while_down = client.submit({"kind": "test-sleep"})
    client.cancel(training)  # a client changes its mind while the daemon is down
    make_daemon()
    statuses = {
        job: wait_state(client, job, TERMINAL, timeout=60) for job in [inference, *queued, published_while_down]
    }
    assert statuses[inference].state.value == "succeeded"
    assert statuses[inference].attempt == 2 and "retried_after_restart" in statuses[inference].notes
    for job in [*queued, published_while_down]:
        assert statuses[job].state.value == "succeeded"
        assert len(runs(spool, job)) == 1, "a job that never started must run exactly once"
    assert wait_state(client, training, TERMINAL).state.value == "cancelled"
    for job in statuses:
        wait_filed(spool, job, "done")
    wait_filed(spool, training, "cancelled")
    assert os.listdir(spool / "running") == []


def test_restart_resumes_a_training_from_its_checkpoint(make_daemon, client: SpoolClient) -> None:
    daemon = make_daemon()
    training = client.submit({"kind": "test-train", "steps": 60, "step_s": 0.05})
    wait_for(lambda: step_of(client, training) >= 5)
    daemon.kill()
    make_daemon()
    status = wait_state(client, training, TERMINAL, timeout=60)
    assert status.state.value == "succeeded"
    assert status.result["resumed_from"] >= 5
    assert "resumed_after_restart" in status.notes


def test_sigterm_lets_a_running_job_finish(make_daemon, client: SpoolClient, spool: Path) -> None:
    daemon = make_daemon()
    job = client.submit({"kind": "test-sleep", "steps": 10, "step_s": 0.1})
    wait_state(client, job, {"running"})
    assert daemon.stop() == 0
    assert client.status(job).state.value == "succeeded"
    assert (spool / "done" / f"{job}.json").exists()
    assert daemon.heartbeat()["state"] == "stopping"


def test_two_daemons_share_a_spool_and_run_each_job_once(make_daemon, client: SpoolClient, spool: Path) -> None:
    make_daemon("alpha")
    make_daemon("beta")
    jobs = [client.submit({"kind": "test-sleep"}) for _ in range(100)]
    statuses = {job: wait_state(client, job, TERMINAL, timeout=120) for job in jobs}
    assert all(s.state.value == "succeeded" for s in statuses.values())
    assert all(len(runs(spool, job)) == 1 for job in jobs)
    owners = {s.daemon for s in statuses.values()}
    assert owners <= {"alpha", "beta"}
    for job in jobs:
        wait_filed(spool, job, "done")
    assert len(os.listdir(spool / "done")) == 100


def test_a_dead_daemons_jobs_are_taken_over(make_daemon, client: SpoolClient, spool: Path) -> None:
    fast_takeover = {"DLWATCHD_DEAD_AFTER": "2"}
    alpha = make_daemon("alpha", env=fast_takeover)
    job = client.submit({"kind": "test-sleep", "steps": 400, "step_s": 0.05})
    wait_for(lambda: step_of(client, job) >= 2)
    assert client.status(job).daemon == "alpha"
    make_daemon("beta", env=fast_takeover)
    alpha.kill()
    status = wait_state(client, job, TERMINAL, timeout=60)
    assert status.state.value == "succeeded"
    assert status.daemon == "beta" and status.attempt == 2
    assert not any(name.endswith("@alpha.json") for name in os.listdir(spool / "running"))


def test_polling_mode_without_native_events(make_daemon, client: SpoolClient) -> None:
    daemon = make_daemon(watch="polling")
    assert daemon.heartbeat()["watcher"] == "polling"
    started = time.monotonic()
    jobs = [client.submit({"kind": "test-sleep"}) for _ in range(5)]
    for job in jobs:
        assert wait_state(client, job, TERMINAL).state.value == "succeeded"
    assert time.monotonic() - started < 30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; it only waits to be reaped by its (dead) parent's reaper
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


def test_sigint_twice_forces_exit(make_daemon) -> None:
    daemon = make_daemon()
    daemon.proc.send_signal(signal.SIGINT)
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(10) in (0, 130)
