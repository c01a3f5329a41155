"""Stable error codes of the spool protocol and the one exception type that carries them."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """The protocol's error codes (PROTOCOL.md section 4); the values never change."""

    BAD_JSON = "E_BAD_JSON"
    SCHEMA = "E_SCHEMA"
    PROTOCOL = "E_PROTOCOL"
    DUPLICATE_ID = "E_DUPLICATE_ID"
    TOO_LARGE = "E_TOO_LARGE"
    PATH_NOT_ALLOWED = "E_PATH_NOT_ALLOWED"
    NOT_FOUND = "E_NOT_FOUND"
    IMAGE_READ = "E_IMAGE_READ"
    IMAGE_TOO_LARGE = "E_IMAGE_TOO_LARGE"
    MASK_SHAPE = "E_MASK_SHAPE"
    MASK_LABELS = "E_MASK_LABELS"
    CHANNELS = "E_CHANNELS"
    EMPTY_DATASET = "E_EMPTY_DATASET"
    WEIGHTS_UNAVAILABLE = "E_WEIGHTS_UNAVAILABLE"
    UNSAFE_MODEL = "E_UNSAFE_MODEL"
    NONFINITE_INPUT = "E_NONFINITE_INPUT"
    NAN_LOSS = "E_NAN_LOSS"
    OUT_OF_MEMORY = "E_OUT_OF_MEMORY"
    DISK_FULL = "E_DISK_FULL"
    PERMISSION = "E_PERMISSION"
    WORKER_DIED = "E_WORKER_DIED"
    INTERRUPTED = "E_INTERRUPTED"
    SCHEDULER = "E_SCHEDULER"
    INTERNAL = "E_INTERNAL"

    def __str__(self) -> str:
        return self.value


class DlwatchdError(Exception):
    """An error a user can act on: a stable code, one readable sentence, and an optional hint.

    `field` names the request field at fault (a dotted path) when there is one.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        hint: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.field = field

    def __repr__(self) -> str:
        return f"DlwatchdError({self.code.value}, {self.message!r})"
