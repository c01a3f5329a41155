"""The spool invariant checker finds each kind of broken spool, and nothing in a healthy one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlwatchd.protocol.status import JobState
from dlwatchd.spool.invariants import SpoolChecker, check_spool
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


def job(layout: SpoolLayout, job_id: str, state: JobState, place: Path) -> StatusFile:
    layout.job_dir(job_id).mkdir(parents=True)
    status = StatusFile(layout.status_path(job_id))
    status.create(job_id=job_id, kind="health", state=state, daemon="d1")
    place.write_text("{}")
    return status


def test_a_healthy_spool_has_no_problems(layout: SpoolLayout) -> None:
    job(layout, "q", JobState.QUEUED, layout.queued_path("q"))
    job(layout, "r", JobState.RUNNING, layout.claim_path("r", "d1"))
    job(layout, "s", JobState.SUCCEEDED, layout.terminal_path("succeeded", "s"))
    (layout.incoming / "s.json").write_text("{}")  # a new submission under an old id is not a second place
    (layout.rejected / "s.dup-1.json").write_text("{}")
    assert check_spool(layout.root) == []


def test_a_job_in_two_places(layout: SpoolLayout) -> None:
    job(layout, "twice", JobState.RUNNING, layout.queued_path("twice"))
    layout.claim_path("twice", "d2").write_text("{}")
    assert check_spool(layout.root) == ["job twice is in more than one place: queued, running@d2"]


def test_two_claims_on_one_job(layout: SpoolLayout) -> None:
    job(layout, "both", JobState.RUNNING, layout.claim_path("both", "d1"))
    layout.claim_path("both", "d2").write_text("{}")
    assert check_spool(layout.root) == ["job both is in more than one place: running@d1, running@d2"]


def test_a_vanished_job(layout: SpoolLayout) -> None:
    job(layout, "gone", JobState.QUEUED, layout.queued_path("gone"))
    checker = SpoolChecker(layout.root)
    assert checker.check() == []
    layout.queued_path("gone").unlink()
    assert checker.check() == ["job gone vanished from every state folder"]


def test_an_unparseable_status(layout: SpoolLayout) -> None:
    job(layout, "bad", JobState.QUEUED, layout.queued_path("bad"))
    layout.status_path("bad").write_text('{"job_id": "bad", "sta')
    [problem] = check_spool(layout.root)
    assert problem.startswith("job bad: status.json does not parse")


def test_seq_going_back(layout: SpoolLayout) -> None:
    status = job(layout, "seq", JobState.QUEUED, layout.queued_path("seq"))
    checker = SpoolChecker(layout.root)
    status.update(progress={"step": 1})
    assert checker.check() == []
    older = json.loads(layout.status_path("seq").read_text())
    older["seq"] = 1
    layout.status_path("seq").write_text(json.dumps(older))
    assert checker.check() == ["job seq: status seq went back from 2 to 1"]


def test_a_terminal_folder_that_disagrees_with_the_status(layout: SpoolLayout) -> None:
    job(layout, "early", JobState.RUNNING, layout.terminal_path("succeeded", "early"))
    assert check_spool(layout.root) == ["job early is in done/ but its status says running"]
