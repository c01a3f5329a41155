"""Model construction and pretrained loading with real tensors: key copy, stem adaptation, coverage, no network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder

from dlwatchd.engine.models import build_model, create_model, load_pretrained_encoder
from dlwatchd.engine.weights import WeightsStore
from dlwatchd.errors import DlwatchdError, ErrorCode


def seeded(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same keys and shapes with seeded random values (floats) and random counts (integer buffers)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator)
        if value.is_floating_point()
        else torch.randint(0, 1000, value.shape, generator=generator, dtype=value.dtype)
        for key, value in state.items()
    }


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine's real Hugging Face cache must not satisfy a lookup these tests expect to fail.
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return seeded(get_encoder("resnet18", weights=None).state_dict(), seed=0)


@pytest.fixture(scope="module")
def timm_resnet50_state() -> dict[str, torch.Tensor]:
    """A timm-style ResNet-50 classification state dict (fc.* included), as the histology hub checkpoints are."""
    return seeded(timm.create_model("resnet50", pretrained=False).state_dict(), seed=1)


@pytest.fixture(scope="module")
def histology_store(tmp_path_factory: pytest.TempPathFactory, timm_resnet50_state: dict) -> WeightsStore:
    folder = tmp_path_factory.mktemp("histology")
    save_file(timm_resnet50_state, folder / "lunit_swav.safetensors")
    store = WeightsStore(folder / "store")
    entry = store.import_file("resnet50_lunit-swav", folder / "lunit_swav.safetensors")
    assert entry["tag"] == "histology"
    return store


def test_architectures_resolve_by_name_and_alias_in_any_case() -> None:
    for name, expected in (("UNet", smp.Unet), ("unet++", smp.UnetPlusPlus), ("DeepLabV3+", smp.DeepLabV3Plus)):
        model = create_model(name, "resnet18", 3, 2)
        assert type(model) is expected
    model = create_model("fpn", "resnet18", 5, 4)
    assert model(torch.zeros(1, 5, 64, 64)).shape == (1, 4, 64, 64)


def test_unknown_architecture_and_encoder_are_schema_errors() -> None:
    with pytest.raises(DlwatchdError) as info:
        create_model("segnet", "resnet18", 3, 2)
    assert (info.value.code, info.value.field) == (ErrorCode.SCHEMA, "model_type")
    assert "unet" in info.value.message
    with pytest.raises(DlwatchdError) as info:
        create_model("unet", "resnet-9000", 3, 2)
    assert (info.value.code, info.value.field) == (ErrorCode.SCHEMA, "architecture.backbone")
    assert "resnet-9000" in info.value.message


@pytest.mark.parametrize("kind", ["safetensors", "checkpoint"])
def test_pretrained_resnet18_encoder_equals_the_imported_file(tmp_path: Path, resnet18_state: dict, kind: str) -> None:
    if kind == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file(resnet18_state, source)
    else:
        source = tmp_path / "w.pth"
        checkpoint = {f"module.{k}": v for k, v in resnet18_state.items()}
        checkpoint.update({"module.fc.weight": torch.randn(1000, 512), "module.fc.bias": torch.randn(1000)})
        torch.save(checkpoint, source)
    store = WeightsStore(tmp_path / "store")
    store.import_file("resnet18", source)

    model, warnings = build_model("unet", "resnet18", 3, 2, use_pretrained=True, store=store)

    assert warnings == []
    encoder_state = model.encoder.state_dict()
    assert sorted(encoder_state) == sorted(resnet18_state)
    for key, value in resnet18_state.items():
        assert torch.equal(encoder_state[key], value), key


def test_histology_weights_with_four_channels_adapt_the_stem_only(histology_store: WeightsStore, timm_resnet50_state):
    model, warnings = build_model("unet", "resnet50_lunit-swav", 4, 3, use_pretrained=True, store=histology_store)

    assert warnings == []
    encoder_state = model.encoder.state_dict()
    stem = timm_resnet50_state["conv1.weight"]
    expected_stem = torch.stack([stem[:, i % 3] for i in range(4)], dim=1) * (3 / 4)
    assert torch.equal(encoder_state["conv1.weight"], expected_stem)
    assert torch.equal(encoder_state["layer1.0.conv1.weight"], timm_resnet50_state["layer1.0.conv1.weight"])
    assert torch.equal(encoder_state["layer4.2.conv1.weight"], timm_resnet50_state["layer4.2.conv1.weight"])
    for key, value in encoder_state.items():
        if key != "conv1.weight":
            assert torch.equal(value, timm_resnet50_state[key]), key


def test_histology_weights_with_one_channel_sum_the_stem(histology_store: WeightsStore, timm_resnet50_state) -> None:
    model, _ = build_model("unet", "resnet50_lunit-swav", 1, 2, use_pretrained=True, store=histology_store)
    stem = timm_resnet50_state["conv1.weight"]
    assert torch.equal(model.encoder.state_dict()["conv1.weight"], stem.sum(dim=1, keepdim=True))
    assert torch.equal(
        model.encoder.state_dict()["layer1.0.conv1.weight"], timm_resnet50_state["layer1.0.conv1.weight"]
    )


def test_histology_without_pretrained_warns_of_random_initialisation(histology_store: WeightsStore) -> None:
    model, warnings = build_model("unet", "resnet50_lunit-swav", 3, 2, use_pretrained=False, store=histology_store)
    assert len(warnings) == 1 and "randomly initialised" in warnings[0]
    assert model.encoder.state_dict()["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_other_encoders_adapt_their_first_conv(resnet18_state: dict) -> None:
    state = seeded(get_encoder("efficientnet-b0", weights=None).state_dict(), seed=3)
    model = create_model("unet", "efficientnet-b0", 2, 2)

    assert load_pretrained_encoder(model, state, 2) == []

    stem = state["_conv_stem.weight"]
    adapted = model.encoder.state_dict()["_conv_stem.weight"]
    assert torch.equal(adapted, torch.stack([stem[:, 0], stem[:, 1]], dim=1) * (3 / 2))


def test_partial_weights_warn_and_list_missing_keys(resnet18_state: dict) -> None:
    dropped = [k for k in resnet18_state if k.startswith("layer4")]
    partial = {k: v for k, v in resnet18_state.items() if k not in dropped}
    model = create_model("unet", "resnet18", 3, 2)

    [warning] = load_pretrained_encoder(model, partial, 3)

    assert f"{len(dropped)} of the encoder's {len(resnet18_state)} tensors" in warning
    assert dropped[0] in warning and f"and {len(dropped) - 10} more" in warning
    assert torch.equal(model.encoder.state_dict()["layer3.1.conv2.weight"], resnet18_state["layer3.1.conv2.weight"])


def test_weights_covering_under_half_are_refused_and_change_nothing(resnet18_state: dict) -> None:
    partial = {k: v for k, v in resnet18_state.items() if k.startswith(("conv1", "bn1", "layer1"))}
    model = create_model("unet", "resnet18", 3, 2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    with pytest.raises(DlwatchdError) as info:
        load_pretrained_encoder(model, partial, 3)

    assert info.value.code is ErrorCode.SCHEMA and "do not fit the encoder" in info.value.message
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_missing_weights_fail_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network use is forbidden in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)

    with pytest.raises(DlwatchdError) as info:
        build_model("unet", "resnet34", 3, 2, use_pretrained=True, store=WeightsStore(tmp_path / "store"))

    assert info.value.code is ErrorCode.WEIGHTS_UNAVAILABLE
    assert "resnet34" in info.value.message and "dlwatchd weights import resnet34" in (info.value.hint or "")
    assert attempts == []
