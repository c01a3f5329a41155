"""Catalogue job handlers called as the worker calls them: a context and a validated request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs import catalog
from dlwatchd.protocol.requests import request_adapter


def request(body: dict[str, Any]) -> Any:
    return request_adapter().validate_python(body)


@pytest.fixture
def ctx(tmp_path: Path) -> SimpleNamespace:
    # The handlers read nothing from the context but `weights_dir`.
    return SimpleNamespace(weights_dir=tmp_path)


def store(weights_dir: Path, encoder: str, file_name: str) -> None:
    (weights_dir / encoder).mkdir(parents=True, exist_ok=True)
    (weights_dir / encoder / file_name).write_bytes(b"weights")


def test_weights_available_follows_the_store_layout(tmp_path: Path) -> None:
    assert not catalog.weights_available(tmp_path, "resnet34")
    store(tmp_path, "resnet34", "imagenet.safetensors")
    assert catalog.weights_available(tmp_path, "resnet34")
    store(tmp_path, "resnet18", "imagenet.pth")
    assert catalog.weights_available(tmp_path, "resnet18")
    # Histology encoders look for their own tag; an ImageNet file does not count.
    store(tmp_path, "resnet50_kather100k", "imagenet.safetensors")
    assert not catalog.weights_available(tmp_path, "resnet50_kather100k")
    store(tmp_path, "resnet50_kather100k", "histology.safetensors")
    assert catalog.weights_available(tmp_path, "resnet50_kather100k")
    assert not catalog.weights_available(tmp_path / "missing", "resnet34")


def test_encoders(ctx: SimpleNamespace) -> None:
    store(ctx.weights_dir, "resnet34", "imagenet.safetensors")
    answer = catalog.run_encoders(ctx, request({"kind": "encoders"}))
    encoders = answer["encoders"]
    assert list(answer) == ["encoders"] and len(encoders) == 16
    assert [e["name"] for e in encoders[:3]] == ["resnet18", "resnet34", "resnet50"]
    assert encoders[-1]["name"] == "vgg16_bn"
    assert [e["name"] for e in encoders if e["weights_available"]] == ["resnet34"]
    assert set(encoders[0]) == {
        "name",
        "display_name",
        "family",
        "params_millions",
        "pretrained_weights",
        "license",
        "recommended_for",
        "weights_available",
    }


def test_encoder_info(ctx: SimpleNamespace) -> None:
    answer = catalog.run_encoder_info(ctx, request({"kind": "encoder-info", "name": "resnet50_tcga-brca"}))
    assert answer["license"] == "GPLv3" and answer["pretrained_weights"] == ["histology"]
    assert answer["weights_available"] is False
    with pytest.raises(DlwatchdError) as caught:
        catalog.run_encoder_info(ctx, request({"kind": "encoder-info", "name": "efficientnet-b1"}))
    assert caught.value.code is ErrorCode.NOT_FOUND and "efficientnet-b1" in caught.value.message


def test_architectures_and_info(ctx: SimpleNamespace) -> None:
    answer = catalog.run_architectures(ctx, request({"kind": "architectures"}))
    assert [a["name"] for a in answer["architectures"]] == [
        "unet",
        "unetplusplus",
        "deeplabv3",
        "deeplabv3plus",
        "fpn",
        "pspnet",
        "manet",
        "linknet",
        "pan",
    ]
    info = catalog.run_architecture_info(ctx, request({"kind": "architecture-info", "name": "UNet++"}))
    assert info["name"] == "unetplusplus" and info["supports_aux_output"] is True
    with pytest.raises(DlwatchdError) as caught:
        catalog.run_architecture_info(ctx, request({"kind": "architecture-info", "name": "segnet"}))
    assert caught.value.code is ErrorCode.NOT_FOUND and "segnet" in caught.value.message


def test_freeze_recommendations(ctx: SimpleNamespace) -> None:
    body = {"kind": "freeze-recommendations", "dataset_size": "medium", "encoder": "resnet50_lunit-bt"}
    assert catalog.run_freeze_recommendations(ctx, request(body)) == {
        "dataset_size": "medium",
        "recommendations": {"0": True, "1": False, "2": False, "3": False, "4": False},
    }
    plain = catalog.run_freeze_recommendations(
        ctx, request({"kind": "freeze-recommendations", "dataset_size": "large"})
    )
    assert plain["recommendations"] == {"0": True, "1": True, "2": False, "3": False, "4": False}


def test_layers_builds_the_model(ctx: SimpleNamespace) -> None:
    body = {"kind": "layers", "architecture": "unet", "encoder": "resnet18", "num_channels": 4, "num_classes": 3}
    layers = catalog.run_layers(ctx, request(body))["layers"]
    assert [g["name"] for g in layers] == [
        "encoder.conv1",
        "encoder.layer1",
        "encoder.layer2",
        "encoder.layer3",
        "encoder.layer4",
        "decoder",
        "segmentation_head",
    ]
    assert layers[0]["param_count"] == 64 * 4 * 7 * 7
    # Unet's head is a 3x3 conv from 16 decoder channels to the classes, plus a bias.
    assert layers[-1]["param_count"] == 3 * 16 * 3 * 3 + 3


def test_layers_for_a_histology_encoder_build_resnet50(ctx: SimpleNamespace) -> None:
    body = {"kind": "layers", "architecture": "deeplabv3+", "encoder": "resnet50_lunit-swav"}
    layers = catalog.run_layers(ctx, request(body))["layers"]
    # ResNet-50's first bottleneck stage: 3 blocks of 1x1/3x3/1x1 convs, BNs and one downsample.
    assert layers[1]["name"] == "encoder.layer1" and layers[1]["param_count"] == 215808


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ({"architecture": "dpt", "encoder": "resnet18"}, "architecture", "dpt"),
        ({"architecture": "unet", "encoder": "efficientnet-b99"}, "encoder", "efficientnet-b99"),
        ({"architecture": "unet", "encoder": "tu-no_such_model"}, "encoder", "tu-no_such_model"),
    ],
)
def test_layers_rejects_what_it_cannot_build(
    ctx: SimpleNamespace, body: dict[str, str], field: str, value: str
) -> None:
    with pytest.raises(DlwatchdError) as caught:
        catalog.run_layers(ctx, request({"kind": "layers", **body}))
    assert caught.value.code is ErrorCode.SCHEMA
    assert caught.value.field == field and value in caught.value.message


def test_pure_handlers_never_load_torch(tmp_path: Path) -> None:
    code = f"""
import sys
from types import SimpleNamespace
from pathlib import Path
from dlwatchd.jobs import catalog
from dlwatchd.protocol.requests import request_adapter
ctx = SimpleNamespace(weights_dir=Path({str(tmp_path)!r}))
for body, handler in [
    ({{"kind": "encoders"}}, catalog.run_encoders),
    ({{"kind": "encoder-info", "name": "resnet34"}}, catalog.run_encoder_info),
    ({{"kind": "architectures"}}, catalog.run_architectures),
    ({{"kind": "architecture-info", "name": "fpn"}}, catalog.run_architecture_info),
    ({{"kind": "freeze-recommendations", "dataset_size": "small"}}, catalog.run_freeze_recommendations),
]:
    handler(ctx, request_adapter().validate_python(body))
heavy = [m for m in ("torch", "segmentation_models_pytorch", "timm") if m in sys.modules]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
