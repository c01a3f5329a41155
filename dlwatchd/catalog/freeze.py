"""Which encoder depths to freeze for a dataset size (ENGINE.md section 7.3)."""

from __future__ import annotations

from typing import Any

from dlwatchd.catalog.encoders import is_histology
from dlwatchd.errors import DlwatchdError, ErrorCode

# Depths 0..4, True = freeze. ImageNet features turn task-specific with depth, so more data frees
# deeper blocks; histology weights are tissue-specific throughout, so fewer depths stay frozen.
_IMAGENET: dict[str, tuple[bool, ...]] = {
    "small": (True, True, True, True, False),
    "medium": (True, True, True, False, False),
    "large": (True, True, False, False, False),
}
_HISTOLOGY: dict[str, tuple[bool, ...]] = {
    "small": (True, True, False, False, False),
    "medium": (True, False, False, False, False),
    "large": (False, False, False, False, False),
}
DATASET_SIZES: tuple[str, ...] = tuple(_IMAGENET)


def freeze_recommendations(dataset_size: str, encoder: str | None = None) -> dict[str, Any]:
    """`{"dataset_size": s, "recommendations": {"0": bool, ..., "4": bool}}` for `dataset_size`.

    The histology table applies when `encoder` is a histology encoder. Keys are strings because
    clients apply them by depth. Raises DlwatchdError(E_SCHEMA, field "dataset_size") for a size
    other than small, medium or large.
    """
    if dataset_size not in _IMAGENET:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Unknown dataset_size {dataset_size!r}; use one of: {', '.join(DATASET_SIZES)}.",
            hint="small is under 500 tiles, medium 500 to 5000, large over 5000.",
            field="dataset_size",
        )
    table = _HISTOLOGY if is_histology(encoder) else _IMAGENET
    flags = table[dataset_size]
    return {"dataset_size": dataset_size, "recommendations": {str(depth): flag for depth, flag in enumerate(flags)}}
