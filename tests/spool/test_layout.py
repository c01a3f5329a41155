"""layout.py: names the daemon may open, claim names, and creating or refusing a spool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.layout import (
    OTHER_DIRS,
    STATE_DIRS,
    SpoolLayout,
    is_sync_artefact,
    parse_claim_name,
    request_id_from_name,
)


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    return SpoolLayout(tmp_path / "spool")


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        ".abc.json",
        ".abc.json.tmp",
        "abc.json.tmp",
        "abc.json.part",
        "abc.tmp",
        ".syncthing.x.json.tmp",
        "~syncthing~x.json.tmp",
        ".x.json.AbC123",
        "x (conflicted copy 2024-01-01).json",
        "x.sync-conflict-20240101-010101-ABCDEFG.json",
        ".DS_Store",
        "._x.json",
        "Thumbs.db",
        "ABC.JSON.TMP",
    ],
)
def test_sync_artefacts_are_recognised(name: str) -> None:
    assert is_sync_artefact(name)


@pytest.mark.parametrize("name", ["abc.json", "abc-1_2.json", "Bad.json", "report.txt", "x.json.bak"])
def test_ordinary_names_are_not_artefacts(name: str) -> None:
    assert not is_sync_artefact(name)


@pytest.mark.parametrize(
    "name,job_id",
    [("abc-1_2.json", "abc-1_2"), ("0.json", "0"), ("a" * 64 + ".json", "a" * 64)],
)
def test_request_names_give_their_job_id(name: str, job_id: str) -> None:
    assert request_id_from_name(name) == job_id


@pytest.mark.parametrize(
    "name",
    [
        "Abc.json",
        "abc.JSON",
        "a" * 65 + ".json",
        ".json",
        "abc",
        "abc.json.tmp",
        "-abc.json",
        "_abc.json",
        "a.b.json",
        "abc@d1.json",
        "abc .json",
    ],
)
def test_other_names_are_not_requests(name: str) -> None:
    assert request_id_from_name(name) is None


def test_a_trailing_newline_is_not_a_request_name() -> None:
    assert request_id_from_name("abc.json\n") is None


def test_claim_names_parse_into_job_and_daemon() -> None:
    assert parse_claim_name("job-1@host-a.1.json") == ("job-1", "host-a.1")
    assert parse_claim_name("job-1@Host_A.json") == ("job-1", "Host_A")


@pytest.mark.parametrize(
    "name", ["job-1.json", "job-1@.json", "Job@d1.json", "job@d1.json.tmp", "@d1.json", "job@-d1.json"]
)
def test_other_names_are_not_claims(name: str) -> None:
    assert parse_claim_name(name) is None


def test_a_claim_name_with_a_trailing_newline_is_not_a_claim() -> None:
    assert parse_claim_name("job@d1.json\n") is None


def test_claim_paths_round_trip(layout: SpoolLayout) -> None:
    path = layout.claim_path("job-1", "host-1")
    assert path.parent == layout.running
    assert parse_claim_name(path.name) == ("job-1", "host-1")


# --- ensure ----------------------------------------------------------------------------------


def test_ensure_creates_every_directory_and_the_marker(layout: SpoolLayout) -> None:
    layout.ensure()
    for name in STATE_DIRS + OTHER_DIRS:
        assert (layout.root / name).is_dir(), name
    assert json.loads(layout.marker.read_bytes()) == {"protocol": 1, "layout": 1}
    assert layout.missing_dirs() == []


def test_ensure_twice_keeps_the_spool(layout: SpoolLayout) -> None:
    layout.ensure()
    (layout.queued / "a.json").write_text("{}")
    layout.ensure()
    assert (layout.queued / "a.json").read_text() == "{}"


def test_ensure_restores_a_missing_directory(layout: SpoolLayout) -> None:
    layout.ensure()
    layout.tmp.rmdir()
    assert layout.missing_dirs() == ["tmp"]
    layout.ensure()
    assert layout.missing_dirs() == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"protocol": 2, "layout": 1}',
        b'{"protocol": 1, "layout": 2}',
        b'{"layout": 1}',
        b"[1, 1]",
        b"not json at all",
        b"",
    ],
    ids=["protocol-2", "layout-2", "no-protocol", "list", "garbage", "empty"],
)
def test_ensure_refuses_a_foreign_marker(layout: SpoolLayout, content: bytes) -> None:
    layout.root.mkdir(parents=True)
    layout.marker.write_bytes(content)
    with pytest.raises(DlwatchdError) as info:
        layout.ensure()
    assert info.value.code is ErrorCode.PROTOCOL
    assert str(layout.root) in info.value.message
    assert info.value.hint
    assert layout.marker.read_bytes() == content  # never overwritten
    assert not layout.incoming.exists()  # nothing made in a foreign spool


def test_missing_dirs_reports_a_directory_replaced_by_a_symlink(layout: SpoolLayout, tmp_path: Path) -> None:
    layout.ensure()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    layout.queued.rmdir()
    os.symlink(elsewhere, layout.queued)
    assert layout.queued.is_dir()  # it still looks like a directory when followed
    assert layout.missing_dirs() == ["queued"]


def test_missing_dirs_reports_a_file_in_place_of_a_directory(layout: SpoolLayout) -> None:
    layout.ensure()
    layout.running.rmdir()
    layout.running.write_text("")
    assert layout.missing_dirs() == ["running"]


def test_dir_refuses_unknown_names(layout: SpoolLayout) -> None:
    assert layout.dir("done") == layout.root / "done"
    with pytest.raises(ValueError):
        layout.dir("../etc")
