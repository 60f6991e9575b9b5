import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unetile.network.model import (
    UNet,
    context_margin,
    count_conv_layers,
    count_parameters,
    forward_flops,
    input_size_for_output,
    is_valid_input_size,
    output_size,
    valid_input_sizes_near,
)


def test_paper_tile_572_gives_388():
    assert output_size(572) == 388
    assert input_size_for_output(388) == 572
    assert context_margin() == 92


def test_paper_network_has_31030658_parameters_and_23_conv_layers():
    model = UNet(in_channels=1, num_classes=2)
    assert count_parameters(model) == 31_030_658
    assert count_conv_layers(model) == 23


def test_paper_forward_is_about_300_gflop_and_matches_torch_counter():
    flops = forward_flops(UNet().config, (572, 572))
    assert 290e9 < flops < 310e9
    small = UNet(base_channels=4, depth=3)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        small(torch.zeros(1, 1, 44, 60))
    assert counter.get_total_flops() == forward_flops(small.config, (44, 60))


def test_forward_shape_2d_small_network():
    model = UNet(base_channels=4, depth=3).eval()
    out = model(torch.zeros(1, 1, 60, 76))
    assert out.shape == (1, 2, 60 - 40, 76 - 40)
    assert context_margin(depth=3) == 20


def test_forward_shape_3d():
    model = UNet(base_channels=2, depth=3, dims=3, num_classes=3).eval()
    out = model(torch.zeros(1, 1, 44, 44, 52))
    assert out.shape == (1, 3, 4, 4, 12)
    # The 3D analogue of 572 -> 388 for the paper's depth.
    assert output_size(572, depth=5) == 388  # per axis, independent of dims


def test_same_padding_keeps_size():
    model = UNet(base_channels=4, depth=4, padding="same", norm="batch").eval()
    assert model(torch.zeros(2, 1, 64, 48)).shape == (2, 2, 64, 48)
    assert output_size(48, depth=4, padding="same") == 48
    assert context_margin(padding="same") == 0


def test_instance_norm_option_builds_and_runs():
    model = UNet(base_channels=4, depth=3, norm="instance").eval()
    assert model(torch.zeros(1, 1, 60, 60)).shape == (1, 2, 20, 20)


def test_invalid_size_570_is_rejected_with_valid_neighbours():
    with pytest.raises(ValueError, match=r"570 is not valid.*556 or 572"):
        output_size(570)
    with pytest.raises(ValueError, match="not valid"):
        UNet(base_channels=2).output_shape((570, 572))


def test_forward_refuses_a_size_the_poolings_cannot_halve():
    # 570 x 570 used to give 372 x 372, shifted by half a pixel after the odd poolings.
    model = UNet(base_channels=1).eval()
    with pytest.raises(ValueError, match=r"input size 570 is not valid.*556 or 572"):
        model(torch.zeros(1, 1, 572, 570))
    small = UNet(base_channels=2, depth=3, padding="same").eval()
    with pytest.raises(ValueError, match=r"input size 30 is not valid.*28 or 32"):
        small(torch.zeros(1, 1, 32, 30))
    assert small(torch.zeros(1, 1, 32, 28)).shape == (1, 2, 32, 28)


@given(st.integers(1, 400), st.integers(1, 6), st.sampled_from(["valid", "same"]))
def test_valid_sizes_repeat_every_pooling_multiple(size, depth, padding):
    below, above = valid_input_sizes_near(size, depth, padding)
    valid = [s for s in range(1, 600) if is_valid_input_size(s, depth, padding)]
    assert above == min(s for s in valid if s >= size)
    assert below == max((s for s in valid if s <= size), default=None)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="padding"):
        UNet(padding="reflect")
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="group")


def test_he_init_std_matches_sqrt_2_over_fan_in():
    model = UNet(base_channels=64, depth=3)
    conv = model.contracting[1][2]  # second 3x3 conv at level 1: 128 -> 128 channels
    fan_in = 128 * 9
    std = conv.weight.std().item()
    assert abs(std - math.sqrt(2 / fan_in)) / math.sqrt(2 / fan_in) < 0.05
    assert torch.all(conv.bias == 0)


@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=2, max_value=5))
def test_geometry_is_consistent(size, depth):
    """Valid inputs lose exactly twice the context margin; the inverse is minimal."""
    if is_valid_input_size(size, depth):
        assert output_size(size, depth) == size - 2 * context_margin(depth)
    wanted = input_size_for_output(size, depth)
    assert is_valid_input_size(wanted, depth)
    assert output_size(wanted, depth) >= size
    smaller = [s for s in range(wanted - 1, 0, -1) if is_valid_input_size(s, depth)]
    assert not smaller or output_size(smaller[0], depth) < size
