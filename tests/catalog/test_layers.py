"""Layer groups of real smp models (no weights): names, depths, flags and true parameter counts.

Expected counts come from `named_parameters()` filtered by name prefix, a different route from
the module walk `resolve_group` takes. The encoder groups partition the encoder exactly for
se_resnet (layer0..4), vgg and mobilenet (slices covering all of `features`); resnet leaves out
`bn1`, efficientnet `_bn0`/`_conv_head`/`_bn1`, densenet `norm0`, the transitions and `norm5`.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from dlwatchd.catalog.layers import count_parameters, layer_groups, resolve_group

smp = pytest.importorskip("segmentation_models_pytorch")

_MODELS: dict[tuple[str, str, int], Any] = {}


def model(arch: str, encoder: str, in_channels: int = 3) -> Any:
    """A cached smp model with random weights (building one costs up to a second)."""
    key = (arch, encoder, in_channels)
    if key not in _MODELS:
        _MODELS[key] = getattr(smp, arch)(
            encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=2
        )
    return _MODELS[key]


def expected_count(net: Any, group: str) -> int:
    """Parameters whose dotted name lies under `group`, slices spelled out as index prefixes."""
    sliced = re.fullmatch(r"(.+)\[(\d+):(\d*)\]", group)
    if sliced:
        base, start, stop = sliced.group(1), int(sliced.group(2)), int(sliced.group(3) or 1000)
        prefixes = tuple(f"{base}.{index}." for index in range(start, stop))
    else:
        prefixes = (group + ".",)
    return sum(p.numel() for name, p in net.named_parameters() if name.startswith(prefixes))


def total(net: Any, prefix: str = "") -> int:
    return sum(p.numel() for name, p in net.named_parameters() if name.startswith(prefix))


HEADS = [
    ("decoder", "Decoder (all layers)", 5, False),
    ("segmentation_head", "Segmentation Head", 6, False),
]
CASES: dict[str, tuple[str, list[tuple[str, str, int, bool]], bool]] = {
    # encoder: (architecture, encoder groups (name, display suffix, depth, freeze), groups partition the encoder)
    "resnet18": (
        "Unet",
        [
            ("encoder.conv1", "Initial Conv", 0, True),
            ("encoder.layer1", "Block 1 (64 filters)", 1, True),
            ("encoder.layer2", "Block 2 (128 filters)", 2, True),
            ("encoder.layer3", "Block 3 (256 filters)", 3, False),
            ("encoder.layer4", "Block 4 (512 filters)", 4, False),
        ],
        False,
    ),
    "se_resnet50": (
        "Unet",
        [
            ("encoder.layer0", "Initial Conv", 0, True),
            ("encoder.layer1", "Block 1 (64 filters)", 1, True),
            ("encoder.layer2", "Block 2 (128 filters)", 2, True),
            ("encoder.layer3", "Block 3 (256 filters)", 3, False),
            ("encoder.layer4", "Block 4 (512 filters)", 4, False),
        ],
        True,
    ),
    "efficientnet-b0": (
        "Unet",
        [
            ("encoder._conv_stem", "Stem Conv", 0, True),
            ("encoder._blocks[0:4]", "Blocks 0-3", 1, True),
            ("encoder._blocks[4:10]", "Blocks 4-9", 2, True),
            ("encoder._blocks[10:18]", "Blocks 10-17", 3, False),
            ("encoder._blocks[18:]", "Blocks 18+", 4, False),
        ],
        False,
    ),
    "densenet121": (
        "FPN",
        [
            ("encoder.features.conv0", "Initial Conv", 0, True),
            ("encoder.features.denseblock1", "Dense Block 1", 1, True),
            ("encoder.features.denseblock2", "Dense Block 2", 2, True),
            ("encoder.features.denseblock3", "Dense Block 3", 3, False),
            ("encoder.features.denseblock4", "Dense Block 4", 4, False),
        ],
        False,
    ),
    "vgg16_bn": (
        "Unet",
        [
            ("encoder.features[0:7]", "Layers 1-2 (64 filters)", 0, True),
            ("encoder.features[7:14]", "Layers 3-4 (128 filters)", 1, True),
            ("encoder.features[14:24]", "Layers 5-7 (256 filters)", 2, True),
            ("encoder.features[24:34]", "Layers 8-10 (512 filters)", 3, False),
            ("encoder.features[34:]", "Layers 11-13 (512 filters)", 4, False),
        ],
        True,
    ),
    "mobilenet_v2": (
        "Unet",
        [
            ("encoder.features[0:2]", "Initial Conv", 0, True),
            ("encoder.features[2:5]", "Blocks 1-3", 1, True),
            ("encoder.features[5:9]", "Blocks 4-7", 2, True),
            ("encoder.features[9:14]", "Blocks 8-12", 3, False),
            ("encoder.features[14:]", "Blocks 13+", 4, False),
        ],
        True,
    ),
}


@pytest.mark.parametrize("encoder", list(CASES))
def test_catalogued_families(encoder: str) -> None:
    arch, specs, partitions = CASES[encoder]
    net = model(arch, encoder)
    groups = layer_groups(net, encoder)
    rows = [(g["name"], g["display_name"], g["depth"], g["recommended_freeze"], g["is_encoder"]) for g in groups]
    assert rows == [(n, f"Encoder: {s}", d, f, True) for n, s, d, f in specs] + [(*h, False) for h in HEADS]
    for group in groups:
        assert group["param_count"] == expected_count(net, group["name"]), group["name"]
        assert group["description"]
    assert all(g["param_count"] > 0 for g in groups if g["name"] != "encoder._blocks[18:]")
    encoder_sum = sum(g["param_count"] for g in groups if g["is_encoder"])
    if partitions:
        assert encoder_sum == total(net, "encoder.")
        assert sum(g["param_count"] for g in groups) == total(net)
    else:
        assert 0 < encoder_sum < total(net, "encoder.")


def test_resnet18_stem_is_the_conv_alone() -> None:
    net = model("Unet", "resnet18")
    stem = layer_groups(net, "resnet18")[0]
    assert stem["param_count"] == 64 * 3 * 7 * 7 == 9408
    # bn1 is in no group, which is the gap between the encoder total and the groups.
    encoder_sum = sum(g["param_count"] for g in layer_groups(net, "resnet18") if g["is_encoder"])
    assert total(net, "encoder.") - encoder_sum == total(net, "encoder.bn1.")


def test_stem_count_follows_the_input_channels() -> None:
    stem = layer_groups(model("Unet", "resnet18", in_channels=5), "resnet18")[0]
    assert stem["param_count"] == 64 * 5 * 7 * 7


def test_efficientnet_b0_last_slice_is_empty() -> None:
    net = model("Unet", "efficientnet-b0")
    assert len(net.encoder._blocks) == 16
    groups = {g["name"]: g for g in layer_groups(net, "efficientnet-b0")}
    assert groups["encoder._blocks[18:]"]["param_count"] == 0
    assert resolve_group(net, "encoder._blocks[18:]") == []
    blocks = sum(groups[f"encoder._blocks[{s}]"]["param_count"] for s in ("0:4", "4:10", "10:18", "18:"))
    assert blocks == total(net, "encoder._blocks.")


def test_histology_encoder_uses_resnet_groups_with_its_own_descriptions() -> None:
    net = model("Unet", "resnet50")
    imagenet = layer_groups(net, "resnet50")
    histology = layer_groups(net, "resnet50_lunit-swav")
    strip = [{k: v for k, v in g.items() if k != "description"} for g in imagenet]
    assert strip == [{k: v for k, v in g.items() if k != "description"} for g in histology]
    assert imagenet[0]["description"] != histology[0]["description"]
    assert imagenet[-1]["description"] == histology[-1]["description"]


def test_uncatalogued_encoder_gets_placeholders() -> None:
    net = model("Unet", "resnext50_32x4d")
    groups = layer_groups(net, "resnext50_32x4d")
    rows = [(g["name"], g["display_name"], g["depth"], g["recommended_freeze"], g["param_count"]) for g in groups]
    assert rows[:3] == [
        ("encoder.layer_early", "Encoder: Early Layers", 0, True, 0),
        ("encoder.layer_mid", "Encoder: Middle Layers", 2, False, 0),
        ("encoder.layer_late", "Encoder: Late Layers", 4, False, 0),
    ]
    assert [g["name"] for g in groups[3:]] == ["decoder", "segmentation_head"]
    assert groups[3]["param_count"] == total(net, "decoder.")


def test_se_resnet_conv1_is_an_alias_of_layer0() -> None:
    net = model("Unet", "se_resnet50")
    assert resolve_group(net, "encoder.conv1") == [net.encoder.layer0]
    # Only the missing stem name falls back; ResNets keep their own conv1.
    plain = model("Unet", "resnet18")
    assert resolve_group(plain, "encoder.conv1") == [plain.encoder.conv1]


def test_slices_follow_python_rules() -> None:
    net = model("Unet", "efficientnet-b0")
    blocks = list(net.encoder._blocks)
    assert resolve_group(net, "encoder._blocks[0:4]") == blocks[0:4]
    assert resolve_group(net, "encoder._blocks[14:]") == blocks[14:]
    assert resolve_group(net, "encoder._blocks[10:18]") == blocks[10:16]
    assert resolve_group(net, "encoder._blocks[:2]") == blocks[:2]
    assert resolve_group(net, "encoder._blocks[-2:]") == blocks[-2:]
    assert resolve_group(net, "encoder._blocks[4:4]") == []
    assert resolve_group(net, "encoder._blocks[30:40]") == []


def test_plain_and_numeric_paths() -> None:
    net = model("FPN", "densenet121")
    assert resolve_group(net, "decoder") == [net.decoder]
    assert resolve_group(net, "encoder.features.denseblock1") == [net.encoder.features.denseblock1]
    # densenet's `features` names its children, so a numeric part indexes by position.
    assert resolve_group(net, "encoder.features.0") == [net.encoder.features.conv0]
    vgg = model("Unet", "vgg16_bn")
    assert resolve_group(vgg, "encoder.features.3") == [vgg.encoder.features[3]]
    assert count_parameters(resolve_group(vgg, "encoder.features[0:7]")) == expected_count(vgg, "encoder.features[0:7]")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "encoder.",
        ".encoder",
        "encoder.nope",
        "nope",
        "encoder.layer9",
        "encoder.features.99",
        "encoder.features[0:2].x",
        "encoder.features[a:b]",
        "encoder.features[1]",
        "encoder.forward",
        "encoder.features.conv0.weight",
    ],
)
def test_bad_names_resolve_to_nothing(name: str) -> None:
    assert resolve_group(model("FPN", "densenet121"), name) == []
