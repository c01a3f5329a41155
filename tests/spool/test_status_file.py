"""status_file.py: versions of status.json with a strictly increasing seq and the state timestamps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dlwatchd.errors import ErrorCode
from dlwatchd.protocol.status import ErrorInfo, JobState
from dlwatchd.spool.status_file import StatusFile, read_status


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs" / "j1" / "status.json"


@pytest.fixture
def writer(path: Path) -> StatusFile:
    path.parent.mkdir(parents=True)
    status = StatusFile(path, progress_interval=3600.0)
    status.create(job_id="j1", kind="infer", state=JobState.QUEUED, daemon=None)
    return status


def on_disk(path: Path) -> dict:
    return json.loads(path.read_bytes())


def test_create_writes_seq_1(writer: StatusFile, path: Path) -> None:
    data = on_disk(path)
    assert data["seq"] == 1
    assert data["state"] == "queued"
    assert data["job_id"] == "j1" and data["kind"] == "infer" and data["protocol"] == 1
    assert data["attempt"] == 1
    assert data["created_at"] == data["updated_at"]
    assert data["started_at"] is None and data["finished_at"] is None


def test_seq_strictly_increases_across_every_kind_of_write(writer: StatusFile, path: Path) -> None:
    seqs = [on_disk(path)["seq"]]
    writer.update(state=JobState.RUNNING, daemon="d1")
    seqs.append(on_disk(path)["seq"])
    assert writer.progress({"fraction": 0.5}, force=True)
    seqs.append(on_disk(path)["seq"])
    writer.warn("W_TEST", "a warning")
    seqs.append(on_disk(path)["seq"])
    writer.update(result={"ok": True}, state=JobState.SUCCEEDED)
    seqs.append(on_disk(path)["seq"])
    assert seqs == [1, 2, 3, 4, 5]
    assert writer.current is not None and writer.current.seq == 5


def test_create_on_an_existing_status_continues_the_seq(writer: StatusFile, path: Path) -> None:
    again = StatusFile(path)
    again.create(job_id="j1", kind="infer", state=JobState.REJECTED, daemon="d1")
    assert on_disk(path)["seq"] == 2
    assert on_disk(path)["state"] == "rejected"


def test_progress_is_throttled_unless_forced(writer: StatusFile, path: Path) -> None:
    writer.update(state=JobState.RUNNING)
    assert writer.progress({"fraction": 0.1}, force=True) is True
    assert on_disk(path)["seq"] == 3
    assert writer.progress({"fraction": 0.2}) is False
    assert on_disk(path)["seq"] == 3
    assert on_disk(path)["progress"] == {"fraction": 0.1}
    assert writer.progress({"fraction": 0.3}, force=True) is True
    assert on_disk(path)["seq"] == 4
    assert on_disk(path)["progress"] == {"fraction": 0.3}


def test_progress_is_written_once_per_interval(writer: StatusFile, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [5000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    writer.progress_interval = 1.0
    assert writer.progress({"step": 1}) is True
    clock[0] += 0.5
    assert writer.progress({"step": 2}) is False
    clock[0] += 0.5
    assert writer.progress({"step": 3}) is True
    assert on_disk(path)["progress"] == {"step": 3}
    assert on_disk(path)["seq"] == 3


def test_the_first_progress_write_is_never_throttled(path: Path) -> None:
    path.parent.mkdir(parents=True)
    status = StatusFile(path, progress_interval=1e12)
    status.create(job_id="j1", kind="train", state=JobState.RUNNING, daemon="d1")
    assert status.progress({"step": 0}) is True


def test_progress_without_throttle_writes_every_time(path: Path) -> None:
    path.parent.mkdir(parents=True)
    status = StatusFile(path, progress_interval=0.0)
    status.create(job_id="j1", kind="train", state=JobState.RUNNING, daemon="d1")
    for step in range(5):
        assert status.progress({"step": step})
    assert on_disk(path)["seq"] == 6
    assert on_disk(path)["progress"] == {"step": 4}


def test_a_second_writer_continues_the_seq(writer: StatusFile, path: Path) -> None:
    writer.update(state=JobState.RUNNING, daemon="d1")
    worker = StatusFile(path)
    assert worker.current is not None and worker.current.seq == 2
    worker.update(progress={"fraction": 0.5})
    supervisor = StatusFile(path)
    supervisor.update(state=JobState.SUCCEEDED)
    data = on_disk(path)
    assert data["seq"] == 4
    assert data["progress"] == {"fraction": 0.5}  # fields of earlier versions are kept


def test_started_at_is_set_when_running_and_kept_afterwards(writer: StatusFile, path: Path) -> None:
    writer.update(progress={"fraction": 0.0})
    assert on_disk(path)["started_at"] is None
    writer.update(state=JobState.RUNNING)
    started = on_disk(path)["started_at"]
    assert started is not None and started == on_disk(path)["updated_at"]
    writer.update(state=JobState.PAUSED)
    writer.update(state=JobState.QUEUED)
    writer.update(state=JobState.RUNNING)
    assert on_disk(path)["started_at"] == started
    assert on_disk(path)["finished_at"] is None


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED])
def test_finished_at_is_set_on_a_terminal_state(writer: StatusFile, path: Path, state: JobState) -> None:
    writer.update(state=JobState.RUNNING)
    assert on_disk(path)["finished_at"] is None
    writer.update(state=state)
    data = on_disk(path)
    assert data["finished_at"] is not None
    assert data["finished_at"] == data["updated_at"]
    assert data["finished_at"].endswith("Z")


def test_create_in_a_terminal_state_sets_finished_at(path: Path) -> None:
    path.parent.mkdir(parents=True)
    StatusFile(path).create(job_id="j1", kind=None, state=JobState.REJECTED, daemon="d1")
    data = on_disk(path)
    assert data["finished_at"] is not None
    assert data["finished_at"] == data["updated_at"]


def test_finished_at_is_not_set_for_live_states(writer: StatusFile, path: Path) -> None:
    for state in (JobState.RUNNING, JobState.CANCELLING, JobState.PAUSED, JobState.QUEUED):
        writer.update(state=state)
        assert on_disk(path)["finished_at"] is None, state


def test_fail_records_the_error(writer: StatusFile, path: Path) -> None:
    writer.fail(ErrorInfo(code=ErrorCode.WORKER_DIED, message="The worker died."))
    data = on_disk(path)
    assert data["state"] == "failed"
    assert data["error"]["code"] == "E_WORKER_DIED"
    assert data["finished_at"] is not None


def test_warnings_accumulate(writer: StatusFile, path: Path) -> None:
    writer.warn("W_ONE", "first")
    writer.warn("W_TWO", "second")
    assert [w["code"] for w in on_disk(path)["warnings"]] == ["W_ONE", "W_TWO"]


def test_update_without_a_status_raises(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        StatusFile(path).update(state=JobState.RUNNING)


def test_read_status_tolerates_missing_and_invalid_files(path: Path) -> None:
    assert read_status(path) is None
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert read_status(path) is None
    path.write_text('{"seq": 1}')
    assert read_status(path) is None


def test_an_invalid_update_writes_nothing(writer: StatusFile, path: Path) -> None:
    before = path.read_bytes()
    with pytest.raises(ValueError):
        writer.update(state="exploded")
    assert path.read_bytes() == before
