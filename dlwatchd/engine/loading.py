"""Loading a model folder into ONNX Runtime or PyTorch (ENGINE §12.5): which runtime, which file, which precision.

The result, a LoadedModel, maps normalized batches to logits; everything after the forward pass is in inference.
"""

from __future__ import annotations

import contextlib
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
from dlwatchd.engine.quantize import INT8_NAME
from dlwatchd.engine.shape_sessions import ShapeSessions
from dlwatchd.errors import DlwatchdError, ErrorCode

ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.pt"
PRECISIONS = ("fp32", "bf16", "int8")
CACHE_FILES = (ONNX_NAME, WEIGHTS_NAME, METADATA_NAME, PREPROCESSING_NAME, INT8_NAME)
GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "mps": "CoreMLExecutionProvider"}


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
