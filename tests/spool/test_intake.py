"""intake.py in-process: incoming/ files become queued jobs, rejections, or are left alone."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dlwatchd.jobs._registry import build_registry
from dlwatchd.spool.intake import Accepted, Intake, IntakeReport
from dlwatchd.spool.layout import SpoolLayout

MAX_BYTES = 32 * 1024 * 1024


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


@pytest.fixture
def intake(layout: SpoolLayout) -> Intake:
    return Intake(layout, build_registry(), "d1", MAX_BYTES)


def publish(layout: SpoolLayout, name: str, body: Any) -> Path:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    path = layout.incoming / name
    path.write_bytes(data)
    return path


def status_of(layout: SpoolLayout, job_id: str) -> dict[str, Any]:
    return json.loads(layout.status_path(job_id).read_bytes())


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def assert_rejected_unread(layout: SpoolLayout, job_id: str, words: str) -> dict[str, Any]:
    status = status_of(layout, job_id)
    assert status["state"] == "rejected"
    assert status["seq"] == 1
    assert words in status["error"]["message"]
    assert listing(layout.incoming) == []
    assert listing(layout.tmp) == []
    assert listing(layout.queued) == []
    assert f"{job_id}.json" in listing(layout.rejected)
    return status


# --- accepted --------------------------------------------------------------------------------


def test_a_valid_health_request_is_queued(layout: SpoolLayout, intake: Intake) -> None:
    body = b'{"kind": "health", "client": {"name": "qupath", "version": "0.6"}, "meta": {"n": 1}}'
    publish(layout, "h1.json", body)
    report = intake.scan()
    assert report.accepted == [Accepted("h1", "health")]
    assert (report.rejected, report.ignored) == (0, 0)
    assert listing(layout.incoming) == []
    assert listing(layout.tmp) == []
    assert (layout.queued / "h1.json").read_bytes() == body
    status = status_of(layout, "h1")
    assert status["state"] == "queued"
    assert status["seq"] == 1
    assert status["kind"] == "health"
    assert status["daemon"] is None
    assert status["attempt"] == 1
    assert status["client"] == {"name": "qupath", "version": "0.6"}
    assert status["meta"] == {"n": 1}
    request = json.loads(layout.request_path("h1").read_bytes())
    assert request == {
        "protocol": 1,
        "kind": "health",
        "client": {"name": "qupath", "version": "0.6"},
        "meta": {"n": 1},
    }
    assert "accepted by d1" in layout.log_path("h1").read_text()


def test_request_json_has_the_defaults_filled_in(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "g1.json", {"kind": "gpu"})
    assert intake.scan().accepted == [Accepted("g1", "gpu")]
    request = json.loads(layout.request_path("g1").read_bytes())
    assert request["protocol"] == 1
    assert request["kind"] == "gpu"


def test_a_scan_of_an_empty_incoming_does_nothing(layout: SpoolLayout, intake: Intake) -> None:
    assert intake.scan() == IntakeReport()
    assert listing(layout.jobs) == []


# --- rejected after reading ------------------------------------------------------------------


def test_bad_json_is_rejected_with_line_and_column(layout: SpoolLayout, intake: Intake) -> None:
    body = b'{\n  "kind": "health",\n  "x": ?\n}'
    publish(layout, "b1.json", body)
    report = intake.scan()
    assert report.rejected == 1 and report.accepted == []
    status = assert_rejected_unread(layout, "b1", "not valid JSON")
    assert status["error"]["code"] == "E_BAD_JSON"
    assert (status["error"]["line"], status["error"]["column"]) == (3, 8)
    assert status["daemon"] == "d1"
    assert (layout.rejected / "b1.json").read_bytes() == body
    assert not layout.request_path("b1").exists()
    assert "rejected: E_BAD_JSON" in layout.log_path("b1").read_text()


def test_a_schema_error_names_the_field(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "s1.json", {"kind": "infer", "model_id": "m", "tiles": [{"id": "t", "data": "x", "bad": 1}]})
    intake.scan()
    status = assert_rejected_unread(layout, "s1", "tiles[0].bad")
    assert status["error"]["code"] == "E_SCHEMA"
    assert status["error"]["field"] == "tiles[0].bad"


def test_a_kind_without_an_engine_is_rejected_e_protocol(layout: SpoolLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every built-in kind has its engine; the test plugin registers one that has none.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "e2e" / "plugins"))
    intake = Intake(layout, build_registry(["dlwatchd_testkinds"]), "d1", MAX_BYTES)
    publish(layout, "e1.json", {"kind": "test-unavailable"})
    report = intake.scan()
    assert report.rejected == 1 and report.accepted == []
    status = assert_rejected_unread(layout, "e1", "'test-unavailable'")
    assert status["error"]["code"] == "E_PROTOCOL"
    assert status["error"]["field"] == "kind"


def test_an_oversized_file_is_too_large(layout: SpoolLayout, intake: Intake) -> None:
    path = layout.incoming / "big.json"
    with open(path, "wb") as handle:
        handle.truncate(MAX_BYTES + 1)  # sparse: no 32 MiB written
    intake.scan()
    status = assert_rejected_unread(layout, "big", str(MAX_BYTES + 1))
    assert status["error"]["code"] == "E_TOO_LARGE"


def test_a_lone_surrogate_does_not_break_the_scan(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "u1.json", b'{"kind": "health", "meta": {"a": "\\ud800"}}')
    intake.scan()
    assert status_of(layout, "u1")["state"] == "rejected"
    assert listing(layout.tmp) == []


# --- rejected unread: not a regular file with one link ---------------------------------------


@pytest.mark.timeout(10)
def test_a_fifo_is_rejected_without_blocking(layout: SpoolLayout, intake: Intake) -> None:
    os.mkfifo(layout.incoming / "f1.json")
    report = intake.scan()  # in this thread: a blocking open would hang the test until the timeout
    assert report.rejected == 1
    status = assert_rejected_unread(layout, "f1", "FIFO")
    assert stat.S_ISFIFO(os.lstat(layout.rejected / "f1.json").st_mode)
    assert status["error"]["code"] in ("E_SCHEMA", "E_PROTOCOL")


def test_a_directory_is_rejected_unread(layout: SpoolLayout, intake: Intake) -> None:
    (layout.incoming / "d1.json").mkdir()
    (layout.incoming / "d1.json" / "inner.json").write_text('{"kind": "health"}')
    assert intake.scan().rejected == 1
    assert_rejected_unread(layout, "d1", "directory")
    assert (layout.rejected / "d1.json").is_dir()


def test_a_symlink_is_rejected_unread(layout: SpoolLayout, intake: Intake, tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text('{"kind": "health"}')
    os.symlink(target, layout.incoming / "l1.json")
    report = intake.scan()
    assert report.accepted == [] and report.rejected == 1
    assert_rejected_unread(layout, "l1", "symbolic link")
    assert (layout.rejected / "l1.json").is_symlink()
    assert target.read_text() == '{"kind": "health"}'


def test_a_dangling_symlink_is_rejected_unread(layout: SpoolLayout, intake: Intake, tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere.json", layout.incoming / "l2.json")
    assert intake.scan().rejected == 1
    assert_rejected_unread(layout, "l2", "symbolic link")


def test_a_hard_link_is_rejected_unread(layout: SpoolLayout, intake: Intake, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"kind": "health"}')
    os.link(other, layout.incoming / "k1.json")
    assert intake.scan().rejected == 1
    assert_rejected_unread(layout, "k1", "hard links")
    assert os.lstat(layout.rejected / "k1.json").st_ino == os.lstat(other).st_ino
    assert other.read_text() == '{"kind": "health"}'


# --- names -----------------------------------------------------------------------------------

ARTEFACTS = [
    ".h1.json.tmp",
    "h2.json.part",
    "h3.json.tmp",
    ".syncthing.h4.json.tmp",
    "~syncthing~h5.json.tmp",
    ".h6.json.AbC123",
    "h7 (conflicted copy 2024-01-01).json",
    "h8.sync-conflict-20240101-010101-ABCDEFG.json",
    ".DS_Store",
    "._h9.json",
    "Thumbs.db",
    "notes.txt",
]


def test_artefacts_and_temp_names_are_left_in_place_and_counted_once(layout: SpoolLayout, intake: Intake) -> None:
    for name in ARTEFACTS:
        publish(layout, name, {"kind": "health"})
    first = intake.scan()
    assert first.ignored == len(ARTEFACTS)
    assert (first.accepted, first.rejected) == ([], 0)
    assert listing(layout.incoming) == sorted(ARTEFACTS)
    assert listing(layout.jobs) == [] and listing(layout.tmp) == [] and listing(layout.rejected) == []
    assert intake.scan().ignored == 0
    # A name that goes away and comes back is new again.
    (layout.incoming / "h2.json.part").unlink()
    assert intake.scan().ignored == 0
    publish(layout, "h2.json.part", b"{}")
    assert intake.scan().ignored == 1


def test_a_published_temp_file_is_picked_up_after_its_rename(layout: SpoolLayout, intake: Intake) -> None:
    temp = publish(layout, ".p1.json.tmp", {"kind": "health"})
    assert intake.scan().ignored == 1
    os.rename(temp, layout.incoming / "p1.json")
    assert intake.scan().accepted == [Accepted("p1", "health")]


def test_an_upper_case_name_is_rejected_unread_with_a_sidecar(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "Bad.json", b"not even json")
    report = intake.scan()
    assert report.rejected == 1
    assert listing(layout.incoming) == []
    assert listing(layout.rejected) == ["Bad.error.json", "Bad.json"]
    assert (layout.rejected / "Bad.json").read_bytes() == b"not even json"
    sidecar = json.loads((layout.rejected / "Bad.error.json").read_bytes())
    assert sidecar["error"]["code"] == "E_SCHEMA"
    assert "'Bad.json'" in sidecar["error"]["message"]
    assert listing(layout.jobs) == []


def test_a_second_bad_name_does_not_overwrite_the_first(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "Bad.json", b"one")
    intake.scan()
    publish(layout, "Bad.json", b"two")
    intake.scan()
    assert (layout.rejected / "Bad.json").read_bytes() == b"one"
    assert (layout.rejected / "Bad.dup-1.json").read_bytes() == b"two"
    assert (layout.rejected / "Bad.dup-1.error.json").exists()


# --- duplicates ------------------------------------------------------------------------------


def test_an_identical_duplicate_is_dropped(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "a1.json", b'{"kind": "health", "meta": {"x": 1}}')
    intake.scan()
    status_before = layout.status_path("a1").read_bytes()
    request_before = layout.request_path("a1").read_bytes()
    publish(layout, "a1.json", b'{\n  "meta": {"x": 1},\n  "kind": "health"\n}')  # same request, other bytes
    report = intake.scan()
    assert (report.accepted, report.rejected) == ([], 0)
    assert listing(layout.incoming) == [] and listing(layout.tmp) == [] and listing(layout.rejected) == []
    assert (layout.queued / "a1.json").read_bytes() == b'{"kind": "health", "meta": {"x": 1}}'
    assert layout.status_path("a1").read_bytes() == status_before
    assert layout.request_path("a1").read_bytes() == request_before


def test_a_different_duplicate_is_rejected_e_duplicate_id(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "a1.json", {"kind": "health"})
    intake.scan()
    status_before = layout.status_path("a1").read_bytes()
    publish(layout, "a1.json", {"kind": "gpu"})
    report = intake.scan()
    assert report.rejected == 1 and report.accepted == []
    assert listing(layout.rejected) == ["a1.dup-1.error.json", "a1.dup-1.json"]
    assert json.loads((layout.rejected / "a1.dup-1.json").read_bytes()) == {"kind": "gpu"}
    sidecar = json.loads((layout.rejected / "a1.dup-1.error.json").read_bytes())
    assert sidecar["error"]["code"] == "E_DUPLICATE_ID"
    assert layout.status_path("a1").read_bytes() == status_before
    assert status_of(layout, "a1")["seq"] == 1
    assert json.loads((layout.queued / "a1.json").read_bytes()) == {"kind": "health"}
    publish(layout, "a1.json", b"garbage")
    intake.scan()
    assert "a1.dup-2.json" in listing(layout.rejected)
    assert layout.status_path("a1").read_bytes() == status_before


# --- recovery of intake claims ---------------------------------------------------------------


def test_an_interrupted_intake_of_this_daemon_is_finished(layout: SpoolLayout, intake: Intake) -> None:
    layout.intake_claim_path("r1", "d1").write_text('{"kind": "health"}')
    report = IntakeReport()
    intake.recover_claims("d1", report)
    assert report.accepted == [Accepted("r1", "health")]
    assert listing(layout.tmp) == []
    assert listing(layout.queued) == ["r1.json"]
    assert status_of(layout, "r1")["state"] == "queued"


def test_an_intake_cut_short_before_its_last_rename_is_finished(layout: SpoolLayout, intake: Intake) -> None:
    publish(layout, "r2.json", {"kind": "health"})
    intake.scan()
    os.rename(layout.queued_path("r2"), layout.intake_claim_path("r2", "d1"))  # status written, file not moved
    status_before = layout.status_path("r2").read_bytes()
    report = IntakeReport()
    intake.recover_claims("d1", report)
    assert report.accepted == [Accepted("r2", "health")]
    assert listing(layout.tmp) == []
    assert listing(layout.queued) == ["r2.json"]
    assert layout.status_path("r2").read_bytes() == status_before


def test_a_dead_daemons_intake_claim_is_taken_and_processed(layout: SpoolLayout, intake: Intake) -> None:
    layout.intake_claim_path("r3", "d2").write_text('{"kind": "health"}')
    layout.intake_claim_path("r4", "d3").write_text('{"kind": "health"}')  # a live daemon's: not ours
    report = IntakeReport()
    intake.recover_claims("d2", report)
    assert report.accepted == [Accepted("r3", "health")]
    assert listing(layout.queued) == ["r3.json"]
    assert listing(layout.tmp) == [layout.intake_claim_path("r4", "d3").name]
    assert "accepted by d1" in layout.log_path("r3").read_text()


def test_a_dead_daemons_bad_claim_is_rejected_by_the_taker(layout: SpoolLayout, intake: Intake) -> None:
    layout.intake_claim_path("r5", "d2").write_text("{")
    report = IntakeReport()
    intake.recover_claims("d2", report)
    assert report.rejected == 1
    assert status_of(layout, "r5")["error"]["code"] == "E_BAD_JSON"
    assert status_of(layout, "r5")["daemon"] == "d1"
    assert listing(layout.rejected) == ["r5.json"]
    assert listing(layout.tmp) == []


def test_recover_claims_ignores_other_tmp_files(layout: SpoolLayout, intake: Intake) -> None:
    (layout.tmp / "intake.d2.Bad.json").write_text("{}")
    (layout.tmp / "model-staging").mkdir()
    report = IntakeReport()
    intake.recover_claims("d2", report)
    assert report == IntakeReport()
    assert listing(layout.tmp) == ["intake.d2.Bad.json", "model-staging"]
