"""The localhost HTTP shim: read-only answers from the supervisor, refused for foreign Host headers."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from conftest import wait_for, wait_state

from dlwatchd.client import SpoolClient


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str, host: str | None = None, method: str = "GET") -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host} if host is not None else {}
    connection.request(method, path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, (json.loads(body) if body else None)


@pytest.fixture
def shim(make_daemon):
    port = free_port()
    daemon = make_daemon(env={"DLWATCHD_HTTP_PORT": str(port)})
    return daemon, port


def test_health_gpu_and_catalogue(shim) -> None:
    _, port = shim
    status, health = get(port, "/api/v1/health")
    assert status == 200 and health["daemon_id"] == "test-1"
    gpu = wait_for(lambda: (lambda r: r[1] if r[0] == 200 else None)(get(port, "/api/v1/gpu")), timeout=60)
    assert {"available", "name", "memory_mb", "cuda_version"} <= set(gpu)
    status, encoders = get(port, "/api/v1/pretrained/encoders")
    assert status == 200 and encoders[1]["name"] == "resnet34"
    assert get(port, "/api/v1/pretrained/encoder/resnet50_lunit-swav")[1]["family"] == "resnet"
    assert get(port, "/api/v1/pretrained/encoder/nope")[0] == 404
    assert get(port, "/api/v1/pretrained/architecture/deeplabv3+")[1]["name"] == "deeplabv3plus"
    freeze = get(port, "/api/v1/pretrained/freeze-recommendations/large?encoder=resnet50_tcga-brca")[1]
    assert freeze["recommendations"] == {"0": False, "1": False, "2": False, "3": False, "4": False}
    assert get(port, "/api/v1/pretrained/freeze-recommendations/huge")[0] == 400
    assert get(port, "/api/v1/models")[1] == {"models": [], "warnings": []}


def test_job_status_through_the_shim(shim, client: SpoolClient) -> None:
    _, port = shim
    job = client.submit({"kind": "health"})
    wait_state(client, job, {"succeeded"})
    status, body = get(port, f"/api/v1/jobs/{job}")
    assert status == 200 and body["state"] == "succeeded"
    assert get(port, "/api/v1/jobs/no-such-job")[0] == 404
    assert get(port, "/api/v1/jobs/..%2F..%2Fetc")[0] == 404


def test_foreign_hosts_and_writes_are_refused(shim) -> None:
    _, port = shim
    assert get(port, "/api/v1/health", host="evil.example:8080")[0] == 403
    assert get(port, "/api/v1/health", host="localhost:1234")[0] == 200
    assert get(port, "/api/v1/health", host="[::1]")[0] == 200
    assert get(port, "/api/v1/health", method="POST")[0] == 405
    assert get(port, "/api/v1/health", method="DELETE")[0] == 405
    assert get(port, "/elsewhere")[0] == 404


def test_the_shim_answers_while_a_training_runs(shim, client: SpoolClient) -> None:
    _, port = shim
    training = client.submit({"kind": "test-train", "steps": 400, "step_s": 0.05})
    wait_state(client, training, {"running"})
    slowest = 0.0
    for _ in range(20):
        started = time.perf_counter()
        assert get(port, "/api/v1/health")[0] == 200
        slowest = max(slowest, time.perf_counter() - started)
    client.cancel(training)
    wait_state(client, training, {"cancelled"})
    print(f"slowest /health answer during a training: {1000 * slowest:.1f} ms")
