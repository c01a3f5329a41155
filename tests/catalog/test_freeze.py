"""Freeze recommendations: the ENGINE.md section 7.3 table for both weight kinds, and bad sizes."""

from __future__ import annotations

import pytest

from dlwatchd.catalog.freeze import freeze_recommendations
from dlwatchd.errors import DlwatchdError, ErrorCode

T, F = True, False
IMAGENET = {"small": [T, T, T, T, F], "medium": [T, T, T, F, F], "large": [T, T, F, F, F]}
HISTOLOGY = {"small": [T, T, F, F, F], "medium": [T, F, F, F, F], "large": [F, F, F, F, F]}
HISTOLOGY_NAMES = ["resnet50_lunit-swav", "resnet50_lunit-bt", "resnet50_kather100k", "resnet50_tcga-brca"]


def as_answer(size: str, flags: list[bool]) -> dict[str, object]:
    return {
        "dataset_size": size,
        "recommendations": {"0": flags[0], "1": flags[1], "2": flags[2], "3": flags[3], "4": flags[4]},
    }


@pytest.mark.parametrize("size", ["small", "medium", "large"])
@pytest.mark.parametrize("encoder", [None, "resnet34", "resnet50", "efficientnet-b1", "se_resnet50"])
def test_imagenet_table(size: str, encoder: str | None) -> None:
    assert freeze_recommendations(size, encoder) == as_answer(size, IMAGENET[size])


@pytest.mark.parametrize("size", ["small", "medium", "large"])
@pytest.mark.parametrize("encoder", HISTOLOGY_NAMES)
def test_histology_table(size: str, encoder: str) -> None:
    assert freeze_recommendations(size, encoder) == as_answer(size, HISTOLOGY[size])


def test_keys_are_depth_strings_in_order() -> None:
    answer = freeze_recommendations("small")
    assert list(answer["recommendations"]) == ["0", "1", "2", "3", "4"]
    assert all(isinstance(flag, bool) for flag in answer["recommendations"].values())


@pytest.mark.parametrize("size", ["tiny", "Small", "", "huge"])
def test_other_sizes_are_schema_errors(size: str) -> None:
    with pytest.raises(DlwatchdError) as caught:
        freeze_recommendations(size, "resnet34")
    assert caught.value.code is ErrorCode.SCHEMA
    assert caught.value.field == "dataset_size"
    assert repr(size) in caught.value.message
