"""Atomic file publication: temp file in the same directory, fsync, os.replace, directory fsync.

Every file a client may read (status.json, outputs, heartbeats) is written through this module, so a
reader sees the previous complete version or the next one, never a partial file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut; best effort on filesystems that refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A dot-named temporary path next to `path`, never matched by any reader of the spool."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True, dir_sync: bool = False) -> None:
    """Publish `data` at `path` atomically.

    `durable` fsyncs the file before the rename; `dir_sync` also fsyncs the directory (state changes).
    On any error the temporary file is removed and the previous `path` is left as it was.
    """
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if dir_sync:
        fsync_dir(path.parent)


def dumps(obj: Any) -> bytes:
    """JSON bytes as every spool file is written: UTF-8, indented, never a NaN or Infinity token."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: Any, *, durable: bool = True, dir_sync: bool = False) -> None:
    """Publish `obj` as JSON at `path` atomically (see write_bytes_atomic)."""
    write_bytes_atomic(path, dumps(obj), durable=durable, dir_sync=dir_sync)


def rename_claim(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` as a claim; True only if this call won.

    Losing a race shows as `src` missing. The winner confirms by stat-ing its own destination, because
    some network filesystems report success for both sides of a race.
    """
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    try:
        os.lstat(dst)  # the claimed entry itself: it may be a (dangling) symlink that intake must reject
    except FileNotFoundError:
        return False
    return True
