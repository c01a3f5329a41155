"""daemons/<id>.json: this daemon's heartbeat, and the liveness of the other daemons on the spool."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlwatchd import __version__
from dlwatchd.protocol.status import DaemonHealth, utc_now
from dlwatchd.spool.atomic import write_json_atomic
from dlwatchd.spool.heartbeat_view import read_heartbeat
from dlwatchd.spool.layout import DAEMON_ID_RE, SpoolLayout, short_hostname

if TYPE_CHECKING:
    from dlwatchd.supervisor.daemon import Supervisor

logger = logging.getLogger("dlwatchd.heartbeat")


def write_heartbeat(layout: SpoolLayout, health: DaemonHealth) -> None:
    """Publish the heartbeat; not fsynced (it is rewritten every few seconds and only its change matters)."""
    write_json_atomic(layout.heartbeat_path(health.daemon_id), health.model_dump(mode="json"), durable=False)


@dataclass
class _Seen:
    beat: object
    since: float


class PeerWatch:
    """Declares a daemon dead when its `beat` has not changed for `dead_after` seconds of *our* clock.

    Wall-clock timestamps in the file are never compared: hosts sharing a spool may disagree on the time.
    """

    def __init__(self, layout: SpoolLayout, my_id: str, dead_after: float) -> None:
        self.layout = layout
        self.my_id = my_id
        self.dead_after = dead_after
        self._seen: dict[str, _Seen] = {}

    def dead_peers(self) -> list[str]:
        """Ids of other daemons whose heartbeat stood still long enough; each is reported until it beats again."""
        now = time.monotonic()
        try:
            names = os.listdir(self.layout.daemons)
        except FileNotFoundError:
            return []
        dead = []
        present = set()
        for name in names:
            if not name.endswith(".json"):
                continue
            daemon_id = name[: -len(".json")]
            if daemon_id == self.my_id or not DAEMON_ID_RE.match(daemon_id):
                continue
            data = read_heartbeat(self.layout.daemons / name)
            if data is None:
                continue
            present.add(daemon_id)
            beat = data.get("beat")
            seen = self._seen.get(daemon_id)
            if seen is None or seen.beat != beat:
                self._seen[daemon_id] = _Seen(beat, now)
            elif now - seen.since >= self.dead_after:
                dead.append(daemon_id)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return dead


def build_health(sup: Supervisor) -> DaemonHealth:
    """The supervisor's health as published in its heartbeat and answered to `health` requests."""
    running = [
        {"job_id": job.job_id, "kind": job.kind, "lane": name, "progress": job.progress}
        for name, lane in sup.lanes.items()
        for job in lane.jobs
    ]
    return DaemonHealth(
        daemon_id=sup.me,
        beat=sup.beat,
        pid=os.getpid(),
        host=short_hostname(),
        version=__version__,
        state=sup.state,
        reason=sup.reason,
        started_at=sup.started_at,
        updated_at=utc_now(),
        device=next((lane.device for lane in sup.lanes.values() if lane.device), None),
        queues={"queued": len(sup.queue), "running": len(running), "paused": len(sup.paused)},
        running_jobs=running,
        lanes={name: lane.describe() for name, lane in sup.lanes.items()},
        watcher=sup.watcher.mode,
        watcher_alive=sup.watcher.alive,
        watcher_reason=sup.watcher.reason,
        last_full_scan=sup.last_full_scan,
        rescan_interval_s=sup.settings.rescan_interval,
        counters=sup.counters,
    )


def status_line(sup: Supervisor) -> str:
    """One line for the service manager: idle / what runs and how far / degraded and why."""
    if sup.state == "degraded" and sup.reason:
        return f"degraded: {sup.reason}"
    parts = []
    for lane in sup.lanes.values():
        if lane.job is None:
            continue
        progress = lane.job.progress or {}
        text = f"{lane.job.kind} job {lane.job.job_id}"
        if progress.get("epoch") is not None and progress.get("total_epochs"):
            text += f" epoch {progress['epoch']}/{progress['total_epochs']}"
        elif isinstance(progress.get("fraction"), (int, float)):
            text += f" {100 * progress['fraction']:.0f}%"
        parts.append(text)
    queued = f"; {len(sup.queue)} queued" if sup.queue else ""
    return ("running " + ", ".join(parts) if parts else "idle") + queued
