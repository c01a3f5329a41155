"""Augmentation: seeded determinism, label safety, float32 fidelity, geometry alignment, non-square tiles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dlwatchd.engine.augmentation import AugmentationConfig, TrainAugmentation, sample_generator
from dlwatchd.errors import DlwatchdError, ErrorCode

U = 255
CLASSES = 3
ALL = AugmentationConfig(p_flip=1.0, p_rotate=1.0, p_elastic=1.0, p_color=1.0, p_noise=1.0)
NONE = AugmentationConfig(p_flip=0.0, p_rotate=0.0, p_elastic=0.0, p_color=0.0, p_noise=0.0)


def only(**probabilities: float) -> AugmentationConfig:
    """A config with every probability 0 except those given."""
    return dataclasses.replace(NONE, **probabilities)


FLIPS_ONLY = only(p_flip=1.0)


def pair(k: int, h: int = 32, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((k, h, w), generator=generator)
    mask = torch.randint(0, CLASSES, (h, w), generator=generator)
    mask[torch.rand((h, w), generator=generator) < 0.1] = U
    return image, mask


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_same_seed_same_result_different_seed_different(k: int) -> None:
    image, mask = pair(k)
    augment = TrainAugmentation(ALL, U)
    first = augment(image, mask, seeded(7))
    again = augment(image, mask, seeded(7))
    other = augment(image, mask, seeded(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_dtypes_and_shapes_preserved_and_inputs_untouched(k: int) -> None:
    image, mask = pair(k, h=24, w=40)
    before = image.clone(), mask.clone()
    augment = TrainAugmentation(ALL, U)
    for seed in range(12):
        out, labels = augment(image, mask, seeded(seed))
        assert out.dtype == torch.float32 and out.shape == (k, 24, 40)
        assert labels.dtype == torch.int64 and labels.shape == (24, 40)
        assert type(out) is torch.Tensor and type(labels) is torch.Tensor
        assert torch.isfinite(out).all()
    assert torch.equal(image, before[0]) and torch.equal(mask, before[1])


def test_mask_values_stay_labels_or_unlabeled() -> None:
    image, mask = pair(3, h=32, w=48)
    for config in (ALL, AugmentationConfig()):
        augment = TrainAugmentation(config, U)
        for seed in range(25):
            _, labels = augment(image, mask, seeded(seed))
            assert set(labels.unique().tolist()) <= {*range(CLASSES), U}


def test_nothing_is_quantised_to_8_bit() -> None:
    # 16-bit data after normalization: values k/65535, nearly none on the 1/255 grid.
    generator = seeded(3)
    image = torch.randint(0, 65536, (5, 32, 32), generator=generator).float() / 65535
    mask = torch.zeros(32, 32, dtype=torch.long)
    augment = TrainAugmentation(ALL, U)
    for seed in range(5):
        out, _ = augment(image, mask, seeded(seed))
        assert out.dtype == torch.float32
        off_grid = ((out * 255 - (out * 255).round()).abs() > 1e-3).float().mean()
        assert off_grid > 0.9
        assert all(out[c].unique().numel() > 256 for c in range(5))
    # Pure permutations (flips, unblurred) return exactly the input values, none rounded.
    flipped = [TrainAugmentation(FLIPS_ONLY, U)(image, mask, seeded(seed))[0] for seed in range(5)]
    assert sum(is_permutation(out, image) for out in flipped) >= 3


def aligned_pair(k: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose channel 0 equals the mask, the other channels random."""
    generator = seeded(11)
    mask = torch.randint(0, CLASSES, (h, w), generator=generator)
    image = torch.rand((k, h, w), generator=generator)
    image[0] = mask.float()
    return image, mask


def is_permutation(out: torch.Tensor, image: torch.Tensor) -> bool:
    """True unless a value changed: the fixed-probability blur (#8) is the only step left on in these tests."""
    return torch.equal(out.flatten().sort().values, image.flatten().sort().values)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 40)])
def test_flips_keep_image_and_mask_aligned(h: int, w: int) -> None:
    image, mask = aligned_pair(3, h, w)
    checked = 0
    for seed in range(5):
        out, labels = TrainAugmentation(FLIPS_ONLY, U)(image, mask, seeded(seed))
        if not is_permutation(out, image):
            continue
        assert torch.equal(labels, mask.flip(-1).flip(-2))
        assert torch.equal(out[0], labels.float())
        assert torch.equal(out[1:], image[1:].flip(-1).flip(-2))
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 40)])
def test_quarter_turns_keep_image_and_mask_aligned(h: int, w: int) -> None:
    image, mask = aligned_pair(3, h, w)
    augment = TrainAugmentation(only(p_flip=0.5, p_rotate=1.0), U)
    transforms = [
        (flip_x, flip_y, k)
        for flip_x in (False, True)
        for flip_y in (False, True)
        for k in range(4)
        if h == w or k % 2 == 0
    ]

    def apply(t: torch.Tensor, flip_x: bool, flip_y: bool, k: int) -> torch.Tensor:
        t = t.flip(-1) if flip_x else t
        t = t.flip(-2) if flip_y else t
        return torch.rot90(t, k, dims=(-2, -1))

    seen: set[int] = set()
    for seed in range(40):
        out, labels = augment(image, mask, seeded(seed))
        assert out.shape == image.shape and labels.shape == mask.shape
        # A free rotation (half of these seeds) or the blur changes values; only exact permutations are checked.
        if (labels == U).any() or not is_permutation(out, image):
            continue
        assert torch.equal(out[0], labels.float())
        matches = [i for i, t in enumerate(transforms) if torch.equal(labels, apply(mask, *t))]
        assert matches and any(torch.equal(out, apply(image, *transforms[i])) for i in matches)
        seen.add(matches[0])
    assert len(seen) >= 3


@pytest.mark.parametrize(("h", "w"), [(32, 32), (20, 44)])
def test_rotation_fills_the_mask_with_unlabeled_from_outside(h: int, w: int) -> None:
    image = torch.rand((2, h, w), generator=seeded(1))
    mask = torch.zeros((h, w), dtype=torch.long)
    augment = TrainAugmentation(only(p_rotate=1.0), U)
    margin = math.ceil(0.21 * max(h, w))
    corners_filled = 0
    for seed in range(30):
        out, labels = augment(image, mask, seeded(seed))
        assert set(labels.unique().tolist()) <= {0, U}
        assert labels[h // 2, w // 2] == 0  # the centre always comes from inside
        ys, xs = torch.nonzero(labels == U, as_tuple=True)
        if ys.numel():
            distance = torch.minimum(torch.minimum(ys, h - 1 - ys), torch.minimum(xs, w - 1 - xs))
            assert distance.max() < margin
            corners_filled += int(labels[0, 0] == U or labels[0, -1] == U)
        # The image is reflected, never blacked out: no row or column of zeros appears at the border.
        assert out.abs().amax(dim=(0, 1)).min() > 0 and out.abs().amax(dim=(0, 2)).min() > 0
    assert corners_filled >= 3


def test_elastic_and_grid_keep_labels_safe_on_thin_tiles() -> None:
    image, mask = pair(5, h=8, w=64)
    augment = TrainAugmentation(only(p_rotate=1.0, p_elastic=1.0), U)
    for seed in range(10):
        out, labels = augment(image, mask, seeded(seed))
        assert out.shape == (5, 8, 64) and labels.shape == (8, 64)
        assert set(labels.unique().tolist()) <= {*range(CLASSES), U}


def test_no_augmentation_returns_equal_copies() -> None:
    image, mask = pair(3)
    out, labels = TrainAugmentation(NONE, U)(image, mask, seeded(0))
    assert torch.equal(out, image) and torch.equal(labels, mask)
    assert out.data_ptr() != image.data_ptr() and labels.data_ptr() != mask.data_ptr()


def test_sample_generator_depends_only_on_seed_epoch_index() -> None:
    def draw(seed: int, epoch: int, index: int) -> torch.Tensor:
        return torch.rand(4, generator=sample_generator(seed, epoch, index))

    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 2, 4))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 3))
    assert not torch.equal(draw(1, 2, 3), draw(2, 2, 3))


def test_config_from_dict() -> None:
    config = AugmentationConfig.from_dict({"p_flip": 0.1, "image_size": 512, "p_noise": None})
    assert config == AugmentationConfig(p_flip=0.1)
    assert AugmentationConfig.from_dict(None) == AugmentationConfig()
    with pytest.raises(DlwatchdError) as info:
        AugmentationConfig.from_dict({"p_color": 1.5})
    assert info.value.code == ErrorCode.SCHEMA and info.value.field == "training.augmentation_config.p_color"
