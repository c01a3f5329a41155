"""Inference: tiles to probabilities with a loaded model (ENGINE §12); loading itself is in `loading`.

Everything after the forward pass (padding, batching, softmax, test-time augmentation) lives here, outside the model,
so both runtimes give the same answer for the same normalized tiles.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from dlwatchd.artifacts.metadata import ModelInfo
from dlwatchd.engine.loading import LoadedModel
from dlwatchd.engine.normalization import NormalizationConfig
from dlwatchd.engine.tiles import pad_to_multiple
from dlwatchd.errors import DlwatchdError, ErrorCode

TTA_MODES = ("none", "flip", "d4")
NORMALIZATION_FIELDS = ("strategy", "per_channel", "clip_percentile", "min", "max", "scope", "stats")
# (transpose H and W first, then flip these axes of a C×H×W array); the first four are the "flip" set.
TRANSFORMS = (
    (False, ()),
    (False, (2,)),
    (False, (1,)),
    (False, (1, 2)),
    (True, ()),
    (True, (2,)),
    (True, (1,)),
    (True, (1, 2)),
)
OOM_TEXTS = ("out of memory", "failed to allocate memory")
# Pixels per forward pass: one 512x512 tile (or four of 256x256) on a CPU; sixteen 512x512 tiles on a GPU.
_CPU_PIXELS_PER_PASS = 512 * 512
_GPU_PIXELS_PER_PASS = 16 * 512 * 512


def resolve_normalization(
    info: ModelInfo, sent: dict[str, Any] | None, *, override: bool
) -> tuple[NormalizationConfig, list[str]]:
    """The normalization to apply (§12.3) and one warning per sent field that differs from the stored value.

    Per field: the model's stored value, else the request's, else the default; with `override` the request's sent
    value comes first. `sent` holds only the fields the request sent (None counts as not sent). Strategy and scope
    compare case-insensitively, numbers by value. Raises E_SCHEMA for a combination NormalizationConfig rejects.
    """
    stored = {key: value for key, value in (info.normalization or {}).items() if value is not None}
    given = {key: value for key, value in (sent or {}).items() if value is not None and key in NORMALIZATION_FIELDS}
    merged: dict[str, Any] = {}
    warnings: list[str] = []
    for key in NORMALIZATION_FIELDS:
        if key in stored and key in given and _canonical(stored[key]) != _canonical(given[key]):
            if override:
                warnings.append(
                    f"normalization.{key}: the request's {json.dumps(given[key])} overrides the model's stored "
                    f"{json.dumps(stored[key])} (normalization_override is on)."
                )
            else:
                warnings.append(
                    f"normalization.{key}: the request sent {json.dumps(given[key])} but the model {info.model_id} was "
                    f"trained with {json.dumps(stored[key])}; the trained value is used."
                )
        first, second = (given, stored) if override else (stored, given)
        if key in first:
            merged[key] = first[key]
        elif key in second:
            merged[key] = second[key]
    return NormalizationConfig.from_dict(merged), warnings


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return tuple(_canonical(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(key), _canonical(item)) for key, item in value.items()))
    return value


def pixels_per_pass(model: LoadedModel) -> int:
    """How many input pixels one forward pass should hold: small on a CPU, where a batch of big tiles only thrashes
    the caches without running faster per tile; large on a GPU, which needs big batches to be busy."""
    return _GPU_PIXELS_PER_PASS if model.device.startswith("cuda") else _CPU_PIXELS_PER_PASS


def predict_probabilities(
    model: LoadedModel, images: list[np.ndarray], *, tta: str = "none", max_batch: int = 16
) -> list[np.ndarray]:
    """Softmax probabilities (C×H×W float32) for normalized K×H×W images of any sizes, in input order.

    Each image is padded bottom/right to the divisor and cropped back; equal padded shapes share batches of at most
    `max_batch`. `tta` "flip" averages identity, h, v and hv; "d4" adds the four transposed ones for square tiles.
    Raises E_SCHEMA (options.tta / options.max_batch) for bad options, E_CHANNELS for a wrong channel count,
    E_OUT_OF_MEMORY when even one tile at a time does not fit.
    """
    if tta not in TTA_MODES:
        raise DlwatchdError(
            ErrorCode.SCHEMA, f"Unknown tta {tta!r}; valid: {', '.join(TTA_MODES)}.", field="options.tta"
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"max_batch must be a positive whole number, not {max_batch!r}.",
            field="options.max_batch",
        )
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    for index, array in enumerate(arrays):
        if array.ndim != 3 or array.shape[0] != model.in_channels:
            raise DlwatchdError(
                ErrorCode.CHANNELS,
                f"Tile {index} has shape {array.shape}, but the model takes {model.in_channels}×H×W.",
            )
    if tta == "none":
        return _predict(model, arrays, max_batch)
    transforms = TRANSFORMS if tta == "d4" else TRANSFORMS[:4]
    sums = [np.zeros((model.num_classes, *array.shape[1:]), dtype=np.float32) for array in arrays]
    counts = [0] * len(arrays)
    for transpose, axes in transforms:
        # Transposing a non-square tile changes its shape; §12.8 keeps d4 to the four flips there.
        chosen = [i for i, array in enumerate(arrays) if not transpose or array.shape[1] == array.shape[2]]
        inputs = [_transform(arrays[i], transpose, axes) for i in chosen]
        for i, probabilities in zip(chosen, _predict(model, inputs, max_batch), strict=True):
            sums[i] += _inverse(probabilities, transpose, axes)
            counts[i] += 1
    return [total / np.float32(count) for total, count in zip(sums, counts, strict=True)]


def _transform(array: np.ndarray, transpose: bool, axes: tuple[int, ...]) -> np.ndarray:
    if transpose:
        array = array.transpose(0, 2, 1)
    return np.flip(array, axes) if axes else array


def _inverse(array: np.ndarray, transpose: bool, axes: tuple[int, ...]) -> np.ndarray:
    if axes:
        array = np.flip(array, axes)
    return array.transpose(0, 2, 1) if transpose else array


def _predict(model: LoadedModel, arrays: list[np.ndarray], max_batch: int) -> list[np.ndarray]:
    divisor = model.size_divisor
    padded = [pad_to_multiple(torch.from_numpy(np.ascontiguousarray(a)), None, divisor, 0)[0].numpy() for a in arrays]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(padded):
        groups.setdefault(array.shape, []).append(index)
    results: list[np.ndarray | None] = [None] * len(arrays)
    batch_size = max_batch
    for indices in groups.values():
        start = 0
        while start < len(indices):
            chunk = indices[start : start + batch_size]
            batch = np.stack([padded[i] for i in chunk])
            try:
                logits = model.forward(batch)
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                _release_cuda_cache()
                if batch_size == 1:
                    raise DlwatchdError(
                        ErrorCode.OUT_OF_MEMORY,
                        f"The device ran out of memory on a single {'×'.join(map(str, batch.shape[1:]))} tile.",
                        hint="Send smaller tiles, free the device (gpu-clear), or set use_gpu to false.",
                    ) from exc
                batch_size //= 2  # kept for the rest of the request: the next batches would fail the same way
                continue
            expected = (len(chunk), model.num_classes, *batch.shape[2:])
            if logits.shape != expected:
                raise DlwatchdError(
                    ErrorCode.SCHEMA,
                    f"The model {model.info.model_id} answered shape {logits.shape} where {expected} was expected.",
                )
            for position, index in enumerate(chunk):
                height, width = arrays[index].shape[1:]
                results[index] = softmax(logits[position, :, :height, :width])
            start += len(chunk)
    return [result for result in results if result is not None]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the class axis (0) of C×H×W logits, in float32, max-subtracted.

    One copy of the logits (which may be a view into the runtime's output buffer), then every step in place.
    """
    probabilities = np.array(logits, dtype=np.float32, order="C")
    probabilities -= probabilities.max(axis=0, keepdims=True)
    np.exp(probabilities, out=probabilities)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    return probabilities


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in OOM_TEXTS)


def _release_cuda_cache() -> None:
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass  # releasing is an optimisation; the smaller batch is retried either way


def class_averages(probabilities: np.ndarray) -> list[float]:
    """Per-class mean of a C×H×W probability map over H×W, as C plain floats (summing to about 1)."""
    return [float(value) for value in np.asarray(probabilities).mean(axis=(1, 2), dtype=np.float64)]
