"""Inference: loading a model folder into ONNX Runtime or PyTorch, caching it, and tiles to probabilities (ENGINE §12).

Everything after the forward pass (padding, batching, softmax, test-time augmentation) lives here, outside the model,
so both runtimes give the same answer for the same normalized tiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlwatchd.artifacts.metadata import METADATA_NAME, PREPROCESSING_NAME, ModelInfo, read_model_info
from dlwatchd.engine.device import cpu_description, detect_device_type
from dlwatchd.engine.models import create_model
from dlwatchd.engine.normalization import NormalizationConfig
from dlwatchd.engine.quantize import INT8_NAME
from dlwatchd.engine.shape_sessions import ShapeSessions
from dlwatchd.engine.tiles import pad_to_multiple
from dlwatchd.errors import DlwatchdError, ErrorCode

ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.pt"
PRECISIONS = ("fp32", "bf16", "int8")
TTA_MODES = ("none", "flip", "d4")
NORMALIZATION_FIELDS = ("strategy", "per_channel", "clip_percentile", "min", "max", "scope", "stats")
CACHE_FILES = (ONNX_NAME, WEIGHTS_NAME, METADATA_NAME, PREPROCESSING_NAME, INT8_NAME)
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
GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "mps": "CoreMLExecutionProvider"}
OOM_TEXTS = ("out of memory", "failed to allocate memory")
# Pixels per forward pass: one 512x512 tile (or four of 256x256) on a CPU; sixteen 512x512 tiles on a GPU.
_CPU_PIXELS_PER_PASS = 512 * 512
_GPU_PIXELS_PER_PASS = 16 * 512 * 512


@dataclass
class LoadedModel:
    """A model ready to run: `forward` maps N×K×H×W float32 (H, W multiples of `size_divisor`) to N×C×H×W logits.

    `device` is "cuda:N", "mps", "coreml" or "cpu"; `providers` the ONNX Runtime providers in use ([] for PyTorch);
    `warnings` includes those from reading the metadata. Forward passes through one `lock` run one at a time.
    `fixed_shapes` holds the fixed-shape sessions of an ONNX model on the CPU (shape_sessions), else None.
    """

    info: ModelInfo
    runtime: str
    device: str
    providers: list[str]
    num_classes: int
    in_channels: int
    size_divisor: int
    precision: str
    warnings: list[str] = field(default_factory=list)
    lock: Any = field(default_factory=threading.Lock, repr=False)
    fixed_shapes: ShapeSessions | None = field(default=None, repr=False)
    _run: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of `batch` as a C-contiguous float32 array; runtime errors (including out of memory) propagate."""
        if self._run is None:
            raise DlwatchdError(ErrorCode.INTERNAL, f"The model {self.info.model_dir} was never loaded.")
        with self.lock:
            return np.ascontiguousarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)


def load_model(model_dir: Path, *, use_gpu: bool = True, precision: str = "fp32") -> LoadedModel:
    """Load `model_dir` (or the folder of a model.onnx/model.pt path) with the runtime §12.5 selects.

    ONNX Runtime when model.onnx exists, onnxruntime imports and precision is fp32, unless a GPU is to be used that
    this onnxruntime build has no provider for and model.pt exists; otherwise, or when the session fails (a warning
    says why), PyTorch from model.pt. Raises E_SCHEMA (field options.precision) for an unknown
    precision, E_NOT_FOUND when no usable model.onnx or model.pt exists, E_UNSAFE_MODEL when model.pt needs more
    than tensors to unpickle, E_SCHEMA when model.pt is unreadable or does not fit the stored architecture.
    """
    if precision not in PRECISIONS:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}.",
            field="options.precision",
        )
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    info = read_model_info(model_dir)
    warnings = list(info.warnings)
    onnx_path, weights_path = model_dir / ONNX_NAME, model_dir / WEIGHTS_NAME
    has_onnx, has_weights = onnx_path.is_file(), weights_path.is_file()
    if not has_onnx and not has_weights:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"The model folder {model_dir} has no {ONNX_NAME} or {WEIGHTS_NAME}, so there is nothing to run.",
        )
    if precision == "bf16" and not has_weights:
        warnings.append(f"bf16 needs {WEIGHTS_NAME}, which the model {info.model_id} lacks; it runs in fp32 on ONNX.")
        precision = "fp32"
    if precision == "int8":
        int8_path = model_dir / INT8_NAME
        if int8_path.is_file() and not (use_gpu and detect_device_type() == "cuda"):
            try:
                return _load_onnx(info, int8_path, False, warnings, precision="int8")
            except Exception as exc:
                warnings.append(f"ONNX Runtime could not load {int8_path} ({_first_line(exc)}); fp32 is used.")
        elif int8_path.is_file():
            warnings.append("int8 runs on the CPU only; on this CUDA device the model runs in fp32.")
        else:
            warnings.append(
                f"The model {info.model_id} has no {INT8_NAME} (trained by another version, or its int8 check "
                "failed); it runs in fp32."
            )
        precision = "fp32"
    # A CPU-only onnxruntime build next to a CUDA torch would leave the GPU idle; PyTorch on the GPU is faster.
    if has_onnx and precision == "fp32" and not (has_weights and _onnx_lacks_gpu(use_gpu)):
        try:
            return _load_onnx(info, onnx_path, use_gpu, warnings)
        except Exception as exc:  # any session failure falls back to PyTorch (§12.5); the reason is kept
            reason = f"ONNX Runtime could not load {onnx_path} ({type(exc).__name__}: {_first_line(exc)})"
            if not has_weights:
                raise DlwatchdError(
                    ErrorCode.NOT_FOUND,
                    f"{reason}, and there is no {WEIGHTS_NAME} to fall back to.",
                    hint="Copy the model folder again; model.onnx may be damaged or not an ONNX file.",
                ) from exc
            warnings.append(f"{reason}; the PyTorch runtime is used instead.")
    return _load_torch(info, weights_path, use_gpu, precision, warnings)


def _onnx_lacks_gpu(use_gpu: bool) -> bool:
    """True when a GPU is to be used but onnxruntime imports without its provider."""
    kind = detect_device_type() if use_gpu else "cpu"
    if kind not in GPU_PROVIDERS:
        return False
    try:
        import onnxruntime
    except ImportError:
        return True
    return GPU_PROVIDERS[kind] not in onnxruntime.get_available_providers()


def _load_onnx(info: ModelInfo, path: Path, use_gpu: bool, warnings: list[str], precision: str = "fp32") -> LoadedModel:
    import onnxruntime

    kind = detect_device_type() if use_gpu else "cpu"
    wanted = GPU_PROVIDERS.get(kind)
    providers: list[Any] = ["CPUExecutionProvider"]
    if wanted in onnxruntime.get_available_providers():
        providers.insert(0, (wanted, {"device_id": torch.cuda.current_device()} if kind == "cuda" else {}))
    session = onnxruntime.InferenceSession(str(path), sess_options=session_options(), providers=providers)
    used = list(session.get_providers())
    if len(providers) > 1 and used[0] != wanted:
        warnings.append(f"ONNX Runtime could not start {wanted}; the model runs on the CPU.")
    device = "cpu"
    if used[0] == "CUDAExecutionProvider":
        device = f"cuda:{torch.cuda.current_device()}"
    elif used[0] == "CoreMLExecutionProvider":
        device = "coreml"
    graph_input, graph_output = session.get_inputs()[0], session.get_outputs()[0]
    in_channels = _checked_count(info.in_channels, _static_dim(graph_input.shape), "input channels", path, warnings)
    num_classes = _checked_count(info.num_classes, _static_dim(graph_output.shape), "classes", path, warnings)
    input_name, output_name = graph_input.name, graph_output.name

    fixed = None
    if used[0] == "CPUExecutionProvider":
        loaded = _identity(os.stat(path))

        def build(overrides: dict[str, int]) -> Any:
            # Built later, in the background: the file must still be the one the dynamic session was made from.
            with open(path, "rb") as handle:
                if _identity(os.fstat(handle.fileno())) != loaded:
                    raise RuntimeError(f"{path} changed since the model was loaded")
                data = handle.read()
            return onnxruntime.InferenceSession(
                data, sess_options=session_options(overrides), providers=["CPUExecutionProvider"]
            )

        fixed = ShapeSessions(graph_input.shape, build, label=f"of {info.model_id} ")

    def run(batch: np.ndarray) -> np.ndarray:
        chosen = fixed.session_for(batch.shape) if fixed is not None else None
        if fixed is not None and chosen is not None:
            try:
                return chosen.run([output_name], {input_name: batch})[0]
            except Exception as exc:  # a shape-specific failure must not fail the tile: the dynamic session decides
                fixed.drop(batch.shape, exc)
        return session.run([output_name], {input_name: batch})[0]

    return LoadedModel(
        info,
        "onnx",
        device,
        used,
        num_classes,
        in_channels,
        info.size_divisor,
        precision,
        warnings,
        fixed_shapes=fixed,
        _run=run,
    )


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def session_options(overrides: dict[str, int] | None = None) -> Any:
    """dlwatchd's ONNX Runtime session options; `overrides` fixes named input dimensions (shape_sessions)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # As many threads as torch uses (one per physical core, or OMP_NUM_THREADS), and unpinned: left alone, ONNX
    # Runtime pins the threads of every session in every process to the same cores, which made one session alone
    # 4-5 % faster here but a fixed-shape session taking turns with others 20 % slower (docs/engine.md).
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, size in (overrides or {}).items():
        options.add_free_dimension_override_by_name(name, size)
    return options


def _load_torch(info: ModelInfo, path: Path, use_gpu: bool, precision: str, warnings: list[str]) -> LoadedModel:
    state = _read_state_dict(path)
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor) and value.dim() == 4]
    # The stem is the first conv of the encoder and the segmentation head the last conv: smp's key order.
    stem = tensors[0].shape[1] if tensors else None
    head = [value for key, value in state.items() if key.startswith("segmentation_head.") and value.dim() == 4]
    in_channels = _checked_count(info.in_channels, stem, "input channels", path, warnings)
    num_classes = _checked_count(info.num_classes, head[-1].shape[0] if head else None, "classes", path, warnings)
    model = create_model(info.architecture, info.encoder, in_channels, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The weights in {path} do not fit a {info.architecture} on {info.encoder}: {_first_line(exc)}",
            hint="Check architecture.type and architecture.backbone in the model's metadata.json.",
        ) from exc
    kind = detect_device_type() if use_gpu else "cpu"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if kind == "cuda" else kind)
    model = model.to(device).eval()
    channels_last = device.type in ("cpu", "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if precision == "bf16" and not _bf16_native(device):
        warnings.append(f"This {device.type.upper()} has no native bf16; bf16 is emulated and may be slower than fp32.")

    def run(batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(batch).to(device)
        if channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = model(tensor)
        return logits.float().cpu().numpy()

    return LoadedModel(
        info, "torch", str(device), [], num_classes, in_channels, info.size_divisor, precision, warnings, _run=run
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global beyond tensors and plain containers: the file wanted to run code.
        raise DlwatchdError(
            ErrorCode.UNSAFE_MODEL,
            f"{path} holds more than tensors and was not loaded: {_first_line(exc)}",
            hint="Only state dicts saved with torch.save(model.state_dict()) are accepted.",
        ) from exc
    except Exception as exc:
        raise DlwatchdError(ErrorCode.SCHEMA, f"{path} is not a readable PyTorch file: {_first_line(exc)}") from exc
    # Some trainers wrap the state dict in a checkpoint dict; the tensors are the same.
    for key in ("state_dict", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise DlwatchdError(ErrorCode.SCHEMA, f"{path} does not hold a state dict (a mapping of names to tensors).")
    return loaded


def _checked_count(stored: int | None, actual: int | None, what: str, path: Path, warnings: list[str]) -> int:
    """The weights' count wins over the metadata's; a disagreement is worth one warning."""
    if actual is None:
        if stored is None:
            raise DlwatchdError(ErrorCode.SCHEMA, f"Neither the metadata nor {path} says how many {what} it has.")
        return stored
    if stored is not None and stored != actual:
        warnings.append(f"The metadata says {stored} {what} but {path.name} has {actual}; {actual} is used.")
    return int(actual)


def _static_dim(shape: list[Any]) -> int | None:
    value = shape[1] if len(shape) > 1 else None
    return value if isinstance(value, int) and value > 0 else None


def _bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(cpu_description()["bf16_native"])
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


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
