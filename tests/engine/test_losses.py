"""Losses of ENGINE §8.1 against hand computations and literal transcriptions; U pixels take no part anywhere."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlwatchd.engine.losses import build_loss, list_losses, per_class_loss_sums, register_loss
from dlwatchd.errors import DlwatchdError, ErrorCode

U = 255


def batch(seed: int = 0, n: int = 2, c: int = 3, h: int = 4, w: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a target in which roughly a third of the pixels are U."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=generator) * 2
    target = torch.randint(0, c, (n, h, w), generator=generator)
    unlabeled = torch.rand(n, h, w, generator=generator) < 0.35
    target[unlabeled] = U
    assert unlabeled.any() and (~unlabeled).any()
    return logits, target


def test_registry_lists_the_three_losses_and_rejects_unknown_and_duplicate_names() -> None:
    assert list_losses() == ["ce", "ce_dice", "focal"]
    assert list_losses("ce*") == ["ce", "ce_dice"]
    with pytest.raises(DlwatchdError) as caught:
        build_loss("dice", num_classes=3, class_weights=None, ignore_index=U)
    assert caught.value.code is ErrorCode.SCHEMA
    assert caught.value.field == "training.loss"
    assert all(name in caught.value.message for name in ("ce", "ce_dice", "focal"))
    with pytest.raises(ValueError):
        register_loss("ce", lambda **_: torch.nn.Identity())
    assert isinstance(build_loss("CE", num_classes=3, class_weights=None, ignore_index=U), torch.nn.Module)


def test_ce_equals_torch_weighted_cross_entropy_with_ignore_index() -> None:
    logits, target = batch()
    weights = [1.0, 2.5, 0.5]
    loss = build_loss("ce", num_classes=3, class_weights=weights, ignore_index=U)(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=U)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_class_weighted_ce_equals_a_hand_computation() -> None:
    # One row of four pixels: classes 0, 1, U, 1 with weights w0 = 2, w1 = 0.5.
    logits = torch.tensor([[[[2.0, 0.0, 9.0, 1.0]], [[0.0, 1.0, -9.0, 3.0]]]])  # 1×2×1×4
    target = torch.tensor([[[0, 1, U, 1]]])

    def nll(a: float, b: float, y: int) -> float:
        chosen = a if y == 0 else b
        return -(chosen - math.log(math.exp(a) + math.exp(b)))

    terms = [(2.0, nll(2.0, 0.0, 0)), (0.5, nll(0.0, 1.0, 1)), (0.5, nll(1.0, 3.0, 1))]
    expected = sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    loss = build_loss("ce", num_classes=2, class_weights=[2.0, 0.5], ignore_index=U)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_equals_ce_exactly_in_value_and_gradient() -> None:
    logits, target = batch(seed=3)
    weights = [0.7, 1.9, 1.3]
    results = []
    for name in ("ce", "focal"):
        x = logits.clone().requires_grad_(True)
        loss = build_loss(name, num_classes=3, class_weights=weights, ignore_index=U, focal_gamma=0.0)(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_focal_with_gamma_two_equals_a_literal_transcription_in_value_and_gradient() -> None:
    logits, target = batch(seed=4, n=1, h=3, w=3)
    weights = [1.0, 3.0, 0.25]
    gamma = 2.0
    reference = logits.double().requires_grad_(True)
    numerator = denominator = 0.0
    for i in range(3):
        for j in range(3):
            y = int(target[0, i, j])
            if y == U:
                continue
            p_t = torch.softmax(reference[0, :, i, j], dim=0)[y]
            numerator = numerator + weights[y] * (1 - p_t) ** gamma * -torch.log(p_t)
            denominator += weights[y]
    expected = numerator / denominator
    expected.backward()
    x = logits.clone().requires_grad_(True)
    loss = build_loss("focal", num_classes=3, class_weights=weights, ignore_index=U, focal_gamma=gamma)(x, target)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, reference.grad.float(), rtol=1e-4, atol=1e-6)


def test_focal_gradient_stays_finite_on_saturated_pixels_with_gamma_below_one() -> None:
    # p_t rounds to exactly 1 in float32, where d/dp (1 − p_t)^0.5 is infinite without a guard.
    logits = torch.tensor([[[[200.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 1]]])
    build_loss("focal", num_classes=2, class_weights=None, ignore_index=U, focal_gamma=0.5)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[..., 1].abs().sum() > 0


def test_ce_dice_equals_a_literal_transcription() -> None:
    logits, target = batch(seed=5)
    target[target == 2] = 0  # class 2 absent from the labels: its D_c is (2·0 + 1)/(Σp_2 + 0 + 1), still averaged
    n, c, h, w = logits.shape
    ce_num = ce_den = 0.0
    inter = [0.0] * c
    p_sum = [0.0] * c
    y_sum = [0.0] * c
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(target[b, i, j])
                if y == U:
                    continue
                p = torch.softmax(logits[b, :, i, j].double(), dim=0).tolist()
                ce_num += -math.log(p[y])
                ce_den += 1
                for k in range(c):
                    p_sum[k] += p[k]
                    y_sum[k] += 1.0 if k == y else 0.0
                    inter[k] += p[k] * (1.0 if k == y else 0.0)
    dice = [(2 * inter[k] + 1) / (p_sum[k] + y_sum[k] + 1) for k in range(c)]
    expected = 0.5 * ce_num / ce_den + 0.5 * (1 - sum(dice) / c)
    loss = build_loss("ce_dice", num_classes=c, class_weights=None, ignore_index=U)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["ce", "ce_dice", "focal"])
def test_ignored_pixels_get_exactly_zero_gradient(name: str) -> None:
    logits, target = batch(seed=6)
    # Extreme logits at U pixels would surface any leak as a non-zero (or NaN) gradient.
    logits = torch.where((target == U).unsqueeze(1), torch.full_like(logits, 80.0), logits)
    logits[:, 0][target == U] = -80.0
    x = logits.clone().requires_grad_(True)
    loss = build_loss(name, num_classes=3, class_weights=[1.0, 2.0, 0.5], ignore_index=U, focal_gamma=0.5)(x, target)
    loss.backward()
    grad = x.grad.permute(0, 2, 3, 1)  # N×H×W×C
    assert torch.all(grad[target == U] == 0)
    assert torch.isfinite(grad).all()
    assert grad[target != U].abs().sum() > 0


@pytest.mark.parametrize("name", ["ce", "ce_dice", "focal"])
def test_a_batch_without_labeled_pixels_gives_a_finite_zero_with_a_graph(name: str) -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), U)
    loss = build_loss(name, num_classes=3, class_weights=None, ignore_index=U)(logits, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_zero_weight_on_every_labeled_pixel_is_also_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 0], [U, 0]]])
    loss = build_loss("ce", num_classes=2, class_weights=[0.0, 1.0], ignore_index=U)(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["ce", "ce_dice", "focal"])
def test_half_precision_logits_are_computed_in_float32(name: str) -> None:
    logits, target = batch(seed=7)
    criterion = build_loss(name, num_classes=3, class_weights=None, ignore_index=U)
    half = criterion(logits.half(), target)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, criterion(logits.half().float(), target))


def test_wrong_number_of_class_weights_is_refused() -> None:
    with pytest.raises(ValueError):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0], ignore_index=U)


def test_per_class_loss_sums_clamp_each_pixel_at_100_and_skip_u() -> None:
    # Pixels: y=0 confident right (≈0), y=0 absurdly wrong (CE 300 → 100), y=1 even, U wrong; class 2 absent.
    logits = torch.tensor([[[[10.0, -150.0, 0.0, -500.0]], [[0.0, 150.0, 0.0, 500.0]], [[0.0, 0.0, -1e9, 0.0]]]])
    target = torch.tensor([[[0, 0, 1, U]]])
    sums, counts = per_class_loss_sums(logits, target, num_classes=3, ignore_index=U)
    first = -(10.0 - math.log(math.exp(10.0) + 2.0))
    assert counts.tolist() == [2, 1, 0]
    assert sums[0].item() == pytest.approx(first + 100.0, rel=1e-6)
    assert sums[1].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert sums[2].item() == 0.0
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
