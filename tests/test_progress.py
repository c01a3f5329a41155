"""progress.py: the training bar, the inference tile count, result summaries and the `list` table."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlwatchd.cli import main
from dlwatchd.client import SpoolClient
from dlwatchd.progress import (
    JobRow,
    StatusFollower,
    collect_rows,
    format_duration,
    progress_bar,
    render_table,
    result_summary,
    short_progress,
    status_text,
)
from dlwatchd.protocol.status import JobStatus

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def status(kind: str, state: str, seq: int = 1, progress: dict[str, Any] | None = None, **extra: Any) -> JobStatus:
    return JobStatus.model_validate(
        {
            "job_id": extra.pop("job_id", "job-1"),
            "kind": kind,
            "state": state,
            "seq": seq,
            "created_at": extra.pop("created_at", "2025-03-01T11:58:00.000Z"),
            "updated_at": "2025-03-01T11:59:00.000Z",
            "progress": progress,
            **extra,
        }
    )


BATCH = {"phase": "train", "epoch": 2, "batch": 3, "batches_per_epoch": 6, "total_epochs": 10, "fraction": 0.25,
         "eta_s": 95.0, "device": "cpu"}  # fmt: skip
EPOCH = {"phase": "train", "epoch": 3, "total_epochs": 10, "fraction": 0.3, "loss": 0.58877, "train_loss": 0.7,
         "accuracy": 0.81, "mean_iou": 0.62884, "per_class_iou": {"a": 0.5}, "learning_rate": 0.001}  # fmt: skip


def test_bar_and_durations() -> None:
    assert progress_bar(0.25, width=8) == "[##------]"
    assert progress_bar(1.7, width=4) == "[####]" and progress_bar(None, width=3) == "[---]"
    assert [format_duration(s) for s in (None, 42, 187, 3723)] == ["?", "42s", "3:07", "1:02:03"]


def test_training_line_shows_epoch_loss_iou_and_eta() -> None:
    line = status_text("train", "running", EPOCH | {"eta_s": 42})
    assert line.startswith("running")
    assert "epoch 3/10" in line and "[######--------------]" in line and "30%" in line
    assert "loss 0.5888" in line and "mIoU 0.629" in line and "ETA 42s" in line
    during = status_text("train", "running", BATCH)
    assert "epoch 3/10 batch 3/6" in during and "ETA 1:35" in during
    assert status_text("train", "queued", None) == "queued     waiting for the training worker"
    assert "checking data" in status_text("train", "running", {"phase": "preflight", "epoch": 0, "total_epochs": 10})
    done = status_text("train", "succeeded", EPOCH | {"phase": "export", "epoch": 10, "fraction": 1.0})
    assert "epoch 10/10" in done and "100%" in done and "ETA" not in done


def test_the_follower_keeps_the_last_epochs_metrics_between_batch_records() -> None:
    clock = [100.0]
    follower = StatusFollower(io.StringIO(), tty=False, clock=lambda: clock[0])
    follower.line(status("train", "running", 1, BATCH))
    follower.line(status("train", "running", 2, EPOCH))
    clock[0] += 30
    line = follower.line(status("train", "running", 3, {"phase": "validate", "epoch": 3}))
    # the validation record has neither totals nor metrics: both come from memory, the ETA counts down
    assert "epoch 4/10 validating" in line and "loss 0.5888" in line and "mIoU 0.629" in line
    assert "ETA 1:05" in line and "30%" in line


def test_inference_line_counts_tiles() -> None:
    line = status_text("infer-pixel", "running", {"tiles_done": 12, "tiles_total": 40, "fraction": 0.3})
    assert line == "running    tiles 12/40  [######--------------]   30%"
    assert status_text("infer", "queued", None) == "queued     waiting for the inference worker"
    assert status_text("infer", "succeeded", {"tiles_done": 1, "tiles_total": 1}) == "succeeded"
    assert status_text("health", "running", None) == "running"


def test_plain_output_writes_a_line_only_when_something_changes() -> None:
    out = io.StringIO()
    follower = StatusFollower(out, tty=False)
    for seq, done in enumerate((0, 1, 1, 2, 5, 10), start=1):
        follower(status("infer-pixel", "running", seq, {"tiles_done": done, "tiles_total": 10}))
    follower(status("infer-pixel", "succeeded", 7, {"tiles_done": 10, "tiles_total": 10}))
    lines = out.getvalue().splitlines()
    assert [line.split()[2] if "tiles" in line else line for line in lines] == [
        "0/10", "1/10", "2/10", "5/10", "10/10", "succeeded"
    ]  # fmt: skip
    assert "\r" not in out.getvalue()


def test_a_terminal_redraws_one_line_in_place() -> None:
    out = io.StringIO()
    follower = StatusFollower(out, tty=True, width=80)
    follower(status("train", "running", 1, BATCH))
    follower(status("train", "running", 2, {"phase": "validate", "epoch": 2}))
    follower(status("train", "succeeded", 3, EPOCH | {"epoch": 10, "fraction": 1.0}))
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert all(len(part) <= 80 for part in text.split("\r"))


def test_result_summaries() -> None:
    train = {"model_id": "unet_1", "model_path": "/s/models/unet_1", "epochs_trained": 10, "best_epoch": 9,
             "stop_reason": "epochs_done", "final_loss": 0.07, "final_accuracy": 0.98, "mean_iou": 0.9595,
             "per_class_iou": {"Background": 0.94, "Nucleus": 0.97}}  # fmt: skip
    lines = result_summary("train", train)
    assert lines[0].startswith("model unet_1: 10 epochs, best epoch 9")
    assert "mean IoU 0.960" in lines[1] and "Nucleus 0.970" in lines[2] and lines[3].endswith("/s/models/unet_1")
    pixel = {"output_paths": {"a": "/o/a.bin", "b": "/o/b.bin"}, "num_classes": 3}
    assert result_summary("infer-pixel", pixel) == ["2 probability maps (3 classes, .bin float32) in /o"]
    assert result_summary("health", {"state": "ready"}) == []


def test_list_table_columns_and_counts() -> None:
    rows = [
        JobRow("a1", "train", "running", "2025-03-01T11:55:00Z", "epoch 3/10 30%"),
        JobRow("b22", "infer-pixel", "failed", "2025-02-27T12:00:00Z", "E_NOT_FOUND"),
        JobRow("c333", "-", "incoming", None, ""),
    ]
    table = render_table(rows, now=NOW).splitlines()
    assert table[0].split() == ["ID", "KIND", "STATE", "AGE", "PROGRESS"]
    assert table[1].split() == ["a1", "train", "running", "5m", "epoch", "3/10", "30%"]
    assert table[2].split() == ["b22", "infer-pixel", "failed", "2d", "E_NOT_FOUND"]
    assert table[3].split() == ["c333", "-", "incoming", "-"]
    assert table[0].index("KIND") == table[1].index("train") == table[2].index("infer-pixel")
    assert table[-1] == "3 jobs: 1 running, 1 failed, 1 incoming"
    assert render_table([]) == "no jobs"
    assert short_progress("train", "running", BATCH, None) == "epoch 2/10 25%"
    assert short_progress("infer", "succeeded", {"tiles_done": 4, "tiles_total": 4, "fraction": 1.0}, None) == (
        "tiles 4/4"
    )


def _job(spool: Path, where: str, job: JobStatus) -> None:
    (spool / where).mkdir(parents=True, exist_ok=True)
    (spool / where / f"{job.job_id}.json").write_text("{}")
    (spool / "jobs" / job.job_id).mkdir(parents=True, exist_ok=True)
    (spool / "jobs" / job.job_id / "status.json").write_text(json.dumps(job.model_dump(mode="json")))


def test_list_reads_each_jobs_status(tmp_path: Path, capsys: Any) -> None:
    spool = tmp_path / "spool"
    _job(spool, "queued", status("train", "queued", job_id="later", created_at="2025-03-01T11:59:00Z"))
    _job(spool, "done", status("infer-pixel", "succeeded", progress={"tiles_done": 2, "tiles_total": 2},
                               job_id="first", created_at="2025-03-01T10:00:00Z"))  # fmt: skip
    failed = status(
        "train", "failed", job_id="broken", created_at="2025-03-01T11:00:00Z",
        error={"code": "E_EMPTY_DATASET", "message": "No images."},
    )  # fmt: skip
    _job(spool, "failed", failed)
    (spool / "incoming").mkdir(exist_ok=True)
    (spool / "incoming" / "fresh.json").write_text("{}")
    rows = collect_rows(SpoolClient(spool))
    assert [(r.job_id, r.state, r.progress) for r in rows] == [
        ("first", "succeeded", "tiles 2/2"),
        ("broken", "failed", "E_EMPTY_DATASET"),
        ("later", "queued", ""),
        ("fresh", "incoming", ""),
    ]
    assert main(["list", "--spool", str(spool)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["ID", "KIND", "STATE", "AGE", "PROGRESS"] and len(printed) == 7
    assert main(["list", "--spool", str(spool), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == ["broken"]
