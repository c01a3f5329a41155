"""The QuPath export layout, its `config.json`, and the preflight that reads every file once (ENGINE §3.1, 3.2, 3.5).

`discover` only lists and pairs files; `preflight` decodes them and turns every data problem into an error
naming the file and the numbers, before epoch 1 (the reference crashed mid-training instead). Links inside the
data folder are refused rather than followed: the folder was checked against the read roots, its contents
were not.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlwatchd.engine.io import DEFAULT_MAX_PIXELS, read_image_and_depth, read_mask, select_channels
from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.paths import open_regular_file

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
SPLITS = ("train", "validation")
CONFIG_NAME = "config.json"
# config.json is a few kilobytes; anything this large is not a QuPath export.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# BatchNorm on globally pooled 1×1 features needs two samples per batch.
POOLING_ARCHITECTURES = frozenset({"deeplabv3", "deeplabv3plus", "deeplabv3+", "pspnet", "pan"})
MAX_LISTED = 10


@dataclass
class Sample:
    image: Path
    mask: Path
    stem: str


@dataclass
class DataConfig:
    """The keys of `config.json` that drive training, plus the whole parsed file."""

    unlabeled_index: int = 255
    class_weights: list[float] | None = None
    class_names: list[str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetIndex:
    root: Path
    train: list[Sample]
    validation: list[Sample]
    config: DataConfig


@dataclass
class PreflightReport:
    """What preflight learned: labeled pixels per class per split, (H, W) per sample, warnings, file K."""

    class_pixel_counts: dict[str, list[int]]
    image_shapes: dict[str, list[tuple[int, int]]]
    warnings: list[str]
    file_channels: int


def _layout_error(message: str, hint: str | None = None) -> DlwatchdError:
    return DlwatchdError(ErrorCode.SCHEMA, message, hint=hint, field="data_path")


def _refuse_link(path: Path, root: Path) -> None:
    if path.is_symlink():
        raise DlwatchdError(
            ErrorCode.PATH_NOT_ALLOWED,
            f"{path.relative_to(root)} in the data folder is a symbolic link; links are not followed there.",
            hint="Copy the files into the data folder instead of linking them.",
            field="data_path",
        )


def _list_images(images_dir: Path, root: Path) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(images_dir), key=lambda e: e.name)
    except OSError as exc:
        code = ErrorCode.PERMISSION if isinstance(exc, PermissionError) else ErrorCode.NOT_FOUND
        raise DlwatchdError(code, f"The folder {images_dir} cannot be listed: {exc.strerror}.") from None
    for entry in entries:
        # Hidden files include the `._*` resource forks macOS leaves on shared drives.
        if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        path = Path(entry.path)
        _refuse_link(path, root)
        if not entry.is_file(follow_symlinks=False):
            continue
        stem = os.path.splitext(entry.name)[0]
        if stem in by_stem:
            raise _layout_error(
                f"{images_dir.relative_to(root)} holds two images named {stem!r}: "
                f"{by_stem[stem].name} and {entry.name}.",
                hint="Keep one file per tile name; masks are paired by name.",
            )
        by_stem[stem] = path
    return by_stem


def _find_mask(masks_dir: Path, image: Path, stem: str, root: Path) -> Path:
    found = [masks_dir / (stem + suffix) for suffix in MASK_SUFFIXES]
    found = [p for p in found if os.path.lexists(p)]
    if not found:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"The image {image.relative_to(root)} has no mask (looked for {stem}.png, .tif, .tiff in "
            f"{masks_dir.relative_to(root)}).",
            hint="Export a mask for every image, or remove the image.",
            field="data_path",
        )
    if len(found) > 1:
        raise _layout_error(
            f"The image {image.relative_to(root)} has several masks: {', '.join(p.name for p in found)}.",
            hint="Keep exactly one mask per image.",
        )
    _refuse_link(found[0], root)
    return found[0]


def _discover_split(root: Path, split: str) -> list[Sample]:
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    for folder in (root / split, images_dir, masks_dir):
        if os.path.lexists(folder):
            _refuse_link(folder, root)
    if not images_dir.is_dir():
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"The data folder {root} has no {split}/images folder.",
            hint="Point data_path at a folder exported by QuPath (train/ and validation/ inside).",
            field="data_path",
        )
    images = _list_images(images_dir, root)
    if not images:
        raise DlwatchdError(
            ErrorCode.EMPTY_DATASET,
            f"{split}/images in {root} holds no .tif, .tiff, .png, .jpg or .jpeg image.",
            hint="Export at least one annotated tile for training and one for validation.",
            field="data_path",
        )
    return [Sample(image, _find_mask(masks_dir, image, stem, root), stem) for stem, image in images.items()]


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def _parse_config(path: Path) -> DataConfig:
    fd = open_regular_file(path)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise _layout_error(f"{path} is larger than {MAX_CONFIG_BYTES} bytes.")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _layout_error(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).",
            hint="Class names with quotes or backslashes must be escaped; re-export or fix the file.",
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _layout_error(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(raw, dict):
        raise _layout_error(f"{path} must hold a JSON object, not {type(raw).__name__}.")
    config = DataConfig(raw=raw)
    index = raw.get("unlabeled_index", 255)
    if isinstance(index, float) and index.is_integer():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 65535:
        raise _layout_error(f"unlabeled_index in {path} must be an integer in 0..65535, not {index!r}.")
    config.unlabeled_index = index
    weights = raw.get("class_weights")
    if weights is not None:
        if not isinstance(weights, list) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights
        ):
            raise _layout_error(f"class_weights in {path} must be a list of numbers.")
        config.class_weights = [float(w) for w in weights]
        _check_weights(config.class_weights, None, f"class_weights in {path}", "data_path")
    config.class_names = _config_class_names(raw.get("classes"))
    return config


def _config_class_names(classes: Any) -> list[str] | None:
    """Class names of the informational `classes` key, ordered by index; None when absent or malformed."""
    if not isinstance(classes, list) or not classes:
        return None
    if all(isinstance(c, str) for c in classes):
        return list(classes)
    if all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes):
        indexed = [(c.get("index"), c["name"]) for c in classes]
        if all(isinstance(i, int) and not isinstance(i, bool) for i, _ in indexed):
            return [name for _, name in sorted(indexed, key=lambda pair: pair[0])]
        return [name for _, name in indexed]
    return None


def discover(data_path: Path) -> DatasetIndex:
    """List and pair the tiles of a QuPath export (§3.1) and parse its optional `config.json` (§3.2).

    Raises E_NOT_FOUND (missing folder, image without mask), E_EMPTY_DATASET (a split without images),
    E_SCHEMA field `data_path` (duplicate stems, two masks for one image, bad config.json),
    E_PATH_NOT_ALLOWED (a symbolic link inside the data folder).
    """
    root = Path(data_path)
    if not root.is_dir():
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The data folder {root} does not exist.", field="data_path")
    train, validation = (_discover_split(root, split) for split in SPLITS)
    config_path = root / CONFIG_NAME
    config = _parse_config(config_path) if os.path.lexists(config_path) else DataConfig()
    return DatasetIndex(root=root, train=train, validation=validation, config=config)


def _check_weights(weights: list[float], num_classes: int | None, where: str, field_name: str) -> None:
    if num_classes is not None and len(weights) != num_classes:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"{where} has {len(weights)} value(s) but there are {num_classes} classes.",
            hint="Give one weight per class, in class order.",
            field=field_name,
        )
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise DlwatchdError(ErrorCode.SCHEMA, f"{where} must be finite and ≥ 0; found {bad[0]!r}.", field=field_name)
    if weights and sum(weights) <= 0:
        raise DlwatchdError(
            ErrorCode.SCHEMA, f"{where} are all zero; at least one class needs weight.", field=field_name
        )


def _bit_depth_warning(depths: dict[int, list[str]], bit_depth: int) -> list[str]:
    return [
        f"{len(names)} image(s) have {depth}-bit samples but input_config.bit_depth is {bit_depth} (first: {names[0]})."
        for depth, names in sorted(depths.items())
        if depth != bit_depth
    ]


def _listed(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_LISTED])
    return shown + (f", … ({len(values)} in all)" if len(values) > MAX_LISTED else "")


def _check_request(
    index: DatasetIndex, class_names: list[str], class_weights: list[float] | None, architecture: str
) -> list[str]:
    """The checks that need no pixels, run first so a wrong request fails before thousands of files are read."""
    num_classes, config = len(class_names), index.config
    if config.unlabeled_index < num_classes:
        raise _layout_error(
            f"unlabeled_index {config.unlabeled_index} in {index.root / CONFIG_NAME} is also a class index "
            f"(there are {num_classes} classes, 0..{num_classes - 1}).",
            hint="Use an unlabeled index above the class indices (255 by default).",
        )
    if class_weights is not None:
        _check_weights(list(class_weights), num_classes, "training.class_weights", "training.class_weights")
    elif config.class_weights is not None:
        _check_weights(config.class_weights, num_classes, f"class_weights in {index.root / CONFIG_NAME}", "data_path")
    if architecture.lower() in POOLING_ARCHITECTURES and len(index.train) == 1:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"{architecture} cannot train on a single training tile: its BatchNorm on pooled features needs two "
            "samples per batch.",
            hint="Add at least one more training tile, or choose an architecture such as unet.",
            field="data_path",
        )
    if config.class_names is not None and config.class_names != list(class_names):
        return [
            f"config.json lists the classes {config.class_names} but the request has {list(class_names)}; "
            "the request's classes are used."
        ]
    return []


def _count_labels(mask: np.ndarray, path: Path, num_classes: int, unlabeled: int) -> np.ndarray:
    """Labeled pixels per class of one mask; raises E_MASK_LABELS for values outside {0..C−1, U}."""
    in_range = (mask >= 0) & (mask < num_classes)
    stray = ~in_range & (mask != unlabeled)
    if stray.any():
        values = [int(v) for v in np.unique(mask[stray])]
        raise DlwatchdError(
            ErrorCode.MASK_LABELS,
            f"The mask {path} holds value(s) {_listed(values)} outside the classes 0..{num_classes - 1} and the "
            f"unlabeled index {unlabeled}.",
            hint="Check that the request lists every exported class, in the exporter's order.",
        )
    return np.bincount(mask[in_range], minlength=num_classes)


def preflight(
    index: DatasetIndex,
    *,
    num_channels: int,
    selected_channels: list[int] | None,
    class_names: list[str],
    class_weights: list[float] | None,
    architecture: str,
    bit_depth: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreflightReport:
    """Decode every image and mask once and check them against the request (§3.5), before epoch 1.

    Request-only checks run first (unlabeled index vs classes, class weights, single-tile pooling
    architectures: E_SCHEMA), then per file in split and name order: E_IMAGE_READ / E_IMAGE_TOO_LARGE /
    E_NONFINITE_INPUT, E_MASK_SHAPE, E_MASK_LABELS, E_CHANNELS; finally E_EMPTY_DATASET when every train
    (or every validation) mask is unlabeled. Everything else worth knowing is a warning in the report.
    """
    num_classes, unlabeled = len(class_names), index.config.unlabeled_index
    warnings = _check_request(index, class_names, class_weights, architecture)
    counts = {split: np.zeros(num_classes, dtype=np.int64) for split in SPLITS}
    shapes: dict[str, list[tuple[int, int]]] = {split: [] for split in SPLITS}
    unlabeled_masks: dict[str, list[str]] = {split: [] for split in SPLITS}
    depths: dict[int, list[str]] = {}
    channel_counts: dict[int, list[str]] = {}  # insertion order: the first key is the first train image's
    # The channel count breaks ties in TIFF axis guessing only when it is the file's count too.
    expected = None if selected_channels else num_channels
    for split, samples in zip(SPLITS, (index.train, index.validation), strict=True):
        for sample in samples:
            image, depth = read_image_and_depth(sample.image, max_pixels=max_pixels, expected_channels=expected)
            mask = read_mask(sample.mask, max_pixels=max_pixels)
            height, width, channels = image.shape
            if mask.shape != (height, width):
                raise DlwatchdError(
                    ErrorCode.MASK_SHAPE,
                    f"The mask {sample.mask} is {mask.shape[0]}×{mask.shape[1]} pixels but its image "
                    f"{sample.image} is {height}×{width}.",
                    hint="Re-export the tile; image and mask must have the same size.",
                )
            per_class = _count_labels(mask, sample.mask, num_classes, unlabeled)
            selected = select_channels(image, selected_channels, name=str(sample.image)).shape[2]
            if selected != num_channels:
                raise DlwatchdError(
                    ErrorCode.CHANNELS,
                    f"The image {sample.image} has {selected} channel(s)"
                    + (f" after selecting {list(selected_channels)}" if selected_channels else "")
                    + f" but input_config.num_channels is {num_channels}.",
                    hint="Set num_channels (or selected_channels) to match the exported images.",
                    field="input_config.num_channels",
                )
            counts[split] += per_class
            shapes[split].append((height, width))
            if not per_class.any():
                unlabeled_masks[split].append(str(sample.mask))
            depths.setdefault(depth, []).append(str(sample.image))
            channel_counts.setdefault(channels, []).append(str(sample.image))
    for split in SPLITS:
        if not counts[split].any():
            raise DlwatchdError(
                ErrorCode.EMPTY_DATASET,
                f"Every {split} mask is unlabeled: no pixel holds a class index (all are {unlabeled}).",
                hint="Annotate at least one region in the exported tiles.",
                field="data_path",
            )
    for split, label in (("train", "training"), ("validation", "validation")):
        missing = [f"{class_names[c]!r}" for c in range(num_classes) if counts[split][c] == 0]
        if missing:
            tail = "" if split == "train" else "; their IoU will be 0"
            warnings.append(f"Class(es) {', '.join(missing)} have no labeled pixel in the {label} set{tail}.")
        if unlabeled_masks[split]:
            warnings.append(
                f"{len(unlabeled_masks[split])} {split} mask(s) have no labeled pixel and contribute nothing: "
                f"{_listed(unlabeled_masks[split])}."
            )
    warnings.extend(_bit_depth_warning(depths, bit_depth))
    if len(channel_counts) > 1:
        found = ", ".join(
            f"{k} ({len(names)} file(s), first {names[0]})" for k, names in sorted(channel_counts.items())
        )
        warnings.append(f"The images do not all have the same channel count: {found}.")
    return PreflightReport(
        class_pixel_counts={split: [int(n) for n in counts[split]] for split in SPLITS},
        image_shapes=shapes,
        warnings=warnings,
        # The first training image's count: with a selection, files may legitimately differ (warned above).
        file_channels=next(iter(channel_counts)),
    )
