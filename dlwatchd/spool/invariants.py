"""The spool's invariants, checked from outside while daemons run: what `dlwatchd check` and the load tests use.

- every job is in exactly one place: an intake claim in tmp/, queued/, running/ (one claim), or one terminal
  folder (a request file in incoming/ with the id of an existing job is a new submission, not a second place);
- a job once seen never vanishes (only retention removes jobs, and it removes the job folder too);
- every jobs/<id>/status.json parses as a status, and its seq never goes back between two checks;
- a job in a terminal folder has that terminal state in its status.json.

Listing folders one after another is not atomic, so a job that moves between two listings could look absent
or doubled; each such finding is confirmed by a second look at that one job before it is reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from dlwatchd.protocol.status import JobStatus
from dlwatchd.spool.layout import TERMINAL_DIRS, SpoolLayout, parse_claim_name, request_id_from_name

_FOLDER_STATE = {folder: state for state, folder in TERMINAL_DIRS.items()}


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


@dataclass
class SpoolChecker:
    """Checks one spool again and again; remembers what it saw so seq and vanished jobs can be judged."""

    root: Path
    _seq: dict[str, int] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    # status.json versions already judged, by (inode, size, mtime): a file replaced whole gets a new inode
    _judged: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layout = SpoolLayout(Path(self.root))

    def places(self) -> dict[str, list[str]]:
        """Job id -> the places it is in now ("incoming", "tmp", "queued", "running@<daemon>", "done", ...)."""
        found: dict[str, list[str]] = {}
        for name in _names(self.layout.incoming):
            job_id = request_id_from_name(name)
            if job_id:
                found.setdefault(job_id, []).append("incoming")
        for name in _names(self.layout.tmp):
            parts = name.split(".")
            if name.startswith("intake.") and name.endswith(".json") and len(parts) >= 4:
                found.setdefault(parts[-2], []).append("tmp")
        for name in _names(self.layout.queued):
            job_id = request_id_from_name(name)
            if job_id:
                found.setdefault(job_id, []).append("queued")
        for name in _names(self.layout.running):
            claim = parse_claim_name(name)
            if claim:
                found.setdefault(claim[0], []).append(f"running@{claim[1]}")
        for folder in TERMINAL_DIRS.values():
            for name in _names(self.layout.root / folder):
                job_id = request_id_from_name(name)
                if job_id:
                    found.setdefault(job_id, []).append(folder)
        return found

    def _places_of(self, job_id: str) -> list[str]:
        """A second look at one job, taken only to confirm a finding (so a full listing again is cheap enough)."""
        return self.places().get(job_id, [])

    @staticmethod
    def _owned(places: list[str]) -> list[str]:
        return [place for place in places if place != "incoming"]

    def check(self) -> list[str]:
        """Every invariant broken right now, as sentences naming the job; empty when all hold."""
        problems: list[str] = []
        found = self.places()
        for job_id, places in sorted(found.items()):
            if len(self._owned(places)) > 1 and len(self._owned(again := self._places_of(job_id))) > 1:
                problems.append(f"job {job_id} is in more than one place: {', '.join(sorted(again))}")
        for job_id in sorted(self._seen - found.keys()):
            if not self._places_of(job_id):
                problems.append(f"job {job_id} vanished from every state folder")
        self._seen |= found.keys()
        for job_id in sorted(os.listdir(self.layout.jobs) if self.layout.jobs.exists() else []):
            problems += self._check_status(job_id, found.get(job_id, []))
        return problems

    def _check_status(self, job_id: str, places: list[str]) -> list[str]:
        path = self.layout.status_path(job_id)
        terminal = [place for place in places if place in _FOLDER_STATE]
        try:
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                version = (info.st_ino, info.st_size, info.st_mtime_ns)
                judged = self._judged.get(job_id)
                if judged is not None and judged[:3] == version:
                    state = judged[3]  # the same version as last time: it parsed then
                else:
                    status = JobStatus.model_validate(json.loads(handle.read()))
                    state = status.state.value
        except FileNotFoundError:
            return []  # a job folder made before its first status, or one being removed
        except (OSError, ValueError, ValidationError) as exc:
            return [f"job {job_id}: status.json does not parse: {str(exc).splitlines()[0]}"]
        problems = []
        if judged is None or judged[:3] != version:
            last = self._seq.get(job_id, 0)
            if status.seq < last:
                problems.append(f"job {job_id}: status seq went back from {last} to {status.seq}")
            self._seq[job_id] = max(last, status.seq)
            self._judged[job_id] = (*version, state)
        if terminal and state != _FOLDER_STATE[terminal[0]]:
            problems.append(f"job {job_id} is in {terminal[0]}/ but its status says {state}")
        return problems


def check_spool(root: Path) -> list[str]:
    """One check of a spool with no history: the invariants that a single look can judge."""
    return SpoolChecker(Path(root)).check()
