"""The training report PNG: drawn without pyplot, for one epoch, several, and with gaps in the data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from dlwatchd.artifacts.report import write_training_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["Background", "Tumor", "Stroma"]


def history(epochs: int) -> list[dict[str, Any]]:
    return [
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "val_loss": 1.2 / epoch,
            "accuracy": 0.5 + 0.05 * epoch,
            "learning_rate": 1e-3,
            "per_class_iou": {name: round(0.1 * epoch + 0.05 * index, 4) for index, name in enumerate(CLASSES)},
            "per_class_loss": dict.fromkeys(CLASSES, 0.3),
            "mean_iou": 0.1 * epoch,
            "epoch_time_s": 1.5,
            "is_best": epoch == epochs,
        }
        for epoch in range(1, epochs + 1)
    ]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000  # four drawn panels, not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the atomic write left no temp file


@pytest.mark.parametrize("epochs", [1, 5])
def test_report_is_a_png(tmp_path: Path, epochs: int) -> None:
    path = tmp_path / "training_report.png"
    matrix = [[50, 3, 1], [4, 40, 6], [0, 2, 30]]
    write_training_report(path, history(epochs), CLASSES, matrix, best_epoch=epochs)
    assert_png(path)


def test_report_with_none_values_and_no_matrix(tmp_path: Path) -> None:
    entries = history(3)
    entries[0]["val_loss"] = None
    entries[1]["mean_iou"] = None
    entries[2]["per_class_iou"] = {"Background": None, "Tumor": 0.4, "Stroma": 0.2}
    path = tmp_path / "report.png"
    write_training_report(path, entries, CLASSES, None, best_epoch=None)
    assert_png(path)


def test_report_with_an_empty_history_and_an_empty_class_row(tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    write_training_report(path, [], ["a", "b"], [[0, 0], [3, 5]], best_epoch=None)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_report_leaves_no_pyplot_state(tmp_path: Path) -> None:
    was_loaded = "matplotlib.pyplot" in sys.modules
    write_training_report(tmp_path / "r.png", history(2), CLASSES, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], best_epoch=2)
    if not was_loaded:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
