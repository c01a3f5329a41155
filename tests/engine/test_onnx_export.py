"""ONNX export with verification: tiny real models, dynamic H/W, the caller's model untouched, failures reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from dlwatchd.engine.models import create_model
from dlwatchd.engine.onnx_export import export_onnx


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("architecture", "encoder", "channels", "classes", "size", "expected_hw"),
    [
        ("unet", "resnet18", 3, 2, (64, 64), (64, 64)),
        ("fpn", "mobilenet_v2", 1, 3, (70, 50), (96, 64)),
        ("linknet", "resnet18", 5, 2, (70, 50), (96, 64)),
    ],
)
def test_tiny_models_export_verified_and_leave_the_caller_model_alone(
    tmp_path: Path,
    architecture: str,
    encoder: str,
    channels: int,
    classes: int,
    size: tuple[int, int],
    expected_hw: tuple[int, int],
) -> None:
    torch.manual_seed(0)
    model = create_model(architecture, encoder, channels, classes)
    model.train()
    before = snapshot(model)
    path = tmp_path / "model.onnx"

    result = export_onnx(model, path, in_channels=channels, input_size=size)

    assert result["verified"] is True, result
    assert result["opset"] == 17
    assert result["exported_shape"] == [1, channels, *expected_hw]
    assert 0.0 <= result["max_abs_diff"] < 1e-3
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left behind
    assert model.training
    assert all(module.training for module in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].device == value.device
        assert torch.equal(after[key], value), key
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_exported_graph_runs_with_dynamic_height_and_width(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("unet", "resnet18", 3, 2)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, path, in_channels=3, input_size=(64, 64))["verified"]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    sample = np.random.default_rng(0).random((3, 3, 96, 128), dtype=np.float32)
    output = session.run(["output"], {"input": sample})[0]
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(sample)).numpy()
    assert output.shape == (3, 2, 96, 128)
    assert np.abs(output - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_pspnet_adaptive_pooling_is_reported_not_raised(tmp_path: Path) -> None:
    model = create_model("pspnet", "resnet18", 3, 2)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, in_channels=3, input_size=(64, 64))
    assert result["verified"] is False
    assert result["opset"] == 17
    assert "max_abs_diff" not in result
    assert isinstance(result["error"], str) and "\n" not in result["error"] and len(result["error"]) < 400
    assert list(tmp_path.iterdir()) == []


class TracedSizeHead(torch.nn.Module):
    """A conv whose output is resized to the size seen while tracing: it exports, but only fits that size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        height, width = int(y.shape[2]), int(y.shape[3])  # python ints: frozen as constants in the trace
        return F.interpolate(y[:, :, ::2, ::2], size=(height, width), mode="nearest")


class TracedSizeBias(torch.nn.Module):
    """Adds a bias map built from the traced size: ONNX Runtime fails to broadcast at any other size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + torch.ones(1, 1, int(y.shape[2]), int(y.shape[3]))


@pytest.mark.parametrize("module", [TracedSizeHead, TracedSizeBias])
def test_a_graph_tied_to_the_traced_size_fails_the_second_shape(tmp_path: Path, module: type) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stale export of older weights")
    result = export_onnx(module(), path, in_channels=2, input_size=(32, 32))
    assert result["verified"] is False
    assert "2×2×64×32" in result["error"], result["error"]
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_cannot_run_is_reported(tmp_path: Path) -> None:
    model = torch.nn.Conv2d(4, 2, 3)  # expects 4 channels, is given 3
    result = export_onnx(model, tmp_path / "model.onnx", in_channels=3, input_size=(32, 32))
    assert result["verified"] is False
    assert result["error"].startswith("ONNX export failed")
    assert list(tmp_path.iterdir()) == []


def test_half_precision_channels_last_model_is_exported_from_a_float32_copy(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    result = export_onnx(model, tmp_path / "model.onnx", in_channels=3, input_size=(40, 40))
    assert result["verified"] is True, result
    assert result["exported_shape"] == [1, 3, 64, 64]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
