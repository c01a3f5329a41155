"""A throwaway single-node Slurm cluster for tests.

`SlurmCluster` writes its own slurm.conf into a fresh temporary directory, starts munged (unless a working one is
already running), slurmctld and slurmd in the foreground as child processes, and waits until the node is idle.
Daemons and clients find the configuration through `SLURM_CONF`; pass `cluster.env` to every subprocess that talks to
the cluster. Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (see .ci/install-slurm).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO

APT_INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"

# Executable -> Debian package that provides it.
REQUIRED = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sinfo": "slurm-client",
    "munged": "munge",
    "munge": "munge",
}

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

# Hardware fields of `slurmd -C` copied onto the node line (a topology that differs from what slurmd detects can get
# the node drained, e.g. "Low socket*core count" on hosts with hyperthreads).
NODE_FIELDS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")


class SlurmUnavailable(Exception):
    """The test cluster cannot be started here; `reason` says why and what to install or fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlurmError(RuntimeError):
    """A Slurm client command failed (for example sbatch refused a job)."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        message = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {message}")


def find_executable(name: str) -> str | None:
    """`name` on PATH, with the sbin directories added (Debian puts the daemons there)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs += [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in dirs]
    return shutil.which(name, path=os.pathsep.join(d for d in dirs if d))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie; `kill -0` cannot tell a zombie from a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The command name is in parentheses and may contain spaces; the state is the first field after it.
    state = stat.rpartition(")")[2].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class SlurmCluster:
    """One slurmctld and one slurmd on 127.0.0.1 with a partition `debug`; use `with SlurmCluster() as cluster:`."""

    def __init__(self, start_timeout: float = 60.0, partition: str = "debug") -> None:
        self.start_timeout = start_timeout
        self.partition = partition
        self.root: Path | None = None
        self.conf: Path | None = None
        self.workdir: Path | None = None
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self.ports: tuple[int, int] | None = None
        self._bin: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._started = False
        self._stopped = False

    # -- context manager -------------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- start -----------------------------------------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        if self._started:
            raise RuntimeError("SlurmCluster.start() called twice")
        self._started = True
        began = time.monotonic()
        self._find_executables()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the throwaway Slurm cluster needs root (SlurmUser=root and the munge setup)")
        atexit.register(self.stop)
        try:
            self.root = Path(tempfile.mkdtemp(prefix="dlwatchd-slurm-"))
            self.workdir = self.root / "work"
            self.workdir.mkdir()
            self._ensure_munge()
            self._write_conf()
            self._start_daemon("slurmctld")
            self._start_daemon("slurmd")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _find_executables(self) -> None:
        missing = []
        for name in REQUIRED:
            path = find_executable(name)
            if path is None:
                missing.append(name)
            else:
                self._bin[name] = path
        if missing:
            packages = sorted({REQUIRED[name] for name in missing})
            raise SlurmUnavailable(
                f"missing {', '.join(missing)} (Debian package{'s' if len(packages) > 1 else ''} "
                f"{', '.join(packages)}); install with `{APT_INSTALL}` or run .ci/install-slurm"
            )

    def _munge_works(self) -> bool:
        try:
            result = subprocess.run([self._bin["munge"], "-n"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0 and bool(result.stdout.strip())

    def _ensure_munge(self) -> None:
        if self._munge_works():
            return  # a munged is already running (for example started by systemd): share it
        assert self.root is not None
        MUNGE_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        MUNGE_RUN_DIR.chmod(0o755)
        if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size == 0:
            mungekey = find_executable("mungekey")
            if mungekey is None:
                raise SlurmUnavailable(
                    f"no usable munge key and no mungekey to create one; install with `{APT_INSTALL}`"
                )
            result = subprocess.run(
                [mungekey, "--create", "--force", f"--keyfile={MUNGE_KEY}"], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise SlurmUnavailable(f"mungekey --create failed: {result.stderr.strip()}")
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        setpriv = find_executable("setpriv")
        if setpriv is None:
            raise SlurmUnavailable("setpriv (util-linux) is needed to start munged as the munge user")
        # munged refuses to run as root; --pdeathsig stops it if the test process dies without cleaning up.
        argv = [setpriv, "--reuid=munge", "--regid=munge", "--init-groups", "--pdeathsig", "SIGTERM"]
        self._spawn("munged", [*argv, self._bin["munged"], "-F"])
        deadline = time.monotonic() + 15
        while not self._munge_works():
            if not process_alive(self._procs["munged"].pid) or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start; its log:\n{tail(self.root / 'munged.log')}")
            time.sleep(0.1)

    def _node_hardware(self) -> tuple[str, dict[str, str]]:
        result = subprocess.run([self._bin["slurmd"], "-C"], capture_output=True, text=True, timeout=30)
        fields = dict(re.findall(r"(\w+)=(\S+)", result.stdout))
        if result.returncode != 0 or "NodeName" not in fields or "CPUs" not in fields:
            raise SlurmUnavailable(
                f"`slurmd -C` failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )
        return fields["NodeName"], {key: fields[key] for key in NODE_FIELDS if key in fields}

    def _write_conf(self) -> None:
        assert self.root is not None
        node, hardware = self._node_hardware()
        host = socket.gethostname().split(".")[0]
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        spool.mkdir()
        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        self.ports = (ctld_port, slurmd_port)
        node_line = " ".join(f"{key}={value}" for key, value in hardware.items())
        lines = [
            f"ClusterName=dlwtest{os.getpid()}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "EnforcePartLimits=ALL",
            "MinJobAge=3600",
            "KillWait=5",
            "OverTimeLimit=0",
            "ReturnToService=2",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={node} NodeAddr=127.0.0.1 {node_line} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf = self.root / "slurm.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_"))}
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.root is not None
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs[name] = log
        self._procs[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env or None,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill the daemons before jobs are cancelled
        )

    def _start_daemon(self, name: str) -> None:
        assert self.conf is not None
        setpriv = find_executable("setpriv")
        prefix = [setpriv, "--pdeathsig", "SIGTERM"] if setpriv else []
        self._spawn(name, [*prefix, self._bin[name], "-D", "-f", str(self.conf)])

    def _wait_idle(self) -> None:
        assert self.root is not None
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if self._procs[name].poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with {self._procs[name].returncode} during start-up\n{self._log_tails()}"
                    )
            try:
                state = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=10).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(sinfo timed out)"
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmUnavailable(
            f"node not idle after {self.start_timeout:g} s (sinfo says {state!r})\n{self._log_tails()}"
        )

    def _log_tails(self) -> str:
        assert self.root is not None
        return "\n".join(
            f"--- {name}.log (last lines) ---\n{tail(self.root / f'{name}.log')}" for name in ("slurmctld", "slurmd")
        )

    # -- clients ---------------------------------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (`sbatch`, `squeue`, ...) against this cluster; raises SlurmError when check fails."""
        command = [self._bin.get(argv[0], argv[0]), *argv[1:]]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, env=self.env, cwd=cwd or self.workdir, timeout=timeout
        )
        if check and result.returncode != 0:
            raise SlurmError(list(argv), result.returncode, result.stdout, result.stderr)
        return result

    def submit(self, script_text: str, *sbatch_args: str, cwd: str | os.PathLike[str] | None = None) -> str:
        """`sbatch --parsable` with the script on stdin; returns the job id. The job runs in `cwd` (default:
        `cluster.workdir`, where slurm-<id>.out lands) unless the arguments say otherwise (--chdir, --output)."""
        result = self.run("sbatch", "--parsable", *sbatch_args, input=script_text, cwd=cwd)
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(["sbatch", *sbatch_args], result.returncode, result.stdout, result.stderr)
        return job_id

    def job_info(self, job_id: str) -> dict[str, str]:
        """The `Key=Value` fields of `scontrol show job -o ID`."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def job_state(self, job_id: str) -> str:
        """JobState from `scontrol show job ID`: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ..."""
        result = self.run("scontrol", "show", "job", str(job_id))
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if match is None:
            raise SlurmError(["scontrol", "show", "job", str(job_id)], 0, result.stdout, "no JobState in the output")
        return match.group(1)

    def wait_state(self, job_id: str, states: str | Iterable[str], timeout: float = 60.0, poll: float = 0.2) -> str:
        """Poll until the job is in one of `states` and return that state. Raises TimeoutError after `timeout`
        seconds, or AssertionError as soon as the job ends in a state that is not wanted."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, not {sorted(wanted)}: {self.job_info(job_id)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, wanted {sorted(wanted)}")
            time.sleep(poll)

    def queue(self) -> list[str]:
        """Ids of the jobs squeue still lists (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split()

    # -- stop ------------------------------------------------------------------------------------------------------

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Cancel every job, wait for the queue to empty, stop the daemons this object started and remove the
        temporary directory. Best effort and idempotent: safe to call twice, from a finalizer or at exit."""
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass  # interpreter shutting down
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.conf is not None:
            self._cancel_all(drain_timeout)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is not None:
                self._terminate(proc)
        for log in self._logs.values():
            try:
                log.close()
            except OSError:
                pass  # nothing useful to do about it at shutdown
        self._logs.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_all(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        try:
            jobs = self.queue()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=10)
            while jobs and time.monotonic() < deadline:
                time.sleep(0.2)
                jobs = self.queue()
        except (OSError, subprocess.SubprocessError, SlurmError):
            pass  # the controller is unhealthy; stopping the daemons is all that is left

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass  # already gone
        deadline = time.monotonic() + timeout
        while proc.poll() is None and process_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None and process_alive(proc.pid):
            try:
                proc.kill()
            except ProcessLookupError:
                pass  # exited in the meantime
        try:
            proc.wait(timeout=5)  # reap it so no zombie is left behind
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel; nothing more a test can do
