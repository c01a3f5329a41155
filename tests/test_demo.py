"""`dlwatchd demo --quick` end to end: its own daemon, a real training and infer-pixel, pictures and a summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlwatchd.demo import score

REPO = Path(__file__).resolve().parents[1]


def test_score_counts_iou_from_the_confusion_of_every_pixel() -> None:
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    predicted = np.array([[0, 1, 1, 1], [2, 2, 0, 2]])
    scores = score([predicted], [truth], ["a", "b", "c"])
    # a: TP 1, FP 1, FN 1 -> 1/3; b: TP 2, FP 1 -> 2/3; c: TP 3, FN 1 -> 3/4
    assert scores.per_class_iou == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 3 / 4})
    assert scores.mean_iou == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert scores.accuracy == pytest.approx(6 / 8)
    assert scores.pixels == 8


def test_quick_demo_trains_predicts_and_writes_its_pictures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(
        os.environ, TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-m", "dlwatchd", "demo", "--quick", "--clean", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in range(1, 6):
        assert f"[{step}/5]" in done.stdout
    summary = (out / "summary.txt").read_text()
    match = re.search(r"held-out mean IoU: ([0-9.]+)", summary)
    assert match, summary
    # Three classes: chance is 1/3. The quick run must clearly have learned something on tiles it never saw.
    assert float(match.group(1)) > 0.6, summary
    with Image.open(out / "overlay.png") as overlay:
        width, height = overlay.size
    assert width > 3 * 64 and height >= 64  # image | prediction | ground truth, side by side
    assert (out / "training_report.png").stat().st_size > 10_000
    # --clean removed the temporary spool and the daemon is gone with it.
    assert not any(tmp_path.glob("dlwatchd-demo-*"))
