"""Probability maps as `.bin` files (ENGINE §12.4, §12.6; PROTOCOL §6): the byte layout the QuPath client reads.

A map is the C×H×W softmax output as little-endian float32 in C order with no header, so element (c, h, w) sits at
byte 4·(c·H·W + h·W + w) and the file is exactly 4·C·H·W bytes. numpy only: clients and tests read maps back without
torch.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dlwatchd.spool.atomic import write_bytes_atomic

DTYPE = np.dtype("<f4")
SAFE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
UNSAFE_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")
MAX_STEM_CHARS = 128
DIGEST_CHARS = 8


def safe_tile_filename(tile_id: str) -> str:
    """The file stem for `tile_id` (§12.6): the id itself when it is 1-128 of [A-Za-z0-9._-] and not `.`/`..`.

    Any other id has each other character replaced by `_`, is cut to 128 characters, and gets `_` plus the first
    8 hex digits of the SHA-1 of its UTF-8 bytes appended, so ids that clean to the same text stay apart. The
    result never contains a path separator and is never `.` or `..`; append `.bin` for the file name.
    """
    if SAFE_ID_RE.fullmatch(tile_id) and tile_id not in (".", ".."):
        return tile_id
    cleaned = UNSAFE_CHAR_RE.sub("_", tile_id)[:MAX_STEM_CHARS]
    # surrogatepass: a JSON request can carry lone surrogates, which plain UTF-8 encoding rejects.
    digest = hashlib.sha1(tile_id.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]
    return f"{cleaned}_{digest}"


def write_probabilities(
    path: Path, probabilities: np.ndarray, *, sha256: bool = True, durable: bool = True
) -> dict[str, Any]:
    """Write a C×H×W array to `path` as `<f4` C-order bytes, atomically (temp name, fsync, rename).

    Returns the manifest entry {path, bytes, dtype: "float32", byte_order: "little", shape: [C, H, W], sha256}
    with `sha256` None when switched off. `durable=False` skips the fsync (interactive inference on slow shares).
    Raises ValueError for an array that is not 3-D; OSError from the write leaves no temp file and the old `path`.
    """
    array = np.asarray(probabilities)
    if array.ndim != 3:
        raise ValueError(f"a probability map is C×H×W, not an array of shape {array.shape}")
    data = np.ascontiguousarray(array, dtype=DTYPE).tobytes(order="C")
    write_bytes_atomic(Path(path), data, durable=durable)
    return {
        "path": str(path),
        "bytes": len(data),
        "dtype": "float32",
        "byte_order": "little",
        "shape": [int(side) for side in array.shape],
        "sha256": hashlib.sha256(data).hexdigest() if sha256 else None,
    }


def read_probabilities(path: Path, num_classes: int, height: int, width: int) -> np.ndarray:
    """The C×H×W float32 array (native byte order) stored at `path` by write_probabilities.

    Raises ValueError when a dimension is not positive or the file is not exactly 4·C·H·W bytes; OSError when
    the file cannot be read.
    """
    shape = (int(num_classes), int(height), int(width))
    if min(shape) < 1:
        raise ValueError(f"a probability map needs positive dimensions, not {shape}")
    expected = DTYPE.itemsize * shape[0] * shape[1] * shape[2]
    actual = os.stat(path).st_size
    if actual != expected:
        raise ValueError(
            f"{path} holds {actual} bytes, but a {shape[0]}×{shape[1]}×{shape[2]} float32 map needs {expected}"
        )
    return np.fromfile(path, dtype=DTYPE).reshape(shape).astype(np.float32)
