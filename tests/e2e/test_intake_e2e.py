"""Bad input at the spool's front door: every case ends in a clear status and a healthy daemon."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import step_of, wait_filed, wait_for, wait_state

from dlwatchd.client import SpoolClient


def publish_raw(spool: Path, job_id: str, data: bytes) -> None:
    temp = spool / "incoming" / f".{job_id}.json.tmp"
    temp.write_bytes(data)
    os.rename(temp, spool / "incoming" / f"{job_id}.json")


def assert_healthy(client: SpoolClient) -> None:
    job = client.submit({"kind": "health"})
    status = wait_state(client, job, {"succeeded"}, timeout=10)
    assert status.result["state"] == "ready"


CASES = {
    "bad-json": (b'{"kind": "health",\n  "client": }', "E_BAD_JSON"),
    "nan-literal": (b'{"kind": "gpu", "meta": {"x": NaN}}', "E_BAD_JSON"),
    "schema-unknown-field": (b'{"kind": "health", "colour": "red"}', "E_SCHEMA"),
    "schema-bad-value": (
        json.dumps({"kind": "infer", "model_id": "m", "tiles": [{"id": "../x", "data": "a.png"}]}).encode(),
        "E_SCHEMA",
    ),
    "deep-nesting": (b'{"kind": "health", "meta": ' + b"[" * 100000 + b"]" * 100000 + b"}", "E_TOO_LARGE"),
    "not-an-object": (b"[1, 2, 3]", "E_SCHEMA"),
    "wrong-protocol": (b'{"protocol": 2, "kind": "health"}', "E_PROTOCOL"),
    "unknown-kind": (b'{"kind": "make-coffee"}', "E_SCHEMA"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_requests_are_rejected_with_a_code(daemon, client: SpoolClient, spool: Path, case: str) -> None:
    data, code = CASES[case]
    publish_raw(spool, case, data)
    status = wait_state(client, case, {"rejected"}, timeout=10)
    assert status.error.code.value == code
    assert status.error.message.endswith(".")
    wait_filed(spool, case, "rejected")
    assert not (spool / "incoming" / f"{case}.json").exists()
    if case == "bad-json":
        assert (status.error.line, status.error.column) == (2, 13)
    if case == "schema-unknown-field":
        assert status.error.field == "colour"
    if case == "schema-bad-value":
        assert status.error.field == "tiles[0].id"
    assert_healthy(client)


def test_oversized_request_is_rejected_unread(daemon, client: SpoolClient, spool: Path) -> None:
    publish_raw(spool, "huge", b'{"kind": "health", "meta": {"pad": "' + b"x" * (33 * 1024 * 1024) + b'"}}')
    status = wait_state(client, "huge", {"rejected"}, timeout=20)
    assert status.error.code.value == "E_TOO_LARGE"
    assert_healthy(client)


def test_temp_and_sync_tool_names_are_never_touched(daemon, client: SpoolClient, spool: Path) -> None:
    names = [
        ".abc.json.tmp",
        "abc.json.part",
        ".syncthing.abc.json.tmp",
        "~syncthing~abc.json.tmp",
        "abc (conflicted copy 2024-05-01).json",
        "abc.sync-conflict-20240501-101010-ABCDEFG.json",
        "._abc.json",
        ".DS_Store",
        "notes.txt",
    ]
    for name in names:
        (spool / "incoming" / name).write_bytes(b'{"kind": "health"}')
    rescans = daemon.heartbeat()["counters"]["rescans"]
    wait_for(lambda: (daemon.heartbeat() or {}).get("counters", {}).get("rescans", 0) >= rescans + 3)
    assert sorted(os.listdir(spool / "incoming")) == sorted(names)
    assert daemon.heartbeat()["counters"]["ignored_files"] == len(names), "each name is counted once"
    assert_healthy(client)
    assert sorted(os.listdir(spool / "incoming")) == sorted(names)


def test_a_fifo_named_like_a_request_does_not_block(daemon, client: SpoolClient, spool: Path) -> None:
    os.mkfifo(spool / "incoming" / "pipe.json")
    status = wait_state(client, "pipe", {"rejected"}, timeout=10)
    assert status.error.code.value == "E_SCHEMA" and "FIFO" in status.error.message
    assert_healthy(client)


def test_badly_named_request_goes_to_rejected_with_a_sidecar(daemon, client: SpoolClient, spool: Path) -> None:
    (spool / "incoming" / "My Job.json").write_bytes(b'{"kind": "health"}')
    sidecar = spool / "rejected" / "My Job.error.json"
    wait_for(sidecar.exists, timeout=10)
    assert json.loads(sidecar.read_bytes())["error"]["code"] == "E_SCHEMA"
    assert (spool / "rejected" / "My Job.json").exists()


def test_duplicate_ids(daemon, client: SpoolClient, spool: Path) -> None:
    body = {"kind": "test-sleep", "steps": 1}
    job = client.submit(body, job_id="dup-1")
    first = wait_state(client, job, {"succeeded"})
    publish_raw(spool, "dup-1", json.dumps(body).encode())  # identical: dropped silently
    publish_raw(spool, "dup-1", json.dumps({**body, "steps": 2}).encode())  # different: refused
    sidecar = spool / "rejected" / "dup-1.dup-1.error.json"
    wait_for(sidecar.exists, timeout=10)
    assert json.loads(sidecar.read_bytes())["error"]["code"] == "E_DUPLICATE_ID"
    wait_for(lambda: not (spool / "incoming" / "dup-1.json").exists(), timeout=10)
    assert client.status(job).seq == first.seq, "the original job's status must be untouched"
    assert not (spool / "rejected" / "dup-1.dup-2.json").exists()


def test_cancel_of_a_queued_job(daemon, client: SpoolClient) -> None:
    blocker = client.submit({"kind": "test-sleep", "steps": 200, "step_s": 0.05})
    wait_state(client, blocker, {"running"})
    waiting = client.submit({"kind": "test-sleep", "steps": 1})
    wait_state(client, waiting, {"queued"})
    client.cancel(waiting)
    status = wait_state(client, waiting, {"cancelled"}, timeout=10)
    assert status.result is None
    assert not (client.layout.job_dir(waiting) / "runs.txt").exists()
    wait_filed(client.layout.root, waiting, "cancelled")
    client.cancel(blocker)
    assert wait_state(client, blocker, {"cancelled"}).state.value == "cancelled"


def test_cancel_after_the_end_changes_nothing(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-sleep"})
    done = wait_state(client, job, {"succeeded"})
    client.cancel(job)
    assert_healthy(client)
    assert client.status(job).seq == done.seq and client.status(job).state.value == "succeeded"


def test_pause_and_resume_of_a_training(daemon, client: SpoolClient) -> None:
    job = client.submit({"kind": "test-train", "steps": 40, "step_s": 0.05})
    wait_for(lambda: step_of(client, job) >= 2)
    client.pause(job)
    paused = wait_state(client, job, {"paused"})
    step_at_pause = paused.progress["step"]
    assert step_at_pause < 40
    client.resume(job)
    done = wait_state(client, job, {"succeeded"}, timeout=60)
    assert done.result["resumed_from"] == step_at_pause
    assert "resumed" in done.notes


def test_pause_marker_on_a_non_training_is_a_warning(daemon, client: SpoolClient) -> None:
    blocker = client.submit({"kind": "test-sleep", "steps": 100, "step_s": 0.05})
    wait_state(client, blocker, {"running"})
    job = client.submit({"kind": "test-sleep"})
    wait_state(client, job, {"queued"})
    client.pause(job)
    wait_for(lambda: client.status(job).warnings, timeout=10)
    assert client.status(job).warnings[0].code == "W_MARKER_IGNORED"
    client.cancel(blocker)
    assert wait_state(client, job, {"succeeded"}).state.value == "succeeded"
