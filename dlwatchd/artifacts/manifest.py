"""`manifest.json`: the list of a job's outputs a client checks before reading them (PROTOCOL §6)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlwatchd.spool.atomic import write_json_atomic
from dlwatchd.spool.layout import PROTOCOL_VERSION

MANIFEST_NAME = "manifest.json"


def write_manifest(path: Path, entries: list[dict[str, Any]], *, base: Path | None) -> None:
    """Publish {"protocol": 1, "outputs": entries} at `path` atomically, the directory fsynced.

    Each entry is copied with its `path` made relative to `base` (forward slashes, so clients on any OS read it)
    when the file lies inside `base`, else absolute; `base=None` keeps every path absolute. The caller's entries
    are not modified. The directory fsync makes the manifest durable before the job's status says succeeded.
    """
    outputs = [{**entry, "path": _manifest_path(Path(entry["path"]), base)} for entry in entries]
    write_json_atomic(Path(path), {"protocol": PROTOCOL_VERSION, "outputs": outputs}, dir_sync=True)


def _manifest_path(path: Path, base: Path | None) -> str:
    absolute = Path(os.path.abspath(path))
    if base is None:
        return str(absolute)
    # Lexical first (a spool reached through a symlink counts as inside itself), then with links resolved (one side
    # given through a link, the other not).
    for inner, outer in ((absolute, Path(os.path.abspath(base))), (path.resolve(), Path(base).resolve())):
        try:
            return inner.relative_to(outer).as_posix()
        except ValueError:
            continue
    return str(absolute)  # outside the job folder (an output_dir elsewhere)
