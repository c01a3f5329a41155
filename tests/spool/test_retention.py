"""retention.py: old terminal jobs and stale tmp/ entries go; live jobs and models never do."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dlwatchd.protocol.status import JobState
from dlwatchd.settings import Retention
from dlwatchd.spool.layout import TERMINAL_DIRS, SpoolLayout
from dlwatchd.spool.retention import sweep
from dlwatchd.spool.status_file import StatusFile

DAY = 86400.0
HOUR = 3600.0


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


@pytest.fixture
def policy() -> Retention:
    return Retention()


def finished_job(layout: SpoolLayout, job_id: str, state: str) -> Path:
    """A job committed now in `state`: its status, job folder with outputs, inputs, and the terminal file."""
    job_dir = layout.job_dir(job_id)
    (job_dir / "outputs").mkdir(parents=True)
    (job_dir / "outputs" / "t1.bin").write_bytes(b"\0" * 16)
    (layout.root / "inputs" / job_id).mkdir(parents=True)
    writer = StatusFile(layout.status_path(job_id))
    writer.create(job_id=job_id, kind="infer", state=JobState.QUEUED, daemon=None)
    writer.update(state=JobState(state))
    terminal = layout.terminal_path(state, job_id)
    terminal.write_text('{"kind": "infer"}')
    return terminal


def gone(layout: SpoolLayout, terminal: Path, job_id: str) -> bool:
    return (
        not terminal.exists() and not layout.job_dir(job_id).exists() and not (layout.root / "inputs" / job_id).exists()
    )


def kept(layout: SpoolLayout, terminal: Path, job_id: str) -> bool:
    return terminal.exists() and layout.status_path(job_id).exists() and (layout.root / "inputs" / job_id).exists()


def test_defaults_match_the_protocol(policy: Retention) -> None:
    assert (policy.done_days, policy.failed_days, policy.cancelled_days) == (14, 30, 7)
    assert (policy.acked_hours, policy.tmp_hours) == (1, 36)


@pytest.mark.parametrize(
    "state,days",
    [("succeeded", 14), ("failed", 30), ("cancelled", 7), ("rejected", 30)],
)
def test_a_terminal_job_is_removed_after_its_days_and_not_before(
    layout: SpoolLayout, policy: Retention, state: str, days: int
) -> None:
    terminal = finished_job(layout, "j1", state)
    assert terminal.parent.name == TERMINAL_DIRS[state]
    now = time.time()
    assert sweep(layout, policy, now=now + (days - 0.5) * DAY) == 0
    assert kept(layout, terminal, "j1")
    assert sweep(layout, policy, now=now + (days + 0.5) * DAY) == 1
    assert gone(layout, terminal, "j1")


def test_only_the_old_job_goes(layout: SpoolLayout, policy: Retention) -> None:
    old = finished_job(layout, "old", "succeeded")
    young = finished_job(layout, "young", "succeeded")
    now = time.time()
    os.utime(old, (now - 15 * DAY, now - 15 * DAY))
    os.utime(young, (now - 13 * DAY, now - 13 * DAY))
    assert sweep(layout, policy, now=now) == 1
    assert gone(layout, old, "old")
    assert kept(layout, young, "young")


def test_an_acknowledged_job_goes_after_an_hour(layout: SpoolLayout, policy: Retention) -> None:
    terminal = finished_job(layout, "j1", "succeeded")
    other = finished_job(layout, "j2", "succeeded")
    layout.marker_path("j1", "ack").touch()
    now = time.time()
    assert sweep(layout, policy, now=now + 0.5 * HOUR) == 0
    assert kept(layout, terminal, "j1")
    assert sweep(layout, policy, now=now + 2 * HOUR) == 1
    assert gone(layout, terminal, "j1")
    assert kept(layout, other, "j2")


def test_a_live_job_is_never_touched_even_with_a_file_in_a_terminal_dir(layout: SpoolLayout, policy: Retention) -> None:
    layout.job_dir("j1").mkdir()
    StatusFile(layout.status_path("j1")).create(job_id="j1", kind="infer", state=JobState.QUEUED, daemon=None)
    (layout.job_dir("j1") / "log.txt").write_text("accepted\n")
    layout.queued_path("j1").write_text("{}")
    stray = layout.terminal_path("succeeded", "j1")
    stray.write_text("{}")
    layout.marker_path("j1", "ack").touch()
    assert sweep(layout, policy, now=time.time() + 400 * DAY) == 0
    assert stray.exists()
    assert layout.queued_path("j1").exists()
    assert json.loads(layout.status_path("j1").read_bytes())["state"] == "queued"
    assert (layout.job_dir("j1") / "log.txt").exists()


def test_a_duplicates_copy_goes_but_not_the_original_job(layout: SpoolLayout, policy: Retention) -> None:
    layout.job_dir("j1").mkdir()
    StatusFile(layout.status_path("j1")).create(job_id="j1", kind="infer", state=JobState.QUEUED, daemon=None)
    copy = layout.rejected / "j1.dup-1.json"
    copy.write_text("{}")
    sidecar = layout.rejected / "j1.dup-1.error.json"
    sidecar.write_text("{}")
    sweep(layout, policy, now=time.time() + 31 * DAY)
    assert not copy.exists() and not sidecar.exists()
    assert layout.status_path("j1").exists()


def test_a_bad_name_rejection_and_its_sidecar_go_after_30_days(layout: SpoolLayout, policy: Retention) -> None:
    (layout.rejected / "Bad.json").write_text("x")
    (layout.rejected / "Bad.error.json").write_text("{}")
    now = time.time()
    sweep(layout, policy, now=now + 29 * DAY)
    assert sorted(os.listdir(layout.rejected)) == ["Bad.error.json", "Bad.json"]
    sweep(layout, policy, now=now + 31 * DAY)
    assert os.listdir(layout.rejected) == []


def test_tmp_entries_older_than_36_hours_go_but_intake_claims_stay(layout: SpoolLayout, policy: Retention) -> None:
    (layout.tmp / ".status.json.ab12.tmp").write_text("{}")
    (layout.tmp / "model-staging").mkdir()
    (layout.tmp / "model-staging" / "model.pt").write_bytes(b"w")
    claim = layout.intake_claim_path("j1", "d2")
    claim.write_text('{"kind": "health"}')
    now = time.time()
    assert sweep(layout, policy, now=now + 35 * HOUR) == 0
    assert len(os.listdir(layout.tmp)) == 3
    assert sweep(layout, policy, now=now + 37 * HOUR) == 2
    assert os.listdir(layout.tmp) == [claim.name]


def test_models_are_never_removed(layout: SpoolLayout, policy: Retention) -> None:
    model = layout.models / "unet_20240101_000000"
    model.mkdir()
    (model / "model.pt").write_bytes(b"w")
    (model / "metadata.json").write_text("{}")
    finished_job(layout, "j1", "succeeded")
    long_ago = time.time() - 10_000 * DAY
    os.utime(model / "model.pt", (long_ago, long_ago))
    os.utime(model, (long_ago, long_ago))
    assert sweep(layout, policy, now=time.time() + 10_000 * DAY) == 1
    assert sorted(os.listdir(model)) == ["metadata.json", "model.pt"]


def test_a_custom_policy_is_honoured(layout: SpoolLayout) -> None:
    terminal = finished_job(layout, "j1", "succeeded")
    now = time.time()
    assert sweep(layout, Retention(done_days=1), now=now + 0.5 * DAY) == 0
    assert sweep(layout, Retention(done_days=1), now=now + 1.5 * DAY) == 1
    assert gone(layout, terminal, "j1")
