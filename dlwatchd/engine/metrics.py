"""Validation metrics accumulated over a whole validation pass (ENGINE §8.6).

Counts and loss sums stay on the device during the pass and meet the host once, in `result`, so a validation batch
costs no synchronisation beyond the criterion value the caller already reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dlwatchd.engine.losses import per_class_loss_sums


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class EpochMetrics:
    """Confusion matrix, per-class CE sums and batch losses of one validation pass.

    The confusion matrix is indexed [true class][predicted class] over labeled pixels (target ≠ ignore_index).
    """

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # Moved to the logits' device by the first update; .to() is a no-op after that.
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._loss_sums = torch.zeros(num_classes, dtype=torch.float32)
        self._loss_counts = torch.zeros(num_classes, dtype=torch.int64)
        self._batch_loss_total = 0.0
        self._batch_count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: logits N×C×H×W, target N×H×W (U pixels are skipped)."""
        c = self.num_classes
        target = target.long()
        labeled = target != self.ignore_index
        predicted = logits.float().argmax(dim=1)
        # U pixels land in one extra bin past the C×C cells and are dropped: no boolean gather, no host sync.
        cells = torch.where(labeled, target * c + predicted, torch.full_like(target, c * c))
        confusion = torch.bincount(cells.flatten(), minlength=c * c + 1)[: c * c].view(c, c)
        sums, counts = per_class_loss_sums(logits, target, num_classes=c, ignore_index=self.ignore_index)
        # Summed in float32 on the device: float64 would need a host copy per batch (MPS has none), and adding a few
        # hundred batch sums loses far less than the 4 decimals reported.
        self._confusion = self._confusion.to(confusion.device) + confusion
        self._loss_sums = self._loss_sums.to(sums.device) + sums
        self._loss_counts = self._loss_counts.to(counts.device) + counts

    def add_batch_loss(self, loss: float) -> None:
        """Record one batch's criterion value; `val_loss` is their unweighted mean (the reference definition)."""
        self._batch_loss_total += float(loss)
        self._batch_count += 1

    def result(self, class_names: list[str]) -> dict[str, Any]:
        """The §8.6 metrics, keyed by `class_names` in class order.

        Returns val_loss, accuracy, mean_iou, per_class_iou, per_class_loss and confusion_matrix (list of int rows).
        per_class_* and mean_iou are rounded to 4 decimals; non-finite values become None. Raises ValueError when
        `class_names` does not have one name per class.
        """
        c = self.num_classes
        if len(class_names) != c:
            raise ValueError(f"{len(class_names)} class names for {c} classes")
        matrix = self._confusion.cpu().tolist()
        loss_sums = self._loss_sums.cpu().tolist()
        loss_counts = self._loss_counts.cpu().tolist()
        labeled = sum(map(sum, matrix))
        correct = sum(matrix[i][i] for i in range(c))
        ious = []
        for i in range(c):
            true_positive = matrix[i][i]
            false_negative = sum(matrix[i]) - true_positive
            false_positive = sum(row[i] for row in matrix) - true_positive
            denominator = true_positive + false_positive + false_negative
            ious.append(true_positive / denominator if denominator else 0.0)
        class_losses = [total / count if count else 0.0 for total, count in zip(loss_sums, loss_counts, strict=True)]
        val_loss = self._batch_loss_total / self._batch_count if self._batch_count else math.nan
        return {
            "val_loss": _finite_or_none(val_loss),
            "accuracy": correct / labeled if labeled else 0.0,
            "mean_iou": round(sum(ious) / c, 4),
            "per_class_iou": {name: round(iou, 4) for name, iou in zip(class_names, ious, strict=True)},
            "per_class_loss": {
                name: _finite_or_none(round(loss, 4)) for name, loss in zip(class_names, class_losses, strict=True)
            },
            "confusion_matrix": matrix,
        }
