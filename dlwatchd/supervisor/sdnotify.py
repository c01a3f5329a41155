"""systemd's notify protocol without the systemd package: one datagram per message to $NOTIFY_SOCKET.

READY=1 after the startup scan, STATUS= one-line summaries, WATCHDOG=1 from the supervisor loop while
it is healthy, STOPPING=1 at shutdown. Without NOTIFY_SOCKET every call is a no-op, so the same code
runs under launchd, in a terminal and in tests.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger("dlwatchd.sdnotify")


class Notifier:
    """Sends sd_notify messages; failures are logged once and never raised (the daemon must not die of it)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract-namespace socket (Linux): its real address starts with a NUL byte.
        self.address: str | None = ("\0" + address[1:]) if address.startswith("@") else (address or None)
        self.watchdog_s = self._watchdog_interval(environ)
        self._socket: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, when the watchdog is meant for us."""
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(0.05, int(usec) / 2_000_000)
        except ValueError:
            return None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of `KEY=value` lines; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode("utf-8"), self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("cannot notify the service manager at %r: %s", self.address, exc)
            return False

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Send STATUS= only when the line changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
