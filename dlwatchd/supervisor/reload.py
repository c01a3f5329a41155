"""SIGHUP: re-read the config file and apply what can change while the daemon runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dlwatchd.errors import DlwatchdError

if TYPE_CHECKING:
    from dlwatchd.supervisor.daemon import Supervisor

logger = logging.getLogger("dlwatchd.reload")

# Settings that only take effect at the next start: they define the spool, the processes or the sockets.
RESTART_ONLY = ("spool", "daemon_id", "watch", "plugins", "warm_workers", "http_port")


def reload_settings(sup: Supervisor) -> list[str]:
    """Apply the re-read settings; returns one line per change. An invalid config keeps the old settings."""
    if sup.reload_source is None:
        logger.info("SIGHUP: no config file or environment to reload from")
        return []
    try:
        new = sup.reload_source()
    except DlwatchdError as error:
        logger.error("SIGHUP: the new configuration is invalid, keeping the running one: %s", error.message)
        return []
    old = sup.settings
    changes = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in RESTART_ONLY:
            changes.append(f"{name}: {before} -> {after} (takes effect at the next restart)")
            setattr(new, name, before)
        else:
            changes.append(f"{name}: {before} -> {after}")
    sup.settings = new
    sup.peers.dead_after = new.dead_after
    sup.intake.max_bytes = new.max_request_bytes
    for line in changes:
        logger.info("SIGHUP: %s", line)
    if not changes:
        logger.info("SIGHUP: configuration unchanged")
    return changes
