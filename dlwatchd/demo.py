"""`dlwatchd demo`: from nothing to a trained model and a probability overlay, through the public protocol only.

It starts a daemon on a fresh temporary spool (or uses the one serving `--spool`), writes a synthetic
three-class dataset with sparse brush-stroke labels into `inputs/<job>/`, trains a small CPU-friendly model,
runs `infer-pixel` on held-out tiles it never trained on, scores the .bin maps against their dense ground
truth and writes overlay.png, training_report.png and summary.txt. Everything goes through `SpoolClient`
and the spool files, as a QuPath extension would, so a passing demo is an end-to-end check of an install.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dlwatchd import __version__
from dlwatchd.client import SpoolClient, format_error, read_probabilities
from dlwatchd.progress import StatusFollower, format_duration
from dlwatchd.synth import SynthSpec, class_names, write_dataset

if TYPE_CHECKING:
    import numpy as np

EXIT_OK, EXIT_JOB_FAILED, EXIT_START = 0, 1, 3
CLASSES = 3
DAEMON_ID = "demo-1"
READY_TIMEOUT_S = 180.0
# Overlay colours per class: background light grey, nuclei violet, fibres orange (readable by most colour-blind eyes).
PALETTE = ((225, 225, 225), (110, 60, 190), (240, 150, 30))
OVERLAY_TILES = 4


@dataclass(frozen=True)
class Plan:
    """Dataset size and training settings; tuned so a 2-core CPU finishes in time and clearly learns."""

    train: int
    validation: int
    heldout: int
    size: int
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 7


# Default: well under 5 minutes on 2 CPU cores. Quick: about a minute, for CI and `tests/test_demo.py`.
FULL = Plan(train=24, validation=6, heldout=8, size=64, epochs=10, batch_size=4, learning_rate=0.001)
QUICK = Plan(train=16, validation=4, heldout=4, size=64, epochs=8, batch_size=4, learning_rate=0.001)


@dataclass
class DemoOptions:
    spool: Path | None = None
    out: Path = Path("dlwatchd-demo")
    epochs: int | None = None
    size: int | None = None
    quick: bool = False
    clean: bool = False

    def plan(self) -> Plan:
        plan = QUICK if self.quick else FULL
        if self.epochs is not None:
            plan = replace(plan, epochs=self.epochs)
        if self.size is not None:
            plan = replace(plan, size=self.size)
        return plan


class DemoFailed(Exception):
    """A step of the demo failed; `code` is the exit code, the message says what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Scores:
    mean_iou: float
    per_class_iou: dict[str, float]
    accuracy: float
    pixels: int


class Daemon:
    """A `dlwatchd run` child process on the demo's own spool, started and stopped by the demo."""

    def __init__(self, spool: Path, log: Path) -> None:
        self.spool, self.log = spool, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once its heartbeat says ready with every lane up; raises DemoFailed."""
        command = [sys.executable, "-m", "dlwatchd", "run", "--spool", str(self.spool), "--daemon-id", DAEMON_ID]
        with open(self.log, "ab") as handle:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        beat_path = self.spool / "daemons" / f"{DAEMON_ID}.json"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailed(EXIT_START, f"the daemon exited with code {self.proc.returncode}:\n{self._tail()}")
            try:
                beat = json.loads(beat_path.read_bytes())
            except (OSError, ValueError):
                beat = {}
            lanes = beat.get("lanes") or {}
            alive = beat.get("pid") == self.proc.pid and beat.get("state") in ("ready", "degraded")
            if alive and lanes and all(lane.get("ready") for lane in lanes.values()):
                return
            time.sleep(0.1)
        raise DemoFailed(EXIT_START, f"the daemon was not ready after {READY_TIMEOUT_S:.0f} s:\n{self._tail()}")

    def stop(self) -> None:
        """SIGTERM, then wait (a training in flight checkpoints first); kill only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no daemon log)"


def require_live_daemon(client: SpoolClient, wait_s: float = 8.0) -> str:
    """The id of a daemon whose heartbeat counter moves within `wait_s`; raises DemoFailed when none does.

    Liveness is judged by `beat` changing on this machine's clock, as daemons judge each other: no
    comparison of timestamps written on another host.
    """
    first = {beat.get("daemon_id"): beat.get("beat") for beat in client.daemons()}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for beat in client.daemons():
            daemon_id = beat.get("daemon_id")
            if (
                beat.get("state") in ("ready", "degraded")
                and daemon_id in first
                and beat.get("beat") != first[daemon_id]
            ):
                return str(daemon_id)
            first.setdefault(daemon_id, beat.get("beat"))
        time.sleep(0.25)
    raise DemoFailed(
        EXIT_START,
        f"no running daemon serves {client.layout.root} (no heartbeat moved in daemons/ for {wait_s:.0f} s); "
        "start one with `dlwatchd run --spool DIR`, or run the demo without --spool to get its own",
    )


def train_request(data: Path, plan: Plan) -> dict[str, Any]:
    """A small U-Net (ResNet-18 encoder, no pretrained weights: nothing to download) with a fixed seed."""
    return {
        "kind": "train",
        "client": {"name": "dlwatchd demo", "version": __version__},
        "model_type": "unet",
        "architecture": {"backbone": "resnet18", "input_size": [plan.size, plan.size], "use_pretrained": False},
        "input_config": {"num_channels": 3, "bit_depth": 8},
        "classes": class_names(CLASSES),
        "training": {
            "epochs": plan.epochs,
            "batch_size": plan.batch_size,
            "learning_rate": plan.learning_rate,
            "scheduler": "none",
            "early_stopping": False,
            "seed": plan.seed,
        },
        "data_path": str(data),
    }


def heldout_tiles(folder: Path) -> list[tuple[str, Path, Path]]:
    """(tile id, image, dense truth) of each held-out tile written by `synth` into `folder`."""
    images = sorted((folder / "validation" / "images").iterdir())
    return [(image.stem, image, folder / "validation" / "truth" / f"{image.stem}.png") for image in images]


def score(predictions: list[np.ndarray], truths: list[np.ndarray], names: list[str]) -> Scores:
    """IoU per class over all held-out pixels (TP / (TP + FP + FN), 0 when a class is absent), their mean, accuracy."""
    import numpy as np

    count = len(names)
    confusion = np.zeros((count, count), dtype=np.int64)
    for predicted, truth in zip(predictions, truths, strict=True):
        confusion += np.bincount(
            count * truth.astype(np.int64).ravel() + predicted.ravel(), minlength=count**2
        ).reshape(count, count)
    true_positive = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    iou = np.divide(true_positive, denominator, out=np.zeros(count), where=denominator > 0)
    total = int(confusion.sum())
    return Scores(
        mean_iou=float(iou.mean()),
        per_class_iou={name: float(value) for name, value in zip(names, iou, strict=True)},
        accuracy=float(true_positive.sum() / total) if total else 0.0,
        pixels=total,
    )


def write_overlay(
    path: Path, images: list[np.ndarray], predictions: list[np.ndarray], truths: list[np.ndarray], names: list[str]
) -> None:
    """A PNG grid, one row per tile: image | prediction | ground truth, with a colour legend."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    palette = np.array(PALETTE[: len(names)], dtype=np.uint8)
    size = images[0].shape[0]
    zoom = max(1, 240 // size)
    cell, gap, header = size * zoom, 8, 28
    legend = 30
    width = 3 * cell + 4 * gap
    height = header + len(images) * (cell + gap) + legend
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font: Any = ImageFont.load_default(size=15)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    for column, title in enumerate(("image", "prediction", "ground truth")):
        draw.text((gap + column * (cell + gap) + 4, 8), title, fill="black", font=font)
    for row, (image, predicted, truth) in enumerate(zip(images, predictions, truths, strict=True)):
        top = header + row * (cell + gap)
        for column, array in enumerate((image, palette[predicted], palette[truth])):
            tile = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), "RGB")
            canvas.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (gap + column * (cell + gap), top))
    x = gap
    for name, colour in zip(names, palette, strict=True):
        y = height - legend + 8
        draw.rectangle((x, y, x + 14, y + 14), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 20, y), name, fill="black", font=font)
        x += 20 + int(draw.textlength(name, font=font)) + 24
    canvas.save(path)


def summary_text(
    scores: Scores,
    train_result: dict[str, Any],
    timings: dict[str, float],
    spool: Path,
    out: Path,
    plan: Plan,
    jobs: dict[str, str],
    tile_count: int,
    own_daemon: bool,
) -> str:
    """The text of summary.txt (also printed at the end); its first result line is `held-out mean IoU: X`."""
    names = list(scores.per_class_iou)
    lines = [
        "dlwatchd demo: synthetic tissue tiles, classes " + ", ".join(names) + ", sparse brush-stroke labels",
        "",
        f"held-out mean IoU: {scores.mean_iou:.3f}",
        f"  {tile_count} tiles of {plan.size}x{plan.size} px never seen in training, scored against their "
        f"dense ground truth ({scores.pixels} pixels); 3 classes, so 1/3 would be chance",
        "per-class IoU: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.per_class_iou.items()),
        f"pixel accuracy: {scores.accuracy:.3f}",
        f"validation mean IoU during training (sparse labels): {train_result.get('mean_iou', float('nan')):.3f} "
        f"at best epoch {train_result.get('best_epoch')} of {train_result.get('epochs_trained')}",
        "",
        f"time: {format_duration(timings['total'])} in all ("
        + ", ".join(f"{step} {format_duration(seconds)}" for step, seconds in timings.items() if step != "total")
        + ")",
        f"model: {train_result.get('model_id')} (unet, resnet18 encoder, {plan.epochs} epochs on "
        f"{plan.train} tiles, device {train_result.get('device', '?')})",
        f"model folder: {train_result.get('model_path')}",
        f"spool: {spool}" + ("  (temporary, served by the demo's own daemon)" if own_daemon else ""),
        f"jobs: training {jobs['train']}, inference {jobs['infer']}",
        f"pictures: {out / 'overlay.png'}, {out / 'training_report.png'}",
    ]
    return "\n".join(lines) + "\n"


def _step(stream: TextIO, number: int, text: str) -> None:
    stream.write(f"[{number}/5] {text}\n")
    stream.flush()


def _follow(client: SpoolClient, job_id: str, stream: TextIO, timeout: float) -> dict[str, Any]:
    """Wait for a job with a live progress line; its result, or DemoFailed with the error and hint."""
    follower = StatusFollower(stream)
    try:
        final = client.wait(job_id, timeout=timeout, on_update=follower, until_paused=False)
    except TimeoutError as exc:
        follower.close()
        raise DemoFailed(EXIT_JOB_FAILED, str(exc)) from None
    follower.close()
    if final.state.value != "succeeded" or final.result is None:
        raise DemoFailed(EXIT_JOB_FAILED, f"job {job_id} ended {final.state.value}: {format_error(final)}")
    return final.result


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> int:
    """Run the whole demo; returns 0, 1 (a job failed) or 3 (no daemon). Output goes to `stream` (stdout)."""
    stream = stream or sys.stdout
    try:
        return _run(options, stream)
    except DemoFailed as failure:
        stream.flush()
        print(f"dlwatchd demo: {failure}", file=sys.stderr)
        return failure.code


def _run(options: DemoOptions, stream: TextIO) -> int:
    plan = options.plan()
    started = time.monotonic()
    timings: dict[str, float] = {}
    clock = _stopwatch(timings)
    workdir: Path | None = None
    daemon: Daemon | None = None
    if options.spool is None:
        workdir = Path(tempfile.mkdtemp(prefix="dlwatchd-demo-"))
        spool = workdir / "spool"
        daemon = Daemon(spool, workdir / "daemon.log")
        _step(stream, 1, f"starting a daemon on a fresh spool: {spool}")
    else:
        spool = options.spool.expanduser().absolute()
        _step(stream, 1, f"using the daemon that serves {spool}")
    client = SpoolClient(spool)
    submitted: list[str] = []
    try:
        if daemon is not None:
            daemon.start()
        else:
            require_live_daemon(client)
        clock("daemon start")
        names = class_names(CLASSES)
        suffix = uuid.uuid4().hex[:8]
        jobs = {"train": f"demo-train-{suffix}", "infer": f"demo-infer-{suffix}"}
        data = spool / "inputs" / jobs["train"] / "dataset"
        heldout = spool / "inputs" / jobs["infer"] / "heldout"
        _step(stream, 2, f"writing {plan.train}+{plan.validation} labelled tiles and {plan.heldout} held-out tiles")
        write_dataset(
            data,
            SynthSpec(train=plan.train, validation=plan.validation, size=plan.size, classes=CLASSES, seed=plan.seed),
        )
        write_dataset(
            heldout, SynthSpec(train=0, validation=plan.heldout, size=plan.size, classes=CLASSES, seed=plan.seed + 1000)
        )
        clock("data")
        _step(stream, 3, f"training a U-Net (resnet18) for {plan.epochs} epochs: job {jobs['train']}")
        submitted.append(client.submit(train_request(data, plan), job_id=jobs["train"]))
        train_result = _follow(client, jobs["train"], stream, timeout=3600)
        clock("training")
        tiles = heldout_tiles(heldout)
        _step(stream, 4, f"predicting {len(tiles)} held-out tiles (infer-pixel): job {jobs['infer']}")
        request = {
            "kind": "infer-pixel",
            "client": {"name": "dlwatchd demo", "version": __version__},
            "model_id": train_result["model_id"],
            "tiles": [{"id": tile_id, "data": str(image)} for tile_id, image, _ in tiles],
        }
        submitted.append(client.submit(request, job_id=jobs["infer"]))
        infer_result = _follow(client, jobs["infer"], stream, timeout=600)
        clock("inference")
        _step(stream, 5, f"scoring against the dense ground truth; writing pictures to {options.out}")
        summary = _report(options.out, tiles, infer_result, train_result, names)
        timings["total"] = time.monotonic() - started
        text = summary_text(
            summary, train_result, timings, spool, options.out, plan, jobs, len(tiles), daemon is not None
        )
        (options.out / "summary.txt").write_text(text)
        stream.write("\n" + text)
        if workdir is not None and not options.clean:
            stream.write(f"\nThe temporary spool stays for you to look at; remove it with: rm -rf {workdir}\n")
        stream.flush()
        return EXIT_OK
    except DemoFailed as failure:
        if daemon is not None and failure.code == EXIT_JOB_FAILED:
            raise DemoFailed(
                failure.code, f"{failure}\n(daemon log: {daemon.log}; job logs: {spool}/jobs/*/log.txt)"
            ) from None
        raise
    except KeyboardInterrupt:
        if daemon is None:  # somebody else's daemon: do not leave our jobs running on it
            for job_id in submitted:
                try:
                    client.cancel(job_id)
                except Exception:  # noqa: BLE001 - best effort while stopping
                    pass
        raise
    finally:
        if daemon is not None:
            daemon.stop()
        if options.clean and workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(
    out: Path,
    tiles: list[tuple[str, Path, Path]],
    infer_result: dict[str, Any],
    train_result: dict[str, Any],
    names: list[str],
) -> Scores:
    """Read the .bin maps (argmax), score them, draw the overlay and copy the training report into `out`."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    images, predictions, truths = [], [], []
    for tile_id, image_path, truth_path in tiles:
        channels, height, width = infer_result["shape"][tile_id]
        probabilities = read_probabilities(Path(infer_result["output_paths"][tile_id]), channels, height, width)
        predictions.append(probabilities.argmax(axis=0))
        truths.append(np.asarray(Image.open(truth_path)))
        images.append(np.asarray(Image.open(image_path).convert("RGB")))
    scores = score(predictions, truths, names)
    count = min(OVERLAY_TILES, len(tiles))
    write_overlay(out / "overlay.png", images[:count], predictions[:count], truths[:count], names)
    report = Path(train_result["model_path"]) / "training_report.png"
    if report.exists():
        shutil.copyfile(report, out / "training_report.png")
    return scores


def _stopwatch(timings: dict[str, float]) -> Callable[[str], None]:
    """A callable that records the seconds since its previous call under the given name."""
    last = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        timings[name] = now - last[0]
        last[0] = now

    return lap
