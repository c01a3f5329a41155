"""int8 export: a static, per-channel QDQ quantization of model.onnx for fast CPU inference (VNNI, AMX).

Calibration uses tiles the model was validated on, normalized exactly as for inference, so the activation ranges
are those of real data. The quantized graph is checked against the fp32 graph on the same tiles before it is kept:
argmax agreement and the largest probability difference go into metadata, and a graph that disagrees too much is
not published.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlwatchd.spool.atomic import write_bytes_atomic

logger = logging.getLogger("dlwatchd.quantize")

INT8_NAME = "model.int8.onnx"
MAX_CALIBRATION_TILES = 16
# Below this argmax agreement with fp32 on the calibration tiles, the int8 graph is not worth serving.
MIN_AGREEMENT = 0.98


def quantize_onnx(source: Path, target: Path, calibration: Sequence[np.ndarray]) -> dict[str, Any]:
    """Write an int8 copy of the fp32 ONNX graph `source` to `target` (atomically); returns its record.

    `calibration`: normalized K×H×W float32 tiles of one size. Success: {"verified": True, "agreement",
    "max_abs_diff", "calibration_tiles", "seconds"}. Any failure, or agreement below MIN_AGREEMENT:
    {"verified": False, "error"} and no file at `target`; never raises for model problems.
    """
    started = time.monotonic()
    tiles = [np.ascontiguousarray(tile, dtype=np.float32)[None] for tile in calibration[:MAX_CALIBRATION_TILES]]
    if not tiles:
        return {"verified": False, "error": "there are no tiles to calibrate the int8 model with"}
    try:
        import onnxruntime
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        input_name = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name

        class Tiles(CalibrationDataReader):
            def __init__(self) -> None:
                self._left = iter(tiles)

            def get_next(self) -> dict[str, np.ndarray] | None:
                tile = next(self._left, None)
                return None if tile is None else {input_name: tile}

        with tempfile.TemporaryDirectory(prefix="dlwatchd-int8-") as scratch:
            prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
            quant_pre_process(str(source), str(prepared))  # folds BatchNorm into the convolutions first
            quantize_static(
                str(prepared),
                str(quantized),
                Tiles(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            agreement, max_diff = _compare(source, quantized, input_name, tiles)
            if agreement < MIN_AGREEMENT:
                return {
                    "verified": False,
                    "error": f"the int8 model agrees with fp32 on only {100 * agreement:.2f} % of the pixels",
                    "agreement": agreement,
                }
            write_bytes_atomic(target, quantized.read_bytes())
    except Exception as exc:  # quantization is an extra: a failure costs the int8 file, never the training
        logger.warning("int8 export failed: %s", exc)
        return {"verified": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {
        "verified": True,
        "format": "QDQ, per-channel int8 weights, uint8 activations",
        "agreement": agreement,
        "max_abs_diff": max_diff,
        "calibration_tiles": len(tiles),
        "seconds": round(time.monotonic() - started, 2),
    }


def _compare(fp32: Path, int8: Path, input_name: str, tiles: list[np.ndarray]) -> tuple[float, float]:
    """(argmax agreement, max |p_fp32 - p_int8|) of the two graphs' softmax outputs on `tiles`."""
    import onnxruntime

    from dlwatchd.engine.inference import softmax  # imported here: inference imports loading, which imports this module

    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    same = total = 0
    worst = 0.0
    for tile in tiles:
        first, second = (softmax(session.run(None, {input_name: tile})[0][0]) for session in sessions)
        same += int((first.argmax(0) == second.argmax(0)).sum())
        total += first.shape[1] * first.shape[2]
        worst = max(worst, float(np.abs(first - second).max()))
    return same / total, worst
