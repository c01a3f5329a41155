"""`python -m dlwatchd` without a daemon: help, version, schema and validate, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dlwatchd import __version__
from dlwatchd.jobs._registry import build_registry
from dlwatchd.spool.intake import Intake
from dlwatchd.spool.layout import SpoolLayout

TIMEOUT = 60


def dlwatchd(*args: str, cwd: Path, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "dlwatchd", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output (lines `import time: self | cumulative | name`)."""
    modules = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    return modules


# --- help and version ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(tmp_path: Path, flag: str) -> None:
    result = dlwatchd(flag, cwd=tmp_path, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    modules = imported_modules(result.stderr)
    assert "dlwatchd.cli" in modules and "argparse" in modules  # the import log was really parsed
    heavy = sorted(m for m in modules if m.split(".")[0] in {"torch", "torchvision", "onnxruntime", "timm"})
    assert heavy == []


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = dlwatchd("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: dlwatchd")
    for command in ("run", "submit", "status", "cancel", "schema", "validate"):
        assert command in result.stdout


def test_version(tmp_path: Path) -> None:
    result = dlwatchd("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"dlwatchd {__version__}"


def test_no_command_prints_help_and_exits_2(tmp_path: Path) -> None:
    result = dlwatchd(cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: dlwatchd" in result.stdout


# --- schema ----------------------------------------------------------------------------------


def test_schema_prints_every_request_kind(tmp_path: Path) -> None:
    result = dlwatchd("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["discriminator"]["propertyName"] == "kind"
    assert "train" in schema["discriminator"]["mapping"]
    assert sorted(schema["discriminator"]["mapping"]) == build_registry().names()
    assert "TrainRequest" in schema["$defs"]


def test_schema_of_status(tmp_path: Path) -> None:
    result = dlwatchd("schema", "status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"job_id", "state", "seq", "attempt", "error"} <= set(schema["properties"])


def test_schema_of_one_kind(tmp_path: Path) -> None:
    result = dlwatchd("schema", "train", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"model_type", "classes", "data_path"} <= set(json.loads(result.stdout)["properties"])


def test_schema_of_an_unknown_name_exits_2_listing_the_valid_names(tmp_path: Path) -> None:
    result = dlwatchd("schema", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "'nope'" in result.stderr
    for name in ("status", "health", "train", "infer-pixel"):
        assert name in result.stderr


# --- validate --------------------------------------------------------------------------------


def test_validate_a_good_request_exits_0(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"kind": "health", "client": {"name": "test"}}')
    result = dlwatchd("validate", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid 'health' request" in result.stdout


def test_validate_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = dlwatchd("validate", str(tmp_path / "absent.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert "absent.json" in result.stderr


def intake_error(tmp_path: Path, data: bytes) -> dict[str, Any]:
    """The error object an in-process intake writes into status.json for these bytes."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.ensure()
    (layout.incoming / "job-1.json").write_bytes(data)
    report = Intake(layout, build_registry(), "d1", 32 * 1024 * 1024).scan()
    assert report.rejected == 1
    status = json.loads(layout.status_path("job-1").read_bytes())
    assert status["state"] == "rejected"
    return {key: value for key, value in status["error"].items() if value is not None}


BAD_REQUESTS = {
    "bad-json": b'{\n  "kind": "health",\n  "x": ?\n}',
    "nan": b'{"kind": "health", "meta": {"a": NaN}}',
    "duplicate-key": b'{"kind": "health", "kind": "gpu"}',
    "not-utf8": b'{"kind": "health", "meta": {"a": "\xff"}}',
    "unknown-field": b'{"kind": "infer", "model_id": "m", "tiles": [{"id": "t", "data": "x", "bad": 1}]}',
    "unknown-kind": b'{"kind": "classify"}',
    "no-kind": b"{}",
    "protocol-2": b'{"protocol": 2, "kind": "health"}',
    "too-deep": b'{"kind": "health", "meta": ' + b"[" * 40 + b"]" * 40 + b"}",
}


@pytest.mark.parametrize("data", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_validate_a_bad_request_prints_the_error_intake_would_write(tmp_path: Path, data: bytes) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(data)
    result = dlwatchd("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    printed = json.loads(result.stdout)
    expected = intake_error(tmp_path, data)
    assert printed == expected
    assert {"code", "message"} <= set(printed)


def test_validate_and_intake_agree_on_an_oversized_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    with open(bad, "wb") as handle:
        handle.truncate(32 * 1024 * 1024 + 1)
    result = dlwatchd("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    printed = json.loads(result.stdout)
    assert printed["code"] == "E_TOO_LARGE"
    assert printed == intake_error(tmp_path, bad.read_bytes())


def test_check_reports_a_broken_spool_and_exits_1(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path / "spool")
    layout.ensure()
    healthy = dlwatchd("check", "--spool", str(layout.root), cwd=tmp_path)
    assert healthy.returncode == 0 and healthy.stdout == "", healthy.stderr
    assert "0 problems in 1 check of" in healthy.stderr
    layout.queued_path("twice").write_text("{}")
    layout.claim_path("twice", "other-host").write_text("{}")
    broken = dlwatchd("check", "--spool", str(layout.root), cwd=tmp_path)
    assert broken.returncode == 1
    assert broken.stdout == "job twice is in more than one place: queued, running@other-host\n"


def test_check_of_a_folder_that_is_no_spool_exits_2(tmp_path: Path) -> None:
    result = dlwatchd("check", "--spool", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "is not a dlwatchd spool" in result.stderr
