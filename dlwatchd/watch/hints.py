"""Native filesystem events (watchdog) turned into "look at this directory" hints for the supervisor loop.

Events are never trusted as the truth: the supervisor rescans at start, periodically and after any
watcher error, so a lost or coalesced event costs at most one rescan interval. In polling mode (network
shares, or when native watching cannot start) there is no observer at all and the rescan does the work.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from dlwatchd.watch.filesystems import filesystem_type, is_network_filesystem

logger = logging.getLogger("dlwatchd.watch")

# watchdog's inotify backend holds every IN_MOVED_FROM for up to 0.5 s hoping to pair it with its
# IN_MOVED_TO, and everything queued behind it in that watch waits too. The daemon's own claims move
# files *out* of watched folders (incoming/ -> tmp/, queued/ -> running/), so each claim would delay
# the next request's event by up to half a second. Pairs inside one folder arrive in the same read,
# so a few milliseconds are enough to keep pairing them.
_MOVE_PAIRING_S = 0.005


def _shorten_move_pairing() -> None:
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # another platform, or a watchdog without this grouper: nothing to tune
        return
    if getattr(InotifyMoveEventGrouper, "delay", 0) > _MOVE_PAIRING_S:
        InotifyMoveEventGrouper.delay = _MOVE_PAIRING_S


class Wakeup:
    """A socket pair the watcher thread writes to, so the supervisor's select() wakes at once."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def ring(self) -> None:
        try:
            self.writer.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already ringing, or closing

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def fileno(self) -> int:
        return self.reader.fileno()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class _HintHandler(FileSystemEventHandler):
    def __init__(self, hints: queue.SimpleQueue[Path], wakeup: Wakeup) -> None:
        self._hints = hints
        self._wakeup = wakeup

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self._hints.put(Path(raw if isinstance(raw, str) else raw.decode()).parent)
        self._wakeup.ring()


WATCHED_FOLDERS = ("incoming", "queued", "running")


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is gone."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class HintWatcher:
    """Watches incoming/, queued/, running/ and the folders of active jobs; degrades to polling."""

    def __init__(self, spool: Path, mode: str, wakeup: Wakeup) -> None:
        self.spool = spool
        self.requested_mode = mode
        self.mode = "polling"
        self.hints: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.wakeup = wakeup
        self.error: str | None = None
        # Set when `auto` chose polling because the spool lies on a network filesystem (its type).
        self.network_filesystem: str | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._jobs: dict[str, ObservedWatch] = {}
        self._watched: dict[str, tuple[int, int] | None] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start native watching when asked for; on any failure, fall back to polling and record why.

        `auto` polls a spool on a network filesystem, whose events from other hosts never arrive, and
        watches natively anywhere else.
        """
        self.mode = "polling"
        if self.requested_mode == "auto":
            fstype = filesystem_type(self.spool)
            if is_network_filesystem(fstype):
                if self.network_filesystem is None:
                    logger.info("the spool is on a network filesystem (%s): polling every rescan interval", fstype)
                self.network_filesystem = fstype
                return
        elif self.requested_mode != "native":
            return
        try:
            _shorten_move_pairing()
            observer = Observer()
            handler = _HintHandler(self.hints, self.wakeup)
            watched = {}
            for name in WATCHED_FOLDERS:
                watched[name] = _identity(self.spool / name)
                observer.schedule(handler, str(self.spool / name), recursive=False)
            observer.daemon = True
            observer.start()
        except Exception as exc:  # inotify limits, unsupported filesystems, ...
            self.error = f"native watching could not start ({exc}); polling every rescan interval"
            logger.warning("%s", self.error)
            return
        self._observer, self._handler, self.mode, self.error = observer, handler, "native", None
        self._jobs, self._watched = {}, watched

    def replaced(self) -> list[str]:
        """Watched folders that are no longer the directory the watch was put on (renamed away and made anew).

        inotify follows the old directory, so events for the new one never arrive until watching restarts.
        """
        if self._observer is None:
            return []
        return [name for name, identity in self._watched.items() if _identity(self.spool / name) != identity]

    @property
    def alive(self) -> bool:
        """False when native watching was requested but its thread is not running."""
        if self.mode == "polling":
            return self.requested_mode == "polling" or self.network_filesystem is not None or self.error is not None
        return self._observer is not None and self._observer.is_alive()

    @property
    def reason(self) -> str | None:
        """Why the watcher polls although native watching was not ruled out by the settings, if it does."""
        if self.mode != "polling" or self.requested_mode == "polling":
            return None
        if self.network_filesystem is not None:
            return f"the spool is on a network filesystem ({self.network_filesystem})"
        return self.error

    def restart(self) -> None:
        self.stop()
        self.start()

    def watch_job(self, job_id: str) -> None:
        """Also watch jobs/<id>/ so control markers are seen at once (best effort: the rescan covers it)."""
        if self._observer is None or job_id in self._jobs:
            return
        try:
            self._jobs[job_id] = self._observer.schedule(
                self._handler, str(self.spool / "jobs" / job_id), recursive=False
            )
        except Exception as exc:
            logger.debug("cannot watch job %s: %s", job_id, exc)

    def unwatch_job(self, job_id: str) -> None:
        watch = self._jobs.pop(job_id, None)
        if watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except Exception:
                pass

    def drain(self) -> set[Path]:
        """Every distinct directory hinted since the last call."""
        self.wakeup.drain()
        seen: set[Path] = set()
        while True:
            try:
                seen.add(self.hints.get_nowait())
            except queue.Empty:
                return seen

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(2.0)
            except Exception:
                pass
        self._observer = None
        self._jobs = {}
