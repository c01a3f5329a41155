"""The infer worker's cache of loaded models: reused while their files are unchanged, emptied by gpu-clear."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dlwatchd.engine.loading import CACHE_FILES, LoadedModel, load_model
from dlwatchd.errors import DlwatchdError, ErrorCode


class ModelCache:
    """Loaded models, least recently used first out, keyed by (real folder, use_gpu, precision).

    An entry is reused only while (mtime_ns, size) of model.onnx, model.pt, metadata.json and preprocessing.json
    are unchanged; otherwise the folder is loaded again. Models on one device share one forward lock. Thread-safe.
    """

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise DlwatchdError(ErrorCode.SCHEMA, f"The model cache needs room for at least one model, not {capacity}.")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bool, str], tuple[tuple, LoadedModel]] = OrderedDict()
        self._device_locks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model_dir: Path, *, use_gpu: bool, precision: str) -> LoadedModel:
        """The cached model for these settings, loaded (raising as load_model does) when absent or changed."""
        model_dir = Path(model_dir)
        if model_dir.is_file():
            model_dir = model_dir.parent
        key = (os.path.realpath(model_dir), bool(use_gpu), precision)
        with self._lock:
            # Taken before loading: a file replaced during the load shows as changed on the next get.
            signature = _signature(Path(key[0]))
            cached = self._entries.get(key)
            if cached is not None and cached[0] == signature:
                self._entries.move_to_end(key)
                return cached[1]
            self._entries.pop(key, None)
            model = load_model(Path(key[0]), use_gpu=use_gpu, precision=precision)
            model.lock = self._device_locks.setdefault(model.device, threading.Lock())
            self._entries[key] = (signature, model)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return model

    def clear(self) -> int:
        """Drop every entry; returns how many there were. Freeing device memory is the caller's next step."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def forget(self, model_dir: Path) -> int:
        """Drop every entry of `model_dir` (a deleted model); returns how many there were."""
        real = os.path.realpath(model_dir)
        with self._lock:
            keys = [key for key in self._entries if key[0] == real]
            for key in keys:
                del self._entries[key]
            return len(keys)

    def __len__(self) -> int:
        return len(self._entries)


def _signature(model_dir: Path) -> tuple:
    parts: list[tuple[int, int] | None] = []
    for name in CACHE_FILES:
        try:
            stat = os.stat(model_dir / name)
        except OSError:
            parts.append(None)
        else:
            parts.append((stat.st_mtime_ns, stat.st_size))
    return tuple(parts)
