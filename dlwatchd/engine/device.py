"""Device detection (CUDA > MPS > CPU), the device-info answer and memory figures (ENGINE.md section 13)."""

from __future__ import annotations

import gc
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("dlwatchd.device")

_MIB = 1024 * 1024


def detect_device_type() -> str:
    """ "cuda", "mps" or "cpu"; any failure while probing counts as absent."""
    try:
        if torch.cuda.is_available():
            return "cuda"
    except Exception:  # a broken driver must not take the daemon down
        logger.warning("CUDA probe failed; using the CPU", exc_info=True)
    try:
        if torch.backends.mps.is_available():
            return "mps"
    except Exception:
        logger.warning("MPS probe failed", exc_info=True)
    return "cpu"


@lru_cache(maxsize=1)
def cpu_description() -> dict[str, Any]:
    """The CPU's model name, logical core count and whether it computes bf16 natively."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) or (
        platform.system() == "Darwin" and platform.machine() == "arm64"
    )
    return {
        "cpu_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16,
    }


def device_summary() -> dict[str, Any]:
    """The few fields a heartbeat carries: which device the workers use."""
    kind = detect_device_type()
    if kind == "cuda":
        index = torch.cuda.current_device()
        return {"device_type": "cuda", "device_string": f"cuda:{index}", "name": torch.cuda.get_device_name(index)}
    if kind == "mps":
        return {"device_type": "mps", "device_string": "mps", "name": "Apple Silicon (MPS)"}
    return {"device_type": "cpu", "device_string": "cpu", "name": cpu_description()["cpu_name"]}


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def device_info() -> dict[str, Any]:
    """The `gpu` answer: the union of the reference shapes for the detected device."""
    kind = detect_device_type()
    common = {"torch_version": torch.__version__, "onnxruntime_providers": onnxruntime_providers()}
    if kind == "cuda":
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        total = int(props.total_memory // _MIB)
        allocated = torch.cuda.memory_allocated(index) / _MIB
        free_bytes, _ = torch.cuda.mem_get_info(index)
        return {
            "available": True,
            "name": props.name,
            "memory_mb": total,
            "cuda_version": torch.version.cuda,
            "device_type": "cuda",
            "device_string": f"cuda:{index}",
            "compute_capability": [props.major, props.minor],
            "total_mb": total,
            "total_memory_mb": total,
            "allocated_mb": round(allocated, 1),
            "reserved_mb": round(torch.cuda.memory_reserved(index) / _MIB, 1),
            "max_allocated_mb": round(torch.cuda.max_memory_allocated(index) / _MIB, 1),
            "utilization_percent": round(100.0 * allocated / total, 1) if total else 0.0,
            "device_used_mb": round(total - free_bytes / _MIB, 1),
            "device_count": torch.cuda.device_count(),
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            **common,
        }
    if kind == "mps":
        info: dict[str, Any] = {
            "available": True,
            "name": "Apple Silicon (MPS)",
            "memory_mb": 0,
            "cuda_version": None,
            "device_type": "mps",
            "device_string": "mps",
            "mps_available": True,
            "backend": "Metal Performance Shaders",
            **common,
        }
        mps_allocated = _mps_allocated_mb()
        if mps_allocated is not None:
            info["allocated_mb"] = mps_allocated
        return info
    return {
        "available": False,
        "name": "CPU",
        "memory_mb": 0,
        "cuda_version": None,
        "device_type": "cpu",
        "device_string": "cpu",
        **cpu_description(),
        **common,
    }


def _mps_allocated_mb() -> float | None:
    try:
        return round(torch.mps.current_allocated_memory() / _MIB, 1)
    except Exception:
        return None


def memory_info() -> dict[str, Any]:
    """The memory-info object of a gpu-clear answer, for this process; errors become an `error` field."""
    kind = detect_device_type()
    try:
        if kind == "cuda":
            index = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory / _MIB
            allocated = torch.cuda.memory_allocated(index) / _MIB
            free_bytes, _ = torch.cuda.mem_get_info(index)
            return {
                "device": "cuda",
                "device_used_mb": round(total - free_bytes / _MIB, 1),
                "allocated_mb": round(allocated, 1),
                "reserved_mb": round(torch.cuda.memory_reserved(index) / _MIB, 1),
                "max_allocated_mb": round(torch.cuda.max_memory_allocated(index) / _MIB, 1),
                "total_mb": round(total, 1),
                "utilization_percent": round(100.0 * allocated / total, 1) if total else 0.0,
            }
        if kind == "mps":
            info: dict[str, Any] = {"device": "mps", "info": "Apple MPS memory is shared with the system"}
            mps_allocated = _mps_allocated_mb()
            if mps_allocated is not None:
                info["allocated_mb"] = mps_allocated
            return info
        return {"device": "cpu", "info": "no accelerator memory to report on the CPU"}
    except Exception as exc:
        return {"device": kind, "error": str(exc)}


def release_device_memory() -> None:
    """Collect garbage and return cached device memory to the driver; errors are logged, never raised."""
    gc.collect()
    try:
        kind = detect_device_type()
        if kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif kind == "mps":
            torch.mps.empty_cache()
    except Exception:
        logger.warning("releasing device memory failed", exc_info=True)
    gc.collect()
