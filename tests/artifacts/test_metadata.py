"""Model metadata: the server schema's key order and JSON safety, and reading both schemas back."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlwatchd.artifacts.metadata import (
    SCHEMA,
    ModelInfo,
    build_metadata,
    build_preprocessing,
    package_versions,
    read_model_info,
)
from dlwatchd.errors import DlwatchdError, ErrorCode

NORMALIZATION = {
    "strategy": "percentile_99",
    "per_channel": False,
    "clip_percentile": 99.5,
    "min": 0.0,
    "max": 255.0,
    "scope": "dataset",
    "stats": [{"lo": 3.0, "hi": 900.0}],
}


def server_metadata(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "model_id": "unet_20250101_120000",
        "model_type": "unet",
        "architecture": {
            "backbone": "resnet18",
            "input_size": [64, 96],
            "use_pretrained": False,
            "frozen_layers": None,
        },
        "input_config": {
            "num_channels": 2,
            "channel_names": ["DAPI", "CD3"],
            "bit_depth": 16,
            "normalization": NORMALIZATION,
            "selected_channels": [0, 2],
        },
        "classes": ["Background", "Tumor", "Stroma"],
        "unlabeled_index": 255,
        "normalization_stats": [{"min": 0.0, "max": 1.0, "mean": 0.5, "std": float("nan"), "p1": 0.0, "p99": 1.0}],
        "training": {"epochs": 3, "final_loss": float("inf"), "per_class_iou": {"Tumor": np.float32(0.5)}},
        "onnx": {"opset": 17, "verified": True, "max_abs_diff": 1e-6},
        "extra_architecture": {
            "encoder_base": "resnet18",
            "encoder_weights": None,
            "in_channels": 2,
            "num_classes": 3,
            "size_divisor": 32,
            "frozen_layers_applied": [],
        },
    }
    arguments.update(overrides)
    return build_metadata(**arguments)


def write_model(folder: Path, metadata: dict[str, Any], preprocessing: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    if preprocessing is not None:
        (folder / "preprocessing.json").write_text(json.dumps(preprocessing), encoding="utf-8")
    return folder


def client_metadata() -> dict[str, Any]:
    return {
        "name": "My classifier",
        "architecture": {
            "type": "unet",
            "backbone": "resnet34",
            "input_channels": 4,
            "input_width": 512,
            "input_height": 384,
        },
        "classes": [{"index": 1, "name": "B", "color": "#fff"}, {"index": 0, "name": "A", "color": "#000"}],
        "channel_config": {
            "normalization_strategy": "PERCENTILE_99",
            "expected_channels": ["a", "b", "c", "d"],
            "bit_depth_trained": 16,
        },
        "version": "1",
        "description": "",
        "createdAt": "2024-05-01T10:00:00Z",
        "training": {"image_name": "slide.svs", "epochs": 10, "final_loss": 0.3, "final_accuracy": 0.9},
    }


def test_build_metadata_keys_in_order_and_architecture_type_first() -> None:
    metadata = server_metadata()
    assert list(metadata) == [
        "id",
        "name",
        "architecture",
        "input_config",
        "classes",
        "unlabeled_index",
        "normalization_stats",
        "training",
        "onnx",
        "versions",
        "created_at",
        "schema",
    ]
    assert metadata["name"] == "UNET Classifier"
    assert metadata["schema"] == SCHEMA
    assert list(metadata["architecture"]) == [
        "type",
        "backbone",
        "input_size",
        "use_pretrained",
        "frozen_layers",
        "encoder_base",
        "encoder_weights",
        "in_channels",
        "num_classes",
        "size_divisor",
        "frozen_layers_applied",
    ]
    assert metadata["classes"] == [
        {"index": 0, "name": "Background"},
        {"index": 1, "name": "Tumor"},
        {"index": 2, "name": "Stroma"},
    ]
    assert datetime.fromisoformat(metadata["created_at"]).utcoffset().total_seconds() == 0


def test_build_metadata_is_json_safe() -> None:
    metadata = server_metadata()
    text = json.dumps(metadata, allow_nan=False)  # raises on a NaN or Infinity left anywhere
    assert metadata["normalization_stats"][0]["std"] is None
    assert metadata["training"]["final_loss"] is None
    assert metadata["training"]["per_class_iou"]["Tumor"] == 0.5
    assert json.loads(text) == metadata


def test_versions_are_looked_up_without_importing_and_missing_ones_are_null(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = server_metadata()["versions"]
    assert list(versions) == [
        "dlwatchd",
        "python",
        "torch",
        "segmentation_models_pytorch",
        "timm",
        "onnx",
        "onnxruntime",
        "numpy",
    ]
    assert versions["numpy"] == np.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    monkeypatch.setattr(
        "dlwatchd.artifacts.metadata.VERSIONED_PACKAGES", {"no_such_module": ("no-such-distribution-xyz",)}
    )
    assert package_versions()["no_such_module"] is None


def test_preprocessing_holds_the_five_keys() -> None:
    metadata = server_metadata()
    preprocessing = build_preprocessing(metadata)
    assert list(preprocessing) == ["architecture", "input_config", "classes", "unlabeled_index", "normalization_stats"]
    assert preprocessing["input_config"]["normalization"] == NORMALIZATION


def test_server_schema_round_trip(tmp_path: Path) -> None:
    metadata = server_metadata()
    folder = write_model(tmp_path / "unet_20250101_120000", metadata)
    info = read_model_info(folder)
    assert isinstance(info, ModelInfo)
    assert info.model_id == "unet_20250101_120000"
    assert info.name == "UNET Classifier"
    assert (info.architecture, info.encoder) == ("unet", "resnet18")
    assert info.in_channels == 2
    assert (info.num_classes, info.class_names) == (3, ["Background", "Tumor", "Stroma"])
    assert info.normalization == NORMALIZATION
    assert info.selected_channels == [0, 2]
    assert info.input_size == (64, 96)
    assert info.size_divisor == 32
    assert info.channel_names == ["DAPI", "CD3"]
    assert info.bit_depth == 16
    assert info.unlabeled_index == 255
    assert info.warnings == []
    assert info.raw == metadata


def test_client_schema(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "from_qupath", client_metadata())
    info = read_model_info(folder)
    assert info.model_id == "from_qupath"  # the client schema has no id: the folder name stands in
    assert info.name == "My classifier"
    assert (info.architecture, info.encoder) == ("unet", "resnet34")
    assert info.in_channels == 4
    assert info.class_names == ["A", "B"]
    assert info.num_classes == 2
    assert info.normalization == {"strategy": "percentile_99"}
    assert info.channel_names == ["a", "b", "c", "d"]
    assert info.bit_depth == 16
    assert info.input_size == (384, 512)
    assert info.unlabeled_index == 255
    assert info.selected_channels is None


def test_preprocessing_json_wins_over_a_client_rewritten_metadata(tmp_path: Path) -> None:
    server = server_metadata()
    folder = write_model(tmp_path / "copied", client_metadata(), build_preprocessing(server))
    info = read_model_info(folder)
    assert info.in_channels == 2
    assert info.class_names == ["Background", "Tumor", "Stroma"]
    assert info.normalization == NORMALIZATION
    assert info.encoder == "resnet18"
    assert info.name == "My classifier"  # identity still comes from metadata.json
    assert info.raw["version"] == "1"


def test_unreadable_preprocessing_json_is_a_warning(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", client_metadata())
    (folder / "preprocessing.json").write_text("{not json", encoding="utf-8")
    info = read_model_info(folder)
    assert info.in_channels == 4
    assert any("preprocessing.json" in warning for warning in info.warnings)


def test_numbers_are_coerced_and_plain_class_names_accepted(tmp_path: Path) -> None:
    metadata = {
        "architecture": {"type": "custom_onnx", "input_size": [256.0, "128"]},
        "input_config": {"num_channels": 3.0, "bit_depth": "8"},
        "classes": ["x", "y"],
        "unlabeled_index": 0.0,
    }
    info = read_model_info(write_model(tmp_path / "m", metadata))
    assert info.architecture == "custom_onnx"
    assert info.size_divisor == 32
    assert info.in_channels == 3 and isinstance(info.in_channels, int)
    assert info.bit_depth == 8
    assert info.input_size == (256, 128)
    assert info.unlabeled_index == 0
    assert info.class_names == ["x", "y"]
    assert info.encoder == "resnet34"
    assert any("backbone" in warning for warning in info.warnings)


def test_histology_encoder_name_is_kept(tmp_path: Path) -> None:
    metadata = client_metadata()
    metadata["architecture"]["backbone"] = "resnet50_lunit-swav"
    assert read_model_info(write_model(tmp_path / "m", metadata)).encoder == "resnet50_lunit-swav"


@pytest.mark.parametrize("architecture", [{"backbone": "resnet34"}, None, {"type": ""}])
def test_missing_architecture_type_is_a_schema_error(tmp_path: Path, architecture: Any) -> None:
    metadata = client_metadata()
    metadata["architecture"] = architecture
    folder = write_model(tmp_path / "no_type", metadata)
    with pytest.raises(DlwatchdError) as caught:
        read_model_info(folder)
    assert caught.value.code is ErrorCode.SCHEMA
    assert "no_type" in caught.value.message


def test_missing_and_broken_metadata(tmp_path: Path) -> None:
    with pytest.raises(DlwatchdError) as missing_folder:
        read_model_info(tmp_path / "absent")
    assert missing_folder.value.code is ErrorCode.NOT_FOUND
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DlwatchdError) as missing_file:
        read_model_info(empty)
    assert missing_file.value.code is ErrorCode.NOT_FOUND and "empty" in missing_file.value.message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text('{"architecture": ', encoding="utf-8")
    with pytest.raises(DlwatchdError) as unreadable:
        read_model_info(broken)
    assert unreadable.value.code is ErrorCode.SCHEMA and "broken" in unreadable.value.message


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"input_config": {"num_channels": 2.5}}, "input_config.num_channels"),
        ({"classes": [{"index": 0, "name": "a"}, {"index": 0, "name": "b"}]}, None),
        ({"classes": []}, "classes"),
    ],
)
def test_malformed_fields_are_schema_errors(tmp_path: Path, patch: dict[str, Any], field: str | None) -> None:
    metadata = {"architecture": {"type": "unet"}, "classes": ["a", "b"], **patch}
    with pytest.raises(DlwatchdError) as caught:
        read_model_info(write_model(tmp_path / "m", metadata))
    assert caught.value.code is ErrorCode.SCHEMA
    if field is not None:
        assert caught.value.field == field


def test_non_finite_values_nested_in_lists_become_null() -> None:
    metadata = server_metadata(training={"curve": [1.0, float("nan"), (2.0, float("-inf"))]})
    assert metadata["training"]["curve"] == [1.0, None, [2.0, None]]
    assert not any(isinstance(v, float) and math.isnan(v) for v in metadata["training"]["curve"])
