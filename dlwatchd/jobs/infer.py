"""The `infer` and `infer-pixel` kinds: tiles in, class averages or .bin probability maps out.

One code path serves one request and a group of requests on the same model (their tiles share
batches). Decoding runs in a thread pool while the model computes; a failing request removes the
files it wrote and fails alone.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs.context import JobContext
from dlwatchd.protocol.requests import InferenceRequestBase, InferPixelRequest
from dlwatchd.spool.layout import JOB_ID_RE
from dlwatchd.spool.paths import resolve_read_path, resolve_write_dir

# Decoding runs beside forward passes that already use every core: on a small machine one decoding thread costs
# the runtime less than two (measured on 2 cores: 376 against 425 ms per 512 px tile).
_DECODE_THREADS = max(1, min(2, (os.cpu_count() or 2) // 2))
_DECODE_AHEAD = 8  # tiles decoded ahead of the forward passes: enough to hide decoding, bounded in memory
# Every file of a model folder a runtime may open (loading.CACHE_FILES, kept torch-free here).
_MODEL_FILES = ("model.onnx", "model.pt", "metadata.json", "preprocessing.json", "model.int8.onnx")
_DISK_MARGIN = 64 * 2**20


@dataclass
class _Request:
    """One request's part of a group: its outputs so far, and its failure if any."""

    ctx: JobContext
    request: InferenceRequestBase
    written: list[Path] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    output_paths: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    predictions: dict[str, list[float]] = field(default_factory=dict)
    folder: Path | None = None
    num_classes: int | None = None
    tiles_done: int = 0
    warnings: list[str] = field(default_factory=list)
    error: BaseException | None = None
    result: dict[str, Any] | None = None


def find_model_dir(ctx: JobContext, request: InferenceRequestBase) -> Path:
    """The model folder of `model_id` (in the model folders) or `model_path` (inside the read roots)."""
    if request.model_id is not None:
        return _by_id(ctx, request.model_id, "model_id")
    raw = request.model_path or ""
    if "/" not in raw and "\\\\" not in raw and JOB_ID_RE.match(raw.lower()):
        return _by_id(ctx, raw, "model_path")  # a bare id, as the reference client sometimes sends
    path = resolve_read_path(raw, ctx.read_roots, field="model_path")
    if path.is_file() and path.name in ("model.onnx", "model.pt"):
        path = path.parent
    if not path.is_dir():
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The model folder '{raw}' does not exist.", field="model_path")
    return _check_model_files(path, ctx.read_roots, "model_path")


def _check_model_files(folder: Path, roots: list[Path], where: str) -> Path:
    """`folder`, once every model file in it resolves inside `roots`.

    The runtimes open these files by name, following links, so a model.pt or model.onnx linked to a file
    outside the roots would otherwise be read although its folder passed the check. Raises E_PATH_NOT_ALLOWED.
    """
    for name in _MODEL_FILES:
        if os.path.lexists(folder / name):
            resolve_read_path(str(folder / name), roots, field=where)
    return folder


def _by_id(ctx: JobContext, model_id: str, where: str) -> Path:
    for models_dir in ctx.model_dirs:
        candidate = models_dir / model_id
        if (candidate / "metadata.json").exists() or (candidate / "model.onnx").exists():
            # models/ sits in a shared spool: an entry linked out of it must still land in a trusted folder.
            roots = [*ctx.model_dirs, *ctx.read_roots]
            return _check_model_files(resolve_read_path(str(candidate), roots, field=where), roots, where)
    raise DlwatchdError(
        ErrorCode.NOT_FOUND,
        f"There is no model '{model_id}'.",
        hint="Ask the `models` query for the ids this daemon knows.",
        field=where,
    )


def _decode(part: _Request, index: int, selected: list[int] | None, normalizer: Any) -> np.ndarray:
    from dlwatchd.engine.io import read_data_url, read_image, select_channels

    tile = part.request.tiles[index]
    if tile.data.startswith("data:"):
        image = read_data_url(tile.data, name=f"tile {tile.id}", keep_integers=True)
    else:
        path = resolve_read_path(tile.data, part.ctx.read_roots, field=f"tiles[{index}].data")
        image = read_image(path, keep_integers=True)
    image = select_channels(image, selected, name=f"tile {tile.id}")
    normalized, _ = normalizer.apply(image, channels_first=True)
    return normalized


def _prepare(part: _Request, model: Any, pool: ThreadPoolExecutor) -> list[Callable[[], Future[np.ndarray]]]:
    """Check the request against the model; returns one call per tile that starts decoding it in `pool`."""
    from dlwatchd.engine.inference import resolve_normalization
    from dlwatchd.engine.normalization import Normalizer

    request, info = part.request, model.info
    config = request.input_config
    if config.num_channels is not None and config.num_channels != model.in_channels:
        raise DlwatchdError(
            ErrorCode.CHANNELS,
            f"The request says {config.num_channels} channels, but the model was trained on {model.in_channels}.",
            field="input_config.num_channels",
        )
    sent = config.normalization.model_dump(exclude_none=True) if config.normalization else None
    normalization, warnings = resolve_normalization(info, sent, override=request.options.normalization_override)
    part.warnings += model.warnings + warnings
    selected = config.selected_channels or info.selected_channels or None
    normalizer = Normalizer(normalization)
    return [partial(pool.submit, _decode, part, i, selected, normalizer) for i in range(len(request.tiles))]


def _check_channels(part: _Request, image: np.ndarray, index: int, expected: int) -> None:
    if image.shape[0] != expected:
        tile = part.request.tiles[index]
        raise DlwatchdError(
            ErrorCode.CHANNELS,
            f"Tile '{tile.id}' has {image.shape[0]} channels after selection; the model needs {expected}.",
            hint="Set input_config.selected_channels to the channels the model was trained on.",
            field=f"tiles[{index}].data",
        )


def _output_dir(part: _Request) -> Path:
    request = part.request
    if isinstance(request, InferPixelRequest) and request.output_dir:
        folder = resolve_write_dir(request.output_dir, part.ctx.write_roots, field="output_dir")
    else:
        folder = part.ctx.outputs_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + _DISK_MARGIN:
        raise DlwatchdError(
            ErrorCode.DISK_FULL,
            f"The probability maps need {needed / 2**20:.0f} MB, but only {free / 2**20:.0f} MB are free in {folder}.",
            hint="Free disk space or choose another output_dir.",
        )


def _store(part: _Request, index: int, probabilities: np.ndarray) -> None:
    """Hand one tile's probabilities to its request: a .bin written at once, or its class averages."""
    from dlwatchd.artifacts.probabilities import safe_tile_filename, write_probabilities
    from dlwatchd.engine.inference import class_averages

    request, tile = part.request, part.request.tiles[index]
    part.num_classes = int(probabilities.shape[0])
    if isinstance(request, InferPixelRequest):
        if part.folder is None:
            part.folder = _output_dir(part)
            _check_space(part.folder, probabilities.nbytes * (len(request.tiles) - index))
        target = part.folder / f"{safe_tile_filename(tile.id)}.bin"
        part.written.append(target)
        part.entries.append(write_probabilities(target, probabilities, sha256=request.options.sha256))
        part.output_paths[tile.id] = str(target)
        part.shapes[tile.id] = list(probabilities.shape)
    else:
        part.predictions[tile.id] = class_averages(probabilities)
    part.tiles_done += 1
    total = len(request.tiles)
    part.ctx.progress(
        force=part.tiles_done == total, tiles_done=part.tiles_done, tiles_total=total, fraction=part.tiles_done / total
    )


def _conclude(part: _Request, model: Any) -> dict[str, Any]:
    """The result of one request once all its tiles are done (the manifest is written last)."""
    from dlwatchd.artifacts.manifest import write_manifest

    ctx = part.ctx
    if model.info.num_classes and part.num_classes and model.info.num_classes != part.num_classes:
        part.warnings.append(
            f"The model outputs {part.num_classes} classes but its metadata lists {model.info.num_classes}; "
            "the model output wins."
        )
    result: dict[str, Any] = {
        "num_classes": part.num_classes,
        "runtime": model.runtime,
        "device": model.device,
        "precision": model.precision,
    }
    if isinstance(part.request, InferPixelRequest):
        write_manifest(ctx.job_dir / "manifest.json", part.entries, base=ctx.job_dir)
        result.update(output_paths=part.output_paths, shape=part.shapes, manifest=str(ctx.job_dir / "manifest.json"))
    else:
        result["predictions"] = part.predictions
    if part.warnings:
        result["warnings"] = part.warnings
        for warning in part.warnings:
            ctx.warn("W_INFERENCE", warning)
    return result


def _fail(part: _Request, error: BaseException) -> None:
    """Record a request's failure and remove every output file it already wrote."""
    part.error = part.error or error
    for path in part.written:
        path.unlink(missing_ok=True)
    part.written.clear()


def run_infer_group(contexts: list[JobContext]) -> list[Any]:
    """Run inference requests that share a model; one result dict or exception per context, in order.

    Three stages overlap: tiles are decoded and normalized in a small thread pool, forward passes run here on
    batches of about `pixels_per_pass` pixels (possibly mixing requests), and each probability map is written
    by one writer thread while the next batch computes. At most two batches wait for the writer, so memory stays
    bounded whatever the request size.
    """
    from dlwatchd.engine.inference import pixels_per_pass
    from dlwatchd.engine.model_cache import ModelCache

    parts = [_Request(ctx, ctx.request) for ctx in contexts]  # type: ignore[arg-type]
    options = parts[0].request.options
    cache: ModelCache = contexts[0].resources.setdefault("models", ModelCache())
    try:
        model = cache.get(
            find_model_dir(contexts[0], parts[0].request), use_gpu=options.use_gpu, precision=options.precision
        )
    except Exception as exc:
        return [exc] * len(parts)
    budget = pixels_per_pass(model)
    lock = threading.Lock()  # a request's lists change in the writer thread and, on failure, here
    with (
        ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="decode") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="write") as writer,
    ):
        work: list[tuple[_Request, int, Callable[[], Future[np.ndarray]]]] = []
        for part in parts:
            try:
                work += [(part, index, start) for index, start in enumerate(_prepare(part, model, pool))]
            except Exception as exc:
                _fail(part, exc)
        decoding: dict[int, Future[np.ndarray]] = {}
        pending: list[list[Future[None]]] = []
        batch: list[tuple[_Request, int, np.ndarray]] = []
        for position, (part, index, _) in enumerate(work):
            for ahead in range(position, min(len(work), position + _DECODE_AHEAD)):
                if ahead not in decoding and work[ahead][0].error is None:
                    decoding[ahead] = work[ahead][2]()
            future = decoding.pop(position, None)
            if part.error is not None or future is None:
                if future is not None:
                    future.cancel()
            else:
                try:
                    part.ctx.check_cancel()
                    image = future.result()
                    _check_channels(part, image, index, model.in_channels)
                    batch.append((part, index, image))
                except Exception as exc:
                    with lock:
                        _fail(part, exc)
            pixels = sum(image.shape[1] * image.shape[2] for _, _, image in batch)
            if batch and (pixels >= budget or len(batch) >= options.max_batch or position == len(work) - 1):
                while len(pending) >= 2:  # back-pressure: the writer is two batches behind
                    wait(pending.pop(0))
                pending.append(_compute(model, batch, options, writer, lock))
                batch = []
        for futures in pending:
            wait(futures)
    for part in parts:
        if part.error is None:
            try:
                part.result = _conclude(part, model)
            except Exception as exc:
                _fail(part, exc)
    return [part.error if part.error is not None else part.result for part in parts]


def _compute(
    model: Any, batch: list[tuple[_Request, int, np.ndarray]], options: Any, writer: Executor, lock: threading.Lock
) -> list[Future[None]]:
    """One forward pass over `batch`; hands each tile's probabilities to the writer and returns its futures."""
    from dlwatchd.engine.inference import predict_probabilities

    live = [item for item in batch if item[0].error is None]
    if not live:
        return []
    try:
        probabilities = predict_probabilities(
            model, [image for _, _, image in live], tta=options.tta, max_batch=options.max_batch
        )
    except Exception as exc:
        with lock:
            for part, _, _ in live:
                _fail(part, exc)
        return []
    return [
        writer.submit(_store_guarded, part, index, probs, lock)
        for (part, index, _), probs in zip(live, probabilities, strict=True)
    ]


def _store_guarded(part: _Request, index: int, probabilities: np.ndarray, lock: threading.Lock) -> None:
    with lock:
        if part.error is not None:
            return
        try:
            _store(part, index, probabilities)
        except Exception as exc:
            _fail(part, exc)


def run_infer(ctx: JobContext, request: InferenceRequestBase) -> dict[str, Any]:
    """One request: a group of one."""
    outcome = run_infer_group([ctx])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
