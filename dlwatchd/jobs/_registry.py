"""The registry of job kinds, filled by `register_kind` (built-in kinds and plugins alike)."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from dlwatchd.errors import DlwatchdError, ErrorCode

Lane = Literal["train", "infer", "query"]
OnInterrupt = Literal["retry", "resume", "fail"]
LANES: tuple[Lane, ...] = ("train", "infer", "query")


@dataclass(frozen=True)
class JobKind:
    """One request kind.

    `handler` is "module:function" run inside a worker of `lane`, or inside the supervisor when `lane` is
    None (pure functions only: the supervisor never loads torch). No handler and no lane: the supervisor
    answers the kind with its own state (health, gpu-clear). No handler with a lane: the kind is not
    available in this version and is rejected.
    `on_interrupt` says what a restart does with a job whose run was cut short: run it again (at most
    `max_attempts` runs in all), resume it from its checkpoint, or fail it.
    """

    name: str
    request_model: type[BaseModel]
    lane: Lane | None
    handler: str | None
    on_interrupt: OnInterrupt = "retry"
    max_attempts: int = 2
    description: str = ""
    # "module:function" taking a list of contexts and returning one result or exception per job; jobs
    # with the same `batch_key` (set at intake) may then run together, e.g. inferences on one model.
    group_handler: str | None = None

    @property
    def available(self) -> bool:
        return self.lane is None or self.handler is not None


class KindRegistry:
    """Kinds by name; a duplicate registration raises, an unknown name raises listing the valid ones."""

    def __init__(self) -> None:
        self._kinds: dict[str, JobKind] = {}

    def register(self, kind: JobKind) -> JobKind:
        if kind.name in self._kinds:
            raise ValueError(f"job kind {kind.name!r} is already registered")
        self._kinds[kind.name] = kind
        return kind

    def get(self, name: str) -> JobKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                f"Unknown request kind {name!r}; valid kinds are: {', '.join(sorted(self._kinds))}.",
                field="kind",
            ) from None

    def require_available(self, name: str) -> JobKind:
        """The kind, or E_PROTOCOL when this version has no engine for it (never a faked answer)."""
        from dlwatchd import __version__

        kind = self.get(name)
        if not kind.available:
            raise DlwatchdError(
                ErrorCode.PROTOCOL,
                f"The '{name}' request kind is not available in dlwatchd {__version__}.",
                hint="Upgrade dlwatchd on the machine that serves this spool.",
                field="kind",
            )
        return kind

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._kinds if fnmatch.fnmatchcase(n, pattern))

    def kinds(self) -> Iterable[JobKind]:
        return self._kinds.values()


def build_registry(plugins: Iterable[str] = ()) -> KindRegistry:
    """A registry with every built-in kind, then each plugin module's `register_kinds(registry)`.

    Raises DlwatchdError(E_NOT_FOUND) when a plugin module cannot be imported.
    """
    from dlwatchd.jobs.builtin import register_builtin_kinds

    registry = KindRegistry()
    register_builtin_kinds(registry)
    for module_name in plugins:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DlwatchdError(
                ErrorCode.NOT_FOUND,
                f"The plugin module {module_name!r} cannot be imported: {exc}.",
                hint="Check DLWATCHD_PLUGINS / the 'plugins' setting and the Python path.",
            ) from exc
        module.register_kinds(registry)
    return registry


def resolve_handler(path: str) -> Callable[..., Any]:
    """The callable named by "module:function"."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
