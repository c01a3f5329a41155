"""Every directory name, file name and id pattern of the spool lives here (PROTOCOL.md section 1)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlwatchd.errors import DlwatchdError, ErrorCode

PROTOCOL_VERSION = 1
LAYOUT_VERSION = 1
MARKER_NAME = "dlwatchd.json"

JOB_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
REQUEST_NAME_RE = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})\.json\Z")
DAEMON_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
CLAIM_NAME_RE = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})@([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.json\Z")

STATE_DIRS = ("incoming", "queued", "running", "done", "failed", "cancelled", "rejected")
OTHER_DIRS = ("jobs", "inputs", "models", "daemons", "tmp")
TERMINAL_DIRS = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled", "rejected": "rejected"}

CONTROL_MARKERS = ("cancel", "pause", "finish", "ack")
RESUME_OVERRIDES = "resume.json"

# Names that sync tools, editors and operating systems leave behind: never opened, never moved.
_ARTEFACT_PREFIXES = (".", "~", "._")
_ARTEFACT_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".download", "~")
_ARTEFACT_FRAGMENTS = ("conflicted copy", ".sync-conflict-", "~syncthing~", ".syncthing.", "(conflict")
_ARTEFACT_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}


def is_sync_artefact(name: str) -> bool:
    """True for dot-files, temp names and sync-tool or OS artefacts that the daemon must never open."""
    lower = name.lower()
    return (
        lower.startswith(_ARTEFACT_PREFIXES)
        or lower.endswith(_ARTEFACT_SUFFIXES)
        or any(fragment in lower for fragment in _ARTEFACT_FRAGMENTS)
        or lower in _ARTEFACT_NAMES
    )


def request_id_from_name(name: str) -> str | None:
    """The job id of a well-formed request name `<id>.json`, else None."""
    match = REQUEST_NAME_RE.match(name)
    return match.group(1) if match else None


def parse_claim_name(name: str) -> tuple[str, str] | None:
    """(job id, daemon id) of a claim file name `<id>@<daemon>.json`, else None."""
    match = CLAIM_NAME_RE.match(name)
    return (match.group(1), match.group(2)) if match else None


@dataclass(frozen=True)
class SpoolLayout:
    """Paths of one spool; creating it makes no directories (see `ensure`)."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    def dir(self, name: str) -> Path:
        """One of the top-level spool directories by name."""
        if name not in STATE_DIRS and name not in OTHER_DIRS:
            raise ValueError(f"not a spool directory: {name}")
        return self.root / name

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def queued(self) -> Path:
        return self.root / "queued"

    @property
    def running(self) -> Path:
        return self.root / "running"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def daemons(self) -> Path:
        return self.root / "daemons"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def status_path(self, job_id: str) -> Path:
        return self.jobs / job_id / "status.json"

    def request_path(self, job_id: str) -> Path:
        return self.jobs / job_id / "request.json"

    def log_path(self, job_id: str) -> Path:
        return self.jobs / job_id / "log.txt"

    def marker_path(self, job_id: str, marker: str) -> Path:
        return self.jobs / job_id / marker

    def queued_path(self, job_id: str) -> Path:
        return self.queued / f"{job_id}.json"

    def claim_path(self, job_id: str, daemon_id: str) -> Path:
        return self.running / f"{job_id}@{daemon_id}.json"

    def terminal_path(self, state: str, job_id: str) -> Path:
        return self.root / TERMINAL_DIRS[state] / f"{job_id}.json"

    def heartbeat_path(self, daemon_id: str) -> Path:
        return self.daemons / f"{daemon_id}.json"

    def intake_claim_path(self, job_id: str, daemon_id: str) -> Path:
        return self.tmp / f"intake.{daemon_id}.{job_id}.json"

    def ensure(self) -> None:
        """Create missing directories and the marker; refuse a spool of an unknown protocol or layout.

        Raises DlwatchdError(E_PROTOCOL) for a foreign marker and E_PERMISSION when the spool cannot be made.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.marker.exists():
                check_marker(self.marker)
            else:
                from dlwatchd.spool.atomic import write_json_atomic

                write_json_atomic(self.marker, {"protocol": PROTOCOL_VERSION, "layout": LAYOUT_VERSION})
            for name in STATE_DIRS + OTHER_DIRS:
                (self.root / name).mkdir(exist_ok=True)
        except PermissionError as exc:
            raise DlwatchdError(
                ErrorCode.PERMISSION,
                f"The spool {self.root} cannot be created or written: {exc.strerror}.",
                hint="Choose a spool folder the daemon's user may write, or fix its permissions.",
            ) from exc

    def missing_dirs(self) -> list[str]:
        """Names of spool directories that are missing or are not plain directories (e.g. swapped for a symlink)."""
        missing = []
        for name in STATE_DIRS + OTHER_DIRS:
            path = self.root / name
            if path.is_symlink() or not path.is_dir():
                missing.append(name)
        return missing


def check_marker(marker: Path) -> None:
    """Raise E_PROTOCOL unless the spool marker names protocol 1 and layout 1."""
    try:
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError) as exc:
        raise DlwatchdError(
            ErrorCode.PROTOCOL,
            f"The spool marker {marker} cannot be read as JSON ({exc}).",
            hint="Restore the marker or point the daemon at another spool folder.",
        ) from exc
    protocol = data.get("protocol") if isinstance(data, dict) else None
    layout = data.get("layout") if isinstance(data, dict) else None
    if protocol != PROTOCOL_VERSION or layout != LAYOUT_VERSION:
        raise DlwatchdError(
            ErrorCode.PROTOCOL,
            f"The spool {marker.parent} uses protocol {protocol!r} / layout {layout!r}; "
            f"this dlwatchd understands protocol {PROTOCOL_VERSION} / layout {LAYOUT_VERSION}.",
            hint="Run a dlwatchd version that matches this spool, or use a new spool folder.",
        )


def short_hostname() -> str:
    """The host name up to the first dot, reduced to the characters a daemon id allows."""
    host = os.uname().nodename.split(".")[0] if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "host")
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", host).strip("-.") or "host"
    return cleaned[:48]
