"""What `dlwatchd weights list` and `dlwatchd weights import` do; cli.py parses their arguments and prints.

Listing stays torch-free; importing loads torch to verify the weights against the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlwatchd.engine.weights import WeightsStore


def list_weights(weights_dir: Path, *, as_json: bool = False) -> str:
    """The store's entries as a table (or JSON with the folder and entries); says so when the store is empty."""
    store = WeightsStore(weights_dir)
    entries = store.entries()
    if as_json:
        return json.dumps({"weights_dir": str(weights_dir), "entries": entries}, indent=2)
    if not entries:
        return f"No weights are installed in {weights_dir}."
    rows = [("ENCODER", "TAG", "SIZE", "SHA256", "IMPORTED", "LICENSE")]
    rows += [
        (
            entry["encoder"],
            entry["tag"],
            _size(entry.get("bytes")),
            (entry.get("sha256") or "-")[:12],
            entry.get("imported_at") or "-",
            entry.get("license") or "-",
        )
        for entry in entries
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)), str(row[-1])]) for row in rows
    ]
    return "\n".join([f"weights store: {weights_dir}", *lines])


def import_weights(weights_dir: Path, encoder: str, source: Path, tag: str | None = None) -> str:
    """Import `source` for `encoder` into the store and describe the result; raises as WeightsStore.import_file."""
    store = WeightsStore(weights_dir)
    entry: dict[str, Any] = store.import_file(encoder, source, tag)
    path = store.path_for(entry["encoder"], entry["tag"])
    licence = f"\nlicense: {entry['license']}" if entry.get("license") else ""
    return (
        f"imported {entry['tag']} weights for {entry['encoder']} ({_size(entry['bytes'])})\n"
        f"stored at: {path}\nsha256: {entry['sha256']}{licence}"
    )


def _size(count: Any) -> str:
    if not isinstance(count, int):
        return "-"
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"
