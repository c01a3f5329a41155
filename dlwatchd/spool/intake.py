"""Intake: claim incoming/<id>.json by rename before reading it, validate, then queue or reject it.

Only names of the form `<id>.json` are ever opened. Sync-tool and temp names are left alone; other
names ending in .json are moved to rejected/ unread with an .error.json sidecar. A request that is not
a regular file with one link is rejected without being opened, so a FIFO can never block the daemon.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry
from dlwatchd.protocol.decode import DecodedRequest, decode_request
from dlwatchd.protocol.status import ErrorInfo, JobState
from dlwatchd.spool.atomic import fsync_dir, rename_claim, write_json_atomic
from dlwatchd.spool.claims import locate_request, unique_sibling
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.layout import SpoolLayout, is_sync_artefact, request_id_from_name
from dlwatchd.spool.status_file import StatusFile, read_status

logger = logging.getLogger("dlwatchd.intake")


@dataclass(frozen=True)
class Accepted:
    job_id: str
    kind: str
    batch_key: str | None = None  # requests with equal keys may run together (see JobKind.group_handler)
    tiles: int = 0


@dataclass
class IntakeReport:
    accepted: list[Accepted] = field(default_factory=list)
    rejected: int = 0
    ignored: int = 0


class Intake:
    """Turns files in incoming/ into queued jobs or rejections; safe to run from several daemons at once."""

    def __init__(
        self,
        layout: SpoolLayout,
        registry: KindRegistry,
        daemon_id: str,
        max_bytes: int,
    ) -> None:
        self.layout = layout
        self.registry = registry
        self.daemon_id = daemon_id
        self.max_bytes = max_bytes
        self._ignored_seen: set[str] = set()

    def scan(self) -> IntakeReport:
        """Process every candidate in incoming/ once."""
        report = IntakeReport()
        try:
            names = sorted(os.listdir(self.layout.incoming))
        except FileNotFoundError:
            return report
        for name in names:
            self.process_name(name, report)
        self._ignored_seen &= set(names)
        return report

    def process_name(self, name: str, report: IntakeReport) -> None:
        job_id = request_id_from_name(name)
        if job_id is None:
            if is_sync_artefact(name) or not name.lower().endswith(".json"):
                if name not in self._ignored_seen:
                    self._ignored_seen.add(name)
                    report.ignored += 1
                return
            self._reject_bad_name(name)
            report.rejected += 1
            return
        claim = self.layout.intake_claim_path(job_id, self.daemon_id)
        if not rename_claim(self.layout.incoming / name, claim):
            return  # another daemon took it, or the client withdrew it
        self.process_claim(job_id, claim, report)

    def recover_claims(self, owner: str, report: IntakeReport) -> None:
        """Finish intake of files claimed by `owner` (this daemon after a crash, or a dead one) into tmp/."""
        prefix = f"intake.{owner}."
        try:
            names = os.listdir(self.layout.tmp)
        except FileNotFoundError:
            return
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".json")):
                continue
            job_id = name[len(prefix) : -len(".json")]
            if request_id_from_name(f"{job_id}.json") is None:
                continue
            claim = self.layout.tmp / name
            if owner != self.daemon_id:
                mine = self.layout.intake_claim_path(job_id, self.daemon_id)
                if not rename_claim(claim, mine):
                    continue
                claim = mine
            self.process_claim(job_id, claim, report)

    def process_claim(self, job_id: str, claim: Path, report: IntakeReport) -> None:
        """Validate one claimed request and queue or reject it; never raises for bad input.

        Raises OSError when the spool cannot be written or read (the claim is left for recover_claims).
        """
        try:
            existing = read_status(self.layout.status_path(job_id))
            if existing is not None:
                self._handle_duplicate(job_id, claim, existing.state, report)
                return
            decoded = None
            try:
                decoded = decode_request(self._read_claimed(claim), self.registry, self.max_bytes)
                self.registry.require_available(decoded.kind)
            except DlwatchdError as error:
                self._reject(job_id, claim, error, kind=decoded.kind if decoded else None)
                report.rejected += 1
                return
            self._accept(job_id, claim, decoded)
            batch_key = getattr(decoded.request, "batch_key", None)
            report.accepted.append(
                Accepted(
                    job_id,
                    decoded.kind,
                    batch_key() if callable(batch_key) else None,
                    len(getattr(decoded.request, "tiles", ()) or ()),
                )
            )
        except OSError as exc:
            # The spool itself misbehaves (disk full, share gone, permissions): the claim stays in tmp/ under
            # this daemon's name, and recover_claims finishes it once the spool works again.
            logger.error("intake of %s failed: %s", job_id, exc)
            raise

    def _read_claimed(self, claim: Path) -> bytes:
        info = os.lstat(claim)
        if not stat.S_ISREG(info.st_mode):
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                f"The request is a {_file_type(info.st_mode)}, not a regular file; it was not read.",
                hint="Publish requests by writing a temporary file and renaming it into incoming/.",
            )
        if info.st_nlink > 1:
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                "The request file has other hard links; it was not read.",
                hint="Publish requests by writing a temporary file and renaming it into incoming/.",
            )
        if info.st_size > self.max_bytes:
            raise DlwatchdError(
                ErrorCode.TOO_LARGE,
                f"The request file is {info.st_size} bytes; the limit is {self.max_bytes} bytes.",
                hint="Stage large inputs as files under inputs/<id>/ and refer to them by path.",
            )
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(claim, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise DlwatchdError(ErrorCode.SCHEMA, "The request is not a regular file; it was not read.") from exc
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DlwatchdError(ErrorCode.SCHEMA, "The request is not a regular file; it was not read.")
            chunks = []
            remaining = self.max_bytes + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _accept(self, job_id: str, claim: Path, decoded: DecodedRequest) -> None:
        job_dir = self.layout.job_dir(job_id)
        job_dir.mkdir(exist_ok=True)
        write_json_atomic(self.layout.request_path(job_id), decoded.request.model_dump(mode="json"))
        StatusFile(self.layout.status_path(job_id)).create(
            job_id=job_id,
            kind=decoded.kind,
            state=JobState.QUEUED,
            daemon=None,
            client=decoded.raw.get("client"),
            meta=decoded.raw.get("meta"),
        )
        append_job_log(self.layout.log_path(job_id), f"accepted by {self.daemon_id}: kind {decoded.kind}")
        os.replace(claim, self.layout.queued_path(job_id))
        fsync_dir(self.layout.queued)
        logger.info("accepted %s (%s)", job_id, decoded.kind)

    def _reject(self, job_id: str, claim: Path, error: DlwatchdError, kind: str | None) -> None:
        job_dir = self.layout.job_dir(job_id)
        job_dir.mkdir(exist_ok=True)
        StatusFile(self.layout.status_path(job_id)).create(
            job_id=job_id,
            kind=kind,
            state=JobState.REJECTED,
            daemon=self.daemon_id,
            error=ErrorInfo.from_error(error),
        )
        append_job_log(self.layout.log_path(job_id), f"rejected: {error.code.value}: {error.message}")
        destination = self.layout.rejected / f"{job_id}.json"
        if destination.exists() or destination.is_symlink():
            destination = unique_sibling(destination)
        os.replace(claim, destination)
        fsync_dir(self.layout.rejected)
        logger.warning("rejected %s: %s %s", job_id, error.code.value, error.message)

    def _handle_duplicate(self, job_id: str, claim: Path, state: JobState, report: IntakeReport) -> None:
        """Same id again: identical -> drop the copy (or finish our own interrupted intake); else E_DUPLICATE_ID."""
        try:
            decoded = decode_request(self._read_claimed(claim), self.registry, self.max_bytes)
            identical = decoded.request.model_dump(mode="json") == json.loads(
                self.layout.request_path(job_id).read_bytes()
            )
        except (DlwatchdError, OSError, ValueError):
            identical = False
        if identical and state is JobState.QUEUED and locate_request(self.layout, job_id) is None:
            os.replace(claim, self.layout.queued_path(job_id))  # an intake cut short before its last rename
            fsync_dir(self.layout.queued)
            report.accepted.append(Accepted(job_id, decoded.kind))
            return
        if identical:
            claim.unlink(missing_ok=True)
            logger.info("dropped an identical copy of %s", job_id)
            return
        destination = unique_sibling(self.layout.rejected / f"{job_id}.json")
        error = DlwatchdError(
            ErrorCode.DUPLICATE_ID,
            f"A different request with the id '{job_id}' was already submitted; this copy was not run.",
            hint="Use a new, unique job id (a lower-case UUID) for every request.",
        )
        _write_sidecar(destination, error)
        os.replace(claim, destination)
        report.rejected += 1
        logger.warning("rejected a duplicate of %s as %s", job_id, destination.name)

    def _reject_bad_name(self, name: str) -> None:
        """Move a .json file whose name is no valid job id to rejected/, unread, with a sidecar."""
        source = self.layout.incoming / name
        destination = self.layout.rejected / name
        if destination.exists() or destination.is_symlink():
            destination = unique_sibling(destination)
        error = DlwatchdError(
            ErrorCode.SCHEMA,
            f"The request name '{name}' is not '<id>.json' with an id of 1-64 lower-case letters, digits, '_' or '-'.",
            hint="Name requests after their job id, e.g. a lower-case UUID.",
            field="id",
        )
        if rename_claim(source, destination):
            _write_sidecar(destination, error)
            logger.warning("rejected the badly named request %r", name)


def _write_sidecar(request_file: Path, error: DlwatchdError) -> None:
    sidecar = request_file.with_name(request_file.name[: -len(".json")] + ".error.json")
    write_json_atomic(sidecar, {"error": ErrorInfo.from_error(error).model_dump(mode="json", exclude_none=True)})


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
