"""Test-only plugin: faults injected into a real daemon's processes, configured by DLWATCHD_TEST_FAULTS.

Loaded through DLWATCHD_PLUGINS, so it runs in the supervisor and in every worker. The variable holds a JSON
object; each key is one fault, all optional:

- "write_error": {"name": glob, "errno": "ENOSPC"|"EACCES"|..., "skip": s, "times": n, "after_bytes": k,
                  "while_exists": path, "process": "any"|"supervisor"|"worker"}
  `os.write` to the temporary sibling of a file whose final name matches `glob` (see
  spool.atomic.temp_sibling) raises that error (default ENOSPC) once `after_bytes` bytes of that file went
  through. The first `skip` such files (default 0) are written normally, the next `times` (default 1)
  fail; with `while_exists`, every one fails while that file exists instead (the disk is full until the
  test "frees space" by removing it). Counts hold across processes (ticket files in the "state" folder).
- "kill": [{"target": "module:attr[.method]", "when": "before"|"after", "call": n, "process": ...}]
  SIGKILLs the process on the n-th call (default 1) of the named function, once per test: the "state"
  folder records that it fired, so the restarted daemon runs normally.
- "drop_events": true - the native watcher's handler swallows every event (lost inotify events).
- "unreadable": {"path": folder, "while_exists": flag} - in the supervisor, listing that folder fails with
  EACCES while the flag file exists (a share whose permissions changed).
- "watcher_dies_when": flag - the supervisor's native watcher thread stops once that file appears.
- "state": a folder for the counters above (required by "write_error" and "kill").

Every fault appends a line to <state>/fired.log, so a test can tell that it really happened.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import importlib
import json
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

from dlwatchd.jobs._registry import KindRegistry

_spec: dict[str, Any] = json.loads(os.environ.get("DLWATCHD_TEST_FAULTS") or "{}")
_state = Path(_spec["state"]) if "state" in _spec else None


def _process_matches(which: str) -> bool:
    is_worker = multiprocessing.parent_process() is not None
    return which == "any" or (which == "worker") == is_worker


def _fired(what: str) -> None:
    assert _state is not None
    with open(_state / "fired.log", "a") as handle:
        handle.write(f"{os.getpid()} {what}\n")


def _take_ticket(name: str, limit: int) -> bool:
    """True for the first `limit` callers across every process (one exclusive-create file per ticket)."""
    assert _state is not None
    for number in range(limit):
        try:
            os.close(os.open(_state / f"{name}.{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return True
    return False


def _temp_behind(fd: int) -> tuple[str, str] | None:
    """(temp path, final name) when `fd` is open on an atomic-write temp (.<name>.<hex>.tmp)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    temp = os.path.basename(path)
    parts = temp.rsplit(".", 2)
    if not temp.startswith(".") or len(parts) != 3 or parts[2] != "tmp":
        return None
    return path, parts[0][1:]


def _install_write_error(spec: dict[str, Any]) -> None:
    if not _process_matches(spec.get("process", "any")):
        return
    code = getattr(errno, spec.get("errno", "ENOSPC"))
    pattern, after = spec["name"], int(spec.get("after_bytes", 0))
    skip, times, flag = int(spec.get("skip", 0)), int(spec.get("times", 1)), spec.get("while_exists")
    real_write = os.write
    written: dict[str, int] = {}  # by temp path: descriptor numbers are reused, temp names are not
    doomed: dict[str, bool] = {}

    def dooms_next_file() -> bool:
        if _take_ticket("write-error-skip", skip):
            return False
        return os.path.exists(flag) if flag else _take_ticket("write-error", times)

    @functools.wraps(real_write)
    def write(fd: int, data: Any) -> int:
        behind = _temp_behind(fd) if fd > 2 else None
        if behind is None or not fnmatch.fnmatch(behind[1], pattern):
            return real_write(fd, data)
        temp, name = behind
        if temp not in doomed:
            doomed[temp] = dooms_next_file()
            written[temp] = 0
        if doomed[temp]:
            room = after - written[temp]
            if room <= 0:
                _fired(f"{errno.errorcode[code]} {name}")
                raise OSError(code, os.strerror(code))
            data = memoryview(data)[:room]
        count = real_write(fd, data)
        written[temp] += count
        return count

    os.write = write


def _install_kill(spec: dict[str, Any]) -> None:
    if not _process_matches(spec.get("process", "any")):
        return
    module_name, _, attr_path = spec["target"].partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, attr)
    when, call = spec.get("when", "after"), int(spec.get("call", 1))
    calls = [0]
    label = f"kill {spec['target']} {when} call {call}"

    def maybe_die() -> None:
        calls[0] += 1
        if calls[0] == call and _take_ticket(f"kill-{spec['target']}", 1):
            _fired(label)
            os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            maybe_die()
        result = original(*args, **kwargs)
        if when == "after":
            maybe_die()
        return result

    setattr(owner, attr, wrapper)


def _install_drop_events() -> None:
    from dlwatchd.watch import hints

    def swallow(self: Any, event: Any) -> None:
        return None

    hints._HintHandler.on_any_event = swallow  # type: ignore[method-assign]


def _install_unreadable(spec: dict[str, Any]) -> None:
    if not _process_matches("supervisor"):
        return
    folder, flag = os.path.realpath(spec["path"]), spec["while_exists"]

    def refusing(real: Any) -> Any:
        @functools.wraps(real)
        def call(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if not isinstance(path, int) and os.path.exists(flag) and os.path.realpath(path) == folder:
                _fired(f"EACCES listing {os.path.basename(folder)}")
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    os.listdir = refusing(os.listdir)
    os.scandir = refusing(os.scandir)


def _install_watcher_death(flag: str) -> None:
    if not _process_matches("supervisor"):
        return
    import threading

    from dlwatchd.watch import hints

    real_start = hints.HintWatcher.start

    def start(self: Any) -> None:
        real_start(self)
        observer = self._observer

        def watch_for_flag() -> None:
            while observer is not None and observer.is_alive():
                if os.path.exists(flag) and _take_ticket("watcher-death", 1):
                    _fired("watcher thread stopped")
                    observer.stop()
                    return
                threading.Event().wait(0.05)

        threading.Thread(target=watch_for_flag, daemon=True).start()

    hints.HintWatcher.start = start  # type: ignore[method-assign]


if "write_error" in _spec:
    _install_write_error(_spec["write_error"])
for _kill in _spec.get("kill", []):
    _install_kill(_kill)
if _spec.get("drop_events"):
    _install_drop_events()
if "unreadable" in _spec:
    _install_unreadable(_spec["unreadable"])
if "watcher_dies_when" in _spec:
    _install_watcher_death(_spec["watcher_dies_when"])


def register_kinds(registry: KindRegistry) -> None:
    """No kinds: importing this module installs the faults."""
