"""Log lines on stderr, one per event: plain with a time stamp, or with `<N>` priorities under systemd.

The supervisor (from the CLI) and each worker process (spawned, so it starts with no logging set up) both call
`configure_stderr_logging`, so a worker's warning reaches the journal at the warning level too.
"""

from __future__ import annotations

import logging
import os
import sys


class JournalFormatter(logging.Formatter):
    """`<N>` syslog priority prefixes on every line, which journald turns into real log levels."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def configure_stderr_logging(level: int, source: str = "%(name)s") -> None:
    """Send every log record of this process to stderr; journald's form when JOURNAL_STREAM is set.

    `source` names where a line comes from (a logger name by default, `worker[train]` in a worker).
    """
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter(f"{source}: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {source}: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
