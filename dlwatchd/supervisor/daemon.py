"""The supervisor's main loop: watch, intake, queue, dispatch to lanes, control markers, heartbeat.

Single-threaded: the watcher thread only queues hints and rings a wakeup socket; signal handlers only
set flags. Every decision happens here, in `step`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from dlwatchd.http.shim import HttpShim, ShimSource, open_shim
from dlwatchd.jobs._registry import LANES, KindRegistry, build_registry
from dlwatchd.jobs.runner import SUSPENDED
from dlwatchd.protocol.status import DaemonCounters, DaemonHealth, utc_now
from dlwatchd.settings import Settings
from dlwatchd.spool import control, retention
from dlwatchd.spool.claims import commit_terminal, queued_ids, release_to_queue
from dlwatchd.spool.intake import Intake, IntakeReport
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.spool.status_file import StatusFile, read_status
from dlwatchd.supervisor import reconciling
from dlwatchd.supervisor.dispatch import dispatch
from dlwatchd.supervisor.gpu_clear import GpuClear
from dlwatchd.supervisor.heartbeat import PeerWatch, build_health, status_line, write_heartbeat
from dlwatchd.supervisor.lanes import Lane, RunningJob
from dlwatchd.supervisor.reload import reload_settings
from dlwatchd.supervisor.sdnotify import Notifier
from dlwatchd.supervisor.slurm_lane import SlurmLane
from dlwatchd.watch.hints import HintWatcher, Wakeup

logger = logging.getLogger("dlwatchd.supervisor")

UNUSABLE_PREFIX = "the spool cannot be used"

_MAX_LOOP_FAILURES = 20
_DEVICE_PROBE_S = 5.0


class Supervisor:
    """One daemon on one spool. Build it in the CLI, then call `run()`; it returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        registry: KindRegistry | None = None,
        reload_source: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.reload_source = reload_source
        self.me = settings.daemon_id
        self.layout = SpoolLayout(settings.spool)
        self.registry = registry or build_registry(settings.plugins)
        self.wakeup = Wakeup()
        self.watcher = HintWatcher(settings.spool, settings.watch, self.wakeup)
        log_level = logging.getLogger().getEffectiveLevel()
        self.lanes: dict[str, Lane | SlurmLane] = {
            name: Lane(name, settings.plugins, settings.warm_workers, log_level) for name in LANES
        }
        if settings.executor == "slurm":
            # Query kinds stay in the local query worker; trainings and inference go to the cluster.
            for name in ("train", "infer"):
                self.lanes[name] = SlurmLane(name, settings, self.registry, log_level)
        self.intake = Intake(self.layout, self.registry, self.me, settings.max_request_bytes)
        self.peers = PeerWatch(self.layout, self.me, settings.dead_after)
        self.counters = DaemonCounters()
        self.state = "starting"
        self.reason: str | None = None
        self._lane_reason: str | None = None  # the reason above when a lane's problem put it there
        self.queue: list[str] = []
        self.kinds: dict[str, str] = {}
        self.batch_keys: dict[str, tuple[str, int]] = {}  # job id -> (key, tiles) of jobs that may run in groups
        self.paused: set[str] = set()
        self.warned: set[tuple[str, str]] = set()
        self.gpu_clear: GpuClear | None = None
        self.beat = 0
        self.started_at = utc_now()
        self.last_full_scan: str | None = None
        self._stop = False
        self._interrupts = 0
        self.last_health: dict[str, Any] | None = None
        self.device_info: dict[str, Any] | None = None
        self._device_asked = 0.0
        self.shim: HttpShim | None = None
        self.notifier = Notifier()
        self._next_ping = 0.0 if self.notifier.watchdog_s else float("inf")
        self._reload = False
        now = time.monotonic()
        self._next_scan = now
        self._next_beat = now
        self._next_retention = now + 5.0

    # ---- life cycle -------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly; raises DlwatchdError for an unusable spool."""
        self.layout.ensure()
        self._install_signal_handlers()
        self._start_shim()
        for lane in self.lanes.values():
            lane.start()
        self._heartbeat()
        self.watcher.start()
        try:
            reconciling.recover_own(self)
        except OSError as exc:  # the spool cannot be written now: every rescan tries again
            self._spool_unusable(exc)
        self._full_scan()
        self.state = "ready" if self.reason is None else "degraded"
        self._heartbeat()
        self.notifier.ready(status_line(self))
        logger.info(
            "ready: spool %s, daemon %s, watcher %s, rescan every %.2f s",
            self.layout.root,
            self.me,
            self.watcher.mode,
            self.settings.rescan_interval,
        )
        try:
            self._serve()
        finally:
            self._shutdown()
        return 0

    def _serve(self) -> None:
        """Run the loop; a bug in one turn degrades the daemon instead of killing it (and its jobs' owner).

        After many failing turns in a row the error is raised, so a service manager restarts the daemon
        and restart reconciliation takes over.
        """
        failures = 0
        while not self._stop:
            try:
                self.step()
                failures = 0
                if self.reason and self.reason.startswith("internal error"):
                    self.reason = None
            except Exception as exc:
                failures += 1
                self.reason = f"internal error in the supervisor loop: {type(exc).__name__}: {exc}"
                logger.exception("supervisor loop failed (%d in a row)", failures)
                if failures >= _MAX_LOOP_FAILURES:
                    raise
                time.sleep(min(5.0, 0.1 * 2**failures))

    def _start_shim(self) -> None:
        if self.settings.http_port is None:
            return
        source = ShimSource(
            self.layout, lambda: self.last_health, lambda: self.device_info,
            self.settings.effective_model_dirs(), self.settings.weights_dir,
        )  # fmt: skip
        self.shim, problem = open_shim(source, self.settings.http_port)
        if problem:
            self.reason = problem

    def _probe_device(self) -> None:
        """Keep the shim's device answer fresh: ask the idle query worker every few seconds."""
        lane = self.lanes["query"]
        now = time.monotonic()
        if self.shim is None or not lane.idle or lane.conn is None or now - self._device_asked < _DEVICE_PROBE_S:
            return
        if self.gpu_clear is not None:
            return
        self._device_asked = now
        lane.conn.send({"op": "device"})

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def request_stop(self) -> None:
        self._stop = True
        self.wakeup.ring()

    def _install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: Any) -> None:
            self.request_stop()

        def on_int(signum: int, frame: Any) -> None:
            self._interrupts += 1
            if self._interrupts > 1:
                os._exit(130)  # a second Ctrl-C: the user wants out now
            self.request_stop()

        def on_hup(signum: int, frame: Any) -> None:
            self._reload = True
            self.wakeup.ring()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGHUP, on_hup)

    def _shutdown(self) -> None:
        self.state = "stopping"
        self.notifier.stopping("stopping: finishing running jobs, checkpointing trainings")
        for lane in self.lanes.values():
            if lane.suspend is not None:
                lane.suspend.set()  # trainings checkpoint at their next batch and go back to the queue
        self._heartbeat()
        deadline = time.monotonic() + self.settings.stop_timeout
        local = [lane for lane in self.lanes.values() if not lane.outlives_supervisor]
        while any(lane.jobs for lane in local) and time.monotonic() < deadline:
            self._wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._read_lanes()
        for lane in self.lanes.values():
            lane.stop(timeout=5.0)
        self.watcher.stop()
        if self.shim is not None:
            self.shim.stop()
        self.notifier.close()
        self._heartbeat()
        self.wakeup.close()
        logger.info("stopped")

    # ---- the loop ---------------------------------------------------------------------------------

    def step(self) -> None:
        """One turn of the loop: wait for something, then handle all that is due."""
        now = time.monotonic()
        timeout = max(0.0, min(self._next_scan, self._next_beat, self._next_ping) - now)
        self._wait(timeout)
        if self._reload:
            self._reload = False
            reload_settings(self)
        self._read_lanes()
        self._restart_lanes()
        for hint in self.watcher.drain():
            self._on_hint(hint)
        now = time.monotonic()
        if now >= self._next_scan:
            self._full_scan()
        if self.gpu_clear is not None and self.gpu_clear.advance():
            self.gpu_clear = None
        dispatch(self)
        if now >= self._next_ping:
            self._ping_watchdog(now)
        if now >= self._next_beat:
            self._check_health()
            self._heartbeat()
            self.notifier.status(status_line(self))
            reconciling.take_over_dead_peers(self)
            self._probe_device()
        if now >= self._next_retention:
            self._next_retention = now + self.settings.retention.interval_s
            retention.sweep(self.layout, self.settings.retention)

    def _wait(self, timeout: float) -> None:
        handles: list[Any] = [self.wakeup]
        for lane in self.lanes.values():
            if lane.conn is not None:
                handles.append(lane.conn)
            if lane.process is not None:
                handles.append(lane.process.sentinel)
        wait(handles, timeout)

    def _on_hint(self, directory: Path) -> None:
        try:
            if directory == self.layout.incoming:
                self._run_intake()
            elif directory == self.layout.queued:
                self.refresh_queue()
            elif directory.parent == self.layout.jobs:
                self._check_markers(directory.name)
        except OSError as exc:
            self._spool_unusable(exc)

    def _spool_unusable(self, exc: OSError) -> None:
        where = f" ({exc.filename})" if exc.filename else ""
        self.reason = f"{UNUSABLE_PREFIX}{where}: {exc.strerror or exc}; retrying every rescan"
        logger.error(self.reason)

    def _full_scan(self) -> None:
        """The directory listing is the truth: intake, queue, markers and orphaned claims, every interval.

        A spool that cannot be used (a share gone away, permissions changed, a full disk) degrades the daemon
        until a later scan succeeds; nothing is moved meanwhile.
        """
        self._next_scan = time.monotonic() + self.settings.rescan_interval
        missing = self.layout.missing_dirs()
        if missing:
            self.reason = f"spool folders missing or replaced by links: {', '.join(missing)}"
            return
        if self.reason and self.reason.startswith(("spool folders", UNUSABLE_PREFIX)):
            self.reason = None
        try:
            report = IntakeReport()
            self.intake.recover_claims(self.me, report)  # requests whose intake an error cut short
            self.count(report)
            self._run_intake()
            self.refresh_queue()
            for job_id in [*self.queue, *self.paused]:
                self._check_markers(job_id)
            reconciling.adopt_orphans(self)
        except OSError as exc:
            self._spool_unusable(exc)
            return
        self.counters.rescans += 1
        self.last_full_scan = utc_now()

    def _run_intake(self) -> None:
        if self.reason and self.reason.startswith(("spool folders", UNUSABLE_PREFIX)):
            return  # refuse to work in a spool whose folders were swapped out or cannot be used
        report = self.intake.scan()
        self.count(report)
        if report.accepted:
            for accepted in report.accepted:
                self.kinds[accepted.job_id] = accepted.kind
                if accepted.batch_key is not None:
                    self.batch_keys[accepted.job_id] = (accepted.batch_key, accepted.tiles)
                self.watcher.watch_job(accepted.job_id)
            self.refresh_queue()

    def count(self, report: IntakeReport) -> None:
        self.counters.accepted += len(report.accepted)
        self.counters.rejected += report.rejected
        self.counters.ignored_files += report.ignored

    def refresh_queue(self) -> None:
        self.queue = queued_ids(self.layout)

    def kind_of(self, job_id: str) -> str | None:
        kind = self.kinds.get(job_id)
        if kind is None:
            status = read_status(self.layout.status_path(job_id))
            kind = status.kind if status else None
            if kind is not None:
                self.kinds[job_id] = kind
        return kind

    # ---- control markers --------------------------------------------------------------------------

    def _check_markers(self, job_id: str) -> None:
        if job_id in self.paused:
            outcome = control.settle_paused(self.layout, job_id, self.me)
            if outcome != "paused":
                self.paused.discard(job_id)
                if outcome == "cancelled":
                    self.forget(job_id)
                else:
                    self.refresh_queue()
            return
        if job_id not in self.queue:
            return
        if self.layout.marker_path(job_id, "cancel").exists():
            if control.cancel_queued(self.layout, job_id, self.me):
                self.forget(job_id)
            self.refresh_queue()
            return
        for marker in control.misplaced_markers(self.layout, job_id, self.kind_of(job_id)):
            if (job_id, marker) not in self.warned:
                self.warned.add((job_id, marker))
                StatusFile(self.layout.status_path(job_id)).warn(
                    "W_MARKER_IGNORED", f"The '{marker}' marker applies to trainings only and was ignored."
                )

    def forget(self, job_id: str) -> None:
        self.kinds.pop(job_id, None)
        self.batch_keys.pop(job_id, None)
        self.watcher.unwatch_job(job_id)
        self.warned = {item for item in self.warned if item[0] != job_id}

    # ---- lanes ------------------------------------------------------------------------------------

    def _read_lanes(self) -> None:
        for lane in self.lanes.values():
            while lane.conn is not None:
                try:
                    if not lane.conn.poll():
                        break
                    message = lane.conn.recv()
                except (EOFError, OSError):
                    break
                self._on_lane_message(lane, message)
            if lane.process is not None and not lane.process.is_alive():
                reconciling.on_worker_death(self, lane)
            for job, state in lane.poll():
                self._finish(job, state)

    def _on_lane_message(self, lane: Lane, message: dict[str, Any]) -> None:
        op = message.get("op")
        if message.get("memory") is not None:
            lane.memory = message["memory"]
        if message.get("device") is not None:
            lane.device = message["device"]
        if op == "ready":
            lane.ready = True
        elif op == "progress" and lane.job is not None:
            lane.job.progress = message.get("progress")
        elif op == "problem":
            lane.problem = message.get("problem")
        elif op == "device":
            self.device_info = message.get("info")
        elif op == "memory" and self.gpu_clear is not None:
            self.gpu_clear.on_memory(lane.name, message.get("memory"))
        elif op == "done":
            job = lane.finish(message["job_id"])
            if job is not None:
                self._finish(job, message["state"])

    def _finish(self, job: RunningJob, state: str) -> None:
        if state in ("succeeded", "failed", "cancelled"):
            commit_terminal(self.layout, Path(job.claim), job.job_id, state)
            self.counters.completed += state == "succeeded"
            self.counters.failed += state == "failed"
            self.forget(job.job_id)
        elif state == "paused":
            self.paused.add(job.job_id)
            self._check_markers(job.job_id)
        elif state == SUSPENDED:
            release_to_queue(self.layout, Path(job.claim), job.job_id)
        elif state == "fenced":
            self.forget(job.job_id)
        logger.info("job %s (%s) ended %s", job.job_id, job.kind, state)

    def _restart_lanes(self) -> None:
        if self._stop:
            return
        now = time.monotonic()
        for lane in self.lanes.values():
            if (
                lane.process is None
                and now >= lane.not_before
                and not (self.gpu_clear is not None and self.gpu_clear.holds(lane.name))
            ):
                lane.start()

    # ---- health -----------------------------------------------------------------------------------

    def _check_health(self) -> None:
        if self.watcher.mode == "native" and not self.watcher.alive:
            self.counters.event_overflows += 1
            self.reason = "the filesystem watcher stopped; restarting it"
            logger.error(self.reason)
            self.watcher.restart()
            self._full_scan()
        elif self.watcher.mode == "native" and not self.layout.missing_dirs() and (lost := self.watcher.replaced()):
            self.counters.event_overflows += 1
            self.reason = f"the filesystem watcher lost {', '.join(lost)}: the folder was replaced; watching it again"
            logger.warning(self.reason)
            self.watcher.restart()
            self._full_scan()
        elif self.reason and self.reason.startswith("the filesystem watcher"):
            self.reason = None
        elif self.watcher.error and self.reason is None and self.settings.watch != "polling":
            self.reason = self.watcher.error
        problems = [lane.problem for lane in self.lanes.values() if lane.problem]
        if problems and self.reason is None:
            self.reason = problems[0]
        elif self.reason is not None and self.reason == self._lane_reason and self.reason not in problems:
            self.reason = problems[0] if problems else None
        self._lane_reason = self.reason if self.reason in problems else None
        if self.state in ("ready", "degraded"):
            self.state = "degraded" if self.reason else "ready"

    def _ping_watchdog(self, now: float) -> None:
        """WATCHDOG=1 only while healthy: the loop turns (we are here), the watcher lives, rescans are on time."""
        assert self.notifier.watchdog_s is not None
        self._next_ping = now + self.notifier.watchdog_s
        rescans_on_time = (
            now - (self._next_scan - self.settings.rescan_interval) < 3 * self.settings.rescan_interval + 1
        )
        if self.watcher.alive and rescans_on_time:
            self.notifier.watchdog()

    def health(self) -> DaemonHealth:
        return build_health(self)

    def _heartbeat(self) -> None:
        self._next_beat = time.monotonic() + self.settings.heartbeat_interval
        self.beat += 1
        health = self.health()
        self.last_health = health.model_dump(mode="json")
        try:
            write_heartbeat(self.layout, health)
        except OSError as exc:
            self.reason = f"cannot write the heartbeat: {exc.strerror}"
            logger.error(self.reason)
