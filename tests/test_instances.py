"""Instance extraction: seeded watersheds, sizes, holes, and region-by-region exactness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetile.predict.instances import (
    METHODS,
    InstanceOptions,
    default_options,
    extract_instances,
    foreground_mask,
    instances_from_probabilities,
    keys_by_region,
    rank_keys,
    region_grid,
)

pytestmark = pytest.mark.fast


def two_classes(foreground: np.ndarray) -> np.ndarray:
    foreground = np.asarray(foreground, dtype=np.float32)
    return np.stack([1 - foreground, foreground])


def touching_disks(gap_rows=(), size=(40, 64)):
    """Two disks of radius 12 that overlap; ``gap_rows`` of the contact column are background."""
    rows, columns = np.indices(size)
    left = np.hypot(rows - 20, columns - 20) < 12
    right = np.hypot(rows - 20, columns - 41) < 12
    cells = (left | right).astype(np.float32)
    for row in gap_rows:
        cells[row, 30:32] = 0
    return cells


def random_probabilities(seed, shape, classes=2, smooth=1.5):
    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(rng.random((classes, *shape)), (0,) + (smooth,) * len(shape))
    fields = np.exp(12 * (fields - fields.mean()))
    return (fields / fields.sum(axis=0)).astype(np.float32)


def by_regions(probabilities, chunks, options):
    spatial = probabilities.shape[1:]
    keys = np.zeros(spatial, dtype=np.uint64)
    regions = region_grid(spatial, chunks, options.extent(len(spatial)))
    return rank_keys(keys, keys_by_region(probabilities, keys, regions, options))


def test_watershed_splits_touching_cells_whose_predicted_gap_is_incomplete():
    # The network drew the gap on 16 of the contact's rows, not on the middle ones.
    probabilities = two_classes(touching_disks(gap_rows=[*range(8, 16), *range(24, 32)]))
    assert extract_instances(probabilities).max() == 1  # the paper's components merge them
    cells = extract_instances(probabilities, method="distance", h=2.0)
    assert cells.max() == 2
    assert abs(int((cells == 1).sum()) - int((cells == 2).sum())) < 20
    # Probability cores: the network is less sure along the contact than inside.
    unsure = touching_disks()
    unsure[:, 30:32] *= 0.6
    blurred = two_classes(ndimage.gaussian_filter(unsure, 1.0))
    assert extract_instances(blurred, method="watershed", seed_threshold=0.9).max() == 2
    assert extract_instances(blurred, method="watershed", seed_threshold=0.2).max() == 1


def test_a_component_without_a_seed_stays_one_cell():
    faint = two_classes(touching_disks()) * np.array([0.4, 0.6], np.float32)[:, None, None]
    faint[0] += 0.4 * (touching_disks() == 0)
    cells = extract_instances(faint, method="watershed", seed_threshold=0.9)
    assert cells.max() == 1 and (cells > 0).sum() == (touching_disks() > 0).sum()


def test_small_objects_are_removed_and_background_holes_filled_but_not_around_a_cell():
    cells = np.zeros((20, 30), np.float32)
    cells[2:12, 2:12] = 1
    cells[6:8, 6:8] = 0  # a hole of 4 px
    cells[2:14, 15:27] = 1
    cells[4:12, 17:25] = 0  # a ring around...
    cells[7:9, 20:22] = 1  # ...another cell of 4 px
    cells[17, 2] = 1  # a speck
    probabilities = two_classes(cells)
    plain = extract_instances(probabilities, method="components")
    assert plain.max() == 4
    filled = extract_instances(probabilities, method="components", fill_holes=True, min_size=5)
    assert filled.max() == 2  # the 4-px cell and the speck are gone
    assert (filled == 1).sum() == 100  # the hole is filled
    assert (filled == 2).sum() == (plain == 2).sum()  # the ring's hole held a cell
    kept = extract_instances(probabilities, method="components", fill_holes=True, min_size=4)
    assert kept.max() == 3 and (kept == 3).sum() == 4


def test_instances_from_probabilities_keeps_the_papers_components_by_default():
    probabilities = random_probabilities(3, (30, 40))
    labels, count = ndimage.label(probabilities.argmax(0) == 1)
    assert np.array_equal(instances_from_probabilities(probabilities), labels)
    assert count > 3
    split = instances_from_probabilities(probabilities, method="distance", h=1.0)
    assert split.max() >= count


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dims=st.sampled_from([2, 3]),
    sizes=st.lists(st.integers(1, 28), min_size=3, max_size=3),
    chunks=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    method=st.sampled_from(METHODS),
    min_size=st.integers(0, 6),
    fill_holes=st.booleans(),
    classes=st.sampled_from([2, 3]),
    extent=st.integers(1, 30),
    opening=st.integers(0, 2),
    connectivity=st.integers(1, 3),
)
def test_region_by_region_equals_the_whole_image(
    seed, dims, sizes, chunks, method, min_size, fill_holes, classes, extent, opening, connectivity
):
    shape, chunks = tuple(sizes[:dims]), tuple(chunks[:dims])
    probabilities = random_probabilities(seed, shape, classes)
    options = InstanceOptions(
        method=method,
        seed_threshold=0.6,
        h=1.0,
        min_size=min_size,
        fill_holes=fill_holes,
        foreground_classes=(1, 2) if classes == 3 else (1,),
        max_extent=extent,
        opening=opening,
        connectivity=connectivity,
    )
    whole = extract_instances(probabilities, options)
    try:
        tiled = by_regions(probabilities, chunks, options)
    except ValueError as error:
        # Only a group of cells wider than the margin may stop it, and it says so.
        assert "max_extent" in str(error)
        structure = ndimage.generate_binary_structure(dims, min(connectivity, dims))
        groups = ndimage.label(foreground_mask(probabilities, options), structure)[0]
        boxes = ndimage.find_objects(groups) or []
        widest = max(max(s.stop - s.start for s in box) for box in boxes)
        assert widest >= extent
        return
    assert tiled.dtype == np.uint32
    assert np.array_equal(tiled, whole)


def test_a_group_of_cells_wider_than_max_extent_stops_region_by_region_extraction():
    probabilities = two_classes(touching_disks(size=(40, 200)))
    options = InstanceOptions(method="distance", max_extent=30)
    with pytest.raises(ValueError, match="max_extent = 30 px"):
        by_regions(probabilities, (20, 20), options)
    wide = InstanceOptions(method="distance", max_extent=45)
    whole = extract_instances(probabilities, wide)
    assert np.array_equal(by_regions(probabilities, (20, 20), wide), whole)


def test_options_check_their_values_and_round_trip_through_json():
    for bad in (
        dict(method="blobs"),
        dict(seed_threshold=0.0),
        dict(h=0),
        dict(min_size=-1),
        dict(min_size=2.5),
        dict(max_extent=0),
        dict(foreground_classes=()),
    ):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            InstanceOptions(**bad)
    with pytest.raises(ValueError, match="unknown instance option 'sead'"):
        InstanceOptions.from_dict({"sead": 1})
    options = default_options("instances", "three-class")
    assert options.foreground_classes == (1, 2) and options.seed == 1
    assert InstanceOptions.from_dict(options.to_dict()) == options
    assert default_options("membrane").method == "components"
    with pytest.raises(ValueError, match="seed class 3 is not one of the 3 classes"):
        extract_instances(random_probabilities(0, (5, 5), 3), seed_class=3)


def test_an_opening_removes_specks_and_cuts_a_thin_bridge():
    cells = np.zeros((30, 60), np.float32)
    rows, columns = np.indices(cells.shape)
    cells[np.hypot(rows - 15, columns - 12) < 9] = 1
    cells[np.hypot(rows - 15, columns - 46) < 9] = 1
    cells[14:16, 20:40] = 1  # a bridge 2 px thick joins them
    cells[2, 30] = cells[27, 3] = 1  # specks
    probabilities = two_classes(cells)
    assert extract_instances(probabilities).max() == 3  # components: one blob and two specks
    opened = extract_instances(probabilities, opening=2)
    assert opened.max() == 2  # the bridge is cut, the specks are gone
    sizes = np.bincount(opened.ravel())[1:]
    assert all(200 < size < 260 for size in sizes)  # each a disk of radius 9 (254 px)


def test_full_connectivity_joins_objects_that_meet_at_corners():
    line = np.eye(12, dtype=np.float32)  # a diagonal vessel, one pixel wide
    probabilities = two_classes(line)
    assert extract_instances(probabilities).max() == 12
    assert extract_instances(probabilities, connectivity=2).max() == 1
    with pytest.raises(ValueError, match="connectivity"):
        InstanceOptions(connectivity=4)
