"""Claims by rename: queued -> running/<id>@<daemon>.json, and moves to the terminal homes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dlwatchd.spool.atomic import fsync_dir, rename_claim
from dlwatchd.spool.layout import TERMINAL_DIRS, SpoolLayout, parse_claim_name, request_id_from_name


def claim_queued(layout: SpoolLayout, job_id: str, daemon_id: str) -> Path | None:
    """Move queued/<id>.json to running/<id>@<daemon>.json; the claim path if this daemon won, else None."""
    destination = layout.claim_path(job_id, daemon_id)
    if rename_claim(layout.queued_path(job_id), destination):
        fsync_dir(layout.running)
        return destination
    return None


def release_to_queue(layout: SpoolLayout, claim: Path, job_id: str) -> bool:
    """Put a claimed job back in queued/ (retry, resume); False when the claim was taken from us."""
    if rename_claim(claim, layout.queued_path(job_id)):
        fsync_dir(layout.queued)
        return True
    return False


def commit_terminal(layout: SpoolLayout, claim: Path, job_id: str, state: str) -> bool:
    """Move the claimed request to its terminal home (the commit point); False if the claim was gone.

    The file's mtime is set to now so retention counts from the end of the job, not from its submission.
    """
    destination = layout.terminal_path(state, job_id)
    if destination.exists():
        destination = unique_sibling(destination)
    if not rename_claim(claim, destination):
        return False
    try:
        os.utime(destination)
    except OSError:
        pass
    fsync_dir(destination.parent)
    return True


def unique_sibling(path: Path) -> Path:
    """`path` with `.dup-<n>` inserted before `.json`, for the first n not yet taken."""
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    n = 1
    while True:
        candidate = path.with_name(f"{stem}.dup-{n}.json")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        n += 1


def own_claims(layout: SpoolLayout, daemon_id: str) -> dict[str, Path]:
    """Job id -> claim path for every running/<id>@<daemon_id>.json."""
    claims: dict[str, Path] = {}
    for entry in _names(layout.running):
        parsed = parse_claim_name(entry)
        if parsed and parsed[1] == daemon_id:
            claims[parsed[0]] = layout.running / entry
    return claims


def claims_by_daemon(layout: SpoolLayout) -> dict[str, dict[str, Path]]:
    """Daemon id -> {job id -> claim path} for every claim in running/."""
    result: dict[str, dict[str, Path]] = {}
    for entry in _names(layout.running):
        parsed = parse_claim_name(entry)
        if parsed:
            result.setdefault(parsed[1], {})[parsed[0]] = layout.running / entry
    return result


def queued_ids(layout: SpoolLayout) -> list[str]:
    """Ids in queued/, oldest first (by the file's mtime, then name), so the queue is first come first served."""
    found: list[tuple[int, str]] = []
    try:
        with os.scandir(layout.queued) as entries:
            for entry in entries:
                job_id = request_id_from_name(entry.name)
                if job_id is None:
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, job_id))
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return []
    return [job_id for _, job_id in sorted(found)]


def locate_request(layout: SpoolLayout, job_id: str) -> Path | None:
    """Where the request file of `job_id` lives now (queued, running, a terminal home), or None."""
    candidates = [layout.queued_path(job_id)]
    candidates += [layout.root / directory / f"{job_id}.json" for directory in TERMINAL_DIRS.values()]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    for entry in _names(layout.running):
        parsed = parse_claim_name(entry)
        if parsed and parsed[0] == job_id:
            return layout.running / entry
    return None


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def age_seconds(path: Path) -> float:
    """Seconds since `path` was last modified (0 when it vanished)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return 0.0
