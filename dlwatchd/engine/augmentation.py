"""Training augmentation of a normalized float32 image and its mask, jointly (ENGINE.md section 5).

Every random number comes from the caller's torch.Generator, so an (image, mask, seed) triple always gives the
same result whatever the worker count. Geometry that pulls pixels from outside the tile reflects them for the
image and labels them U in the mask: the loss then ignores them instead of learning invented labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from dlwatchd.errors import DlwatchdError, ErrorCode

_ELASTIC_ALPHA = 120.0  # px of displacement per unit of smoothed noise
_ELASTIC_SIGMA = 6.0  # px, Gaussian smoothing of the noise
_GRID_CELLS = 5
_GRID_LIMIT = 0.3
_ROTATE_LIMIT = 45.0
_P_BLUR = 0.1


@dataclass(frozen=True)
class AugmentationConfig:
    """Probabilities of the section 5 transforms; each in [0, 1], else DlwatchdError(E_SCHEMA)."""

    p_flip: float = 0.5
    p_rotate: float = 0.5
    p_elastic: float = 0.3
    p_color: float = 0.3
    p_noise: float = 0.2

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise DlwatchdError(
                    ErrorCode.SCHEMA,
                    f"{item.name} must be a probability in [0, 1], got {value!r}",
                    field=f"training.augmentation_config.{item.name}",
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentationConfig:
        """Build from `training.augmentation_config`; None or absent keys take the defaults.

        `image_size` (a reference key with no effect) and any other unknown key are ignored; the request model
        at the protocol edge is where unknown keys are rejected.
        """
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in (data or {}).items() if key in names and value is not None})


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, sample index) alone, so results ignore num_workers.

    SeedSequence mixes the three numbers, so neighbouring epochs or indices do not give correlated streams.
    Raises ValueError for negative inputs.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor)


def _flip(kernel: Any, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _plain(kernel(tv_tensors.Image(image))), _plain(kernel(tv_tensors.Mask(mask)))


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror continuous coordinates (pixel i spans [i, i+1)) about the tile edges, then keep them on pixel centres.

    The clamp matters: grid_sample pads with zeros, so a coordinate in a border half-pixel would blend in black.
    """
    folded = torch.remainder(coords, 2 * size)
    folded = torch.where(folded > size, 2 * size - folded, folded)
    return folded.clamp(0.5, size - 0.5)


def _remap(
    image: torch.Tensor, mask: torch.Tensor, src_x: torch.Tensor, src_y: torch.Tensor, unlabeled: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample image (bilinear) and mask (nearest) so output pixel (y, x) reads source point (src_y, src_x).

    Coordinates are continuous pixel units with pixel centres at i + 0.5. The v2 elastic kernel takes offsets from
    the identity grid in normalized units, hence the division by W/2 (x) and H/2 (y).
    """
    height, width = image.shape[-2:]
    centre_x = torch.arange(width, dtype=src_x.dtype, device=src_x.device) + 0.5
    centre_y = (torch.arange(height, dtype=src_y.dtype, device=src_y.device) + 0.5)[:, None]

    def displacement(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift = torch.stack(((x - centre_x) / (width / 2), (y - centre_y) / (height / 2)), dim=-1)
        return shift[None].to(torch.float32)

    warped = F.elastic(
        tv_tensors.Image(image),
        displacement(_reflect(src_x, width), _reflect(src_y, height)),
        interpolation=F.InterpolationMode.BILINEAR,
    )
    # Outside points are left as they are: the kernel gives them the fill value U.
    labels = F.elastic(tv_tensors.Mask(mask), displacement(src_x, src_y), fill=[float(unlabeled)])
    return _plain(warped), _plain(labels)


def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device) + 0.5,
        torch.arange(width, dtype=torch.float64, device=device) + 0.5,
        indexing="ij",
    )
    return xs, ys


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _smooth_noise(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """Two fields (dx, dy) of U(−1, 1) noise smoothed by a Gaussian of σ = 6 px, shaped 2×H×W.

    The noise is drawn with a margin of the kernel radius and convolved without padding, so the field is equally
    smooth at the tile border as inside and tiles of any size work.
    """
    radius = math.ceil(3 * _ELASTIC_SIGMA)
    # float32: CPU conv2d is about ten times slower in float64, and the field needs no such precision.
    noise = torch.rand((2, 1, height + 2 * radius, width + 2 * radius), generator=generator)
    taps = _gaussian_taps(_ELASTIC_SIGMA, radius).to(torch.float32)
    smooth = nnf.conv2d(noise * 2 - 1, taps.view(1, 1, 1, -1))
    smooth = nnf.conv2d(smooth, taps.view(1, 1, -1, 1))
    return smooth[:, 0]


def _grid_axis(generator: torch.Generator, size: int) -> torch.Tensor:
    """Source coordinate of each output pixel centre along one axis for a piecewise-linear grid distortion.

    Output cells are equal; source cells are scaled by 1 + U(−0.3, 0.3) and then normalized to span the tile
    again, so the remap stays inside the tile (albumentations' `normalized=True`).
    """
    scales = 1 + (torch.rand(_GRID_CELLS, generator=generator, dtype=torch.float64) * 2 - 1) * _GRID_LIMIT
    knots = torch.cat((torch.zeros(1, dtype=torch.float64), torch.cumsum(scales, 0)))
    knots = knots * (size / knots[-1])
    position = (torch.arange(size, dtype=torch.float64) + 0.5) * (_GRID_CELLS / size)
    cell = position.floor().clamp(max=_GRID_CELLS - 1).long()
    fraction = position - cell
    return knots[cell] + fraction * (knots[cell + 1] - knots[cell])


# Devillard's 19 compare-exchange network: after it, slot 4 holds the median of 9 values.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7), (3, 6),
            (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))  # fmt: skip


def _median3(image: torch.Tensor) -> torch.Tensor:
    """3×3 median per channel, border replicated (as OpenCV's medianBlur).

    A min/max network over nine shifted views avoids a 9× patch tensor; one channel at a time bounds memory.
    """
    height, width = image.shape[-2:]
    planes = []
    for plane in image:
        padded = nnf.pad(plane[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
        v = [padded[i : i + height, j : j + width] for i in range(3) for j in range(3)]
        for a, b in _MEDIAN9:
            v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
        planes.append(v[4])
    return torch.stack(planes)


class TrainAugmentation:
    """The nine section 5 transforms in order, for K×H×W float32 images of any K and H×W int64 masks."""

    def __init__(self, config: AugmentationConfig, unlabeled_index: int) -> None:
        self.config = config
        self.unlabeled_index = unlabeled_index

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a new augmented (image, mask) pair with the input dtypes and shapes; inputs are not modified.

        All randomness comes from `generator` (a CPU generator, as sample_generator makes).
        Raises DlwatchdError(E_INTERNAL) when the shapes do not pair up.
        """
        if image.ndim != 3 or mask.shape != image.shape[-2:]:
            raise DlwatchdError(
                ErrorCode.INTERNAL, f"augmentation needs K×H×W image and H×W mask, got {image.shape}, {mask.shape}"
            )
        cfg, g = self.config, generator
        image, mask = image.clone(), mask.clone()
        if _chance(g, cfg.p_flip):
            image, mask = _flip(F.horizontal_flip, image, mask)
        if _chance(g, cfg.p_flip):
            image, mask = _flip(F.vertical_flip, image, mask)
        if _chance(g, cfg.p_rotate):
            image, mask = self._rotate_quarter(image, mask, g)
        if _chance(g, 0.5 * cfg.p_rotate):
            image, mask = self._rotate_free(image, mask, g)
        if _chance(g, cfg.p_elastic):
            image, mask = self._elastic(image, mask, g)
        if _chance(g, 0.5 * cfg.p_elastic):
            image, mask = self._grid_distortion(image, mask, g)
        if _chance(g, cfg.p_color):
            image = self._color(image, g)
        if _chance(g, _P_BLUR):
            image = self._blur(image, g)
        if _chance(g, cfg.p_noise):
            sigma = _uniform(g, 0.04, 0.2)
            noise = torch.randn(image.shape, generator=g, dtype=torch.float32)
            image = image + noise.to(image.device) * sigma
        # Quarter turns leave strided views; collation and pinning are cheaper on contiguous memory.
        return image.contiguous(), mask.contiguous()

    def _rotate_quarter(
        self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A quarter turn would swap H and W of a non-square tile, so those only get 0° or 180°.
        square = image.shape[-1] == image.shape[-2]
        k = int(torch.randint(0, 4, (), generator=g)) if square else 2 * int(torch.randint(0, 2, (), generator=g))
        return torch.rot90(image, k, dims=(-2, -1)), torch.rot90(mask, k, dims=(-2, -1))

    def _rotate_free(
        self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Equivalent to reflect-padding, rotating and cropping back, but needs no pad < size for thin tiles.
        angle = math.radians(_uniform(g, -_ROTATE_LIMIT, _ROTATE_LIMIT))
        height, width = image.shape[-2:]
        xs, ys = _pixel_centres(height, width, image.device)
        u, v = xs - width / 2, ys - height / 2
        # Counter-clockwise on screen, as torchvision's rotate: each output point reads the source turned back.
        src_x = width / 2 + u * math.cos(angle) - v * math.sin(angle)
        src_y = height / 2 + u * math.sin(angle) + v * math.cos(angle)
        return _remap(image, mask, src_x, src_y, self.unlabeled_index)

    def _elastic(
        self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        field = _smooth_noise(g, height, width).to(image.device, torch.float64) * _ELASTIC_ALPHA
        xs, ys = _pixel_centres(height, width, image.device)
        return _remap(image, mask, xs + field[0], ys + field[1], self.unlabeled_index)

    def _grid_distortion(
        self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        src_x = _grid_axis(g, width).to(image.device)
        src_y = _grid_axis(g, height).to(image.device)
        return _remap(
            image, mask, src_x.expand(height, width), src_y[:, None].expand(height, width), self.unlabeled_index
        )

    def _color(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # One α/β/γ for every channel: a per-channel draw would shift the channels' relative intensities.
        if _chance(g, 0.5):
            alpha = 1 + _uniform(g, -0.2, 0.2)
            beta = _uniform(g, -0.2, 0.2)
            return image * alpha + beta
        gamma = _uniform(g, 0.8, 1.2)
        return image.clamp(min=0.0) ** gamma

    def _blur(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if _chance(g, 0.5):
            return _median3(image)
        kernel = 3 if _chance(g, 0.5) else 5
        if min(image.shape[-2:]) <= kernel // 2:
            return image  # reflect padding needs a tile larger than the kernel radius
        sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8  # OpenCV's σ for a given kernel size
        return _plain(F.gaussian_blur(tv_tensors.Image(image), [kernel, kernel], [sigma, sigma]))
