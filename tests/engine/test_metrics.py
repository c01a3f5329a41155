"""Validation metrics of ENGINE §8.6 against hand-counted examples with ignored pixels and absent classes."""

from __future__ import annotations

import math

import pytest
import torch

from dlwatchd.engine.metrics import EpochMetrics

U = 255
NAMES = ["background", "tumor", "stroma", "necrosis"]


def logits_for(predictions: list[list[int]], num_classes: int = 4) -> torch.Tensor:
    """1×C×H×W logits whose argmax is `predictions` (confident: 5 for the predicted class, 0 elsewhere)."""
    predicted = torch.tensor(predictions)
    return torch.nn.functional.one_hot(predicted, num_classes).permute(2, 0, 1).unsqueeze(0).float() * 5.0


# Target and prediction, 2×4; class 3 (necrosis) is absent from both, U pixels are predicted anything.
TARGET = [[0, 0, 1, U], [1, 2, U, 0]]
PREDICTED = [[0, 1, 1, 3], [0, 2, 2, 0]]
# Labeled pixels (y, ŷ): (0,0) (0,1) (1,1) (1,0) (2,2) (0,0)  →  rows true, columns predicted.
CONFUSION = [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_hand_counted_confusion_accuracy_and_iou() -> None:
    metrics = EpochMetrics(num_classes=4, ignore_index=U)
    metrics.update(logits_for(PREDICTED), torch.tensor([TARGET]))
    metrics.add_batch_loss(0.5)
    result = metrics.result(NAMES)
    assert result["confusion_matrix"] == CONFUSION
    assert result["accuracy"] == 4 / 6
    # IoU: class 0 TP 2 FP 1 FN 1 → 2/4; class 1 TP 1 FP 1 FN 1 → 1/3; class 2 → 1; class 3 absent → 0.
    assert result["per_class_iou"] == {"background": 0.5, "tumor": 0.3333, "stroma": 1.0, "necrosis": 0.0}
    assert list(result["per_class_iou"]) == NAMES
    assert result["mean_iou"] == round((0.5 + 1 / 3 + 1.0 + 0.0) / 4, 4) == 0.4583
    assert result["val_loss"] == 0.5


def test_per_class_loss_is_the_mean_clamped_ce_of_each_true_class() -> None:
    # Row: y=0 confident right, y=0 absurdly wrong (CE 400 → 100), y=1 even split of two classes, U wrong.
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, 0] = 20.0
    logits[0, 1, 0, 1] = 400.0
    logits[0, :2, 0, 2] = 1.0
    logits[0, 2, 0, 2] = -1e4
    logits[0, 1, 0, 3] = 400.0
    metrics = EpochMetrics(num_classes=3, ignore_index=U)
    metrics.update(logits, torch.tensor([[[0, 0, 1, U]]]))
    result = metrics.result(["a", "b", "c"])
    right = -(20.0 - math.log(math.exp(20.0) + 2.0))
    assert result["per_class_loss"] == {"a": round((right + 100.0) / 2, 4), "b": round(math.log(2.0), 4), "c": 0.0}


def test_two_batches_accumulate_like_one_and_val_loss_is_the_batch_mean() -> None:
    target = torch.tensor([TARGET])
    logits = logits_for(PREDICTED)
    split = EpochMetrics(num_classes=4, ignore_index=U)
    split.update(logits[..., :2], target[..., :2])
    split.update(logits[..., 2:], target[..., 2:])
    split.add_batch_loss(1.0)
    split.add_batch_loss(2.0)
    whole = EpochMetrics(num_classes=4, ignore_index=U)
    whole.update(logits, target)
    split_result, whole_result = split.result(NAMES), whole.result(NAMES)
    assert split_result["val_loss"] == 1.5  # mean over batches, not over pixels
    for key in ("confusion_matrix", "accuracy", "mean_iou", "per_class_iou", "per_class_loss"):
        assert split_result[key] == whole_result[key], key


def test_no_labeled_pixels_gives_zeros_not_errors() -> None:
    metrics = EpochMetrics(num_classes=2, ignore_index=U)
    metrics.update(torch.randn(1, 2, 2, 2), torch.full((1, 2, 2), U))
    result = metrics.result(["a", "b"])
    assert result["accuracy"] == 0.0 and result["mean_iou"] == 0.0
    assert result["per_class_iou"] == {"a": 0.0, "b": 0.0} and result["per_class_loss"] == {"a": 0.0, "b": 0.0}
    assert result["confusion_matrix"] == [[0, 0], [0, 0]]


def test_non_finite_values_become_none() -> None:
    metrics = EpochMetrics(num_classes=2, ignore_index=U)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0, 0, 0] = float("nan")
    metrics.update(logits, torch.tensor([[[0, 1]]]))
    metrics.add_batch_loss(float("nan"))
    result = metrics.result(["a", "b"])
    assert result["val_loss"] is None
    assert result["per_class_loss"]["a"] is None
    assert result["per_class_loss"]["b"] == pytest.approx(round(math.log(2.0), 4))


def test_half_precision_logits_and_a_class_name_mismatch() -> None:
    metrics = EpochMetrics(num_classes=4, ignore_index=U)
    metrics.update(logits_for(PREDICTED).half(), torch.tensor([TARGET]))
    assert metrics.result(NAMES)["confusion_matrix"] == CONFUSION
    with pytest.raises(ValueError):
        metrics.result(NAMES[:3])
