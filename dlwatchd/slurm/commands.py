"""The Slurm client commands the executor uses: sbatch, scontrol, scancel, squeue. Nothing else is assumed.

`scontrol show job` is the source of truth for a job's state (it needs no accounting database, unlike sacct);
the cluster must keep finished jobs visible for a while (MinJobAge, 300 s by default), longer than the
executor's poll interval.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("dlwatchd.slurm")

COMMAND_TIMEOUT_S = 30.0

# Job states after which the job will not run again by itself (Slurm's own `--requeue` is never asked for).
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    }
)


class SlurmUnreachable(Exception):
    """A Slurm command is missing or the controller cannot be reached: worth retrying later, not the job's fault."""


class SlurmRefused(Exception):
    """sbatch refused this job (bad partition, account, gres, limits): retrying the same submission cannot help."""


@dataclass(frozen=True)
class SlurmJob:
    """What `scontrol show job` says of one job."""

    job_id: str
    state: str
    reason: str | None
    exit_code: str | None
    name: str | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


def parse_show_job(text: str) -> SlurmJob | None:
    """The first job record of `scontrol -o show job` output, or None when it has none.

    A state may carry flags after a '+' (`CANCELLED+`, `COMPLETING`); the plain state is kept.
    """
    for line in text.splitlines():
        fields: dict[str, str] = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        if "JobId" in fields and "JobState" in fields:
            reason = fields.get("Reason")
            return SlurmJob(
                job_id=fields["JobId"],
                state=fields["JobState"].split("+", 1)[0],
                reason=None if reason in (None, "None", "(null)") else reason,
                exit_code=fields.get("ExitCode"),
                name=fields.get("JobName"),
            )
    return None


class SlurmCommands:
    """Runs the Slurm client programs; every failure becomes SlurmUnreachable or SlurmRefused with Slurm's words."""

    def __init__(self, environment: dict[str, str] | None = None) -> None:
        self.environment = environment

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        path = shutil.which(program)
        if path is None:
            raise SlurmUnreachable(f"the Slurm command '{program}' is not installed or not on PATH")
        try:
            return subprocess.run(
                [path, *args],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                env=self.environment,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmUnreachable(f"'{program}' could not be run: {exc}") from exc

    def submit(self, script: Path, args: list[str]) -> str:
        """sbatch the script (held when `--hold` is among `args`); returns the Slurm job id."""
        done = self._run("sbatch", "--parsable", *args, str(script))
        if done.returncode != 0:
            words = _last_words(done)
            if _unreachable(words):
                raise SlurmUnreachable(f"sbatch could not reach the Slurm controller: {words}")
            raise SlurmRefused(words or f"sbatch exited with code {done.returncode}")
        job_id = done.stdout.strip().split(";", 1)[0]
        if not job_id.isdigit():
            raise SlurmUnreachable(f"sbatch answered something that is not a job id: {done.stdout.strip()!r}")
        logger.debug("sbatch %s -> %s", shlex.join(args), job_id)
        return job_id

    def show(self, job_id: str) -> SlurmJob | None:
        """The job's record, or None when the controller no longer (or never) knew it."""
        done = self._run("scontrol", "-o", "show", "job", job_id)
        if done.returncode != 0:
            words = _last_words(done)
            if "Invalid job id" in words:
                return None
            raise SlurmUnreachable(f"scontrol show job {job_id} failed: {words}")
        return parse_show_job(done.stdout)

    def find(self, name: str) -> str | None:
        """The id of a job with this name that has not ended (for re-attaching after a crash), or None."""
        done = self._run("squeue", "-h", "-n", name, "-o", "%i")
        if done.returncode != 0:
            raise SlurmUnreachable(f"squeue failed: {_last_words(done)}")
        ids = done.stdout.split()
        return ids[0] if ids else None

    def release(self, job_id: str) -> None:
        done = self._run("scontrol", "release", job_id)
        if done.returncode != 0:
            raise SlurmUnreachable(f"scontrol release {job_id} failed: {_last_words(done)}")

    def cancel(self, job_id: str) -> None:
        """scancel the job; a job that already ended is not an error."""
        done = self._run("scancel", job_id)
        if done.returncode != 0 and "already completing or completed" not in _last_words(done):
            words = _last_words(done)
            if "Invalid job id" not in words:
                raise SlurmUnreachable(f"scancel {job_id} failed: {words}")


def _last_words(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr or done.stdout or "").strip()
    return text.splitlines()[-1].strip() if text else ""


def _unreachable(words: str) -> bool:
    lowered = words.lower()
    return any(
        sign in lowered
        for sign in ("unable to contact slurm controller", "connection refused", "socket timed out", "zero bytes")
    )
