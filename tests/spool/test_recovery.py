"""recovery.py (reconcile, take_over) and control.py: interrupted or waiting jobs reach a defined state."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from dlwatchd.errors import ErrorCode
from dlwatchd.jobs._registry import KindRegistry, build_registry
from dlwatchd.protocol.status import JobState
from dlwatchd.spool import control
from dlwatchd.spool.claims import claim_queued
from dlwatchd.spool.intake import Intake
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.recovery import CHECKPOINT_NAME, reconcile, take_over
from dlwatchd.spool.status_file import StatusFile

TRAIN_BODY = {
    "kind": "train",
    "model_type": "unet",
    "input_config": {"num_channels": 3},
    "classes": ["a", "b"],
    "data_path": "/data",
}


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


@pytest.fixture(scope="module")
def registry() -> KindRegistry:
    return build_registry()


def accept_gpu(layout: SpoolLayout, registry: KindRegistry, job_id: str) -> None:
    """A `gpu` job accepted by a real intake (a retry kind with max_attempts 2)."""
    (layout.incoming / f"{job_id}.json").write_text('{"kind": "gpu"}')
    report = Intake(layout, registry, "d1", 1 << 20).scan()
    assert [a.job_id for a in report.accepted] == [job_id]


def accept_train(layout: SpoolLayout, job_id: str) -> None:
    """A queued training written by hand: this version's intake refuses `train` (no engine yet)."""
    layout.job_dir(job_id).mkdir()
    (layout.request_path(job_id)).write_text(json.dumps(TRAIN_BODY))
    StatusFile(layout.status_path(job_id)).create(job_id=job_id, kind="train", state=JobState.QUEUED, daemon=None)
    layout.queued_path(job_id).write_text(json.dumps(TRAIN_BODY))


def claim(layout: SpoolLayout, job_id: str, daemon: str = "d1", **status: Any) -> Path:
    path = claim_queued(layout, job_id, daemon)
    assert path is not None
    if status:
        StatusFile(layout.status_path(job_id)).update(daemon=daemon, **status)
    return path


def status_of(layout: SpoolLayout, job_id: str) -> dict[str, Any]:
    return json.loads(layout.status_path(job_id).read_bytes())


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- reconcile -------------------------------------------------------------------------------


@pytest.mark.parametrize("state,home", [("succeeded", "done"), ("failed", "failed"), ("cancelled", "cancelled")])
def test_a_terminal_job_is_committed(layout: SpoolLayout, registry: KindRegistry, state: str, home: str) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.RUNNING)
    StatusFile(layout.status_path("j1")).update(state=JobState(state))
    before = layout.status_path("j1").read_bytes()
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.INTERRUPTED) == "committed"
    assert listing(layout.running) == []
    assert listing(layout.root / home) == ["j1.json"]
    assert layout.status_path("j1").read_bytes() == before


def test_a_claimed_but_queued_job_goes_back_without_spending_an_attempt(
    layout: SpoolLayout, registry: KindRegistry
) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1")
    before = layout.status_path("j1").read_bytes()
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.WORKER_DIED) == "requeued"
    assert listing(layout.running) == []
    assert listing(layout.queued) == ["j1.json"]
    assert layout.status_path("j1").read_bytes() == before
    assert status_of(layout, "j1")["attempt"] == 1


@pytest.mark.parametrize(
    "code,note",
    [
        (ErrorCode.WORKER_DIED, "retried_after_worker_death"),
        (ErrorCode.INTERRUPTED, "retried_after_restart"),
    ],
)
def test_a_retry_kind_on_its_first_attempt_is_requeued(
    layout: SpoolLayout, registry: KindRegistry, code: ErrorCode, note: str
) -> None:
    assert registry.get("gpu").on_interrupt == "retry" and registry.get("gpu").max_attempts == 2
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.RUNNING)
    seq = status_of(layout, "j1")["seq"]
    assert reconcile(layout, registry, "j1", path, "d1", code) == "requeued"
    status = status_of(layout, "j1")
    assert status["state"] == "queued"
    assert status["attempt"] == 2
    assert status["notes"] == [note]
    assert status["daemon"] is None
    assert status["seq"] == seq + 1
    assert listing(layout.queued) == ["j1.json"] and listing(layout.running) == []
    assert f"queued again ({note})" in layout.log_path("j1").read_text()


@pytest.mark.parametrize("code", [ErrorCode.WORKER_DIED, ErrorCode.INTERRUPTED])
def test_a_retry_kind_on_its_last_attempt_fails(layout: SpoolLayout, registry: KindRegistry, code: ErrorCode) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.RUNNING, attempt=2)
    assert reconcile(layout, registry, "j1", path, "d1", code) == "failed"
    status = status_of(layout, "j1")
    assert status["state"] == "failed"
    assert status["error"]["code"] == code.value
    assert "last allowed attempt (2)" in status["error"]["message"]
    assert status["finished_at"] is not None
    assert listing(layout.root / "failed") == ["j1.json"]
    assert listing(layout.running) == [] and listing(layout.queued) == []


@pytest.mark.parametrize("attempt", [1, 2, 7])
def test_a_training_with_a_checkpoint_is_resumed_after_a_restart(
    layout: SpoolLayout, registry: KindRegistry, attempt: int
) -> None:
    assert registry.get("train").on_interrupt == "resume"
    accept_train(layout, "t1")
    path = claim(layout, "t1", state=JobState.RUNNING, attempt=attempt)
    (layout.job_dir("t1") / CHECKPOINT_NAME).write_bytes(b"weights")
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.INTERRUPTED) == "requeued"
    status = status_of(layout, "t1")
    assert status["state"] == "queued"
    assert status["notes"] == ["resumed_after_restart"]
    assert status["attempt"] == attempt + 1
    assert listing(layout.queued) == ["t1.json"]
    assert (layout.job_dir("t1") / CHECKPOINT_NAME).read_bytes() == b"weights"


def test_a_training_resumes_once_after_a_worker_death(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_train(layout, "t1")
    path = claim(layout, "t1", state=JobState.RUNNING)
    (layout.job_dir("t1") / CHECKPOINT_NAME).write_bytes(b"weights")
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.WORKER_DIED) == "requeued"
    assert status_of(layout, "t1")["notes"] == ["resumed_after_worker_death"]
    path = claim(layout, "t1", state=JobState.RUNNING)
    assert status_of(layout, "t1")["attempt"] == 2
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.WORKER_DIED) == "failed"
    status = status_of(layout, "t1")
    assert status["error"]["code"] == "E_WORKER_DIED"
    assert "last allowed attempt (2)" in status["error"]["message"]
    assert listing(layout.root / "failed") == ["t1.json"]


def test_a_training_without_a_checkpoint_fails_interrupted(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_train(layout, "t1")
    path = claim(layout, "t1", state=JobState.RUNNING)
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.INTERRUPTED) == "failed"
    status = status_of(layout, "t1")
    assert status["state"] == "failed"
    assert status["error"]["code"] == "E_INTERRUPTED"
    assert "before its first checkpoint" in status["error"]["message"]
    assert listing(layout.root / "failed") == ["t1.json"]


def test_a_cancelling_job_is_cancelled(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.RUNNING)
    StatusFile(layout.status_path("j1")).update(state=JobState.CANCELLING)
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.WORKER_DIED) == "cancelled"
    status = status_of(layout, "j1")
    assert status["state"] == "cancelled"
    assert status["finished_at"] is not None
    assert listing(layout.root / "cancelled") == ["j1.json"]
    assert listing(layout.running) == []


def test_a_cancelling_training_leaves_no_checkpoint(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_train(layout, "t1")
    path = claim(layout, "t1", state=JobState.RUNNING)
    StatusFile(layout.status_path("t1")).update(state=JobState.CANCELLING)
    (layout.job_dir("t1") / CHECKPOINT_NAME).write_bytes(b"weights")
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.INTERRUPTED) == "cancelled"
    assert not (layout.job_dir("t1") / CHECKPOINT_NAME).exists()


def test_a_paused_job_stays_paused(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_train(layout, "t1")
    path = claim(layout, "t1", state=JobState.PAUSED)
    before = layout.status_path("t1").read_bytes()
    assert reconcile(layout, registry, "t1", path, "d1", ErrorCode.INTERRUPTED) == "paused"
    assert path.exists()
    assert layout.status_path("t1").read_bytes() == before


def test_a_job_whose_status_was_lost_fails(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1")
    layout.status_path("j1").unlink()
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.INTERRUPTED) == "failed"
    status = status_of(layout, "j1")
    assert status["state"] == "failed"
    assert status["error"]["code"] == "E_INTERRUPTED"
    assert listing(layout.root / "failed") == ["j1.json"]


def test_a_running_job_of_an_unknown_kind_fails(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.RUNNING, kind="plugin-kind")
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.WORKER_DIED) == "failed"
    assert status_of(layout, "j1")["error"]["code"] == "E_WORKER_DIED"


def test_a_claim_taken_meanwhile_is_lost(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    path = claim(layout, "j1", state=JobState.SUCCEEDED)
    os.rename(path, layout.claim_path("j1", "d9"))
    assert reconcile(layout, registry, "j1", path, "d1", ErrorCode.INTERRUPTED) == "lost"
    assert listing(layout.running) == ["j1@d9.json"]
    assert listing(layout.root / "done") == []


# --- take_over -------------------------------------------------------------------------------


def test_take_over_fences_and_reconciles_the_dead_daemons_claims(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "g1")
    claim(layout, "g1", daemon="d2", state=JobState.RUNNING)
    accept_train(layout, "t1")
    claim(layout, "t1", daemon="d2", state=JobState.PAUSED)
    accept_gpu(layout, registry, "g2")
    live = claim(layout, "g2", daemon="d3", state=JobState.RUNNING)

    outcomes = take_over(layout, registry, "d2", "d1")

    assert outcomes == {"g1": "requeued", "t1": "paused"}
    # The paused job shows the fence: its claim now carries the new owner's name.
    assert listing(layout.running) == ["g2@d3.json", "t1@d1.json"]
    assert live.exists()
    assert listing(layout.queued) == ["g1.json"]
    assert status_of(layout, "g1")["notes"] == ["retried_after_restart"]
    assert "taken over by d1 from d2" in layout.log_path("g1").read_text()
    assert status_of(layout, "g2")["state"] == "running"


def test_take_over_of_a_daemon_without_claims_does_nothing(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "g1")
    claim(layout, "g1", daemon="d3", state=JobState.RUNNING)
    assert take_over(layout, registry, "d2", "d1") == {}
    assert listing(layout.running) == ["g1@d3.json"]


# --- control ---------------------------------------------------------------------------------


def test_cancel_queued_cancels_at_once(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    assert control.cancel_queued(layout, "j1", "d1") is True
    status = status_of(layout, "j1")
    assert status["state"] == "cancelled"
    assert status["daemon"] == "d1"
    assert status["started_at"] is None
    assert listing(layout.root / "cancelled") == ["j1.json"]
    assert listing(layout.queued) == [] and listing(layout.running) == []
    assert control.cancel_queued(layout, "j1", "d1") is False


def test_cancel_queued_of_a_claimed_job_does_nothing(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    claim(layout, "j1", daemon="d2", state=JobState.RUNNING)
    assert control.cancel_queued(layout, "j1", "d1") is False
    assert status_of(layout, "j1")["state"] == "running"


def paused_training(layout: SpoolLayout, job_id: str = "t1") -> Path:
    accept_train(layout, job_id)
    path = claim(layout, job_id, state=JobState.PAUSED)
    (layout.job_dir(job_id) / CHECKPOINT_NAME).write_bytes(b"weights")
    layout.marker_path(job_id, "pause").touch()
    return path


def test_settle_paused_cancels_and_removes_the_checkpoint(layout: SpoolLayout) -> None:
    paused_training(layout)
    layout.marker_path("t1", "cancel").touch()
    assert control.settle_paused(layout, "t1", "d1") == "cancelled"
    assert status_of(layout, "t1")["state"] == "cancelled"
    assert not (layout.job_dir("t1") / CHECKPOINT_NAME).exists()
    assert listing(layout.root / "cancelled") == ["t1.json"]
    assert listing(layout.running) == []


def test_settle_paused_resumes_when_the_pause_marker_is_gone(layout: SpoolLayout) -> None:
    paused_training(layout)
    layout.marker_path("t1", "pause").unlink()
    assert control.settle_paused(layout, "t1", "d1") == "resumed"
    status = status_of(layout, "t1")
    assert status["state"] == "queued"
    assert status["daemon"] is None
    assert status["notes"][-1] == "resumed"
    assert listing(layout.queued) == ["t1.json"]
    assert listing(layout.running) == []
    assert (layout.job_dir("t1") / CHECKPOINT_NAME).exists()


def test_settle_paused_keeps_a_job_that_is_still_paused(layout: SpoolLayout) -> None:
    path = paused_training(layout)
    before = layout.status_path("t1").read_bytes()
    assert control.settle_paused(layout, "t1", "d1") == "paused"
    assert path.exists()
    assert layout.status_path("t1").read_bytes() == before


def test_settle_paused_leaves_jobs_it_does_not_hold(layout: SpoolLayout) -> None:
    paused_training(layout)
    layout.marker_path("t1", "pause").unlink()
    assert control.settle_paused(layout, "t1", "d2") == "gone"
    accept_train(layout, "t2")
    claim(layout, "t2", state=JobState.RUNNING)
    assert control.settle_paused(layout, "t2", "d1") == "gone"
    assert status_of(layout, "t1")["state"] == "paused"
    assert status_of(layout, "t2")["state"] == "running"


def test_misplaced_markers(layout: SpoolLayout, registry: KindRegistry) -> None:
    accept_gpu(layout, registry, "j1")
    assert control.misplaced_markers(layout, "j1", "gpu") == []
    layout.marker_path("j1", "finish").touch()
    layout.marker_path("j1", "cancel").touch()
    assert control.misplaced_markers(layout, "j1", "gpu") == ["finish"]
    layout.marker_path("j1", "pause").touch()
    assert control.misplaced_markers(layout, "j1", "gpu") == ["pause", "finish"]
    assert control.misplaced_markers(layout, "j1", "train") == []
