from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetile.data.augment import (
    AugmentParams,
    Transform,
    _reflect_any,
    _reflect_index,
    apply_transforms,
    augment_batch,
    draw_transform,
    elastic_displacement,
    warp,
)

ELASTIC_ONLY = AugmentParams(rotation=False, flip=False, shift=0.0, gray=False)
GEOMETRY_ONLY = AugmentParams(gray=False)


def random_batch(shape=(2, 1, 24, 28), num_labels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(shape, generator=generator)
    labels = torch.randint(0, num_labels, (shape[0], *shape[2:]), generator=generator)
    weights = torch.rand((shape[0], *shape[2:]), generator=generator)
    return images, labels, weights


def checkerboard(size: int, square: int) -> np.ndarray:
    index = np.arange(size) // square
    return (index[:, None] + index[None, :]) % 2


# ---- identity -------------------------------------------------------------


def test_none_params_is_the_identity():
    images, labels, weights = random_batch()
    out = augment_batch(images, labels, weights, np.random.default_rng(0), AugmentParams.none())
    assert torch.equal(out[0], images)
    assert torch.equal(out[1], labels)
    assert torch.equal(out[2], weights)


def test_zero_sigma_elastic_is_the_identity():
    images, labels, weights = random_batch()
    params = AugmentParams(elastic_sigma=0.0, rotation=False, flip=False, shift=0.0, gray=False)
    out = augment_batch(images, labels, None, np.random.default_rng(0), params)
    assert torch.equal(out[0], images)
    assert torch.equal(out[1], labels)
    assert out[2] is None
    field = elastic_displacement((24, 28), np.random.default_rng(0), sigma=0.0)
    assert not field.any()
    assert np.array_equal(warp(images[0, 0].numpy(), field, order=3), images[0, 0].numpy())


def test_output_shape_of_identity_is_the_centre_crop():
    images, labels, weights = random_batch(shape=(1, 2, 20, 21))
    out = augment_batch(
        images, labels, weights, np.random.default_rng(0), AugmentParams.none(), (10, 15)
    )
    assert torch.equal(out[0], images[:, :, 5:15, 3:18])
    assert torch.equal(out[1], labels[:, 5:15, 3:18])
    assert torch.equal(out[2], weights[:, 5:15, 3:18])


# ---- exact geometry -------------------------------------------------------


@pytest.mark.parametrize(
    ("angle", "turns"), [(90.0, -1), (180.0, 2), (270.0, 1), (-90.0, 1), (450.0, -1)]
)
def test_rotation_by_multiples_of_90_degrees_is_exact(angle, turns):
    images, labels, weights = random_batch(shape=(1, 2, 7, 7))
    transform = Transform(angle=angle)
    out = apply_transforms(images, labels, weights, [transform])
    assert torch.equal(out[0], torch.rot90(images, turns, dims=(2, 3)))
    assert torch.equal(out[1], torch.rot90(labels, turns, dims=(1, 2)))
    assert torch.equal(out[2], torch.rot90(weights, turns, dims=(1, 2)))


@pytest.mark.parametrize("flips", [(True, False), (False, True), (True, True)])
def test_flips_are_exact(flips):
    images, labels, weights = random_batch(shape=(1, 1, 6, 9))
    axes = [axis for axis, flag in enumerate(flips) if flag]
    out = apply_transforms(images, labels, weights, [Transform(flips=flips)])
    assert torch.equal(out[0], images.flip([2 + axis for axis in axes]))
    assert torch.equal(out[1], labels.flip([1 + axis for axis in axes]))


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(4, 20),
    width=st.integers(4, 20),
    data=st.data(),
)
def test_integer_shift_with_crop_reads_the_shifted_window(height, width, data):
    out_height = data.draw(st.integers(1, height))
    out_width = data.draw(st.integers(1, width))
    top, left = (height - out_height) // 2, (width - out_width) // 2
    shift_rows = data.draw(st.integers(-top, height - out_height - top))
    shift_columns = data.draw(st.integers(-left, width - out_width - left))
    images, labels, weights = random_batch(shape=(1, 1, height, width))
    transform = Transform(shift=(float(shift_rows), float(shift_columns)))
    out = apply_transforms(images, labels, weights, [transform], (out_height, out_width))
    rows = slice(top + shift_rows, top + shift_rows + out_height)
    columns = slice(left + shift_columns, left + shift_columns + out_width)
    assert torch.equal(out[0], images[:, :, rows, columns])
    assert torch.equal(out[1], labels[:, rows, columns])
    assert torch.equal(out[2], weights[:, rows, columns])


def test_positions_outside_are_mirrored_about_the_border_pixels():
    array = np.arange(20, dtype=np.float64).reshape(4, 5)
    displacement = np.zeros((2, 4, 5))
    displacement[1] = -2.0  # every pixel reads two columns to the left
    warped = warp(array, displacement, order=1)
    # Column 0 reads column -2, mirrored to 2; column 1 reads -1 -> 1.
    assert np.array_equal(warped[:, 0], array[:, 2])
    assert np.array_equal(warped[:, 1], array[:, 1])
    assert np.array_equal(warped[:, 2:], array[:, :3])


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 7), shift=st.integers(-30, 30))
def test_far_positions_are_mirrored_periodically(size, shift):
    array = np.arange(3 * size, dtype=np.int64).reshape(3, size)
    displacement = np.zeros((2, 3, size))
    displacement[1] = shift
    warped = warp(array, displacement, order=0)
    for column in range(size):
        position = column + shift
        if size > 1:  # mirror about pixel centres 0 and size - 1: period 2 (size - 1)
            position %= 2 * (size - 1)
            position = min(position, 2 * (size - 1) - position)
        else:
            position = 0
        assert np.array_equal(warped[:, column], array[:, position])


def test_warp_half_pixel_linear_is_the_mean_of_neighbours():
    array = np.array([[0.0, 2.0, 6.0], [1.0, 3.0, 5.0]])
    displacement = np.zeros((2, 2, 3))
    displacement[1, :, :2] = 0.5
    warped = warp(array, displacement, order=1)
    assert np.allclose(warped, [[1.0, 4.0, 6.0], [2.0, 4.0, 5.0]], atol=1e-12)


# ---- the elastic field ----------------------------------------------------


def test_control_point_displacement_std_is_sigma():
    rng = np.random.default_rng(7)
    values = []
    for _ in range(300):
        field = elastic_displacement((41, 41), rng, sigma=10.0, grid=3)
        values.append(field[:, ::20, ::20])  # control points sit at pixels 0, 20, 40
    values = np.concatenate([value.ravel() for value in values])
    assert values.size == 300 * 2 * 9
    assert abs(values.std() - 10.0) < 1.0
    assert abs(values.mean()) < 1.0


def test_field_is_bicubic_interpolation_of_the_control_points():
    field = elastic_displacement((30, 45), np.random.default_rng(3), sigma=10.0, grid=3)
    control = np.random.default_rng(3).normal(0.0, 10.0, size=(2, 3, 3))
    assert np.allclose(
        field[:, [0, 0, 29, 29], [0, 44, 0, 44]], control[:, [0, 0, 2, 2], [0, 2, 0, 2]]
    )
    reference = F.interpolate(
        torch.from_numpy(control)[None], size=(30, 45), mode="bicubic", align_corners=True
    )[0].numpy()
    assert np.allclose(field, reference, atol=1e-10)
    # Smooth: neighbouring displacements differ by much less than sigma.
    assert np.abs(np.diff(field, axis=2)).max() < 3.0


def test_augment_batch_elastic_is_warp_by_elastic_displacement():
    images = torch.rand(
        (1, 1, 40, 50), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    labels = (images[:, 0] > 0.5).long()
    out = augment_batch(images, labels, None, np.random.default_rng(21), ELASTIC_ONLY)
    field = elastic_displacement((40, 50), np.random.default_rng(21), sigma=10.0, grid=3)
    assert np.abs(field).max() > 5.0
    assert np.allclose(out[0][0, 0].numpy(), warp(images[0, 0].numpy(), field, order=3), atol=1e-9)
    same = out[1][0].numpy() == warp(labels[0].numpy(), field, order=0)
    assert same.mean() > 0.999


def test_3d_field_has_a_3x3x3_grid_of_control_points():
    rng = np.random.default_rng(11)
    values = np.concatenate(
        [elastic_displacement((9, 9, 9), rng, 10.0)[:, ::4, ::4, ::4].ravel() for _ in range(60)]
    )
    assert values.size == 60 * 3 * 27
    assert abs(values.std() - 10.0) < 1.0


# ---- labels, weights and alignment ----------------------------------------


def test_labels_keep_their_set_of_values():
    images, _, _ = random_batch(shape=(3, 1, 40, 40))
    generator = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 7, 1000, 70001])
    labels = ids[torch.randint(0, 4, (3, 40, 40), generator=generator)]
    out = augment_batch(images, labels, None, np.random.default_rng(5), AugmentParams())
    assert out[1].dtype == torch.int64
    assert set(out[1].unique().tolist()) <= {0, 7, 1000, 70001}


def test_label_weight_pairs_stay_pairs():
    images, labels, _ = random_batch(shape=(2, 1, 32, 32))
    weights = 1.0 + labels.double() * 10.0 + torch.rand(labels.shape, dtype=torch.float64) * 0.1
    out = augment_batch(images, labels, weights, np.random.default_rng(2), GEOMETRY_ONLY)
    assert torch.equal(torch.floor((out[2] - 1.0) / 10.0).long(), out[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deformed_image_edges_line_up_with_deformed_labels(seed):
    # A 3x3 grid over a 192-pixel tile: control points 96 px apart, as on a
    # (smaller) training tile of the paper, so the deformation does not fold.
    board = checkerboard(256, 16)
    images = torch.from_numpy(board.astype(np.float32))[None, None]
    labels = torch.from_numpy(board.astype(np.int64))[None]
    out = augment_batch(
        images, labels, None, np.random.default_rng(seed), GEOMETRY_ONLY, (192, 192)
    )
    thresholded = (out[0][0, 0] > 0.5).numpy()
    deformed = out[1][0].numpy()
    # Away from edges: pixels whose 5x5 neighbourhood in the labels is uniform.
    interior = ndimage.minimum_filter(deformed, 5) == ndimage.maximum_filter(deformed, 5)
    assert interior.mean() > 0.3
    agreement = (thresholded == deformed.astype(bool))[interior].mean()
    assert agreement > 0.98
    # Everywhere, too: a one-pixel misalignment would give about 0.92 here.
    assert (thresholded == deformed.astype(bool)).mean() > 0.98


def test_gray_variation_changes_images_only():
    images, labels, weights = random_batch()
    params = AugmentParams(elastic=False, rotation=False, flip=False, shift=0.0)
    out = augment_batch(images, labels, weights, np.random.default_rng(4), params)
    assert torch.equal(out[1], labels)
    assert torch.equal(out[2], weights)
    assert not torch.allclose(out[0], images)


def test_gray_variation_hand_numbers():
    images = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    labels = torch.zeros((1, 2, 2), dtype=torch.int64)

    def vary(**values):
        return apply_transforms(images, labels, None, [Transform(**values)])[0].flatten().tolist()

    # Gamma 2 on the range [0, 4]: 4 * (x / 4) ** 2.
    assert vary(gamma=2.0) == pytest.approx([0.0, 0.25, 1.0, 4.0])
    # Contrast 2 about the mean 1.75.
    assert vary(contrast=2.0) == pytest.approx([-1.75, 0.25, 2.25, 6.25])
    # Brightness 0.1 of the range 4.
    assert vary(brightness=0.1) == pytest.approx([0.4, 1.4, 2.4, 4.4])


# ---- randomness -----------------------------------------------------------


def test_same_seed_same_result_and_other_seed_differs():
    images, labels, weights = random_batch(shape=(2, 1, 30, 30))
    first = augment_batch(images, labels, weights, np.random.default_rng(9), AugmentParams())
    second = augment_batch(images, labels, weights, np.random.default_rng(9), AugmentParams())
    other = augment_batch(images, labels, weights, np.random.default_rng(10), AugmentParams())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # Each tile of a batch draws its own deformation.
    twins = augment_batch(
        images[[0, 0]], labels[[0, 0]], None, np.random.default_rng(9), ELASTIC_ONLY
    )
    assert not torch.equal(twins[1][0], twins[1][1])


def test_draw_transform_respects_disabled_augmentations():
    transform = draw_transform(np.random.default_rng(0), AugmentParams.none(), ndim=2)
    assert transform.control_displacement is None
    assert (transform.angle, transform.flips, transform.shift) == (0.0, (), ())
    assert (transform.gamma, transform.contrast, transform.brightness) == (1.0, 1.0, 0.0)
    drawn = draw_transform(np.random.default_rng(0), AugmentParams(shift=5.0), ndim=3)
    assert drawn.control_displacement.shape == (3, 3, 3, 3)
    assert 0.0 <= drawn.angle < 360.0
    assert all(abs(value) <= 5.0 for value in drawn.shift)
    assert 0.8 <= drawn.gamma <= 1.25 and 0.8 <= drawn.contrast <= 1.25


# ---- 3D and interface ------------------------------------------------------


def test_3d_batch_keeps_shapes_and_label_values():
    images, labels, weights = random_batch(shape=(2, 1, 10, 24, 24), num_labels=2)
    out = augment_batch(
        images, labels, weights, np.random.default_rng(0), AugmentParams(), (6, 16, 16)
    )
    assert out[0].shape == (2, 1, 6, 16, 16)
    assert out[1].shape == out[2].shape == (2, 6, 16, 16)
    assert set(out[1].unique().tolist()) <= {0, 1}


def test_params_round_trip_through_json():
    params = AugmentParams(elastic_sigma=8.0, shift=4.0, gamma=(0.7, 1.4))
    restored = AugmentParams.from_dict(json.loads(json.dumps(asdict(params))))
    assert restored == params
    assert asdict(AugmentParams())["elastic_sigma"] == 10.0
    assert asdict(AugmentParams())["elastic_grid"] == 3


def test_bad_inputs_raise_clear_errors():
    images, labels, weights = random_batch()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="labels must have shape"):
        augment_batch(images, labels[:, :5], weights, rng, AugmentParams())
    with pytest.raises(ValueError, match="output_shape"):
        augment_batch(images, labels, weights, rng, AugmentParams(), (30, 10))
    with pytest.raises(ValueError, match="rng must be"):
        augment_batch(images, labels, weights, 0, AugmentParams())
    with pytest.raises(ValueError, match="elastic_sigma"):
        AugmentParams(elastic_sigma=-1.0)
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        AugmentParams.from_dict({"sigma": 3})
    with pytest.raises(ValueError, match="bicubic"):
        warp(np.zeros((4, 4, 4)), np.zeros((3, 4, 4, 4)), order=3)


@given(size=st.integers(2, 9), low=st.integers(-60, 0), span=st.integers(1, 120))
def test_the_gpu_mirror_equals_the_cpu_mirror_and_numpy_reflect(size, low, span):
    # The GPU path mirrors without reading the range back; it must agree exactly.
    index = torch.arange(low, low + span)
    expected = np.pad(np.arange(size), 200, mode="reflect")[index.numpy() + 200]
    assert np.array_equal(_reflect_any(index, size - 1).numpy(), expected)
    assert np.array_equal(_reflect_index(index, size).numpy(), expected)
