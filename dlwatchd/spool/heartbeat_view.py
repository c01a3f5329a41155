"""Reading the heartbeats in daemons/ (clients, the CLI and the supervisor's peer watch share this)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dlwatchd.spool.layout import SpoolLayout


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """One heartbeat file as a dict, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_heartbeats(layout: SpoolLayout) -> list[dict[str, Any]]:
    """Every readable heartbeat in daemons/, sorted by daemon id; unreadable files are skipped."""
    beats = []
    try:
        names = sorted(os.listdir(layout.daemons))
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        data = read_heartbeat(layout.daemons / name)
        if data is not None:
            beats.append(data)
    return beats
