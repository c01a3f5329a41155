"""Training losses (ENGINE §8.1), filled by `register_loss`, and the per-class sums behind §8.6 `per_class_loss`.

Every loss takes logits N×C×H×W (any float dtype, cast to float32 first) and an integer target N×H×W in which the
unlabeled index U marks pixels that take no part: they add nothing to any sum and receive exactly zero gradient.
Nothing here synchronises with the device, so a loss costs no host round trip per batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dlwatchd.errors import DlwatchdError, ErrorCode

# Per-pixel CE values are clamped here before they enter per_class_loss, so one absurd pixel cannot dominate.
PER_PIXEL_LOSS_CLAMP = 100.0

LossFactory = Callable[..., torch.nn.Module]
_LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str, factory: LossFactory) -> LossFactory:
    """Register `factory(*, num_classes, class_weights, ignore_index, focal_gamma) -> nn.Module` under `name`.

    Raises ValueError when the name is taken.
    """
    if name in _LOSSES:
        raise ValueError(f"loss {name!r} already registered")
    _LOSSES[name] = factory
    return factory


def list_losses(pattern: str = "*") -> list[str]:
    """Registered loss names matching the fnmatch `pattern`, in registration order."""
    return [name for name in _LOSSES if fnmatch.fnmatchcase(name, pattern)]


def build_loss(
    name: str,
    *,
    num_classes: int,
    class_weights: list[float] | None,
    ignore_index: int,
    focal_gamma: float = 2.0,
) -> torch.nn.Module:
    """The loss module registered as `name` (any letter case).

    Raises DlwatchdError(E_SCHEMA, field "training.loss") listing the valid names for an unknown one, and
    ValueError when `class_weights` does not have `num_classes` entries (preflight should have caught that).
    """
    factory = _LOSSES.get(name.strip().lower())
    if factory is None:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Unknown loss {name!r}; valid names are: {', '.join(list_losses())}.",
            field="training.loss",
        )
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    return factory(
        num_classes=num_classes, class_weights=class_weights, ignore_index=ignore_index, focal_gamma=focal_gamma
    )


class _LabeledLoss(torch.nn.Module):
    """Shared plumbing: the float32 cast, the labeled mask, per-pixel class weights and the weighted mean."""

    class_weights: torch.Tensor

    def __init__(self, *, num_classes: int, class_weights: list[float] | None, ignore_index: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weights = torch.ones(num_classes) if class_weights is None else torch.tensor(class_weights)
        # A buffer follows the module to the device; not persistent, so it never enters a state_dict.
        self.register_buffer("class_weights", weights.to(torch.float32), persistent=False)

    def _prepare(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """float32 logits, the labeled mask, the target with U replaced by 0 (a safe index) and w_y (0 at U)."""
        logits = logits.float()
        target = target.long()
        labeled = target != self.ignore_index
        safe_target = torch.where(labeled, target, torch.zeros_like(target))
        # .to() is a no-op once the module sits on the logits' device; it spares callers a forgotten move.
        class_weights = self.class_weights.to(logits.device)
        pixel_weight = torch.where(labeled, class_weights[safe_target], torch.zeros((), device=logits.device))
        return logits, labeled, safe_target, pixel_weight

    def _nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted per-pixel −log p_y; torch gives 0 and a zero gradient at U pixels."""
        return F.cross_entropy(logits, target, reduction="none", ignore_index=self.ignore_index)

    @staticmethod
    def _weighted_mean(terms: torch.Tensor, labeled: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
        """Σ terms / Σ w_y over labeled pixels; exactly 0 (with a graph) when Σ w_y is 0."""
        # torch.where, not a multiply: a non-finite value at a U pixel must not turn 0·x into NaN.
        numerator = torch.where(labeled, terms, torch.zeros_like(terms)).sum()
        denominator = pixel_weight.sum()
        # Dividing by a where-guarded denominator keeps both the value and the gradient finite when nothing is
        # labeled; a where around the quotient would still send 0/0 = NaN back through the unused branch.
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return numerator / safe


class CrossEntropyLoss(_LabeledLoss):
    """`ce`: Σ w_y·ℓ / Σ w_y over labeled pixels, i.e. torch's weighted cross-entropy with ignore_index."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, labeled, _, pixel_weight = self._prepare(logits, target)
        return self._weighted_mean(pixel_weight * self._nll(logits, target.long()), labeled, pixel_weight)


class CeDiceLoss(_LabeledLoss):
    """`ce_dice`: 0.5·CE + 0.5·(1 − mean_c D_c), soft Dice with +1 smoothing over the labeled pixels of the batch."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, labeled, safe_target, pixel_weight = self._prepare(logits, target)
        ce = self._weighted_mean(pixel_weight * self._nll(logits, target.long()), labeled, pixel_weight)
        mask = labeled.unsqueeze(1).to(logits.dtype)
        probabilities = torch.softmax(logits, dim=1) * mask
        one_hot = F.one_hot(safe_target, self.num_classes).permute(0, 3, 1, 2).to(logits.dtype) * mask
        dims = (0, 2, 3)
        intersection = (probabilities * one_hot).sum(dims)
        dice = (2.0 * intersection + 1.0) / (probabilities.sum(dims) + one_hot.sum(dims) + 1.0)
        return 0.5 * ce + 0.5 * (1.0 - dice.mean())


class FocalLoss(_LabeledLoss):
    """`focal`: w_y·(1 − p_t)^γ·(−log p_t) normalised by Σ w_y; with γ = 0 the result is bit-identical to `ce`."""

    def __init__(self, *, num_classes: int, class_weights: list[float] | None, ignore_index: int, gamma: float) -> None:
        super().__init__(num_classes=num_classes, class_weights=class_weights, ignore_index=ignore_index)
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, labeled, _, pixel_weight = self._prepare(logits, target)
        nll = self._nll(logits, target.long())
        # p_t from the same nll CE uses, so γ = 0 multiplies by an exact 1.0 and matches `ce` bit for bit. The
        # clamp keeps d/dp (1 − p_t)^γ finite at p_t = 1 for γ < 1 (and at U pixels, where nll is 0).
        modulation = (1.0 - torch.exp(-nll)).clamp_min(1e-12).pow(self.gamma)
        return self._weighted_mean(pixel_weight * modulation * nll, labeled, pixel_weight)


def per_class_loss_sums(
    logits: torch.Tensor, target: torch.Tensor, *, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c: Σ of unweighted per-pixel CE (each clamped at 100) over labeled pixels with y = c, and their count.

    Returns (float32 sums, int64 counts), both of length `num_classes` on the logits' device; U pixels count nowhere.
    """
    target = target.long()
    labeled = target != ignore_index
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=ignore_index)
    per_pixel = per_pixel.clamp(max=PER_PIXEL_LOSS_CLAMP)
    # U pixels go to an extra bin that is dropped, which avoids a boolean gather (a host sync on GPUs).
    bins = torch.where(labeled, target, torch.full_like(target, num_classes)).flatten()
    values = torch.where(labeled, per_pixel, torch.zeros_like(per_pixel)).flatten()
    sums = torch.zeros(num_classes + 1, dtype=torch.float32, device=logits.device).scatter_add_(0, bins, values)
    counts = torch.bincount(bins, minlength=num_classes + 1)
    return sums[:num_classes], counts[:num_classes]


register_loss(
    "ce",
    lambda *, num_classes, class_weights, ignore_index, focal_gamma: CrossEntropyLoss(
        num_classes=num_classes, class_weights=class_weights, ignore_index=ignore_index
    ),
)
register_loss(
    "ce_dice",
    lambda *, num_classes, class_weights, ignore_index, focal_gamma: CeDiceLoss(
        num_classes=num_classes, class_weights=class_weights, ignore_index=ignore_index
    ),
)
register_loss(
    "focal",
    lambda *, num_classes, class_weights, ignore_index, focal_gamma: FocalLoss(
        num_classes=num_classes, class_weights=class_weights, ignore_index=ignore_index, gamma=focal_gamma
    ),
)
