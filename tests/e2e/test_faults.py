"""Faults injected into a real daemon: full disks, SIGKILL at each stage, a frozen daemon, lost events.

The faults come from the test plugin dlwatchd_faults (loaded in the supervisor and every worker through
DLWATCHD_PLUGINS). After each one the test checks what a user would: the job's end state and error code,
that nothing half-written is visible, that no job ran twice or got lost, and that the daemon is healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import runs, step_of, wait_filed, wait_for, wait_state
from test_infer_e2e import make_model_folder, tile_png
from test_train_e2e import dataset, train_request

from dlwatchd.client import SpoolClient, read_probabilities
from dlwatchd.spool.invariants import check_spool

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}
MODEL = "unet_faults"


def faults(state: Path, **spec: Any) -> dict[str, str]:
    """The environment that installs `spec` in every process of a daemon."""
    state.mkdir(parents=True, exist_ok=True)
    return {
        "DLWATCHD_PLUGINS": "dlwatchd_testkinds,dlwatchd_faults",
        "DLWATCHD_TEST_FAULTS": json.dumps({"state": str(state), **spec}),
    }


def fired(state: Path) -> list[str]:
    log = state / "fired.log"
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def temp_files(root: Path) -> list[str]:
    """Atomic-write temporaries (.<name>.<hex>.tmp) and model folders being assembled, anywhere below root."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            if name.endswith(".tmp") or (folder.endswith("models") and name.startswith(".")):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


def assert_healthy(client: SpoolClient) -> None:
    """The daemon answers and says it is ready, and an ordinary job still runs."""
    health = wait_state(client, client.submit({"kind": "health"}), TERMINAL, timeout=30)
    assert health.result["state"] == "ready", health.result.get("reason")
    job = client.submit({"kind": "test-sleep"})
    assert wait_state(client, job, TERMINAL, timeout=60).state.value == "succeeded"


def assert_consistent(spool: Path) -> None:
    problems = check_spool(spool)
    assert not problems, problems


class StatusWatch:
    """Reads one job's status.json as fast as it can; every version it sees must parse, with seq never going back."""

    def __init__(self, client: SpoolClient, job_id: str) -> None:
        self.path = client.layout.status_path(job_id)
        self.states: list[str] = []
        self.errors: list[str] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._look()
            time.sleep(0.002)

    def _look(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            status = json.loads(data)
        except ValueError as exc:
            self.errors.append(f"unparseable status.json: {exc}")
            return
        if status["seq"] < self._seq:
            self.errors.append(f"seq went back from {self._seq} to {status['seq']}")
        self._seq = status["seq"]
        if not self.states or self.states[-1] != status["state"]:
            self.states.append(status["state"])

    def stop(self) -> list[str]:
        """Stops polling and takes one last look, so the version that ended the wait is always among the states."""
        self._stop.set()
        self._thread.join(5)
        self._look()
        return self.states


@pytest.fixture(scope="module")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture
def model(spool: Path, model_template: Path) -> str:
    shutil.copytree(model_template, spool / "models" / MODEL)
    return MODEL


def pixel_request(spool: Path, count: int, **fields: Any) -> dict[str, Any]:
    inputs = spool / "inputs" / "px"
    tiles = [{"id": f"t{i}", "data": str(tile_png(inputs / f"t{i}.png", 64, 64, i))} for i in range(count)]
    return {"kind": "infer-pixel", "model_id": MODEL, "tiles": tiles, **fields}


# ---- full disk --------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_bin_map(
    make_daemon, client: SpoolClient, spool: Path, model: str, tmp_path: Path
) -> None:
    state = tmp_path / "faults"
    # the second .bin of the request fails after 4 KiB: the first one is already complete by then
    make_daemon(env=faults(state, write_error={"name": "*.bin", "skip": 1, "after_bytes": 4096, "process": "worker"}))
    job = client.submit(pixel_request(spool, 3))
    watch = StatusWatch(client, job)
    status = wait_state(client, job, TERMINAL, timeout=120)
    assert watch.stop()[-1] == "failed" and not watch.errors, watch.errors
    assert status.state.value == "failed" and status.error.code.value == "E_DISK_FULL", status.error
    assert fired(state) == ["ENOSPC t1.bin"]
    outputs = client.layout.job_dir(job) / "outputs"
    assert not outputs.exists() or os.listdir(outputs) == [], "a failed request leaves no .bin behind"
    assert temp_files(spool) == []
    assert_consistent(spool)
    again = wait_state(client, client.submit(pixel_request(spool, 3)), TERMINAL, timeout=120)
    assert again.state.value == "succeeded", again.error
    assert_healthy(client)


def test_disk_full_while_publishing_a_model(make_daemon, client: SpoolClient, spool: Path, tmp_path: Path) -> None:
    state = tmp_path / "faults"
    make_daemon(env=faults(state, write_error={"name": "model.pt", "after_bytes": 65536, "process": "worker"}))
    data = dataset(spool, "full")
    job = client.submit(train_request(data, epochs=1))
    status = wait_state(client, job, TERMINAL, timeout=300)
    assert status.state.value == "failed" and status.error.code.value == "E_DISK_FULL", status.error
    assert fired(state) == ["ENOSPC model.pt"]
    assert os.listdir(spool / "models") == [], "no model folder, finished or half-assembled"
    assert temp_files(spool) == []
    assert_consistent(spool)
    assert_healthy(client)


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [("ENOSPC", "E_DISK_FULL", "No space left"), ("EACCES", "E_PERMISSION", "Permission denied")],
)
def test_status_json_that_cannot_be_written(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path, error: str, code: str, words: str
) -> None:
    """A full disk, or a job folder whose permissions were taken away, while the job writes its status."""
    state, broken = tmp_path / "faults", tmp_path / "broken"
    broken.touch()
    # the worker's first status write (running) lands; then every write fails until the test repairs it
    spec = {"name": "status.json", "errno": error, "skip": 1, "while_exists": str(broken), "process": "worker"}
    daemon = make_daemon(env=faults(state, write_error=spec))
    job = client.submit({"kind": "test-sleep", "steps": 20, "step_s": 0.02})
    watch = StatusWatch(client, job)
    beat = wait_for(lambda: (b := daemon.heartbeat()) and b["state"] == "degraded" and b, timeout=30)
    assert f"cannot record the end of job {job}" in beat["reason"] and words in beat["reason"]
    assert client.status(job).state.value == "running", "the last status written stays readable"
    broken.unlink()  # space is freed, permissions are given back
    status = wait_state(client, job, TERMINAL, timeout=30)
    assert watch.stop()[-2:] == ["running", "failed"] and not watch.errors, watch.errors
    assert status.error.code.value == code
    assert f"{error} status.json" in fired(state)
    assert temp_files(spool) == []
    wait_for(lambda: daemon.heartbeat()["state"] == "ready", timeout=10)
    assert_consistent(spool)
    assert_healthy(client)


def test_disk_full_at_intake_keeps_the_request_until_there_is_room(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path
) -> None:
    state, full = tmp_path / "faults", tmp_path / "disk-is-full"
    spec = {"name": "status.json", "while_exists": str(full), "process": "supervisor"}
    daemon = make_daemon(env=faults(state, write_error=spec))
    full.touch()
    job = client.submit({"kind": "test-sleep"})
    beat = wait_for(lambda: (b := daemon.heartbeat()) and b["state"] == "degraded" and b, timeout=30)
    assert beat["reason"].startswith("the spool cannot be used") and "No space left" in beat["reason"]
    assert_consistent(spool)  # claimed into tmp/, not lost, nothing half-written visible
    assert client.status(job) is None
    full.unlink()
    assert wait_state(client, job, TERMINAL, timeout=30).state.value == "succeeded"
    assert len(runs(spool, job)) == 1
    assert temp_files(spool) == []
    wait_for(lambda: daemon.heartbeat()["state"] == "ready", timeout=10)
    assert_healthy(client)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 8 MiB filesystem (tmpfs), where this machine lets the tests mount one."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_request_that_cannot_fit_is_refused_before_writing(
    make_daemon, client: SpoolClient, spool: Path, model: str, small_disk: Path
) -> None:
    make_daemon(env={"DLWATCHD_WRITE_ROOTS": str(small_disk)})
    request = {**pixel_request(spool, 2), "output_dir": str(small_disk / "overlays")}
    refused = wait_state(client, client.submit(request), TERMINAL, timeout=120)
    assert refused.state.value == "failed" and refused.error.code.value == "E_DISK_FULL", refused.error
    assert "MB are free" in refused.error.message and str(small_disk) in refused.error.message
    assert os.listdir(small_disk / "overlays") == []
    assert_consistent(spool)
    assert_healthy(client)


# ---- SIGKILL at each stage --------------------------------------------------------------------------

# (stage, the function whose call ends in SIGKILL, before or after it, which process)
KILL_POINTS = {
    "after-intake-claim": ("dlwatchd.spool.intake:rename_claim", "after", "supervisor"),
    "after-claim": ("dlwatchd.supervisor.dispatch:claim_queued", "after", "supervisor"),
    "outputs-written-before-the-final-move": ("dlwatchd.supervisor.daemon:commit_terminal", "before", "supervisor"),
}


@pytest.mark.parametrize("stage", sorted(KILL_POINTS))
def test_sigkill_of_the_daemon_at_each_stage(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path, stage: str
) -> None:
    target, when, process = KILL_POINTS[stage]
    state = tmp_path / "faults"
    env = faults(state, kill=[{"target": target, "when": when, "process": process}])
    daemon = make_daemon(env=env)
    job = client.submit({"kind": "test-sleep", "steps": 3})
    daemon.proc.wait(60)
    assert daemon.proc.returncode == -signal.SIGKILL and fired(state) == [f"kill {target} {when} call 1"]
    assert_consistent(spool)
    make_daemon(env=env)  # the same daemon id restarts; the fault has fired and stays off
    status = wait_state(client, job, TERMINAL, timeout=60)
    assert status.state.value == "succeeded", status.error
    assert len(runs(spool, job)) == 1, "ran exactly once"
    wait_filed(spool, job, "done")
    assert os.listdir(spool / "done") == [f"{job}.json"] and os.listdir(spool / "running") == []
    assert_consistent(spool)


def test_sigkill_of_a_worker_mid_inference(
    make_daemon, client: SpoolClient, spool: Path, model: str, tmp_path: Path
) -> None:
    state = tmp_path / "faults"
    # the worker dies right after the second of four .bin maps is published
    kill = {"target": "dlwatchd.jobs.infer:_store", "when": "after", "call": 2, "process": "worker"}
    make_daemon(env=faults(state, kill=[kill]))
    job = client.submit(pixel_request(spool, 4))
    status = wait_state(client, job, TERMINAL, timeout=120)
    assert fired(state) == ["kill dlwatchd.jobs.infer:_store after call 2"]
    assert status.state.value == "succeeded" and status.attempt == 2, status.error
    assert "retried_after_worker_death" in status.notes
    outputs = client.layout.job_dir(job) / "outputs"
    assert sorted(os.listdir(outputs)) == [f"t{i}.bin" for i in range(4)]
    for name in os.listdir(outputs):
        assert np.allclose(read_probabilities(outputs / name, 3, 64, 64).sum(axis=0), 1.0, atol=1e-5)
    assert temp_files(spool) == []
    assert_consistent(spool)


# ---- a frozen daemon --------------------------------------------------------------------------------


def test_a_frozen_daemon_is_taken_over_and_publishes_nothing_when_it_wakes(
    make_daemon, client: SpoolClient, spool: Path
) -> None:
    fast = {"DLWATCHD_DEAD_AFTER": "2"}
    alpha = make_daemon("alpha", env=fast)
    job = client.submit({"kind": "test-sleep", "steps": 60, "step_s": 0.05})
    wait_for(lambda: step_of(client, job) >= 2)
    frozen = [alpha.proc.pid, *alpha.worker_pids().values()]
    for pid in frozen:  # the whole machine stops: supervisor and workers
        os.kill(pid, signal.SIGSTOP)
    try:
        make_daemon("beta", env=fast)
        status = wait_state(client, job, TERMINAL, timeout=60)
        assert status.state.value == "succeeded" and status.daemon == "beta" and status.attempt == 2
        finished = client.layout.status_path(job).read_bytes()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # alpha wakes with its worker mid-job and its claim gone: it must not write a single byte more
    wait_for(lambda: "discarded" in alpha.log.read_text() or "is gone" in alpha.log.read_text(), timeout=30)
    time.sleep(1.0)
    assert client.layout.status_path(job).read_bytes() == finished
    wait_filed(spool, job, "done")
    assert os.listdir(spool / "done") == [f"{job}.json"] and os.listdir(spool / "running") == []
    assert [line.split()[0] for line in runs(spool, job)] == ["1", "2"]
    assert alpha.proc.poll() is None, "the woken daemon carries on"
    wait_for(lambda: alpha.heartbeat()["beat"] > 0 and alpha.heartbeat()["state"] == "ready", timeout=10)
    assert_consistent(spool)


# ---- races ------------------------------------------------------------------------------------------


def test_cancel_racing_completion_ends_in_one_state(daemon, client: SpoolClient, spool: Path) -> None:
    jobs = []
    for i in range(16):
        job = client.submit({"kind": "test-sleep", "steps": 2, "step_s": 0.02})
        wait_for(lambda job=job: client.status(job) is not None)  # accepted: the job folder exists
        time.sleep(0.015 * (i % 5))  # cancel before, during or right after the run
        client.cancel(job)
        jobs.append(job)
    ends = {job: wait_state(client, job, TERMINAL, timeout=60).state.value for job in jobs}
    assert set(ends.values()) <= {"succeeded", "cancelled"}
    for job, end in ends.items():
        folder = {"succeeded": "done", "cancelled": "cancelled"}[end]
        wait_filed(spool, job, folder)
    assert_consistent(spool)


def test_the_same_job_id_submitted_twice_at_once(daemon, client: SpoolClient, spool: Path) -> None:
    """Two clients publish different requests under one id at the same moment (as raw renames, like any client)."""
    bodies = [{"kind": "test-sleep", "steps": 1}, {"kind": "test-sleep", "steps": 2}]
    for round_ in range(5):
        job_id = f"twice-{round_}"
        barrier = threading.Barrier(2)

        def publish(
            number: int, body: dict[str, Any], job_id: str = job_id, barrier: threading.Barrier = barrier
        ) -> None:
            temp = spool / "incoming" / f".{job_id}.{number}.tmp"
            temp.write_text(json.dumps(body))
            barrier.wait()
            os.rename(temp, spool / "incoming" / f"{job_id}.json")

        threads = [threading.Thread(target=publish, args=pair) for pair in enumerate(bodies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = wait_state(client, job_id, TERMINAL, timeout=60)
        wait_for(lambda job_id=job_id: not (spool / "incoming" / f"{job_id}.json").exists(), timeout=30)
        assert status.state.value == "succeeded" and len(runs(spool, job_id)) == 1
        # the later arrival either replaced the first before intake saw it (one request) or was refused
        refused = sorted(name for name in os.listdir(spool / "rejected") if name.startswith(f"{job_id}."))
        assert len(refused) in (0, 2), refused
        if refused:
            sidecar = json.loads(
                (spool / "rejected" / next(n for n in refused if n.endswith(".error.json"))).read_text()
            )
            assert sidecar["error"]["code"] == "E_DUPLICATE_ID", sidecar
    assert_consistent(spool)


# ---- lost events --------------------------------------------------------------------------------


def test_a_native_watcher_that_delivers_nothing_still_runs_every_job(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path
) -> None:
    daemon = make_daemon(env=faults(tmp_path / "faults", drop_events=True))
    started = time.monotonic()
    jobs = [client.submit({"kind": "test-sleep"}) for _ in range(3)]
    for job in jobs:
        assert wait_state(client, job, TERMINAL, timeout=30).state.value == "succeeded"
    assert time.monotonic() - started < 10, "within a few rescans (0.5 s each here)"
    assert daemon.heartbeat()["watcher"] == "native"


def test_a_spool_that_cannot_be_read_degrades_then_recovers(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "unreadable"
    spool.mkdir()
    (spool / "incoming").mkdir()
    daemon = make_daemon(
        env=faults(tmp_path / "faults", unreadable={"path": str(spool / "incoming"), "while_exists": str(flag)})
    )
    flag.touch()
    job = client.submit({"kind": "test-sleep"})
    beat = wait_for(lambda: (b := daemon.heartbeat()) and b["state"] == "degraded" and b, timeout=30)
    assert beat["reason"].startswith("the spool cannot be used") and "Permission denied" in beat["reason"]
    time.sleep(1.0)
    assert client.status(job) is None and (spool / "incoming" / f"{job}.json").exists(), "nothing moved meanwhile"
    assert daemon.proc.poll() is None
    flag.unlink()
    assert wait_state(client, job, TERMINAL, timeout=30).state.value == "succeeded"
    wait_for(lambda: daemon.heartbeat()["state"] == "ready", timeout=10)
    assert_consistent(spool)


def test_the_watcher_thread_dying_is_seen_and_it_is_restarted(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "kill-watcher"
    daemon = make_daemon(env=faults(tmp_path / "faults", watcher_dies_when=str(flag)))
    flag.touch()
    wait_for(lambda: daemon.heartbeat()["counters"]["event_overflows"] >= 1, timeout=30)
    assert "the filesystem watcher stopped; restarting it" in daemon.log.read_text()
    wait_for(lambda: (b := daemon.heartbeat())["state"] == "ready" and b["watcher_alive"], timeout=10)
    job = client.submit({"kind": "test-sleep"})
    assert wait_state(client, job, TERMINAL, timeout=30).state.value == "succeeded"


def test_a_watched_folder_replaced_is_watched_again(make_daemon, client: SpoolClient, spool: Path) -> None:
    daemon = make_daemon(rescan_interval=60.0)  # only events can bring a job in quickly
    os.rename(spool / "incoming", spool / "incoming.old")
    (spool / "incoming").mkdir()  # a sync tool recreates the folder
    wait_for(lambda: daemon.heartbeat()["counters"]["event_overflows"] >= 1, timeout=30)
    assert "the filesystem watcher lost incoming: the folder was replaced" in daemon.log.read_text()
    started = time.monotonic()
    job = client.submit({"kind": "test-sleep"})
    assert wait_state(client, job, TERMINAL, timeout=30).state.value == "succeeded"
    assert time.monotonic() - started < 10, "picked up by an event on the new folder, not a 60 s rescan"
