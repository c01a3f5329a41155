"""Query kinds and gpu-clear end to end, through the spool only."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import runs, wait_filed, wait_state

from dlwatchd.client import SpoolClient


def test_health_answers_with_daemon_health(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "health", "client": {"name": "pytest", "version": "1"}})
    status = wait_state(client, job, {"succeeded"}, timeout=10)
    assert status.result["daemon_id"] == "test-1"
    assert status.result["state"] == "ready"
    assert status.result["watcher"] == "native"
    assert set(status.result["lanes"]) == {"train", "infer", "query"}
    assert status.client == {"name": "pytest", "version": "1"}
    wait_filed(client.layout.root, job, "done")


def test_gpu_reports_the_device(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "gpu"})
    status = wait_state(client, job, {"succeeded", "failed"}, timeout=60)
    assert status.state.value == "succeeded", status.error
    result = status.result
    assert result["device_type"] in ("cpu", "cuda", "mps")
    assert {"available", "name", "memory_mb", "cuda_version", "device_string", "torch_version"} <= set(result)
    if result["device_type"] == "cpu":
        assert result["available"] is False and result["name"] == "CPU"
        assert isinstance(result["bf16_native"], bool) and result["cpu_count"] >= 1


def test_gpu_clear_cancels_trainings_and_recycles_workers(daemon, client: SpoolClient) -> None:
    training = client.submit({"kind": "test-train", "steps": 1000, "step_s": 0.05})
    wait_state(client, training, {"running"})
    queued_training = client.submit({"kind": "test-train", "steps": 5})
    wait_state(client, queued_training, {"queued"})
    pids_before = daemon.worker_pids()
    clear = client.submit({"kind": "gpu-clear"})
    status = wait_state(client, clear, {"succeeded", "failed"}, timeout=90)
    assert status.state.value == "succeeded", status.error
    result = status.result
    assert result["status"] == "cleared"
    assert set(result["cancelled_jobs"]) == {training, queued_training}
    assert result["memory_before"]["device"] in ("cpu", "cuda", "mps")
    assert result["memory_after"]["device"] == result["memory_before"]["device"]
    assert wait_state(client, training, {"cancelled"}).state.value == "cancelled"
    assert client.status(queued_training).state.value == "cancelled"
    assert runs(client.layout.root, queued_training) == []
    daemon.wait_ready()
    pids_after = daemon.worker_pids()
    assert all(pids_after[lane] != pids_before[lane] for lane in pids_before)


def test_kinds_without_an_engine_are_rejected_not_faked(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-unavailable"})
    status = wait_state(client, job, {"rejected"}, timeout=10)
    assert status.error.code.value == "E_PROTOCOL"
    assert "not available" in status.error.message and "test-unavailable" in status.error.message
    assert status.kind == "test-unavailable"


def test_queries_do_not_wait_behind_a_training(daemon, client: SpoolClient) -> None:
    training = client.submit({"kind": "test-train", "steps": 400, "step_s": 0.05})
    wait_state(client, training, {"running"})
    started = time.monotonic()
    health = client.submit({"kind": "health"})
    wait_state(client, health, {"succeeded"}, timeout=5)
    # a query lane job too: the gpu answer needs the query worker, not the busy train worker
    gpu = client.submit({"kind": "gpu"})
    wait_state(client, gpu, {"succeeded"}, timeout=60)
    assert client.status(training).state.value == "running", "the training must still be running"
    assert time.monotonic() - started < 60
    client.cancel(training)
    wait_state(client, training, {"cancelled"})


def test_status_files_of_a_spool_are_always_valid(daemon, client: SpoolClient, spool: Path) -> None:
    job = client.submit({"kind": "test-sleep", "steps": 30, "step_s": 0.05})
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.status(job)  # parses and validates every version it sees
        if status is not None:
            if not seen or seen[-1] != status.seq:
                seen.append(status.seq)
            if status.state.terminal:
                break
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert client.status(job).state.value == "succeeded"


def test_the_supervisor_never_loads_torch(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "gpu"})  # makes the query worker load torch
    wait_state(client, job, {"succeeded"}, timeout=60)
    supervisor_maps = Path(f"/proc/{daemon.proc.pid}/maps")
    if not supervisor_maps.exists():
        return  # not Linux: nothing to read
    assert "libtorch" not in supervisor_maps.read_text()
    query_worker = daemon.worker_pids()["query"]
    assert "libtorch" in Path(f"/proc/{query_worker}/maps").read_text()
