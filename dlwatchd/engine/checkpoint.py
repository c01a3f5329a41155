"""Training checkpoints (ENGINE.md section 10.3): plain containers and tensors, loadable with weights_only=True."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.atomic import write_bytes_atomic

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain lists (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Write the checkpoint atomically (temp file + rename); the previous one stays valid on any error."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **content}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything else in it is refused as E_UNSAFE_MODEL."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DlwatchdError(
            ErrorCode.UNSAFE_MODEL,
            f"The checkpoint {path.name} cannot be loaded safely: {exc}.",
            hint="Start the training again; the checkpoint is damaged or was not written by dlwatchd.",
        ) from exc
    if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
        raise DlwatchdError(ErrorCode.UNSAFE_MODEL, f"The checkpoint {path.name} has an unknown format.")
    return content


def remove_checkpoint(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
