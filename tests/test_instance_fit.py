"""Post-processing fitted to the training labels, and moved only on evidence beyond noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetile.evaluate.evidence import MIN_BLOCK, beyond_noise, scoring_units
from unetile.predict.instances import InstanceOptions, default_options, extract_instances
from unetile.train.instance_fit import (
    MIN_SIZE_SHARE,
    fit_from_labels,
    is_membrane_map,
    measure_objects,
    tune,
)


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


def test_touching_instances_keep_components_and_leave_the_watershed_to_scored_images():
    touching = [disks([(30, 30), (30, 45), (60, 30), (60, 45)], 8)]  # pairs 15 px apart
    options, record = fit_from_labels(touching, default_options("instances"), "instances")
    assert record["touching_share"] == 1.0 and options.method == "components"
    assert "scored images decide" in record["why"]
    three = default_options("instances", target="three-class")
    options, _ = fit_from_labels(touching, three, "instances")
    assert options.method == "watershed" and options.foreground_classes == (1, 2)
    binary = [ndimage.label(touching[0] > 0)[0]]
    options, record = fit_from_labels(binary, default_options("membrane"), "membrane")
    assert options.method == "components" and "scored images" not in record["why"]


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


def test_scoring_units_are_blocks_that_hold_objects():
    truth = np.zeros((2 * MIN_BLOCK, 2 * MIN_BLOCK + 10), np.int32)
    truth[5:10, 5:10] = 1
    truth[-10:-5, -10:-5] = 2
    probability = np.zeros((2, *truth.shape), np.float32)
    units = scoring_units([probability], [truth])
    assert len(units) == 2  # four blocks, two of them empty
    assert all(u[0].shape[1:] == u[1].shape == (MIN_BLOCK, MIN_BLOCK + 5) for u in units)
    assert len(scoring_units([probability] * 3, [truth] * 3)) == 6
    # Larger blocks for larger objects: one block per image.
    assert len(scoring_units([probability], [truth], min_block=3 * MIN_BLOCK)) == 1


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


def test_training_carries_the_label_fit_and_tunes_it_only_on_held_out_images(tmp_path):
    import json

    from unetile import io
    from unetile.data import synthetic
    from unetile.train.config import make_config
    from unetile.train.loop import refit_instances
    from unetile.train.run import train

    for index in range(5):
        cells = synthetic.cells_like((128, 128), touching_fraction=0.5, rng=index)
        io.write_image(tmp_path / "images" / f"{index}.tif", (cells.image * 255).astype(np.uint8))
        io.write_image(tmp_path / "labels" / f"{index}.tif", cells.instances.astype(np.uint16))
    common = dict(
        images=str(tmp_path / "images"),
        labels=str(tmp_path / "labels"),
        label_mode="instances",
        depth=2,
        tile=(20,),
        steps=3,
        compile=False,
        threads=1,
        augment="none",
    )
    train(make_config("cpu-fast", out=str(tmp_path / "plain"), **common), progress=False)
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    fit = saved["instances_fit"]
    assert fit["objects"] > 0 and "instances_tuning" not in saved  # nothing held out
    assert saved["instances"]["min_size"] == int(MIN_SIZE_SHARE * fit["size_p5"])
    held = make_config("cpu-fast", out=str(tmp_path / "held"), holdout=0.2, **common)
    summary = train(held, progress=False)
    record = json.loads((tmp_path / "held" / "config.json").read_text())["instances_tuning"]
    assert record["scored_on"] == "validation images" and summary["instances"]["tuning"] == record
    # An older run's post-processing is fitted again the same way, its weights untouched.
    weights = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert refit_instances(tmp_path / "plain")["options"] == saved["instances"]
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == weights
