"""The encoder catalogue: the ENGINE.md section 6.3 table, histology rows, lookups and the no-torch rule."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlwatchd.catalog.encoders import (
    EncoderEntry,
    encoder_answer,
    encoder_base,
    encoder_family,
    get_encoder,
    is_histology,
    list_encoders,
    register_encoder,
    weights_tag,
)
from dlwatchd.errors import DlwatchdError, ErrorCode

# name, display_name, family, params_millions, license, recommended_for: ENGINE.md section 6.3 verbatim.
TABLE = [
    ("resnet18", "ResNet-18", "resnet", 11.7, "MIT (torchvision)", "small_datasets, fast_inference"),
    ("resnet34", "ResNet-34", "resnet", 21.8, "MIT (torchvision)", "general_purpose, balanced"),
    ("resnet50", "ResNet-50", "resnet", 25.6, "MIT (torchvision)", "large_datasets, high_accuracy"),
    (
        "resnet50_lunit-swav",
        "ResNet-50 Lunit SwAV (Histology)",
        "resnet",
        25.6,
        "Non-commercial (Lunit)",
        "histopathology, high_accuracy, tissue_classification",
    ),
    (
        "resnet50_lunit-bt",
        "ResNet-50 Lunit Barlow Twins (Histology)",
        "resnet",
        25.6,
        "Non-commercial (Lunit)",
        "histopathology, high_accuracy, tissue_classification",
    ),
    (
        "resnet50_kather100k",
        "ResNet-50 Kather100K (Histology)",
        "resnet",
        25.6,
        "CC-BY-4.0",
        "histopathology, colorectal, tissue_classification",
    ),
    (
        "resnet50_tcga-brca",
        "ResNet-50 TCGA-BRCA (Histology)",
        "resnet",
        25.6,
        "GPLv3",
        "histopathology, breast_cancer, tissue_classification",
    ),
    ("resnet101", "ResNet-101", "resnet", 44.5, "MIT (torchvision)", "very_large_datasets"),
    ("efficientnet-b0", "EfficientNet-B0", "efficientnet", 5.3, "Apache 2.0", "efficient, mobile"),
    ("efficientnet-b3", "EfficientNet-B3", "efficientnet", 12.0, "Apache 2.0", "balanced, efficient"),
    ("efficientnet-b4", "EfficientNet-B4", "efficientnet", 19.0, "Apache 2.0", "high_accuracy, efficient"),
    ("se_resnet50", "SE-ResNet-50", "se_resnet", 28.1, "MIT", "attention, histopathology"),
    ("densenet121", "DenseNet-121", "densenet", 8.0, "BSD", "feature_reuse, small_objects"),
    ("densenet169", "DenseNet-169", "densenet", 14.1, "BSD", "feature_reuse"),
    ("mobilenet_v2", "MobileNet-V2", "mobilenet", 3.5, "Apache 2.0", "mobile, fast_inference, low_memory"),
    ("vgg16_bn", "VGG-16 (BatchNorm)", "vgg", 138.4, "MIT (torchvision)", "texture, histopathology"),
]
HISTOLOGY = {
    "resnet50_lunit-swav": "hf_hub:1aurent/resnet50.lunit_swav",
    "resnet50_lunit-bt": "hf_hub:1aurent/resnet50.lunit_bt",
    "resnet50_kather100k": "hf_hub:1aurent/resnet50.tiatoolbox-kather100k",
    "resnet50_tcga-brca": "hf_hub:1aurent/resnet50.tcga_brca_simclr",
}


def test_catalogue_is_the_reference_table_in_order() -> None:
    rows = [
        (e.name, e.display_name, e.family, e.params_millions, e.license, ", ".join(e.recommended_for))
        for e in list_encoders()
    ]
    assert rows == TABLE


def test_histology_rows_use_resnet50_and_their_hub_ids() -> None:
    for entry in list_encoders():
        if entry.name in HISTOLOGY:
            assert (entry.base, entry.hub_id, entry.pretrained_weights) == (
                "resnet50",
                HISTOLOGY[entry.name],
                ("histology",),
            )
            assert is_histology(entry.name) and weights_tag(entry.name) == "histology"
            assert encoder_base(entry.name) == "resnet50"
        else:
            assert (entry.base, entry.hub_id, entry.pretrained_weights) == (entry.name, None, ("imagenet",))
            assert not is_histology(entry.name) and weights_tag(entry.name) == "imagenet"
    assert sum(is_histology(entry.name) for entry in list_encoders()) == 4


def test_uncatalogued_names_pass_through() -> None:
    assert encoder_base("efficientnet-b1") == "efficientnet-b1"
    assert encoder_family("efficientnet-b1") == "unknown"
    assert encoder_family("se_resnet50") == "se_resnet"
    assert weights_tag("efficientnet-b1") == "imagenet"
    assert not is_histology("efficientnet-b1") and not is_histology(None)


def test_get_encoder_unknown_is_not_found_naming_it() -> None:
    assert get_encoder("densenet121").display_name == "DenseNet-121"
    with pytest.raises(DlwatchdError) as caught:
        get_encoder("efficientnet-b1")
    error = caught.value
    assert error.code is ErrorCode.NOT_FOUND
    assert "efficientnet-b1" in error.message and "resnet18" in error.message
    assert error.hint is not None and "encoders" in error.hint


def test_list_filters_with_fnmatch() -> None:
    assert [e.name for e in list_encoders("efficientnet-*")] == [
        "efficientnet-b0",
        "efficientnet-b3",
        "efficientnet-b4",
    ]
    assert [e.name for e in list_encoders("*_lunit-*")] == ["resnet50_lunit-swav", "resnet50_lunit-bt"]
    assert list_encoders("nothing*") == []


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        register_encoder(EncoderEntry("resnet18", "x", "resnet", 1.0, ("imagenet",), "MIT", (), "resnet18"))


def test_answer_shape() -> None:
    answer = encoder_answer(get_encoder("resnet50_kather100k"), weights_available=True)
    assert answer == {
        "name": "resnet50_kather100k",
        "display_name": "ResNet-50 Kather100K (Histology)",
        "family": "resnet",
        "params_millions": 25.6,
        "pretrained_weights": ["histology"],
        "license": "CC-BY-4.0",
        "recommended_for": ["histopathology", "colorectal", "tissue_classification"],
        "weights_available": True,
    }


def test_catalogue_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import dlwatchd.catalog.encoders, dlwatchd.catalog.architectures, dlwatchd.catalog.freeze\n"
        "import dlwatchd.catalog.layers, dlwatchd.jobs.catalog, dlwatchd.protocol.train_request\n"
        "heavy = [m for m in ('torch', 'segmentation_models_pytorch', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
