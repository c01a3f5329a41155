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
        self._confusion: torch.Tensor | None = None
        self._loss_sums: torch.Tensor | None = None
        self._loss_counts: torch.Tensor | None = None
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
        # float64 on the CPU would cost a sync per batch and MPS has no float64; float32 per-batch sums are summed
        # here on the device and promoted to float64 only in result().
        if self._confusion is None:
            self._confusion, self._loss_sums, self._loss_counts = confusion, sums, counts
        else:
            self._confusion = self._confusion + confusion
            self._loss_sums = self._loss_sums + sums
            self._loss_counts = self._loss_counts + counts

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
        if self._confusion is None:
            confusion = torch.zeros(c, c, dtype=torch.int64)
            loss_sums = torch.zeros(c, dtype=torch.float64)
            loss_counts = torch.zeros(c, dtype=torch.int64)
        else:
            confusion = self._confusion.cpu()
            loss_sums = self._loss_sums.cpu().double()
            loss_counts = self._loss_counts.cpu()
        matrix = confusion.tolist()
        labeled = sum(map(sum, matrix))
        correct = sum(matrix[i][i] for i in range(c))
        ious = []
        for i in range(c):
            true_positive = matrix[i][i]
            false_negative = sum(matrix[i]) - true_positive
            false_positive = sum(row[i] for row in matrix) - true_positive
            denominator = true_positive + false_positive + false_negative
            ious.append(true_positive / denominator if denominator else 0.0)
        class_losses = [float(loss_sums[i]) / int(loss_counts[i]) if int(loss_counts[i]) else 0.0 for i in range(c)]
        val_loss = self._batch_loss_total / self._batch_count if self._batch_count else math.nan
        return {
            "val_loss": _finite_or_none(val_loss),
            "accuracy": correct / labeled if labeled else 0.0,
            "mean_iou": round(sum(ious) / c, 4),
            "per_class_iou": {name: round(iou, 4) for name, iou in zip(class_names, ious, strict=True)},
            "per_class_loss": {
                name: None if not math.isfinite(loss) else round(loss, 4)
                for name, loss in zip(class_names, class_losses, strict=True)
            },
            "confusion_matrix": matrix,
        }
