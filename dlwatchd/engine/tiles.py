"""Training tiles in memory: decoded, channel-selected and normalized once, padded to the network's divisor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TileSet:
    """Images (K×H×W float32) and masks (H×W int64) ready for the network; `names` for messages."""

    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(
            i.numel() * i.element_size() + m.numel() * m.element_size()
            for i, m in zip(self.images, self.masks, strict=True)
        )


def pad_to_multiple(
    image: torch.Tensor, mask: torch.Tensor | None, divisor: int, fill_label: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad bottom/right to multiples of `divisor`: reflect for the image (replicate where reflect cannot
    reach), the unlabeled index for the mask so padded pixels never count. Sizes already divisible are kept.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if not pad_h and not pad_w:
        return image, mask
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    padded = F.pad(image.unsqueeze(0), (0, pad_w, 0, pad_h), mode=mode).squeeze(0)
    if mask is not None:
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=fill_label)
    return padded, mask


def build_tileset(
    samples: Sequence[tuple[str, Callable[[], np.ndarray], Callable[[], np.ndarray]]],
    *,
    divisor: int,
    unlabeled_index: int,
) -> TileSet:
    """Load every sample once: `samples` holds (name, load normalized image H×W×K, load mask H×W)."""
    images, masks, names = [], [], []
    for name, load_image, load_mask in samples:
        image = torch.from_numpy(np.ascontiguousarray(load_image().transpose(2, 0, 1), dtype=np.float32))
        mask = torch.from_numpy(np.ascontiguousarray(load_mask(), dtype=np.int64))
        image, padded_mask = pad_to_multiple(image, mask, divisor, unlabeled_index)
        assert padded_mask is not None
        images.append(image)
        masks.append(padded_mask)
        names.append(name)
    return TileSet(images, masks, names)


def batches(order: Sequence[int], batch_size: int, drop_singleton: bool) -> list[list[int]]:
    """Split a sample order into batches; a final batch of one is dropped when asked (BatchNorm cannot train on it)."""
    chunks = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if drop_singleton and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


def stack(tiles: TileSet, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch tensors for `indices`, one group per tile shape (tiles of different sizes cannot share a batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index in indices:
        groups.setdefault(tuple(tiles.images[index].shape), []).append(index)
    return [
        (torch.stack([tiles.images[i] for i in group]), torch.stack([tiles.masks[i] for i in group]))
        for group in groups.values()
    ]
