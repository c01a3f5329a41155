"""Training throughput on this machine's CPU: a plain PyTorch loop against dlwatchd's Trainer, fp32, auto and bf16.

Throughput rows (unet/resnet34, encoder_weights None, 256×256 px, batch 8, 3 classes, random data):
  1. a plain PyTorch fp32 loop, as the reference server runs it: model.train(), Adam,
     CrossEntropyLoss(ignore_index=255), contiguous memory format, one torch.stack per batch, loss.item() per step;
  2. dlwatchd's Trainer with precision fp32 (channels_last);
  3. dlwatchd's Trainer with the precision `resolve_precision("auto", "cpu", False)` picks on this machine;
  4. dlwatchd's Trainer with bf16 autocast, asked for explicitly.
Each row: warm-up steps, then the wall time of every step; samples/s from the median step. The Trainer's steps are timed
between its per-batch progress callbacks, so they include its batch assembly and control checks.

Quality check: every configuration trains for a few epochs on dlwatchd.synth data (3 classes, 64 px, fixed seed), and
its best weights are scored in fp32 against the dense ground truth of held-out tiles (mean IoU over the 3 classes).

Prints figures only; asserts nothing. Other processes on the machine skew the figures: the load average is printed.
Usage: python benchmarks/train_throughput.py [--quick] [--steps N] [--warmup N] [--epochs N] [--no-bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlwatchd.engine.device import cpu_description
from dlwatchd.engine.io import read_image, read_mask
from dlwatchd.engine.models import create_model
from dlwatchd.engine.normalization import NormalizationConfig, Normalizer
from dlwatchd.engine.tiles import TileSet, build_tileset
from dlwatchd.engine.training import FitConfig, Trainer, TrainingHooks
from dlwatchd.jobs.train_setup import resolve_precision
from dlwatchd.synth import SynthSpec, class_names, write_dataset

ARCHITECTURE, ENCODER = "unet", "resnet34"
SIZE, BATCH, CLASSES, CHANNELS = 256, 8, 3, 3
UNLABELED = 255
SEED = 0
# Quality check: synth tiles, a smaller batch so that a few epochs still make enough optimizer steps.
QUALITY_SIZE, QUALITY_BATCH = 64, 4


@dataclass
class Timing:
    label: str
    precision: str
    step_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def samples_per_s(self) -> float:
        return BATCH / self.median_s


def random_tiles(count: int, seed: int) -> TileSet:
    """Uniform images and random labels with about 10% unlabeled pixels; the same tiles for every row."""
    generator = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for _ in range(count):
        images.append(torch.rand(CHANNELS, SIZE, SIZE, generator=generator))
        mask = torch.randint(0, CLASSES, (SIZE, SIZE), generator=generator)
        unlabeled = torch.rand(SIZE, SIZE, generator=generator) < 0.1
        masks.append(torch.where(unlabeled, torch.full_like(mask, UNLABELED), mask))
    return TileSet(images, masks, [f"random_{i}" for i in range(count)])


def fresh_model(seed: int = SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(ARCHITECTURE, ENCODER, CHANNELS, CLASSES)


def plain_loop(tiles: TileSet, warmup: int, steps: int) -> Timing:
    """What the reference does per batch: fp32, contiguous, Adam, CE with ignore_index, loss.item()."""
    model = fresh_model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=UNLABELED)
    times = []
    for step in range(warmup + steps):
        indices = range(step * BATCH, (step + 1) * BATCH)
        started = time.perf_counter()
        images = torch.stack([tiles.images[i] for i in indices])
        masks = torch.stack([tiles.masks[i] for i in indices])
        optimizer.zero_grad()
        loss = criterion(model(images), masks)
        loss.backward()
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - started)
    return Timing("plain PyTorch loop", "fp32", times[warmup:])


def trainer_loop(label: str, precision: str, tiles: TileSet, validation: TileSet, warmup: int, steps: int) -> Timing:
    """One Trainer epoch of warmup + steps batches; a step is the time between two per-batch progress callbacks."""
    stamps: list[float] = []

    def progress(fields: dict[str, Any], force: bool) -> None:
        if fields.get("phase") == "train" and "batch" in fields:
            stamps.append(time.perf_counter())

    config = FitConfig(
        class_names=class_names(CLASSES),
        epochs=1,
        batch_size=BATCH,
        learning_rate=1e-3,
        scheduler="none",
        early_stopping=False,
        augmentation=False,  # the plain loop has none either
        checkpoint_every=0,
        seed=SEED,
        device="cpu",
        precision=precision,
        channels_last=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            fresh_model(), tiles, validation, config, TrainingHooks(progress=progress), Path(tmp) / "c.pt", {}
        )
        trainer.fit()
    durations = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
    # durations[i] is step i + 1; steps 0 .. warmup - 1 are the warm-up.
    return Timing(label, precision, durations[warmup - 1 :])


# ---- quality -------------------------------------------------------------------------------------------------------


def synth_tiles(root: Path, split: str, normalizer: Normalizer) -> tuple[TileSet, list[np.ndarray]]:
    from PIL import Image

    stems = sorted(path.stem for path in (root / split / "images").iterdir())
    samples = []
    for stem in stems:
        image_path = root / split / "images" / f"{stem}.png"
        mask_path = root / split / "masks" / f"{stem}.png"
        samples.append(
            (
                stem,
                lambda path=image_path: normalizer.apply(read_image(path))[0],
                lambda path=mask_path: read_mask(path),
            )
        )
    tiles = build_tileset(samples, divisor=32, unlabeled_index=UNLABELED)
    truth = [np.asarray(Image.open(root / split / "truth" / f"{stem}.png"), dtype=np.int64) for stem in stems]
    return tiles, truth


def held_out_mean_iou(model: torch.nn.Module, state: dict[str, torch.Tensor], tiles: TileSet, truth: list) -> float:
    """Mean IoU over the classes of the dense ground truth, predicted in fp32 as inference would."""
    model.load_state_dict(state)
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    with torch.no_grad():
        for image, dense in zip(tiles.images, truth, strict=True):
            predicted = model(image.unsqueeze(0)).argmax(dim=1)[0].numpy()
            height, width = dense.shape
            cells = dense * CLASSES + predicted[:height, :width]
            confusion += np.bincount(cells.ravel(), minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES)
    ious = []
    for c in range(CLASSES):
        tp = confusion[c, c]
        denominator = confusion[c, :].sum() + confusion[:, c].sum() - tp
        ious.append(tp / denominator if denominator else 0.0)
    return float(np.mean(ious))


def quality(precision: str, data: dict[str, Any], epochs: int) -> dict[str, Any]:
    config = FitConfig(
        class_names=class_names(CLASSES),
        epochs=epochs,
        batch_size=QUALITY_BATCH,
        learning_rate=1e-3,
        scheduler="cosine",
        early_stopping=False,
        augmentation=False,
        checkpoint_every=0,
        seed=SEED,
        device="cpu",
        precision=precision,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            fresh_model(), data["train"], data["validation"], config, TrainingHooks(), Path(tmp) / "c", {}
        )
        result = trainer.fit()
    seconds = time.perf_counter() - started
    iou = held_out_mean_iou(fresh_model(), result.best_state, data["held_out"], data["held_out_truth"])
    return {"iou": iou, "best_epoch": result.best_epoch, "val_iou": result.best_metrics["mean_iou"], "s": seconds}


def load_quality_data(root: Path, train: int, validation: int, held_out: int) -> dict[str, Any]:
    write_dataset(
        root / "fit", SynthSpec(train=train, validation=validation, size=QUALITY_SIZE, classes=CLASSES, seed=7)
    )
    write_dataset(root / "held", SynthSpec(train=0, validation=held_out, size=QUALITY_SIZE, classes=CLASSES, seed=8))
    normalizer = Normalizer(NormalizationConfig())  # the request default: percentile_99, per channel, tile scope
    train_tiles, _ = synth_tiles(root / "fit", "train", normalizer)
    validation_tiles, _ = synth_tiles(root / "fit", "validation", normalizer)
    held_tiles, held_truth = synth_tiles(root / "held", "validation", normalizer)
    return {"train": train_tiles, "validation": validation_tiles, "held_out": held_tiles, "held_out_truth": held_truth}


# ---- report --------------------------------------------------------------------------------------------------------


def print_machine(auto: str, auto_warning: str | None) -> None:
    cpu = cpu_description()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"machine: {cpu['cpu_name']}, {cpu['cpu_count']} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {load}"
    )
    print(f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    print(f"cpu_description()['bf16_native']: {cpu['bf16_native']}")
    print(
        f'resolve_precision("auto", "cpu", False) -> {auto!r}' + (f" (warning: {auto_warning})" if auto_warning else "")
    )


def print_rows(rows: list[Timing], steps: int, warmup: int) -> None:
    print()
    print(
        f"training throughput, {ARCHITECTURE}/{ENCODER}, {SIZE}x{SIZE} px, batch {BATCH}, {CLASSES} classes, "
        f"random data; median of {steps} steps after {warmup} warm-up"
    )
    base = rows[0].samples_per_s
    print(
        f"  {'#':2} {'configuration':38} {'precision':9} {'median s/step':>13} {'min':>7} {'max':>7} "
        f"{'samples/s':>10} {'vs row 1':>9}"
    )
    for number, row in enumerate(rows, start=1):
        print(
            f"  {number:<2} {row.label:38} {row.precision:9} {row.median_s:13.3f} {min(row.step_s):7.3f} "
            f"{max(row.step_s):7.3f} {row.samples_per_s:10.3f} {row.samples_per_s / base:8.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and epochs (about 10 minutes on 2 cores)")
    parser.add_argument("--steps", type=int, help="timed steps per fp32 row (bf16 rows time fewer when slow)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (at least 1)")
    parser.add_argument("--epochs", type=int, help="epochs of the quality check")
    parser.add_argument("--no-bf16", action="store_true", help="skip the explicit bf16 row and its quality run")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    warmup = max(1, args.warmup or (1 if args.quick else 2))
    epochs = args.epochs or (6 if args.quick else 20)
    # Emulated bf16 (no native support) runs several times slower; fewer timed steps keep the run bounded.
    auto, auto_warning = resolve_precision("auto", "cpu", False)
    native = bool(cpu_description()["bf16_native"])
    bf16_steps = steps if native else max(2, steps // 3)

    print_machine(auto, auto_warning)
    tiles = random_tiles((warmup + steps) * BATCH, seed=1)
    validation = random_tiles(1, seed=2)
    configurations: list[tuple[str, str, Callable[[], Timing]]] = [
        ("plain", "fp32", lambda: plain_loop(tiles, warmup, steps)),
        ("fp32", "fp32", lambda: trainer_loop("dlwatchd Trainer fp32", "fp32", tiles, validation, warmup, steps)),
        (
            "auto",
            auto,
            lambda: trainer_loop(f"dlwatchd Trainer auto (= {auto})", auto, tiles, validation, warmup, steps),
        ),
    ]
    if not args.no_bf16:
        count = (warmup + bf16_steps) * BATCH
        bf16_tiles = TileSet(tiles.images[:count], tiles.masks[:count], tiles.names[:count])
        configurations.append(
            (
                "bf16",
                "bf16",
                lambda: trainer_loop("dlwatchd Trainer bf16", "bf16", bf16_tiles, validation, warmup, bf16_steps),
            )
        )
    rows = []
    for name, _, run in configurations:
        started = time.perf_counter()
        rows.append(run())
        print(f"  ... {name} row measured in {time.perf_counter() - started:.0f} s", flush=True)
    print_rows(rows, steps, warmup)
    if not args.no_bf16 and bf16_steps != steps:
        print(f"  (row 4 timed {bf16_steps} steps: this CPU has no native bf16, so autocast emulates it)")

    print()
    train_count, validation_count, held_count = (16, 8, 16) if args.quick else (32, 8, 24)
    print(
        f"quality: synth data, {CLASSES} classes, {QUALITY_SIZE} px, {train_count} train / {validation_count} "
        f"validation tiles, batch {QUALITY_BATCH}, {epochs} epochs, seed {SEED}; mean IoU on {held_count} held-out "
        "tiles against the dense truth, predicted in fp32"
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = load_quality_data(Path(tmp), train_count, validation_count, held_count)
        for name, precision, _ in configurations[1:]:
            results[name] = quality(precision, data, epochs)
            r = results[name]
            print(
                f"  {name:5} ({precision:4}) held-out mean IoU {r['iou']:.4f}   validation mean IoU {r['val_iou']:.4f}"
                f"   best epoch {r['best_epoch']:2}   {r['s']:.0f} s",
                flush=True,
            )
    print(
        f"  difference fp32 - auto: {results['fp32']['iou'] - results['auto']['iou']:+.4f}"
        + (" (auto resolves to fp32 here: the same computation)" if auto == "fp32" else "")
    )
    if "bf16" in results:
        print(f"  difference fp32 - bf16: {results['fp32']['iou'] - results['bf16']['iou']:+.4f}")


if __name__ == "__main__":
    main()
