"""The encoder catalogue (ENGINE.md sections 6.3 and 6.4), filled by `register_encoder`.

Pure data: importing this module imports no torch, smp or timm, so the supervisor can answer
catalogue queries. Any smp encoder name outside the catalogue stays usable with family `unknown`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode


@dataclass(frozen=True)
class EncoderEntry:
    """One catalogued encoder.

    `base` is the smp encoder the model is built with; `hub_id` is the timm hub id the
    histology weights come from (None for the ImageNet encoders).
    """

    name: str
    display_name: str
    family: str
    params_millions: float
    pretrained_weights: tuple[str, ...]
    license: str
    recommended_for: tuple[str, ...]
    base: str
    hub_id: str | None = None


_ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    """Add `entry` to the catalogue (listing order is registration order).

    Raises ValueError when the name is already registered.
    """
    if entry.name in _ENCODERS:
        raise ValueError(f"encoder {entry.name!r} is already registered")
    _ENCODERS[entry.name] = entry
    return entry


def list_encoders(pattern: str = "*") -> list[EncoderEntry]:
    """Catalogued encoders whose name matches the fnmatch `pattern`, in catalogue order."""
    return [entry for name, entry in _ENCODERS.items() if fnmatch.fnmatchcase(name, pattern)]


def get_encoder(name: str) -> EncoderEntry:
    """The catalogue entry of `name`.

    Raises DlwatchdError(E_NOT_FOUND) naming it and listing the catalogued names.
    """
    entry = _ENCODERS.get(name)
    if entry is None:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"Unknown encoder {name!r}; catalogued encoders are: {', '.join(_ENCODERS)}.",
            hint="Send an `encoders` query for the catalogue with details of each encoder.",
            field="name",
        )
    return entry


def is_histology(name: str | None) -> bool:
    """True for the histology encoders (their weights carry the `histology` tag)."""
    entry = _ENCODERS.get(name) if name else None
    return entry is not None and "histology" in entry.pretrained_weights


def encoder_base(name: str) -> str:
    """The smp encoder name a model is built with: the catalogued base, else `name` itself."""
    entry = _ENCODERS.get(name)
    return entry.base if entry is not None else name


def encoder_family(name: str) -> str:
    """The catalogued family of `name`, or "unknown" for any other encoder."""
    entry = _ENCODERS.get(name)
    return entry.family if entry is not None else "unknown"


def weights_tag(name: str) -> str:
    """The tag of the pretrained weights `name` uses: "histology" or "imagenet"."""
    return "histology" if is_histology(name) else "imagenet"


def encoder_answer(entry: EncoderEntry, weights_available: bool) -> dict[str, Any]:
    """The JSON object of one encoder in the `encoders` and `encoder-info` answers (ENGINE.md section 14)."""
    return {
        "name": entry.name,
        "display_name": entry.display_name,
        "family": entry.family,
        "params_millions": entry.params_millions,
        "pretrained_weights": list(entry.pretrained_weights),
        "license": entry.license,
        "recommended_for": list(entry.recommended_for),
        "weights_available": weights_available,
    }


def _imagenet(name: str, display: str, family: str, params: float, licence: str, uses: str) -> EncoderEntry:
    return EncoderEntry(name, display, family, params, ("imagenet",), licence, tuple(uses.split()), base=name)


def _histology(name: str, display: str, licence: str, uses: str, hub_id: str) -> EncoderEntry:
    # Every histology encoder is a ResNet-50 whose weights come from a timm hub checkpoint.
    return EncoderEntry(
        name, display, "resnet", 25.6, ("histology",), licence, tuple(uses.split()), base="resnet50", hub_id=hub_id
    )


_TORCHVISION = "MIT (torchvision)"
_LUNIT = "Non-commercial (Lunit)"
_HISTOLOGY_USES = "histopathology high_accuracy tissue_classification"

for _entry in (
    _imagenet("resnet18", "ResNet-18", "resnet", 11.7, _TORCHVISION, "small_datasets fast_inference"),
    _imagenet("resnet34", "ResNet-34", "resnet", 21.8, _TORCHVISION, "general_purpose balanced"),
    _imagenet("resnet50", "ResNet-50", "resnet", 25.6, _TORCHVISION, "large_datasets high_accuracy"),
    _histology(
        "resnet50_lunit-swav",
        "ResNet-50 Lunit SwAV (Histology)",
        _LUNIT,
        _HISTOLOGY_USES,
        "hf_hub:1aurent/resnet50.lunit_swav",
    ),
    _histology(
        "resnet50_lunit-bt",
        "ResNet-50 Lunit Barlow Twins (Histology)",
        _LUNIT,
        _HISTOLOGY_USES,
        "hf_hub:1aurent/resnet50.lunit_bt",
    ),
    _histology(
        "resnet50_kather100k",
        "ResNet-50 Kather100K (Histology)",
        "CC-BY-4.0",
        "histopathology colorectal tissue_classification",
        "hf_hub:1aurent/resnet50.tiatoolbox-kather100k",
    ),
    _histology(
        "resnet50_tcga-brca",
        "ResNet-50 TCGA-BRCA (Histology)",
        "GPLv3",
        "histopathology breast_cancer tissue_classification",
        "hf_hub:1aurent/resnet50.tcga_brca_simclr",
    ),
    _imagenet("resnet101", "ResNet-101", "resnet", 44.5, _TORCHVISION, "very_large_datasets"),
    _imagenet("efficientnet-b0", "EfficientNet-B0", "efficientnet", 5.3, "Apache 2.0", "efficient mobile"),
    _imagenet("efficientnet-b3", "EfficientNet-B3", "efficientnet", 12.0, "Apache 2.0", "balanced efficient"),
    _imagenet("efficientnet-b4", "EfficientNet-B4", "efficientnet", 19.0, "Apache 2.0", "high_accuracy efficient"),
    _imagenet("se_resnet50", "SE-ResNet-50", "se_resnet", 28.1, "MIT", "attention histopathology"),
    _imagenet("densenet121", "DenseNet-121", "densenet", 8.0, "BSD", "feature_reuse small_objects"),
    _imagenet("densenet169", "DenseNet-169", "densenet", 14.1, "BSD", "feature_reuse"),
    _imagenet("mobilenet_v2", "MobileNet-V2", "mobilenet", 3.5, "Apache 2.0", "mobile fast_inference low_memory"),
    _imagenet("vgg16_bn", "VGG-16 (BatchNorm)", "vgg", 138.4, _TORCHVISION, "texture histopathology"),
):
    register_encoder(_entry)
del _entry
