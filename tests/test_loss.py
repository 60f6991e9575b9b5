from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unetile.train.loss import combined_loss, dice_loss, weighted_cross_entropy

pytestmark = pytest.mark.fast

# One image, 2 classes, 1x2 pixels. Pixel 0: logits (0, log 3) -> p = (1/4, 3/4).
# Pixel 1: logits (2, 0) -> p_1 = 1 / (1 + e^2). Both pixels have true label 1.
LOGITS = torch.tensor([[[[0.0, 2.0]], [[math.log(3.0), 0.0]]]], dtype=torch.float64)
TARGET = torch.tensor([[[1, 1]]])
LOSS_PIXEL_0 = -math.log(0.75)  # 0.287682
LOSS_PIXEL_1 = math.log(1.0 + math.e**2)  # 2.126928


def test_cross_entropy_matches_hand_computation():
    loss = weighted_cross_entropy(LOGITS, TARGET)
    assert float(loss) == pytest.approx((LOSS_PIXEL_0 + LOSS_PIXEL_1) / 2, rel=1e-12)
    assert float(loss) == pytest.approx(1.207305, abs=1e-6)


def test_weights_multiply_each_pixel_and_normaliser_is_pixel_count():
    weights = torch.tensor([[[2.0, 0.5]]], dtype=torch.float64)
    loss = weighted_cross_entropy(LOGITS, TARGET, weights)
    expected = (2.0 * LOSS_PIXEL_0 + 0.5 * LOSS_PIXEL_1) / 2  # 0.819414
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(loss) == pytest.approx(0.819414, abs=1e-6)


def test_ignored_pixels_contribute_nothing_and_leave_the_normaliser():
    target = torch.tensor([[[1, 255]]])
    weights = torch.tensor([[[2.0, 0.5]]], dtype=torch.float64)
    loss = weighted_cross_entropy(LOGITS, target, weights, ignore_index=255)
    assert float(loss) == pytest.approx(2.0 * LOSS_PIXEL_0, rel=1e-12)


def test_all_pixels_ignored_gives_zero_with_zero_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    loss = weighted_cross_entropy(logits, torch.full((1, 1, 2), -1), ignore_index=-1)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
@pytest.mark.parametrize("num_classes", [1, 2, 5])
def test_unweighted_equals_torch_cross_entropy_in_2d_and_3d(spatial, num_classes):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((2, num_classes, *spatial), generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (2, *spatial), generator=generator)
    expected = F.cross_entropy(logits, target)
    assert float(weighted_cross_entropy(logits, target)) == pytest.approx(float(expected), 1e-12)
    ones = torch.ones((2, *spatial), dtype=torch.float64)
    assert float(weighted_cross_entropy(logits, target, ones)) == pytest.approx(
        float(expected), rel=1e-12
    )


def test_ignore_index_equals_torch_cross_entropy_ignore_index():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn((1, 3, 6, 6), generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (1, 6, 6), generator=generator)
    target[0, :2] = 7
    expected = F.cross_entropy(logits, target, ignore_index=7)
    loss = weighted_cross_entropy(logits, target, ignore_index=7)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


def test_large_logits_give_finite_loss_and_gradient():
    logits = torch.tensor([[[[1e4, -1e4]], [[-1e4, 1e4]]]], requires_grad=True)
    target = torch.tensor([[[1, 1]]])
    loss = weighted_cross_entropy(logits, target, torch.tensor([[[1.0, 3.0]]]))
    loss.backward()
    # Pixel 0 is confidently wrong by 2e4 nats, pixel 1 confidently right.
    assert float(loss.detach()) == pytest.approx(2e4 / 2, rel=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="target must have shape"):
        weighted_cross_entropy(LOGITS, torch.tensor([[[1, 1, 1]]]))
    with pytest.raises(ValueError, match="target labels must lie in"):
        weighted_cross_entropy(LOGITS, torch.tensor([[[1, 2]]]))
    with pytest.raises(ValueError, match="integer class labels"):
        weighted_cross_entropy(LOGITS, TARGET.double())
    with pytest.raises(ValueError, match="weights must have the shape"):
        weighted_cross_entropy(LOGITS, TARGET, torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="logits must have shape"):
        weighted_cross_entropy(LOGITS[0], TARGET[0])


def test_dice_of_hand_probabilities():
    # Class 0: p = (1/4, 1 - 1/(1+e^2)), g = (0, 0); class 1: p = (3/4, 1/(1+e^2)), g = (1, 1).
    p1 = 1.0 / (1.0 + math.e**2)
    dice_0 = (0.0 + 1.0) / (0.25 + (1.0 - p1) + 0.0 + 1.0)
    dice_1 = (2.0 * (0.75 + p1) + 1.0) / ((0.75 + p1) + 2.0 + 1.0)
    loss = dice_loss(LOGITS, TARGET, eps=1.0)
    assert float(loss) == pytest.approx(1.0 - (dice_0 + dice_1) / 2, rel=1e-12)
    foreground = dice_loss(LOGITS, TARGET, eps=1.0, include_background=False)
    assert float(foreground) == pytest.approx(1.0 - dice_1, rel=1e-12)


def test_dice_of_perfect_prediction_is_zero_and_of_inverted_is_near_one():
    target = torch.tensor([[[0, 1, 1, 0], [1, 1, 0, 0]]])
    one_hot = F.one_hot(target, 2).movedim(-1, 1).double()
    assert float(dice_loss(50.0 * (2 * one_hot - 1), target)) == pytest.approx(0.0, abs=1e-12)
    inverted = dice_loss(50.0 * (1 - 2 * one_hot), target, eps=1e-6)
    assert float(inverted) == pytest.approx(1.0, abs=1e-6)


def test_dice_ignores_unannotated_pixels():
    target = torch.tensor([[[0, 1, 9, 9]]])
    logits = torch.tensor([[[[20.0, -20.0, 20.0, -20.0]], [[-20.0, 20.0, -20.0, 20.0]]]])
    # The ignored pixels are predicted as 0 and 1; a perfect score means they were left out.
    assert float(dice_loss(logits, target, ignore_index=9)) == pytest.approx(0.0, abs=1e-6)


def test_combined_loss_is_cross_entropy_plus_weighted_dice():
    weights = torch.tensor([[[2.0, 0.5]]], dtype=torch.float64)
    total = combined_loss(LOGITS, TARGET, weights, dice_weight=0.5)
    expected = weighted_cross_entropy(LOGITS, TARGET, weights) + 0.5 * dice_loss(LOGITS, TARGET)
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    only_cross_entropy = combined_loss(LOGITS, TARGET, weights, dice_weight=0.0)
    assert float(only_cross_entropy) == pytest.approx(0.819414, abs=1e-6)
    with pytest.raises(ValueError, match="dice_weight"):
        combined_loss(LOGITS, TARGET, dice_weight=-1.0)
