"""Post-processing fitted to the training labels, and moved only on evidence beyond noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetile.evidence import MIN_BLOCK, beyond_noise, scoring_units
from unetile.instance_fit import (
    MIN_SIZE_SHARE,
    fit_from_labels,
    is_membrane_map,
    measure_objects,
    tune,
)
from unetile.instances import InstanceOptions, default_options, extract_instances


def disks(centres, radius, shape=(96, 96)):
    """Instance labels of disks (later ones over earlier ones)."""
    rows, columns = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for index, (row, column) in enumerate(centres, start=1):
        labels[np.hypot(rows - row, columns - column) < radius] = index
    return labels


APART = [(15, 15), (15, 50), (50, 20), (55, 60), (80, 30), (80, 80)]


def test_objects_on_a_background_get_components_a_size_floor_and_filled_holes():
    labels = [disks(APART, 8), disks(APART[::-1], 8)]
    options, record = fit_from_labels(labels, default_options("membrane"), "membrane")
    sizes = np.bincount(labels[0].ravel())[1:]
    assert options.method == "components" and options.fill_holes
    assert options.min_size == int(MIN_SIZE_SHARE * np.percentile(sizes, 5))
    assert 50 < options.min_size < sizes.min()  # well below the smallest true object
    assert record["touching_share"] == 0.0 and "components" in record["why"]


def test_touching_instances_get_a_watershed_but_binary_masks_cannot_show_touching():
    touching = [disks([(30, 30), (30, 45), (60, 30), (60, 45)], 8)]  # pairs 15 px apart
    options, record = fit_from_labels(touching, default_options("instances"), "instances")
    assert record["touching_share"] == 1.0 and options.method == "watershed"
    binary = [ndimage.label(touching[0] > 0)[0]]
    options, _ = fit_from_labels(binary, default_options("membrane"), "membrane")
    assert options.method == "components"


def test_objects_with_holes_keep_them():
    labels = disks(APART, 8)
    labels[disks(APART[:3], 3) > 0] = 0  # three of the six objects are rings
    assert measure_objects([labels])["hole_share"] == 0.5
    options, _ = fit_from_labels([labels], default_options("instances"), "instances")
    assert not options.fill_holes


def test_a_membrane_map_keeps_the_papers_components():
    cells = np.ones((64, 64), bool)
    cells[::16, :] = cells[:, ::16] = False  # one-pixel membranes on a 16 px grid
    assert is_membrane_map(cells)
    assert not is_membrane_map(disks(APART, 8) > 0)
    options, record = fit_from_labels(
        [ndimage.label(cells)[0]], default_options("membrane"), "membrane"
    )
    assert options.method == "components" and options.connectivity == 1
    assert record["why"].startswith("membrane map")


def test_masks_linked_through_corners_get_full_connectivity():
    vessels = np.zeros((40, 60), bool)
    for offset in (0, 10, 20):
        vessels[np.arange(30), np.arange(30) + offset] = True  # diagonal lines
    pieces = ndimage.label(vessels)[0]
    assert pieces.max() == 90
    options, record = fit_from_labels([pieces], default_options("membrane"), "membrane")
    assert options.connectivity == 2 and record["objects"] == 3


def test_scoring_units_are_images_or_blocks_that_hold_objects():
    truth = np.zeros((2 * MIN_BLOCK, 2 * MIN_BLOCK + 10), np.int32)
    truth[5:10, 5:10] = 1
    truth[-10:-5, -10:-5] = 2
    probability = np.zeros((2, *truth.shape), np.float32)
    units = scoring_units([probability], [truth])
    assert len(units) == 2  # four blocks, two of them empty
    assert all(u[0].shape[1:] == u[1].shape == (MIN_BLOCK, MIN_BLOCK + 5) for u in units)
    assert len(scoring_units([probability] * 4, [truth] * 4)) == 4
    narrow = truth[:, : MIN_BLOCK + 10]  # too narrow to halve: split along rows only
    assert len(scoring_units([probability[:, :, : MIN_BLOCK + 10]], [narrow])) == 1


def test_beyond_noise_needs_a_consistent_gain():
    assert beyond_noise([0.8, 0.82, 0.79, 0.81], [0.7, 0.71, 0.7, 0.72])
    assert not beyond_noise([0.9, 0.6, 0.95, 0.6], [0.7, 0.7, 0.7, 0.7])  # mean up, noisy
    assert not beyond_noise([0.9], [0.1])  # one unit says nothing about the noise
    assert not beyond_noise([0.7, 0.7], [0.7, 0.7])


def test_tuning_moves_off_the_default_only_for_a_clear_gain():
    truths = [disks(APART, 8) for _ in range(4)]
    noisy = []
    rng = np.random.default_rng(0)
    for truth in truths:
        foreground = (truth > 0) | (rng.random(truth.shape) < 0.01)  # specks everywhere
        noisy.append(np.stack([1.0 - foreground, foreground]).astype(np.float32))
    plain = InstanceOptions()
    best, record = tune(noisy, truths, plain, diameter=16.0)
    assert record["moved"] and (best.min_size > 0 or best.opening > 0)
    assert record["best"]["f1@0.5"] == 1.0 and record["default"]["f1@0.5"] < 0.5
    assert extract_instances(noisy[0], best).max() == len(APART)
    # A default that is already right stays, whatever ties the grid holds.
    kept, record = tune(noisy, truths, best, diameter=16.0)
    assert kept == best and not record["moved"]


@pytest.mark.parametrize("value", [0, 4, -1])
def test_connectivity_is_checked(value):
    with pytest.raises(ValueError, match="connectivity"):
        InstanceOptions(connectivity=value)
