"""The architecture catalogue: reference order, aliases, letter case, unknown names, answer shape."""

from __future__ import annotations

import pytest

from dlwatchd.catalog.architectures import (
    ArchitectureEntry,
    architecture_answer,
    canonical_architecture_name,
    list_architectures,
    register_architecture,
    resolve_architecture,
)
from dlwatchd.errors import DlwatchdError, ErrorCode

# name, smp class, display_name, decoder_channels, supports_aux_output: ENGINE.md section 6.1.
TABLE = [
    ("unet", "Unet", "U-Net", (256, 128, 64, 32, 16), False),
    ("unetplusplus", "UnetPlusPlus", "U-Net++", (256, 128, 64, 32, 16), True),
    ("deeplabv3", "DeepLabV3", "DeepLab V3", (256,), False),
    ("deeplabv3plus", "DeepLabV3Plus", "DeepLab V3+", (256, 48), False),
    ("fpn", "FPN", "Feature Pyramid Network", (256, 256, 256, 256), False),
    ("pspnet", "PSPNet", "PSPNet", (512,), False),
    ("manet", "MAnet", "MA-Net", (256, 128, 64, 32, 16), False),
    ("linknet", "Linknet", "LinkNet", (256, 128, 64, 32), False),
    ("pan", "PAN", "PAN", (32,), False),
]


def test_catalogue_order_and_table() -> None:
    rows = [
        (e.name, e.smp_class, e.display_name, e.decoder_channels, e.supports_aux_output) for e in list_architectures()
    ]
    assert rows == TABLE
    for entry in list_architectures():
        assert entry.size_divisor == 32
        assert entry.description.endswith(".") and entry.description.count(". ") == 0


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("unet++", "unetplusplus"),
        ("UNet++", "unetplusplus"),
        ("deeplabv3+", "deeplabv3plus"),
        ("DeepLabV3Plus", "deeplabv3plus"),
        (" FPN ", "fpn"),
        ("MAnet", "manet"),
        ("PAN", "pan"),
    ],
)
def test_names_resolve_case_insensitively_with_aliases(sent: str, canonical: str) -> None:
    assert canonical_architecture_name(sent) == canonical
    assert resolve_architecture(sent).name == canonical


@pytest.mark.parametrize("name", ["segnet", "upernet", "segformer", "dpt", "unet+", ""])
def test_unknown_is_not_found_listing_the_valid_names(name: str) -> None:
    with pytest.raises(DlwatchdError) as caught:
        resolve_architecture(name)
    error = caught.value
    assert error.code is ErrorCode.NOT_FOUND
    assert repr(name) in error.message
    assert "unetplusplus" in error.message and "deeplabv3+" in error.message and "pan" in error.message
    with pytest.raises(DlwatchdError):
        canonical_architecture_name(name)


def test_list_filters_with_fnmatch() -> None:
    assert [e.name for e in list_architectures("unet*")] == ["unet", "unetplusplus"]
    assert [e.name for e in list_architectures("deeplab*")] == ["deeplabv3", "deeplabv3plus"]


def test_duplicate_name_or_alias_raises() -> None:
    with pytest.raises(ValueError):
        register_architecture(ArchitectureEntry("UNet", "x", "Unet", "x.", (16,), False))
    with pytest.raises(ValueError):
        register_architecture(ArchitectureEntry("newnet", "x", "Unet", "x.", (16,), False, aliases=("unet++",)))
    assert [e.name for e in list_architectures("newnet")] == []


def test_answer_shape() -> None:
    answer = architecture_answer(resolve_architecture("deeplabv3+"))
    assert list(answer) == ["name", "display_name", "description", "decoder_channels", "supports_aux_output"]
    assert answer["decoder_channels"] == [256, 48] and answer["supports_aux_output"] is False
