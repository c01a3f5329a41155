"""Progress for people: a training's one-line bar, an inference's tile count, result summaries, the `list` table.

Rendering is pure (status in, text out). `StatusFollower` adds the little state a live view needs: the daemon's
per-batch progress record does not repeat the last epoch's loss and IoU, so the follower remembers them, and it
counts an ETA down between updates. On a terminal it redraws one line in place; into a file or a pipe it writes
a plain line only when something a reader cares about changed (state, phase, epoch, a tenth of the tiles).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from dlwatchd.client import SpoolClient
    from dlwatchd.protocol.status import JobStatus

BAR_WIDTH = 20
# Kept from the last progress record that had them: a per-batch record carries only the batch position, and the
# record written when validation starts carries only the phase and the epoch.
REMEMBERED = (
    "loss",
    "train_loss",
    "accuracy",
    "mean_iou",
    "per_class_iou",
    "learning_rate",
    "total_epochs",
    "batches_per_epoch",
    "fraction",
)
TRAIN_KINDS = frozenset({"train"})
INFER_KINDS = frozenset({"infer", "infer-pixel"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "rejected"})
PHASE_TEXT = {"preflight": "checking data and building the model", "checkpoint": "saving a checkpoint"}


def progress_bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """`[#######-------------]` for a fraction in [0, 1] (clamped; None draws an empty bar)."""
    value = 0.0 if fraction is None else min(1.0, max(0.0, float(fraction)))
    filled = int(round(value * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_duration(seconds: float | None) -> str:
    """`42s`, `3:07`, `1:02:03`; `?` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_age(seconds: float) -> str:
    """A compact age for tables: `12s`, `5m`, `3h`, `2d`."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _percent(fraction: Any) -> str:
    return f"{100 * float(fraction):3.0f}%" if isinstance(fraction, (int, float)) else "  ?%"


def training_text(progress: Mapping[str, Any], state: str = "running") -> str:
    """The body of a training's progress line: position, bar, loss, mean IoU and ETA.

    `progress` is a status.json training progress record, merged with the last epoch's metrics where the
    record itself lacks them (see StatusFollower). `epoch` is the last completed epoch (protocol meaning).
    """
    total = progress.get("total_epochs")
    done = int(progress.get("epoch") or 0)
    phase = progress.get("phase")
    if state == "queued":
        return "waiting for the training worker"
    if phase in PHASE_TEXT and done == 0:
        return PHASE_TEXT[phase]
    of_total = f"/{total}" if total else ""
    if phase == "train" and progress.get("batch") and state == "running":
        where = f"epoch {done + 1}{of_total} batch {progress['batch']}/{progress.get('batches_per_epoch', '?')}"
    elif phase == "validate" and state == "running":
        where = f"epoch {done + 1}{of_total} validating"
    elif phase == "export" and state == "running":
        where = f"epoch {done}{of_total} exporting the model"
    else:
        where = f"epoch {done}{of_total}"
    fraction = progress.get("fraction")
    if fraction is None and total:
        fraction = done / total
    parts = [where, progress_bar(fraction), _percent(fraction)]
    if progress.get("loss") is not None:
        parts.append(f"loss {_number(progress['loss'], 4)}")
    if progress.get("mean_iou") is not None:
        parts.append(f"mIoU {_number(progress['mean_iou'], 3)}")
    if state == "running" and progress.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(progress['eta_s'])}")
    return "  ".join(parts)


def inference_text(progress: Mapping[str, Any], state: str = "running") -> str:
    """The body of an inference's progress line: tiles done of total, with a bar."""
    if state == "queued":
        return "waiting for the inference worker"
    total = progress.get("tiles_total")
    done = progress.get("tiles_done") or 0
    if not total:
        return "loading the model"
    fraction = progress.get("fraction", done / total)
    return f"tiles {done}/{total}  {progress_bar(fraction)}  {_percent(fraction)}"


def status_text(kind: str | None, state: str, progress: Mapping[str, Any] | None) -> str:
    """`<state>  <kind-specific progress>` for any job; kinds without progress show their state alone."""
    progress = progress or {}
    if state in ("succeeded", "failed", "cancelled", "rejected") and kind not in TRAIN_KINDS:
        body = ""
    elif kind in TRAIN_KINDS and (progress or state == "queued"):
        body = training_text(progress, state)
    elif kind in INFER_KINDS and (progress or state == "queued"):
        body = inference_text(progress, state)
    elif isinstance(progress.get("fraction"), (int, float)):
        body = f"{progress_bar(progress['fraction'])}  {_percent(progress['fraction'])}"
    else:
        body = ""
    return f"{state:<10} {body}".rstrip()


def short_progress(kind: str | None, state: str, progress: Mapping[str, Any] | None, error_code: str | None) -> str:
    """The PROGRESS cell of the `list` table: epochs or tiles and a percentage; the error code of a failure."""
    if error_code:
        return error_code
    progress = progress or {}
    fraction = progress.get("fraction")
    percent = f" {100 * fraction:.0f}%" if isinstance(fraction, (int, float)) and state not in TERMINAL else ""
    if kind in TRAIN_KINDS and progress.get("total_epochs"):
        return f"epoch {int(progress.get('epoch') or 0)}/{progress['total_epochs']}{percent}"
    if kind in INFER_KINDS and progress.get("tiles_total"):
        return f"tiles {progress.get('tiles_done') or 0}/{progress['tiles_total']}{percent}"
    return percent.strip()


def result_summary(kind: str | None, result: Mapping[str, Any] | None) -> list[str]:
    """A few lines for people about a succeeded job's result; empty for kinds whose JSON says it all."""
    if not result:
        return []
    if kind in TRAIN_KINDS and "model_id" in result:
        lines = [
            f"model {result['model_id']}: {result.get('epochs_trained', '?')} epochs, best epoch "
            f"{result.get('best_epoch', '?')} ({result.get('stop_reason', 'done')})",
            f"  validation: loss {_number(result.get('final_loss'), 4)}, "
            f"accuracy {_number(result.get('final_accuracy'), 3)}, mean IoU {_number(result.get('mean_iou'), 3)}",
        ]
        per_class = result.get("per_class_iou") or {}
        if per_class:
            lines.append("  IoU per class: " + ", ".join(f"{name} {_number(v, 3)}" for name, v in per_class.items()))
        if result.get("model_path"):
            lines.append(f"  folder: {result['model_path']}")
        return lines
    if kind == "infer-pixel" and "output_paths" in result:
        paths = list(result["output_paths"].values())
        where = str(_common_folder(paths)) if paths else "-"
        return [f"{len(paths)} probability maps ({result.get('num_classes', '?')} classes, .bin float32) in {where}"]
    if kind == "infer" and "predictions" in result:
        return [f"class averages for {len(result['predictions'])} tiles ({result.get('num_classes', '?')} classes)"]
    return []


def _common_folder(paths: list[str]) -> str:
    import os.path

    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # paths on different drives
        return os.path.dirname(paths[0])


class StatusFollower:
    """An `on_update` callback for `SpoolClient.wait` that draws progress for people.

    `tty` None means: ask the stream. `close()` ends an in-place line; call it before printing anything else.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        tty: bool | None = None,
        width: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.clock = clock
        self.memory: dict[str, Any] = {}
        self.eta: tuple[float, float] | None = None  # (eta_s, when it was reported)
        self.last_key: tuple[Any, ...] | None = None
        self.drawn = 0  # characters of the line currently drawn in place

    def merged(self, status: JobStatus) -> dict[str, Any]:
        """The status's progress plus remembered fields (last epoch's metrics, totals) and a counted-down ETA."""
        progress = dict(status.progress or {})
        for key in REMEMBERED:
            if progress.get(key) is not None:
                self.memory[key] = progress[key]
            elif key in self.memory:
                progress[key] = self.memory[key]
        now = self.clock()
        if progress.get("eta_s") is not None:
            self.eta = (float(progress["eta_s"]), now)
        elif self.eta is not None:
            progress["eta_s"] = max(0.0, self.eta[0] - (now - self.eta[1]))
        return progress

    def line(self, status: JobStatus) -> str:
        return status_text(status.kind, status.state.value, self.merged(status))

    def __call__(self, status: JobStatus) -> None:
        text = self.line(status)
        if self.tty:
            width = self.width or shutil.get_terminal_size((100, 20)).columns
            text = text[: max(10, width - 1)]  # a wrapped line cannot be redrawn with a carriage return
            self.stream.write("\r" + text + " " * max(0, self.drawn - len(text)))
            self.drawn = len(text)
            if status.state.value in TERMINAL or status.state.value == "paused":
                self.close()
        else:
            key = _change_key(status)
            if key != self.last_key:
                self.last_key = key
                self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = 0


def _change_key(status: JobStatus) -> tuple[Any, ...]:
    """What must change for a plain (non-terminal) output to get a new line."""
    progress = status.progress or {}
    tiles = progress.get("tiles_done")
    total = progress.get("tiles_total") or 0
    tenth = int(10 * tiles / total) if isinstance(tiles, int) and total else None
    last_tile = bool(total) and tiles == total
    return (status.state.value, progress.get("phase"), progress.get("epoch"), tenth, last_tile)


@dataclass(frozen=True)
class JobRow:
    """One line of the `list` table."""

    job_id: str
    kind: str
    state: str
    created_at: str | None
    progress: str


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def collect_rows(client: SpoolClient) -> list[JobRow]:
    """Every job of the spool with its status.json (where one exists), oldest first."""
    rows: list[JobRow] = []
    for where, ids in client.list_jobs().items():
        for job_id in ids:
            status = client.status(job_id)
            if status is None:
                rows.append(JobRow(job_id, "-", where, None, ""))
                continue
            state = status.state.value
            code = status.error.code.value if status.error is not None else None
            rows.append(
                JobRow(
                    job_id,
                    status.kind or "-",
                    state,
                    status.created_at,
                    short_progress(status.kind, state, status.progress, code),
                )
            )
    far_future = datetime.max.replace(tzinfo=timezone.utc)
    return sorted(rows, key=lambda row: (_parse_time(row.created_at) or far_future, row.job_id))


def render_table(rows: Iterable[JobRow], now: datetime | None = None) -> str:
    """Aligned columns ID, KIND, STATE, AGE, PROGRESS, and a count per state below them."""
    rows = list(rows)
    if not rows:
        return "no jobs"
    now = now or datetime.now(timezone.utc)
    cells = [("ID", "KIND", "STATE", "AGE", "PROGRESS")]
    for row in rows:
        created = _parse_time(row.created_at)
        age = format_age((now - created).total_seconds()) if created else "-"
        cells.append((row.job_id, row.kind, row.state, age, row.progress))
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(line)).rstrip() for line in cells
    ]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    lines.append("")
    lines.append(f"{len(rows)} job{'s' if len(rows) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
