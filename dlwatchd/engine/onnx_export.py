"""ONNX export of a trained model with a runtime check against PyTorch (ENGINE §11.2).

The export works on a CPU float32 copy, so the caller's model (often still on the GPU, in train mode, maybe
channels-last or half precision) is never moved or switched. A model that does not export or whose ONNX graph
disagrees with PyTorch is reported, not raised: the model is still published, only without `model.onnx`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dlwatchd.spool.atomic import fsync_dir, temp_sibling

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
RELATIVE_TOLERANCE = 1e-4
VERIFY_SEED = 0
MAX_ERROR_CHARS = 300
# Tails of the exporter's messages that say nothing about the model (a plea for pull requests, an IR value dump).
TORCH_BOILERPLATE = ("Please feel free to request support", "[Caused by the value")


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    *,
    in_channels: int,
    input_size: tuple[int, int],
    size_divisor: int = 32,
    opset: int = 17,
) -> dict[str, Any]:
    """Export `model` to `path` and verify it with ONNX Runtime; returns the metadata's `onnx` block.

    `input_size` is (height, width), rounded up to `size_divisor` for the traced shape (1, K, H, W). Verified
    at that shape and at (2, K, H + d, W): pass when max|onnx - torch| <= 1e-4 * max(1, max|torch|) at both.
    Success: {"opset", "verified": True, "max_abs_diff", "exported_shape"}, `path` replaced atomically.
    Any failure: {"opset", "verified": False, "error"} and no file at `path`; never raises for model problems.
    """
    height, width = (_round_up(side, size_divisor) for side in input_size)
    shapes = [(1, in_channels, height, width), (2, in_channels, height + size_divisor, width)]
    tmp = temp_sibling(path)
    try:
        duplicate = _cpu_eval_copy(model)
        _trace_to_file(duplicate, tmp, shapes[0], opset)
        max_diff = _verify(duplicate, tmp, shapes)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as exc:  # any model problem becomes a report; KeyboardInterrupt still ends the job
        _remove(tmp)
        _remove(path)  # a stale model.onnx must not outlive a failed export of the weights it sits next to
        return {"opset": opset, "verified": False, "error": _sentence(exc)}
    fsync_dir(path.parent)
    return {"opset": opset, "verified": True, "max_abs_diff": max_diff, "exported_shape": list(shapes[0])}


class ExportCheckFailed(Exception):
    """The exported graph ran but disagreed with PyTorch; the message is the readable reason."""


def _round_up(side: int, divisor: int) -> int:
    return int(math.ceil(int(side) / divisor) * divisor)


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    # Pre-filling deepcopy's memo with CPU float32 clones means no second copy of the weights is ever made on the
    # caller's device (a GPU near its memory limit after training would otherwise fail here).
    memo: dict[int, Any] = {}
    parameter_ids = {id(parameter) for parameter in model.parameters()}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        clone = tensor.detach().to("cpu", copy=True)
        if clone.is_floating_point():
            clone = clone.to(torch.float32)
        clone = clone.contiguous()
        memo[id(tensor)] = torch.nn.Parameter(clone, requires_grad=False) if id(tensor) in parameter_ids else clone
    duplicate = copy.deepcopy(model, memo)
    duplicate.to(torch.float32).to(memory_format=torch.contiguous_format)
    return duplicate.eval()


def _trace_to_file(model: torch.nn.Module, path: Path, shape: tuple[int, ...], opset: int) -> None:
    example = torch.zeros(shape, dtype=torch.float32)
    options: dict[str, Any] = {}
    # `dynamo=False` keeps the TorchScript exporter (no onnxscript dependency); older torch has no such keyword.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
        # The deprecation notice of the TorchScript exporter and tracer warnings would flood the job log once per
        # model; a size-dependent trace is caught by the second verification shape instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dict(DYNAMIC_AXES), OUTPUT_NAME: dict(DYNAMIC_AXES)},
            opset_version=opset,
            do_constant_folding=True,
            **options,
        )


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    # The TorchScript exporter always switches its C++ log on (it tests a function object for truth) and dumps the
    # whole IR graph to file descriptor 1 when a model fails to export, pages per model. Nothing in a worker talks
    # over stdout (jobs report through a pipe, logs go to stderr), so fd 1 is muted for the length of the export.
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to mute
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _verify(model: torch.nn.Module, path: Path, shapes: Sequence[tuple[int, ...]]) -> float:
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))  # by path, so graphs with external data over 2 GB are checked too
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    worst = 0.0
    for shape in shapes:
        # Uniform [0, 1) is the range every normalization strategy maps into (ENGINE §4.1).
        sample = torch.rand(shape, generator=generator, dtype=torch.float32)
        with torch.no_grad():
            expected = model(sample).numpy()
        try:
            actual = session.run([OUTPUT_NAME], {INPUT_NAME: sample.numpy()})[0]
        except Exception as exc:
            raise ExportCheckFailed(
                f"ONNX Runtime could not run the exported model at input shape {_shape(shape)}: {_first_line(exc)}"
            ) from exc
        if actual.shape != expected.shape:
            raise ExportCheckFailed(
                f"The exported model gives output shape {_shape(actual.shape)} at input shape {_shape(shape)}, "
                f"PyTorch gives {_shape(expected.shape)}."
            )
        scale = float(abs(expected).max()) if expected.size else 0.0
        diff = float(abs(actual - expected).max()) if expected.size else 0.0
        tolerance = RELATIVE_TOLERANCE * max(1.0, scale)
        if not diff <= tolerance:  # also false for NaN
            raise ExportCheckFailed(
                f"The exported model differs from PyTorch by {diff:.3g} at input shape {_shape(shape)}, "
                f"more than the tolerance {tolerance:.3g}."
            )
        worst = max(worst, diff)
    return worst


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # already absent, or a folder we did not create: nothing of ours to clean


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(int(side)) for side in shape)


def _first_line(exc: BaseException) -> str:
    # Tracer errors carry pages of graph dump; the first line says what went wrong.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for boilerplate in TORCH_BOILERPLATE:
        text = text.split(boilerplate)[0].strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _sentence(exc: BaseException) -> str:
    if isinstance(exc, ExportCheckFailed):
        return str(exc)
    return f"ONNX export failed ({type(exc).__name__}): {_first_line(exc)}"
