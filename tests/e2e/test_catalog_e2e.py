"""Catalogue, models and layer queries through the spool."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import wait_state

from dlwatchd.client import SpoolClient

TERMINAL = {"succeeded", "failed", "rejected", "cancelled"}


def ask(client: SpoolClient, body: dict, timeout: float = 60) -> dict:
    status = wait_state(client, client.submit(body), TERMINAL, timeout=timeout)
    assert status.state.value == "succeeded", status.error
    return status.result


def test_encoders_and_encoder_info(daemon, client: SpoolClient) -> None:
    encoders = ask(client, {"kind": "encoders"})["encoders"]
    assert [e["name"] for e in encoders][:3] == ["resnet18", "resnet34", "resnet50"]
    assert len(encoders) == 16
    assert all(e["weights_available"] is False for e in encoders)
    info = ask(client, {"kind": "encoder-info", "name": "resnet50_kather100k"})
    assert info["family"] == "resnet" and info["pretrained_weights"] == ["histology"]
    unknown = wait_state(client, client.submit({"kind": "encoder-info", "name": "resnet9000"}), TERMINAL)
    assert unknown.state.value == "failed" and unknown.error.code.value == "E_NOT_FOUND"
    assert "resnet9000" in unknown.error.message and "resnet34" in unknown.error.message


def test_architectures_and_aliases(daemon, client: SpoolClient) -> None:
    names = [a["name"] for a in ask(client, {"kind": "architectures"})["architectures"]]
    assert names[:8] == ["unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn", "pspnet", "manet", "linknet"]
    assert "pan" in names
    assert ask(client, {"kind": "architecture-info", "name": "UNet++"})["name"] == "unetplusplus"
    unknown = wait_state(client, client.submit({"kind": "architecture-info", "name": "transformer"}), TERMINAL)
    assert unknown.error.code.value == "E_NOT_FOUND"


def test_freeze_recommendations(daemon, client: SpoolClient) -> None:
    imagenet = ask(client, {"kind": "freeze-recommendations", "dataset_size": "small"})
    assert imagenet == {
        "dataset_size": "small",
        "recommendations": {"0": True, "1": True, "2": True, "3": True, "4": False},
    }
    histology = ask(
        client, {"kind": "freeze-recommendations", "dataset_size": "medium", "encoder": "resnet50_lunit-bt"}
    )
    assert histology["recommendations"] == {"0": True, "1": False, "2": False, "3": False, "4": False}


def test_layers_builds_the_model_without_weights(daemon, client: SpoolClient) -> None:
    layers = ask(client, {"kind": "layers", "architecture": "unet", "encoder": "resnet18", "num_channels": 4})["layers"]
    names = [layer["name"] for layer in layers]
    assert names == [
        "encoder.conv1",
        "encoder.layer1",
        "encoder.layer2",
        "encoder.layer3",
        "encoder.layer4",
        "decoder",
        "segmentation_head",
    ]
    assert layers[0]["param_count"] == 64 * 4 * 7 * 7  # the stem sees 4 input channels
    bad = wait_state(client, client.submit({"kind": "layers", "architecture": "unet", "encoder": "nope"}), TERMINAL, 60)
    assert bad.state.value == "failed" and bad.error.code.value == "E_SCHEMA" and "nope" in bad.error.message


def _model(folder: Path, metadata: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def test_models_lists_both_metadata_schemas(make_daemon, client: SpoolClient, spool: Path, tmp_path: Path) -> None:
    project_models = tmp_path / "project-models"
    server = {
        "id": "unet_20240101_120000",
        "name": "UNET Classifier",
        "architecture": {"type": "unet", "backbone": "resnet34"},
    }
    client_schema = {"name": "Tumour finder", "architecture": {"type": "fpn", "input_channels": 3}, "version": "1"}
    _model(spool / "models" / "unet_20240101_120000", server)
    _model(project_models / "tumour", client_schema)
    (project_models / "broken").mkdir()
    (project_models / "broken" / "metadata.json").write_text("{not json")
    make_daemon(env={"DLWATCHD_MODEL_DIRS": str(project_models)})
    result = ask(client, {"kind": "models"})
    assert result["models"] == [
        {"id": "tumour", "name": "Tumour finder", "type": "fpn", "path": str(project_models / "tumour")},
        {
            "id": "unet_20240101_120000",
            "name": "UNET Classifier",
            "type": "unet",
            "path": str(spool / "models" / "unet_20240101_120000"),
        },
    ]
    assert any("broken" in warning for warning in result["warnings"])
