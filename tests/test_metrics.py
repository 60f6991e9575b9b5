"""Tests of unetile.evaluate.metrics: hand computations, skimage checks, topology."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.stats import entropy
from skimage.metrics import adapted_rand_error, variation_of_information

from unetile.evaluate import metrics

pytestmark = pytest.mark.fast

FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = ndimage.generate_binary_structure(2, 2)


def block(text: str) -> np.ndarray:
    """A 3x3 block drawn as three rows of '#' (foreground) and '.' (background)."""
    return np.array([[char == "#" for char in row] for row in text.split()], dtype=bool)


def simple(text: str, connectivity: int) -> bool:
    code = metrics.neighbourhood_code(block(text))
    return bool(metrics.simple_point_table(connectivity)[code])


# ---------------------------------------------------------------------------
# Simple points


@pytest.mark.parametrize(
    ("drawing", "simple_4_8", "simple_8_4", "why"),
    [
        ("... .#. ...", False, False, "isolated pixel: removing it deletes a component"),
        ("### ### ###", False, False, "interior pixel: removing it makes a hole"),
        ("... ##. ...", True, True, "end of a line"),
        ("... #.# ...", False, False, "bridge between two 4-neighbours"),
        ("#.. ... ..#", False, False, "bridge between two diagonal neighbours"),
        ("##. ... ...", True, True, "corner of a blob"),
        ("#.. ... ...", False, True, "only a diagonal neighbour: isolated under 4-connectivity"),
        (".#. ..# ...", False, True, "two 4-neighbours that touch diagonally"),
        ("### #.# ###", False, False, "filling a one-pixel hole"),
        ("### ... ###", False, False, "splits a band in two"),
        ("### #.. #..", True, True, "inner corner of an L"),
    ],
)
def test_simple_point_on_hand_drawn_neighbourhoods(drawing, simple_4_8, simple_8_4, why):
    assert simple(drawing, 1) is simple_4_8, why
    assert simple(drawing, 2) is simple_8_4, why


def test_simple_point_tables_are_dual_under_complement():
    # A pixel is simple for (4, 8) in X iff it is simple for (8, 4) in the complement of X.
    four_eight = metrics.simple_point_table(1)
    eight_four = metrics.simple_point_table(2)
    codes = np.arange(256)
    assert np.array_equal(four_eight[codes], eight_four[255 - codes])
    assert four_eight.sum() == eight_four.sum() == 116


def _component_counts(image: np.ndarray, connectivity: int) -> tuple[int, int]:
    foreground, background = (FOUR, EIGHT) if connectivity == 1 else (EIGHT, FOUR)
    padded = np.pad(image, 1)  # outside the image is background
    return ndimage.label(padded, foreground)[1], ndimage.label(~padded, background)[1]


@settings(max_examples=40, deadline=None)
@given(
    image=arrays(bool, (6, 6)),
    connectivity=st.sampled_from([1, 2]),
)
def test_flipping_a_pixel_keeps_topology_iff_it_is_simple(image, connectivity):
    # In 2D a flip changes topology exactly when it changes the number of
    # components of the cells or of the background; check every pixel.
    table = metrics.simple_point_table(connectivity)
    padded = np.pad(image, 1)
    before = _component_counts(image, connectivity)
    for row in range(6):
        for column in range(6):
            code = metrics.neighbourhood_code(padded[row : row + 3, column : column + 3])
            flipped = image.copy()
            flipped[row, column] ^= True
            unchanged = _component_counts(flipped, connectivity) == before
            assert table[code] == unchanged, (row, column)


def test_neighbourhood_code_rejects_a_block_that_is_not_3x3():
    with pytest.raises(ValueError, match="3x3"):
        metrics.neighbourhood_code(np.zeros((2, 3), bool))


# ---------------------------------------------------------------------------
# Warping error


def two_cells() -> np.ndarray:
    """24x24: a membrane frame and a vertical membrane at column 10 between two cells."""
    cells = np.zeros((24, 24), bool)
    cells[1:-1, 1:-1] = True
    cells[:, 10] = False
    return cells


def test_warping_error_is_zero_for_a_boundary_shifted_by_one_pixel():
    truth = two_cells()
    shifted = np.zeros_like(truth)
    shifted[1:-1, 1:-1] = True
    shifted[:, 11] = False
    assert metrics.pixel_error(shifted, truth) == pytest.approx(2 * 22 / 576)
    result = metrics.warping_error(shifted, truth)
    assert (result.error, result.splits, result.mergers) == (0.0, 0, 0)
    assert np.array_equal(result.warped, truth)


def voronoi_cells(size: int, count: int, seed: int, gap: float) -> np.ndarray:
    """Cells of a Voronoi tiling; membrane where the two nearest seeds differ by <= gap px."""
    seeds = np.random.default_rng(seed).uniform(0, size, (count, 2))
    rows, columns = np.mgrid[:size, :size]
    distances = np.hypot(rows[..., None] - seeds[:, 0], columns[..., None] - seeds[:, 1])
    nearest = np.sort(distances, axis=-1)
    return nearest[..., 1] - nearest[..., 0] > gap


@pytest.mark.parametrize("move", [ndimage.binary_dilation, ndimage.binary_erosion])
def test_warping_error_is_zero_for_voronoi_membranes_moved_by_one_pixel(move):
    truth = voronoi_cells(64, 12, seed=2, gap=6)  # membranes about 3 px wide
    moved = move(truth, FOUR)  # every boundary moved by one pixel: membranes thinner / thicker
    assert metrics.pixel_error(moved, truth) > 0.07
    # Same topology (checked independently), so warping removes every disagreement.
    assert _component_counts(moved, 1) == _component_counts(truth, 1)
    result = metrics.warping_error(moved, truth)
    assert (result.error, result.splits, result.mergers) == (0.0, 0, 0)


def test_warping_error_counts_a_cut_cell_as_one_split():
    truth = two_cells()
    cut = truth.copy()
    cut[12, 1:10] = False  # a spurious membrane across the left cell
    result = metrics.warping_error(cut, truth)
    # No pixel of the cut can be flipped without joining the two halves.
    assert result.error == pytest.approx(9 / 576)
    assert (result.splits, result.mergers) == (1, 0)


def test_warping_error_counts_a_missing_membrane_as_one_merger():
    truth = two_cells()
    truth[12, 1:10] = False
    merged = two_cells()
    result = metrics.warping_error(merged, truth)
    # All but one pixel of the missing membrane can be restored; the last one keeps the join.
    assert result.error == pytest.approx(1 / 576)
    assert (result.splits, result.mergers) == (0, 1)


@settings(max_examples=30, deadline=None)
@given(
    prediction=arrays(bool, (9, 11)),
    truth=arrays(bool, (9, 11)),
    connectivity=st.sampled_from([1, 2]),
)
def test_warp_keeps_the_topology_of_the_prediction(prediction, truth, connectivity):
    result = metrics.warping_error(prediction, truth, connectivity)
    assert _component_counts(result.warped, connectivity) == _component_counts(
        prediction, connectivity
    )
    assert result.error <= metrics.pixel_error(prediction, truth)
    # Warping only moves toward the truth: a pixel it changed now agrees.
    changed = result.warped != prediction
    assert np.all(result.warped[changed] == truth[changed])


def test_warping_error_rejects_3d():
    with pytest.raises(ValueError, match="2D only"):
        metrics.warping_error(np.ones((2, 3, 3), bool), np.ones((2, 3, 3), bool))


# ---------------------------------------------------------------------------
# Rand and information scores


def test_rand_scores_by_hand_for_a_merger():
    truth = np.array([[1, 1, 2, 2]])
    prediction = np.array([[1, 1, 1, 1]])
    # pairs: true 2*1 + 2*1 = 4, predicted 4*3 = 12, joint 2*1 + 2*1 = 4
    v_rand, split, merge = metrics.rand_scores(prediction, truth)
    assert (v_rand, split, merge) == pytest.approx((8 / 16, 1.0, 4 / 12))
    # I(S; T) = 0 since the prediction is one object: V_info = 0
    assert metrics.info_score(prediction, truth) == pytest.approx(0.0)
    assert metrics.info_score(truth, truth) == pytest.approx(1.0)


def test_rand_scores_treat_predicted_background_inside_cells_as_singletons():
    truth = np.array([[1, 1, 1, 0, 2, 2]])
    prediction = np.array([[1, 0, 1, 0, 2, 2]])
    # restricted to 5 true-cell pixels; predicted objects {2 px}, {2 px}, one singleton
    # joint pairs: 2 + 2 = 4; true pairs: 3*2 + 2*1 = 8; predicted pairs: 2 + 2 = 4
    assert metrics.rand_scores(prediction, truth) == pytest.approx((8 / 12, 4 / 8, 1.0))


def _singletons(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    relabelled = prediction.copy()
    holes = (prediction == 0) & (truth > 0)
    relabelled[holes] = prediction.max() + 1 + np.arange(np.count_nonzero(holes))
    return relabelled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_and_info_agree_with_skimage_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 6, (40, 50))
    prediction = rng.integers(0, 8, (40, 50))
    relabelled = _singletons(prediction, truth)
    v_rand, split, merge = metrics.rand_scores(prediction, truth)
    error, precision, recall = adapted_rand_error(truth, relabelled)
    assert (1 - v_rand, split, merge) == pytest.approx((error, precision, recall), abs=1e-12)
    inside = truth > 0
    entropies = entropy(np.bincount(truth[inside]), base=2) + entropy(
        np.bincount(relabelled[inside]), base=2
    )
    variation = variation_of_information(truth, relabelled, ignore_labels=(0,)).sum()
    assert 1 - metrics.info_score(prediction, truth) == pytest.approx(variation / entropies)


def test_rand_agrees_with_skimage_on_a_real_looking_segmentation():
    truth_cells = voronoi_cells(96, 30, seed=7, gap=4)
    prediction_cells = ndimage.binary_dilation(truth_cells, FOUR)  # membranes thinned
    prediction_cells[40:56, 47] = False  # and one spurious membrane
    truth, _ = ndimage.label(truth_cells, FOUR)
    prediction, _ = ndimage.label(prediction_cells, FOUR)
    relabelled = _singletons(prediction, truth)
    # Predicted membrane inside true cells: skimage sees label 0 as one object...
    assert np.any((prediction == 0) & (truth > 0))
    naive = adapted_rand_error(truth, prediction)[0]
    exact = adapted_rand_error(truth, relabelled)[0]
    ours = 1 - metrics.rand_scores(prediction, truth)[0]
    assert ours == pytest.approx(exact, abs=1e-12)
    assert naive != pytest.approx(exact, abs=1e-9)


# ---------------------------------------------------------------------------
# Pixel, IoU, Dice, SEG, matching


def test_pixel_error_iou_and_dice_by_hand():
    truth = np.array([[1, 1, 1, 0]], bool)
    prediction = np.array([[0, 1, 1, 1]], bool)
    assert metrics.pixel_error(prediction, truth) == 0.5
    assert metrics.iou(prediction, truth) == pytest.approx(2 / 4)
    assert metrics.dice(prediction, truth) == pytest.approx(4 / 6)
    assert metrics.iou(~prediction, ~truth) == 0.0


def test_seg_by_hand():
    truth = np.zeros((4, 8), int)
    truth[0, 0:4] = 1  # 4 px, matched by prediction 5 with 3 px: J = 3 / 5
    truth[2, 0:4] = 2  # 4 px, prediction 6 covers exactly half: not matched, 0
    prediction = np.zeros_like(truth)
    prediction[0, 1:5] = 5
    prediction[2, 0:2] = 6
    assert metrics.seg_score(prediction, truth) == pytest.approx((3 / 5 + 0) / 2)


def test_matching_by_hand():
    truth = np.zeros((2, 10), int)
    truth[0, 0:5] = 1
    truth[1, 0:5] = 2
    prediction = np.zeros_like(truth)
    prediction[0, 0:3] = 1  # IoU 3/5 with true 1
    prediction[1, 0:2] = 2  # IoU 2/5 with true 2
    prediction[1, 7:9] = 3  # no partner
    at_half, at_point7 = metrics.match_objects(prediction, truth, (0.5, 0.7))
    assert at_half.true_positives == 1
    assert (at_half.false_positives, at_half.false_negatives) == (2, 1)
    assert (at_half.precision, at_half.recall, at_half.f1) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    assert at_point7.true_positives == 0 and at_point7.f1 == 0.0
    low = metrics.match_objects(prediction, truth, (0.4,))[0]
    assert low.true_positives == 2


def test_matching_is_one_to_one_when_two_objects_tie_for_one():
    truth = np.array([[1, 1, 2, 0]])
    prediction = np.array([[3, 4, 4, 0]])
    # true 1 has IoU 1/2 with both 3 and 4; true 2 has IoU 1/2 with 4: two matches at most
    match = metrics.match_objects(prediction, truth, (0.5,))[0]
    assert match.true_positives == 2
    assert (match.false_positives, match.false_negatives) == (0, 0)


def test_contingency_table_lists_overlaps():
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([5, 5, 0, 0, 0, 7])
    ids_a, ids_b, counts = metrics.contingency_table(a, b)
    table = {(int(i), int(j)): int(n) for i, j, n in zip(ids_a, ids_b, counts, strict=True)}
    assert table == {(0, 5): 1, (1, 5): 1, (1, 0): 1, (2, 0): 2, (2, 7): 1}
    # A sparse id space (labels up to 10^6) takes the sorting path with the same result.
    ids_a, ids_b, counts = metrics.contingency_table(a * 1000_000, b * 1000_000)
    assert sorted(zip(ids_a // 1000_000, ids_b // 1000_000, counts, strict=True)) == sorted(
        (i, j, n) for (i, j), n in table.items()
    )


# ---------------------------------------------------------------------------
# score()


def test_score_of_a_perfect_prediction():
    truth = two_cells()
    result = metrics.score(truth, truth.astype(np.uint8) * 255)
    assert result == {
        "pixel_error": 0.0,
        "rand_error": 0.0,
        "info_error": 0.0,
        "warping_error": 0.0,
        "splits": 0,
        "mergers": 0,
        "iou": 1.0,
        "iou_background": 1.0,
        "dice": 1.0,
        "seg": 1.0,
    }


def test_score_picks_each_metric_at_its_best_threshold():
    truth = two_cells()
    probabilities = np.where(truth, 0.35, 0.25)
    result = metrics.score(probabilities, truth, ["pixel_error", "warping_error", "f1"])
    assert result["pixel_error"] == 0.0 and result["pixel_error_threshold"] == 0.3
    assert result["warping_error"] == 0.0 and result["warping_error_threshold"] == 0.3
    assert result["f1"] == 1.0 and result["f1_threshold"] == 0.3
    assert result["f1@0.95"] == 1.0
    at_half = metrics.score(probabilities, truth, ["pixel_error"], thresholds=[0.5])
    # Nothing is cell above 0.5: every cell pixel (22 * 21 px) is wrong.
    assert at_half == {"pixel_error": 22 * 21 / 576, "pixel_error_threshold": 0.5}


def test_score_takes_instance_labels_and_cell_value():
    truth = np.zeros((6, 6), np.uint16)
    truth[0:3, 0:3] = 1
    truth[0:3, 3:6] = 2  # touching objects: only labels keep them apart
    truth[4:6, :] = 3
    assert metrics.score(truth, truth, ["rand_error", "seg", "f1"])["seg"] == 1.0
    cells = (truth > 0).astype(np.uint8)
    # As a binary map the two touching objects become one 18 px object that covers
    # each 9 px true object fully: both match it with J = 9 / 18; SEG = (1/2 + 1/2 + 1) / 3
    assert metrics.score(cells, truth, ["seg"])["seg"] == pytest.approx(2 / 3)
    inverted = np.where(truth > 0, 0, 255).astype(np.uint8)  # cells black
    assert metrics.score(inverted, inverted, ["pixel_error"], cell_value=0)["pixel_error"] == 0
    assert metrics.score(inverted, truth > 0, ["iou"], cell_value=0)["iou"] == 1.0


def test_score_works_in_3d_without_warping():
    truth = np.zeros((3, 8, 8), bool)
    truth[:, 1:4, 1:7] = True
    truth[:, 5:7, 1:7] = True
    result = metrics.score(truth, truth)
    assert "warping_error" not in result and result["rand_error"] == 0.0
    with pytest.raises(ValueError, match="2D only"):
        metrics.score(truth, truth, ["warping_error"])


@pytest.mark.parametrize(
    ("prediction", "truth", "kwargs", "message"),
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), {}, "differs from ground_truth shape"),
        (np.zeros((0, 4), bool), np.zeros((0, 4), bool), {}, "empty"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), {}, "no cell pixel"),
        (np.eye(4, dtype=bool), np.linspace(0, 1, 16).reshape(4, 4), {}, "not binary"),
        (np.full((4, 4), 1.5), np.eye(4, dtype=bool), {}, r"must lie in \[0, 1\]"),
        (np.full((4, 4), np.nan), np.eye(4, dtype=bool), {}, r"must lie in \[0, 1\]"),
        (np.eye(4, dtype=bool), np.eye(4, dtype=bool), {"metrics": ["rand"]}, "unknown metric"),
        (np.eye(4, dtype=bool), np.eye(4, dtype=bool), {"thresholds": [0.5]}, "probability"),
        (
            np.eye(4, dtype=np.uint8) * 3 + 1,
            np.eye(4, dtype=np.uint8),
            {"cell_value": 9},
            "no pixel of the cell value 9",
        ),
        (np.arange(16).reshape(4, 4) % 3, np.eye(4, dtype=bool), {"cell_value": 1}, "not binary"),
    ],
)
def test_score_rejects_bad_input_with_a_clear_message(prediction, truth, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.score(prediction, truth, **kwargs)
