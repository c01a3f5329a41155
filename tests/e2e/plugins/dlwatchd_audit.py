"""Test-only plugin: an audit hook in every daemon process that logs each file open outside allowed folders.

Loaded through DLWATCHD_PLUGINS, so it is imported in the supervisor and in every worker (spawn imports the
plugins again). Active only when DLWATCHD_TEST_AUDIT_LOG names the log file; DLWATCHD_TEST_AUDIT_ALLOW holds
os.pathsep-separated folder prefixes whose opens are not logged. Each line is `<pid>\t<path>`: the real path
of what the open would reach (the parent resolved only when the open does not follow a final symlink), or
`relative:<name>` for a name opened relative to a folder descriptor. Opens are logged before they happen, so
an attempt that the kernel then refuses is logged too.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from dlwatchd.jobs._registry import KindRegistry

_state = threading.local()
_fd: int | None = None
_allowed: tuple[str, ...] = ()


def _target(path: Any, flags: int) -> str | None:
    if isinstance(path, int):
        return None  # an open of a descriptor already opened (and logged) by name
    text = os.fsdecode(os.fspath(path))
    if not os.path.isabs(text):
        return f"relative:{text}"
    if flags & os.O_NOFOLLOW:
        return os.path.join(os.path.realpath(os.path.dirname(text)), os.path.basename(text))
    return os.path.realpath(text)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or _fd is None or getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        path, _mode, flags = args
        target = _target(path, flags if isinstance(flags, int) else 0)
        if target is None or os.path.join(target, "").startswith(_allowed):
            return
        os.write(_fd, f"{os.getpid()}\t{target}\n".encode("utf-8", "surrogateescape"))
    except Exception:  # an audit hook must never break the process it watches
        pass
    finally:
        _state.busy = False


def _install() -> None:
    global _fd, _allowed
    log = os.environ.get("DLWATCHD_TEST_AUDIT_LOG")
    if not log:
        return
    allowed = [p for p in os.environ.get("DLWATCHD_TEST_AUDIT_ALLOW", "").split(os.pathsep) if p]
    _allowed = tuple(os.path.join(os.path.realpath(p), "") for p in allowed)
    _fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.write(_fd, f"{os.getpid()}\tinstalled {sys.argv[0]}\n".encode())
    sys.addaudithook(_hook)


_install()


def register_kinds(registry: KindRegistry) -> None:
    """No kinds: importing this module is all it does."""
