"""QuPath export layout, config.json and preflight on small synthetic datasets written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from dlwatchd.engine.dataset import DatasetIndex, discover, preflight
from dlwatchd.errors import DlwatchdError, ErrorCode

CLASSES = ["Tumor", "Stroma", "Other"]


def _write_image(path: Path, shape: tuple[int, ...] = (8, 8, 3), dtype: str = "uint8", value: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, data, photometric="rgb" if shape[-1] == 3 and len(shape) == 3 else "minisblack")
    else:
        Image.fromarray(data).save(path, "PNG" if path.suffix.lower() == ".png" else "JPEG")


def _write_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path, "PNG")


def _labels(fill: int = 255, classes: tuple[int, ...] = (0, 1, 2), shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    labels = np.full(shape, fill, np.uint8)
    for i, c in enumerate(classes):
        labels[i, :2] = c
    return labels


def _dataset(root: Path, train: int = 2, validation: int = 1, config: dict[str, Any] | None = None) -> Path:
    for split, count in (("train", train), ("validation", validation)):
        for i in range(count):
            _write_image(root / split / "images" / f"tile_{i}.tif")
            _write_mask(root / split / "masks" / f"tile_{i}.png", _labels())
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def _check(index: DatasetIndex, **overrides: Any):
    args: dict[str, Any] = dict(
        num_channels=3,
        selected_channels=None,
        class_names=CLASSES,
        class_weights=None,
        architecture="unet",
        bit_depth=8,
    )
    args.update(overrides)
    return preflight(index, **args)


def _fails(code: ErrorCode, needles: list[str], call, *args, **kwargs) -> DlwatchdError:
    with pytest.raises(DlwatchdError) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value.message
    for needle in needles:
        assert needle in info.value.message, info.value.message
    return info.value


def test_discover_pairs_sorts_and_filters(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", train=0, validation=1)
    images, masks = root / "train" / "images", root / "train" / "masks"
    for name in ("b.TIF", "a.Png", "c.jpeg", "d.JPG", "e.tiff"):
        _write_image(images / name)
        _write_mask(masks / (Path(name).stem + ".png"), _labels())
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (images / ".hidden.png").write_bytes(b"x")
    (images / "notes.txt").write_text("ignored")
    (images / "sub.png").mkdir()  # a folder with an image suffix is not an image
    index = discover(root)
    assert [s.image.name for s in index.train] == ["a.Png", "b.TIF", "c.jpeg", "d.JPG", "e.tiff"]
    assert [s.stem for s in index.train] == ["a", "b", "c", "d", "e"]
    assert index.train[0].mask == masks / "a.png"
    assert len(index.validation) == 1
    assert index.config.unlabeled_index == 255 and index.config.class_weights is None and index.config.raw == {}


def test_tiff_masks_are_found(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    mask = root / "train" / "masks" / "tile_0.png"
    mask.unlink()
    tifffile.imwrite(mask.with_suffix(".tiff"), _labels().astype(np.uint16))
    assert discover(root).train[0].mask.name == "tile_0.tiff"


def test_missing_folders_masks_and_empty_splits(tmp_path: Path) -> None:
    error = _fails(ErrorCode.NOT_FOUND, ["nowhere"], discover, tmp_path / "nowhere")
    assert error.field == "data_path"
    root = _dataset(tmp_path / "d")
    (root / "validation" / "masks" / "tile_0.png").unlink()
    _fails(ErrorCode.NOT_FOUND, ["validation/images/tile_0.tif", "no mask"], discover, root)
    root = _dataset(tmp_path / "e", validation=0)
    _fails(ErrorCode.NOT_FOUND, ["validation/images"], discover, root)
    (root / "validation" / "images").mkdir(parents=True)
    _fails(ErrorCode.EMPTY_DATASET, ["validation/images"], discover, root)


def test_duplicate_stems_and_two_masks(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    _write_image(root / "train" / "images" / "tile_0.png")
    error = _fails(ErrorCode.SCHEMA, ["'tile_0'", "tile_0.png", "tile_0.tif"], discover, root)
    assert error.field == "data_path"
    root = _dataset(tmp_path / "e")
    tifffile.imwrite(root / "train" / "masks" / "tile_1.tif", _labels())
    _fails(ErrorCode.SCHEMA, ["train/images/tile_1.tif", "tile_1.png", "tile_1.tif"], discover, root)


def test_links_inside_the_data_folder_are_refused(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    _write_image(tmp_path / "elsewhere.tif")
    (root / "train" / "images" / "zz.tif").symlink_to(tmp_path / "elsewhere.tif")
    _fails(ErrorCode.PATH_NOT_ALLOWED, ["train/images/zz.tif"], discover, root)
    root = _dataset(tmp_path / "e")
    (tmp_path / "other").mkdir()
    (root / "validation" / "masks").rename(tmp_path / "other" / "masks")
    (root / "validation" / "masks").symlink_to(tmp_path / "other" / "masks", target_is_directory=True)
    _fails(ErrorCode.PATH_NOT_ALLOWED, ["validation/masks"], discover, root)


def test_config_json_keys(tmp_path: Path) -> None:
    config = {
        "unlabeled_index": 254.0,
        "class_weights": [1, 2.5, 0],
        "classes": [{"index": 1, "name": "B", "pixel_count": 3}, {"index": 0, "name": "A", "pixel_count": 4}],
        "patch_size": 512,
    }
    index = discover(_dataset(tmp_path / "d", config=config))
    assert index.config.unlabeled_index == 254
    assert index.config.class_weights == [1.0, 2.5, 0.0]
    assert index.config.class_names == ["A", "B"]
    assert index.config.raw["patch_size"] == 512


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"classes": [{"name": "a"b"}]}', "line 1"),
        ("[1, 2]", "JSON object"),
        ('{"unlabeled_index": -1}', "unlabeled_index"),
        ('{"unlabeled_index": 70000}', "unlabeled_index"),
        ('{"unlabeled_index": "255"}', "unlabeled_index"),
        ('{"class_weights": [1, -2]}', "class_weights"),
        ('{"class_weights": [0, 0]}', "all zero"),
        ('{"class_weights": "1,2"}', "class_weights"),
        ('{"class_weights": [NaN, 1]}', "NaN"),
    ],
)
def test_bad_config_json(tmp_path: Path, text: str, needle: str) -> None:
    root = _dataset(tmp_path / "d")
    (root / "config.json").write_text(text)
    error = _fails(ErrorCode.SCHEMA, [needle], discover, root)
    assert "config.json" in error.message


def test_preflight_counts_shapes_and_no_warnings(tmp_path: Path) -> None:
    index = discover(_dataset(tmp_path / "d", train=2, validation=1, config={"classes": CLASSES}))
    report = _check(index)
    assert report.class_pixel_counts == {"train": [4, 4, 4], "validation": [2, 2, 2]}
    assert report.image_shapes == {"train": [(8, 8), (8, 8)], "validation": [(8, 8)]}
    assert report.file_channels == 3
    assert report.warnings == []


def test_grayscale_with_selected_channel_zero(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for split in ("train", "validation"):
        _write_image(root / split / "images" / "g.png", shape=(8, 8))
        _write_mask(root / split / "masks" / "g.png", _labels())
    report = _check(discover(root), num_channels=1, selected_channels=[0])
    assert report.file_channels == 1
    _fails(ErrorCode.CHANNELS, ["g.png", "1 channel(s)"], _check, discover(root), num_channels=1, selected_channels=[1])


def test_channel_count_mismatch(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    _write_image(root / "validation" / "images" / "tile_0.tif", shape=(5, 8, 8), dtype="uint16")
    error = _fails(
        ErrorCode.CHANNELS,
        ["validation/images/tile_0.tif", "5 channel(s)", "num_channels is 3"],
        _check,
        discover(root),
    )
    assert error.field == "input_config.num_channels"
    # Selecting three of the five channels makes it fit, with a warning about differing files and bit depths.
    report = _check(discover(root), selected_channels=[0, 1, 2])
    assert any("same channel count" in w for w in report.warnings)
    assert any("16-bit" in w and "bit_depth is 8" in w for w in report.warnings)


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    _write_mask(root / "train" / "masks" / "tile_1.png", _labels(shape=(8, 6)))
    _fails(ErrorCode.MASK_SHAPE, ["train/masks/tile_1.png", "8×6", "8×8", "tile_1.tif"], _check, discover(root))


def test_mask_label_out_of_range(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    labels = _labels()
    labels[5, :] = np.arange(3, 11)
    labels[6, :] = np.arange(11, 19)
    _write_mask(root / "train" / "masks" / "tile_0.png", labels)
    error = _fails(
        ErrorCode.MASK_LABELS, ["train/masks/tile_0.png", "3, 4, 5", "16 in all", "255"], _check, discover(root)
    )
    listed = error.message.split("value(s) ")[1].split(" outside")[0]
    assert listed == "3, 4, 5, 6, 7, 8, 9, 10, 11, 12, … (16 in all)"  # at most 10 values listed


def test_unlabeled_index_from_config(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", config={"unlabeled_index": 7})
    _fails(ErrorCode.MASK_LABELS, ["255", "unlabeled index 7"], _check, discover(root))
    root = _dataset(tmp_path / "e", config={"unlabeled_index": 2})
    _fails(ErrorCode.SCHEMA, ["unlabeled_index 2", "3 classes"], _check, discover(root))


def test_unreadable_and_nonfinite_files(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    (root / "train" / "images" / "tile_1.tif").write_bytes(b"II*\x00garbage")
    _fails(ErrorCode.IMAGE_READ, ["train/images/tile_1.tif"], _check, discover(root))
    root = _dataset(tmp_path / "e")
    data = np.zeros((8, 8, 3), np.float32)
    data[0, 0, 0] = np.inf
    tifffile.imwrite(root / "validation" / "images" / "tile_0.tif", data, photometric="rgb")
    _fails(ErrorCode.NONFINITE_INPUT, ["validation/images/tile_0.tif"], _check, discover(root), bit_depth=32)
    root = _dataset(tmp_path / "f")
    (root / "train" / "masks" / "tile_0.png").write_bytes(b"not a png")
    _fails(ErrorCode.IMAGE_READ, ["train/masks/tile_0.png"], _check, discover(root))


def test_all_train_or_validation_masks_unlabeled(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d")
    for i in range(2):
        _write_mask(root / "train" / "masks" / f"tile_{i}.png", np.full((8, 8), 255, np.uint8))
    _fails(ErrorCode.EMPTY_DATASET, ["train", "unlabeled"], _check, discover(root))
    root = _dataset(tmp_path / "e")
    _write_mask(root / "validation" / "masks" / "tile_0.png", np.full((8, 8), 255, np.uint8))
    _fails(ErrorCode.EMPTY_DATASET, ["validation"], _check, discover(root))


def test_class_weights(tmp_path: Path) -> None:
    index = discover(_dataset(tmp_path / "d"))
    for weights, needle in [([1.0, 2.0], "2 value(s)"), ([1.0, -1.0, 1.0], "-1.0"), ([0.0, 0.0, 0.0], "all zero")]:
        error = _fails(ErrorCode.SCHEMA, ["training.class_weights", needle], _check, index, class_weights=weights)
        assert error.field == "training.class_weights"
    assert _check(index, class_weights=[1.0, 0.0, 2.0]).warnings == []
    index = discover(_dataset(tmp_path / "e", config={"class_weights": [1, 1]}))
    _fails(ErrorCode.SCHEMA, ["config.json", "2 value(s)", "3 classes"], _check, index)
    assert _check(index, class_weights=[1.0, 1.0, 1.0]).warnings == []  # the request overrides config.json


@pytest.mark.parametrize("architecture", ["deeplabv3", "DeepLabV3+", "deeplabv3plus", "pspnet", "pan"])
def test_single_tile_with_pooling_architectures(tmp_path: Path, architecture: str) -> None:
    index = discover(_dataset(tmp_path / "d", train=1))
    error = _fails(ErrorCode.SCHEMA, [architecture, "single training tile"], _check, index, architecture=architecture)
    assert error.hint and "Add" in error.hint
    assert _check(index, architecture="unet").class_pixel_counts["train"] == [2, 2, 2]


def test_warnings(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", config={"classes": ["Tumor", "Other", "Stroma"]})
    _write_mask(root / "train" / "masks" / "tile_0.png", _labels(classes=(0, 1)))
    _write_mask(root / "train" / "masks" / "tile_1.png", np.full((8, 8), 255, np.uint8))
    _write_mask(root / "validation" / "masks" / "tile_0.png", _labels(classes=(0,)))
    report = _check(discover(root), bit_depth=16)
    text = "\n".join(report.warnings)
    assert "'Other'" in text and "training set" in text  # class 2 never labeled in train
    assert "'Stroma'" in text and "validation set" in text and "IoU will be 0" in text
    assert "1 train mask(s) have no labeled pixel" in text and "tile_1.png" in text
    assert "8-bit samples but input_config.bit_depth is 16" in text
    assert "config.json lists the classes" in text
    assert report.class_pixel_counts == {"train": [2, 2, 0], "validation": [2, 0, 0]}
