"""daemons/<id>.json: this daemon's heartbeat, and the liveness of the other daemons on the spool."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from dlwatchd.protocol.status import DaemonHealth
from dlwatchd.spool.atomic import write_json_atomic
from dlwatchd.spool.heartbeat_view import read_heartbeat
from dlwatchd.spool.layout import DAEMON_ID_RE, SpoolLayout

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
