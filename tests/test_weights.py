import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetile.data.synthetic import cells_like, em_like
from unetile.data.weights import (
    border_cutoff,
    class_balance,
    instances_from_membrane_map,
    nearest_two_distances,
    weight_map,
)

pytestmark = pytest.mark.fast


def brute_force_border_term(instances, w0=10.0, sigma=5.0):
    """Independent reference: every cell's full-image distance transform, stacked and sorted."""
    ids = [cell for cell in np.unique(instances) if cell != 0]
    if len(ids) < 2:
        return np.zeros(instances.shape)
    stacked = np.sort(
        np.stack([ndimage.distance_transform_edt(instances != cell) for cell in ids]), axis=0
    )
    gap = stacked[0] + stacked[1] - 1.0
    return np.where(instances == 0, w0 * np.exp(-(gap**2) / (2 * sigma**2)), 0.0)


def two_squares(gap, side=10, margin=8):
    """Two side x side squares in one row band, separated by `gap` background columns."""
    instances = np.zeros((side + 2 * margin, 2 * side + gap + 2 * margin), dtype=np.int32)
    rows = slice(margin, margin + side)
    instances[rows, margin : margin + side] = 1
    instances[rows, margin + side + gap : margin + 2 * side + gap] = 2
    return instances


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (1, 1 + 10 * math.exp(-1 / 50)),  # 10.801987
        (2, 10.231163463866357),
        (3, 1 + 10 * math.exp(-9 / 50)),  # 9.352702
        (5, 1 + 10 * math.exp(-25 / 50)),  # 7.065307
    ],
)
def test_gap_of_g_pixels_gives_w0_exp_minus_g_squared_at_every_gap_pixel(gap, expected):
    # A gap pixel k columns from square 1 is k px from its outermost pixel centre
    # and gap + 1 - k px from square 2's; minus half a pixel each to reach the
    # cells' borders, d1 + d2 = gap exactly, at the centre and across the gap.
    instances = two_squares(gap)
    weights = weight_map(instances, class_weights=None)
    centre_row = instances.shape[0] // 2
    gap_columns = slice(18, 18 + gap)
    assert weights[centre_row, 18 + gap // 2] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(weights[8:18, gap_columns], expected, rtol=1e-6)


def test_diagonal_gap_uses_centre_distance_minus_half_pixel():
    instances = np.zeros((5, 5), dtype=np.int32)
    instances[0, 0] = 1
    instances[2, 2] = 2
    # Both cells are sqrt(2) px from pixel (1, 1): d1 + d2 = 2 sqrt(2) - 1 = 1.828427.
    expected = 1 + 10 * math.exp(-((2 * math.sqrt(2) - 1) ** 2) / 50)
    assert weight_map(instances, class_weights=None)[1, 1] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(10.353234, rel=1e-6)


def test_single_cell_has_no_border_term():
    instances = np.zeros((30, 40), dtype=np.int32)
    instances[5:15, 10:25] = 7
    weights = weight_map(instances, class_weights=None)
    np.testing.assert_array_equal(weights, np.ones(instances.shape, dtype=np.float32))
    np.testing.assert_array_equal(weight_map(np.zeros((6, 6), dtype=np.int32)), 1.0)


def test_border_term_vanishes_far_from_all_cells():
    instances = np.zeros((20, 200), dtype=np.int32)
    instances[5:15, 0:10] = 1
    instances[5:15, 11:21] = 2
    weights = weight_map(instances, class_weights=None)
    assert weights[10, 10] == pytest.approx(1 + 10 * math.exp(-1 / 50), rel=1e-6)
    # 150 px away d1 + d2 = 309 px: 10 exp(-309^2 / 50) is far below float32 resolution.
    assert weights[10, 170] == 1.0
    # Cell pixels never get the border term.
    np.testing.assert_array_equal(weights[instances > 0], 1.0)


def test_balanced_class_weights_by_hand():
    # 3 background pixels and 1 cell pixel: w = 4 / (2 * 3) and 4 / (2 * 1).
    np.testing.assert_allclose(class_balance(np.array([[0, 0, 0, 1]]), 2), [2 / 3, 2.0])
    weights = weight_map(np.array([[0, 0, 0, 5]]), w0=0.0)
    np.testing.assert_allclose(weights, [[2 / 3, 2 / 3, 2 / 3, 2.0]], rtol=1e-6)
    assert weights.mean() == pytest.approx(1.0)
    # A missing class gets weight 0 and does not count in the normalisation.
    np.testing.assert_allclose(class_balance(np.array([0, 0, 2, 2]), 4), [1.0, 0.0, 1.0, 0.0])


def test_balanced_weights_of_multi_class_labels():
    labels = np.array([[0, 1, 1, 2, 2, 2]])
    instances = np.array([[0, 1, 1, 2, 2, 2]])
    # Counts 1, 2, 3 of 6 pixels, 3 classes: 6/3, 6/6, 6/9.
    weights = weight_map(instances, w0=0.0, labels=labels)
    np.testing.assert_allclose(weights, [[2.0, 1.0, 1.0, 2 / 3, 2 / 3, 2 / 3]], rtol=1e-6)


def test_given_class_weights_and_border_term_add():
    instances = np.array([[1, 1, 0, 0, 2, 2]])
    weights = weight_map(instances, class_weights=[0.5, 3.0])
    border = 10 * math.exp(-4 / 50)
    np.testing.assert_allclose(
        weights, [[3.0, 3.0, 0.5 + border, 0.5 + border, 3.0, 3.0]], rtol=1e-6
    )
    assert weights.dtype == np.float32


def test_three_dimensional_gap_between_cubes():
    instances = np.zeros((12, 12, 20), dtype=np.int32)
    instances[2:10, 2:10, 2:8] = 1
    instances[2:10, 2:10, 11:17] = 2  # a gap of 3 voxels along the last axis
    weights = weight_map(instances, class_weights=None)
    assert weights.shape == instances.shape
    assert weights[6, 6, 9] == pytest.approx(1 + 10 * math.exp(-9 / 50), rel=1e-6)
    np.testing.assert_allclose(
        weights - 1.0, brute_force_border_term(instances), atol=1e-5, rtol=1e-6
    )


@pytest.mark.parametrize("generator", [em_like, cells_like])
def test_matches_brute_force_on_synthetic_images(generator):
    instances = generator((128, 160), num_cells=30, rng=4).instances
    weights = weight_map(instances, class_weights=None)
    np.testing.assert_allclose(weights - 1.0, brute_force_border_term(instances), atol=2e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_boxes=st.integers(0, 8),
    tolerance=st.sampled_from([0.0, 1e-6, 1e-3, 0.5]),
    sigma=st.floats(1.0, 8.0),
)
def test_error_is_below_tolerance_for_random_rectangles(seed, num_boxes, tolerance, sigma):
    rng = np.random.default_rng(seed)
    instances = np.zeros((48, 56), dtype=np.int32)
    for cell in range(1, num_boxes + 1):
        top, left = rng.integers(0, 44), rng.integers(0, 52)
        height, width = rng.integers(1, 12, size=2)
        instances[top : top + height, left : left + width] = cell
    computed = weight_map(instances, sigma=sigma, class_weights=None, tolerance=tolerance)
    reference = brute_force_border_term(instances, sigma=sigma)
    assert np.max(np.abs(computed - 1.0 - reference)) <= tolerance + 1e-5


def test_nearest_two_distances_exact_within_reach():
    instances = np.zeros((1, 30), dtype=np.int32)
    instances[0, 0] = 1
    instances[0, 10] = 2
    nearest, second = nearest_two_distances(instances, max_distance=math.inf)
    assert (nearest[0, 4], second[0, 4]) == (4.0, 6.0)
    assert (nearest[0, 20], second[0, 20]) == (10.0, 20.0)
    # Distances up to max_distance are exact; cell 2 is 7 px from pixel 3.
    nearest, second = nearest_two_distances(instances, max_distance=6)
    assert (nearest[0, 4], second[0, 4]) == (4.0, 6.0)
    assert second[0, 3] == np.inf
    assert second[0, 20] == np.inf


def test_border_cutoff_of_the_paper_parameters():
    # 5 * sqrt(2 ln(10 / 1e-6)) = 28.388462 px; the term there equals the tolerance.
    assert border_cutoff(10.0, 5.0, 1e-6) == pytest.approx(28.388462, rel=1e-6)
    assert 10 * math.exp(-(border_cutoff() ** 2) / 50) == pytest.approx(1e-6)
    assert border_cutoff(10.0, 5.0, 0.0) == math.inf


def test_instances_from_membrane_map_connectivity():
    membrane = np.array(
        [
            [255, 0, 255, 255],
            [0, 255, 0, 0],
            [255, 0, 0, 255],
        ],
        dtype=np.uint8,
    )
    four = instances_from_membrane_map(membrane)
    np.testing.assert_array_equal(four, [[1, 0, 2, 2], [0, 3, 0, 0], [4, 0, 0, 5]])
    assert four.dtype == np.int32
    # 8-connectivity joins the diagonal chain 1-3-4 and 3-2.
    assert instances_from_membrane_map(membrane, connectivity=2).max() == 2
    np.testing.assert_array_equal(instances_from_membrane_map(membrane == 255), four)
    np.testing.assert_array_equal(instances_from_membrane_map(membrane // 255, cell_value=1), four)


def test_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="instances: expected integer ids"):
        weight_map(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="negative id"):
        weight_map(np.full((4, 4), -1))
    with pytest.raises(ValueError, match="sigma"):
        weight_map(np.zeros((4, 4), dtype=int), sigma=0)
    with pytest.raises(ValueError, match="labels: shape"):
        weight_map(np.zeros((4, 4), dtype=int), labels=np.zeros((4, 5), dtype=int))
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        weight_map(np.zeros((2, 2), dtype=int), class_weights=[1, 1], labels=np.full((2, 2), 2))
    with pytest.raises(ValueError, match="class_weights must be"):
        weight_map(np.zeros((2, 2), dtype=int), class_weights="inverse")
    with pytest.raises(ValueError, match="value 128 found"):
        instances_from_membrane_map(np.array([[0, 128, 255]]))
    with pytest.raises(ValueError, match="num_classes"):
        class_balance(np.array([0, 3]), 2)


def test_touching_borders_mark_both_sides_of_a_contact_only():
    from unetile.data.weights import touching_borders

    instances = np.array([[1, 1, 2, 0, 4], [1, 1, 2, 0, 4], [0, 0, 0, 0, 4]])
    assert touching_borders(instances).astype(int).tolist() == [
        [0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ]


def test_weight_map_peaks_on_the_line_between_touching_cells():
    from unetile.data.weights import touching_borders

    instances = np.zeros((40, 60), dtype=np.int32)
    instances[10:30, 10:30] = 1
    instances[10:30, 30:50] = 2
    separated = np.where(touching_borders(instances), 0, instances)
    weights = weight_map(separated, class_weights=None)
    # A 2 px line: d1 + d2 = 2 px, so w = 1 + 10 exp(-4 / 50).
    assert weights[20, 29] == pytest.approx(1 + 10 * np.exp(-4 / 50), abs=1e-5)
    assert weights[20, 20] == pytest.approx(1.0)
