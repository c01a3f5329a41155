"""ONNX Runtime CPU sessions with the input shape fixed, for the batch shapes a model sees again and again.

A model exported with dynamic height and width computes each decoder upsampling size from tensor shapes at run time.
That keeps ONNX Runtime's CPU layout optimizer from carrying its blocked (NCHWc) layout through the decoder: every
upsampling converts back to the plain layout and out again. With the input shape fixed when the session is created,
those sizes fold into constants and the graph stays blocked from end to end (unet/resnet34: 117 nodes become 58, of
which one layout conversion instead of 15). The outputs are bit-identical and a 512 px tile runs 1.01-1.10x as fast
(paired runs, docs/engine.md), in fp32 and int8 alike. The batch size is part of the shape, so every batch size is a
shape of its own.

Such a session costs about 0.25 s to build and 280 MB (unet/resnet34 fp32, arena included), so at most `LIMIT` are
kept per model, for the shapes seen most: a shape gets one once it has been seen `SIGHTINGS` times, while there is
room or when it has been seen more than twice as often as the least seen shape that has one (which then makes way).
The margin keeps shapes that come equally often, such as the batch sizes of concurrent requests, from taking turns.
Counts are halved every `AGE_EVERY` sightings, so a shape that is no longer sent loses its place. Sessions are built
in a background thread, one at a time, while the dynamic session goes on serving.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger("dlwatchd.inference")

LIMIT = 3
SIGHTINGS = 2
AGE_EVERY = 512
# Shapes counted at most (the least recently seen go first): a stream of odd tile sizes cannot grow the table.
_COUNTED = 64

Shape = tuple[int, ...]


def dimension_overrides(dims: Sequence[Any], shape: Shape) -> dict[str, int] | None:
    """{symbolic dimension name: size} that fixes a graph input declared as `dims` to `shape`, or None when there is
    nothing to fix (no dynamic dimension) or it cannot be fixed by name (an unnamed dynamic dimension, one name bound
    to two sizes, a fixed size that disagrees)."""
    if len(dims) != len(shape):
        return None
    overrides: dict[str, int] = {}
    for dim, size in zip(dims, shape, strict=True):
        if isinstance(dim, int):
            if dim != size:
                return None
        elif isinstance(dim, str) and dim:
            if overrides.setdefault(dim, size) != size:
                return None
        else:
            return None
    return overrides or None


class ShapeSessions:
    """Fixed-shape sessions next to a dynamic one; `session_for(shape)` says which to run. Thread-safe.

    `build(overrides)` creates a session with the given free dimension overrides; it runs in a daemon thread, one
    build at a time. A build that fails is logged once and that shape keeps the dynamic session.
    """

    def __init__(self, dims: Sequence[Any], build: Callable[[dict[str, int]], Any], *, label: str = "") -> None:
        self._dims = list(dims)
        self._build = build
        self._label = label
        self._ready: OrderedDict[Shape, Any] = OrderedDict()
        self._seen: OrderedDict[Shape, int] = OrderedDict()
        self._pending: tuple[Shape, Future[Any]] | None = None
        self._refused: set[Shape] = set()
        self._sightings = 0
        self._lock = threading.Lock()

    def session_for(self, shape: Shape) -> Any | None:
        """The fixed session for `shape` when one is ready, else None (run the dynamic session); counts the shape."""
        with self._lock:
            self._collect()
            seen = self._count(shape)
            session = self._ready.get(shape)
            if session is not None or shape in self._refused or self._pending is not None or seen < SIGHTINGS:
                return session
            if len(self._ready) >= LIMIT and seen <= 2 * self._seen.get(self._least_seen(), 0):
                return None
            overrides = dimension_overrides(self._dims, shape)
            if overrides is None:
                self._refused.add(shape)
            else:
                self._start(shape, overrides)
            return None

    def drop(self, shape: Shape, reason: BaseException) -> None:
        """Stop using the fixed session of `shape` (it failed to run); the dynamic session serves it from now on."""
        with self._lock:
            self._ready.pop(shape, None)
            self._refused.add(shape)
        logger.warning("fixed-shape ONNX session %s%s failed (%s); the dynamic one is used", self._label, shape, reason)

    def shapes(self) -> list[Shape]:
        """The shapes that have a ready session, in the order they got it."""
        with self._lock:
            self._collect()
            return list(self._ready)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a build in progress (for tests that want a settled state)."""
        pending = self._pending
        if pending is not None:
            pending[1].exception(timeout)

    def _start(self, shape: Shape, overrides: dict[str, int]) -> None:
        future: Future[Any] = Future()

        def build() -> None:
            try:
                future.set_result(self._build(overrides))
            except BaseException as exc:  # reported by _collect in the caller's thread
                future.set_exception(exc)

        self._pending = (shape, future)
        threading.Thread(target=build, name=f"onnx-shape-{'x'.join(map(str, shape))}", daemon=True).start()

    def _count(self, shape: Shape) -> int:
        seen = self._seen.pop(shape, 0) + 1
        self._seen[shape] = seen
        for stale in [key for key in self._seen if key not in self._ready][: max(0, len(self._seen) - _COUNTED)]:
            del self._seen[stale]
        self._sightings += 1
        if self._sightings % AGE_EVERY == 0:
            for key in self._seen:
                self._seen[key] //= 2
        return seen

    def _least_seen(self) -> Shape:
        return min(self._ready, key=lambda key: self._seen.get(key, 0))

    def _collect(self) -> None:
        if self._pending is None or not self._pending[1].done():
            return
        shape, future = self._pending
        self._pending = None
        exc = future.exception()
        if exc is not None:
            self._refused.add(shape)
            logger.warning("no fixed-shape ONNX session %s%s (%s); the dynamic one is used", self._label, shape, exc)
            return
        if len(self._ready) >= LIMIT:
            del self._ready[self._least_seen()]
        self._ready[shape] = future.result()
        logger.info("fixed-shape ONNX session %s%s ready", self._label, shape)
