"""int8 export: a real static quantization of a small model, checked against fp32, and loading it for inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlwatchd.engine import quantize
from dlwatchd.engine.inference import predict_probabilities
from dlwatchd.engine.loading import load_model
from dlwatchd.engine.models import create_model
from dlwatchd.engine.onnx_export import export_onnx
from dlwatchd.engine.quantize import INT8_NAME, quantize_onnx


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = create_model("unet", "resnet18", 3, 2).eval()
    assert export_onnx(model, folder / "model.onnx", in_channels=3, input_size=(64, 64))["verified"]
    metadata = {
        "id": "m",
        "architecture": {"type": "unet", "backbone": "resnet18", "in_channels": 3, "num_classes": 2},
        "input_config": {"num_channels": 3},
        "classes": ["a", "b"],
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def tiles(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # A vertical edge on noise: the untrained net's answer depends on it, so fp32 and int8 can be compared.
    out = []
    for _ in range(count):
        tile = rng.random((3, 64, 64), dtype=np.float32) * 0.2
        tile[:, :, 32:] += 0.8
        out.append(tile)
    return out


def test_quantized_model_is_checked_and_published(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 0.0)
    record = quantize_onnx(model_dir / "model.onnx", model_dir / INT8_NAME, tiles(4))
    assert record["verified"] is True, record
    assert record["calibration_tiles"] == 4 and 0.0 <= record["agreement"] <= 1.0
    assert 0.0 <= record["max_abs_diff"] <= 1.0
    assert (model_dir / INT8_NAME).stat().st_size > 0
    int8 = load_model(model_dir, use_gpu=False, precision="int8")
    fp32 = load_model(model_dir, use_gpu=False, precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    sample = tiles(1, seed=5)
    quantized, exact = predict_probabilities(int8, sample)[0], predict_probabilities(fp32, sample)[0]
    assert quantized.shape == exact.shape == (2, 64, 64)
    np.testing.assert_allclose(quantized.sum(axis=0), 1.0, atol=1e-5)
    assert not np.array_equal(quantized, exact)  # it really ran the quantized graph
    assert float(np.abs(quantized - exact).max()) < 0.5


def test_an_int8_model_that_disagrees_with_fp32_is_not_published(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / INT8_NAME
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # no quantized graph can agree more than fully
    record = quantize_onnx(model_dir / "model.onnx", target, tiles(2))
    assert record["verified"] is False and "agrees with fp32 on only" in record["error"]
    assert not target.exists()


def test_no_calibration_tiles_is_a_clear_failure(model_dir: Path, tmp_path: Path) -> None:
    record = quantize_onnx(model_dir / "model.onnx", tmp_path / INT8_NAME, [])
    assert record == {"verified": False, "error": "there are no tiles to calibrate the int8 model with"}


def test_a_model_without_int8_export_runs_fp32_with_a_warning(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("model.onnx", "metadata.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    loaded = load_model(folder, use_gpu=False, precision="int8")
    assert loaded.precision == "fp32"
    assert any(INT8_NAME in warning for warning in loaded.warnings)
