"""Synthetic QuPath-style training data with sparse brush-stroke labels, for demos, checks and tests.

Tissue-like images: a textured background (class 0), round "nuclei" blobs (class 1) and, with three
classes, elongated "fibre" bands (class 2). Masks label only a few strokes across each region, as a
pathologist's brush would; everything else is the unlabeled index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNLABELED = 255


@dataclass(frozen=True)
class SynthSpec:
    train: int = 8
    validation: int = 4
    size: int = 64
    classes: int = 2
    channels: int = 3
    bit_depth: int = 8
    seed: int = 0
    stroke_fraction: float = 0.15


def _scene(rng: np.random.Generator, size: int, classes: int) -> np.ndarray:
    """Dense ground truth: 0 background, 1 blobs, 2 bands."""
    yy, xx = np.mgrid[0:size, 0:size]
    truth = np.zeros((size, size), dtype=np.uint8)
    if classes > 2:
        for _ in range(rng.integers(1, 3)):
            angle = rng.uniform(0, np.pi)
            offset = rng.uniform(-size / 3, size / 3)
            distance = np.abs((xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle) - offset)
            truth[distance < size * rng.uniform(0.05, 0.09)] = 2
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size * 0.07, size * 0.16)
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1
    return truth


def _render(rng: np.random.Generator, truth: np.ndarray, channels: int, bit_depth: int) -> np.ndarray:
    """Colour each class differently per channel, add texture and noise; returns H×W×K in the bit depth's range."""
    top = 255.0 if bit_depth == 8 else 65535.0
    palette = rng.uniform(0.15, 0.85, size=(3, channels))
    palette[1] = np.clip(palette[0] - 0.35, 0.02, 1)  # nuclei darker than background on every channel
    palette[2] = np.clip(palette[0] + 0.2, 0, 0.98)
    image = palette[truth]
    image += rng.normal(0, 0.04, size=image.shape)
    image = np.clip(image, 0, 1) * top
    return image.astype(np.uint8 if bit_depth == 8 else np.uint16)


def _strokes(rng: np.random.Generator, truth: np.ndarray, classes: int, fraction: float) -> np.ndarray:
    """Sparse labels: short straight strokes inside each class's region, the rest unlabeled."""
    size = truth.shape[0]
    mask = np.full(truth.shape, UNLABELED, dtype=np.uint8)
    for label in range(classes):
        ys, xs = np.nonzero(truth == label)
        if len(ys) == 0:
            continue
        for _ in range(max(1, int(fraction * 20))):
            pick = rng.integers(len(ys))
            y0, x0 = ys[pick], xs[pick]
            angle = rng.uniform(0, 2 * np.pi)
            for step in range(int(size * 0.2)):
                y = int(round(y0 + step * np.sin(angle)))
                x = int(round(x0 + step * np.cos(angle)))
                if not (0 <= y < size and 0 <= x < size) or truth[y, x] != label:
                    break
                mask[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = np.where(
                    truth[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] == label,
                    label,
                    mask[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2],
                )
    return mask


def write_dataset(root: Path, spec: SynthSpec = SynthSpec()) -> dict[str, list[str]]:
    """Write train/ and validation/ (images/, masks/) and config.json under `root`; returns file stems per split.

    3-channel 8-bit data is written as PNG, anything else as TIFF (tifffile), masks always as PNG.
    Dense ground truth is written too, as `truth/<stem>.png`, for measuring a model against it.
    """
    from PIL import Image

    rng = np.random.default_rng(spec.seed)
    names = ["Background", "Nucleus", "Fibre"][: spec.classes]
    stems: dict[str, list[str]] = {}
    for split, count in (("train", spec.train), ("validation", spec.validation)):
        for folder in ("images", "masks", "truth"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        stems[split] = []
        for index in range(count):
            stem = f"{split}_{index:03d}"
            truth = _scene(rng, spec.size, spec.classes)
            image = _render(rng, truth, spec.channels, spec.bit_depth)
            if spec.channels == 3 and spec.bit_depth == 8:
                Image.fromarray(image, "RGB").save(root / split / "images" / f"{stem}.png")
            else:
                import tifffile

                tifffile.imwrite(
                    root / split / "images" / f"{stem}.tif", image, photometric="minisblack", planarconfig="contig"
                )
            Image.fromarray(_strokes(rng, truth, spec.classes, spec.stroke_fraction), "L").save(
                root / split / "masks" / f"{stem}.png"
            )
            Image.fromarray(truth, "L").save(root / split / "truth" / f"{stem}.png")
            stems[split].append(stem)
    config = {
        "unlabeled_index": UNLABELED,
        "patch_size": spec.size,
        "classes": [{"index": i, "name": n} for i, n in enumerate(names)],
        "metadata": {"generator": "dlwatchd synth", "seed": spec.seed},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return stems


def class_names(classes: int) -> list[str]:
    return ["Background", "Nucleus", "Fibre"][:classes]
