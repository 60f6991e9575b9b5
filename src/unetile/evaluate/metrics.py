"""Challenge metrics: the numbers the U-Net paper is judged by, for any data.

The ISBI 2012 EM challenge scores a cell/membrane map by pixel error, Rand
error and warping error (paper: 0.0611, 0.0382, 0.000353); the cell tracking
challenge by IoU. This module computes all of them, plus the information
theoretic score V_info, the cell tracking challenge SEG measure, Dice and
object-level precision / recall / F1 at IoU thresholds, on 2D images (3D for
everything except the warping error).

Conventions
-----------
* A *cell map* is a binary image, True (or the larger of two values, or
  ``cell_value``) = cell, the rest = membrane / background.
* *Instance labels* are non-negative integers, 0 = background, each positive
  value one object. An integer image with more than two distinct values is read
  as instance labels; a two-valued image as a cell map whose objects are its
  connected components (``connectivity=1``: 4-neighbours in 2D, 6 in 3D, the
  ISBI 2012 convention; ``connectivity=2``: 8 / 26).
* A *probability map* (floating-point, values in [0, 1]) holds the probability
  of the cell class; :func:`score` binarises it as ``probability > t`` for each
  threshold ``t`` and reports each metric at its best threshold, as the
  challenge's own script does.

The single entry point for the trainer, the demo and the CLI is :func:`score`.
Overlap counts come from a sparse contingency table (``np.bincount`` over
combined ids, ``np.unique`` when the id space is large), so a 2048x2048 image
with thousands of objects is scored in well under a second.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from scipy import ndimage, optimize

#: The thresholds of the ISBI 2012 challenge script: 0.0, 0.1, ..., 0.9.
THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(10))
#: IoU thresholds of object matching, 0.5, 0.55, ..., 0.95 (as in StarDist / COCO).
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))
#: Metric names accepted by :func:`score`.
METRICS = (
    "pixel_error",
    "rand_error",
    "info_error",
    "warping_error",
    "iou",
    "dice",
    "seg",
    "f1",
    "precision",
    "recall",
    "objects",
)
#: What ``unetile evaluate`` reports by default for objects on a background
#: (instance labels, or binary masks that are not membrane maps).
OBJECT_METRICS = ("pixel_error", "iou", "dice", "seg", "f1", "objects")
#: Metrics that :func:`score` computes when none are named.
DEFAULT_METRICS = ("pixel_error", "rand_error", "info_error", "warping_error", "iou", "dice", "seg")
# Metrics where lower is better; the others are scores in [0, 1] where higher is better.
_ERRORS = ("pixel_error", "rand_error", "info_error", "warping_error")


# ---------------------------------------------------------------------------
# Input handling


def _check_pair(prediction: np.ndarray, ground_truth: np.ndarray) -> None:
    if prediction.shape != ground_truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from ground_truth shape "
            f"{ground_truth.shape}; give images of the same size"
        )
    if prediction.size == 0:
        raise ValueError(f"prediction and ground_truth are empty (shape {prediction.shape})")


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2) or (connectivity == 2 and ndim > 3):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity!r}")
    return ndimage.generate_binary_structure(ndim, 1 if connectivity == 1 else ndim)


def is_instance_labels(image: np.ndarray) -> bool:
    """True for an integer image with more than two distinct values (instance labels)."""
    image = np.asarray(image)
    if image.size == 0 or not np.issubdtype(image.dtype, np.integer):
        return False
    low, high = image.min(), image.max()
    return bool(np.any((image != low) & (image != high)))


def cell_map(image: np.ndarray, name: str = "image", cell_value: float | None = None) -> np.ndarray:
    """Binary cell map (bool) from a two-valued image or from instance labels.

    Parameters
    ----------
    image : ndarray
        Boolean map, two-valued map (the larger value is the cell unless
        ``cell_value`` says otherwise) or instance labels (cells are the
        positive labels).
    name : str
        Name of the argument, for error messages.
    cell_value : number, optional
        Value that marks cells in a two-valued map (e.g. 0 where cells are
        black); a boolean map is always True = cell.

    Returns
    -------
    ndarray of bool
        True where the image shows a cell.
    """
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape}); give a non-empty image")
    if image.dtype == bool:
        return image  # True is cell whatever cell_value says: a bool map has no other reading
    if cell_value is not None:
        cells = image == cell_value
        others = image[~cells]
        if others.size and np.any(others != others.flat[0]):
            if not np.any(cells):
                raise ValueError(
                    f"{name} holds no pixel of the cell value {cell_value} (its values span "
                    f"{others.min()}..{others.max()}); check the cell value"
                )
            raise ValueError(
                f"{name} is not binary: besides the cell value {cell_value} it holds several "
                f"values ({others.min()}..{others.max()}); give a two-valued map"
            )
        return cells
    if is_instance_labels(image):
        if image.min() < 0:
            raise ValueError(f"{name}: instance labels must be >= 0, found {image.min()}")
        return image > 0
    low, high = image.min(), image.max()
    if np.issubdtype(image.dtype, np.floating) and not np.all((image == low) | (image == high)):
        raise ValueError(
            f"{name} is not binary: it holds more than two values in [{low}, {high}]; "
            "threshold it, or pass it as the prediction to score it as probabilities"
        )
    return image == high if low != high else image != 0


def object_labels(
    image: np.ndarray, name: str = "image", cell_value: float | None = None, connectivity: int = 1
) -> tuple[np.ndarray, int]:
    """Instance labels and their count: labels as given, or connected components of a map.

    Parameters
    ----------
    image : ndarray
        Instance labels (kept as they are) or a binary cell map (labelled by
        connected components of its cells).
    name, cell_value : see :func:`cell_map`.
    connectivity : {1, 2}
        1: 4-neighbours in 2D (6 in 3D); 2: 8-neighbours (26 in 3D).

    Returns
    -------
    labels : ndarray of int64
        0 = background, 1..n objects (for a label image: its own values).
    count : int
        Number of distinct objects.
    """
    image = np.asarray(image)
    if cell_value is None and is_instance_labels(image):
        if image.min() < 0:
            raise ValueError(f"{name}: instance labels must be >= 0, found {image.min()}")
        labels = image.astype(np.int64, copy=False)
        return labels, int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    cells = cell_map(image, name, cell_value)
    labels, count = ndimage.label(cells, structure=_structure(cells.ndim, connectivity))
    return labels.astype(np.int64, copy=False), int(count)


def contingency_table(
    labels_a: np.ndarray, labels_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse overlap counts of two label images of the same shape.

    Returns
    -------
    ids_a, ids_b, counts : ndarray of int64
        One entry per pair of labels that share at least one pixel:
        ``counts[k]`` pixels carry label ``ids_a[k]`` in ``labels_a`` and
        ``ids_b[k]`` in ``labels_b``.
    """
    a = np.asarray(labels_a).ravel().astype(np.int64, copy=False)
    b = np.asarray(labels_b).ravel().astype(np.int64, copy=False)
    if a.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    width = int(b.max()) + 1
    combined = a * width + b
    # bincount is linear time but allocates the whole id space; fall back to a
    # sort when the space is much larger than the image (thousands x thousands).
    if (int(a.max()) + 1) * width <= max(4 * a.size, 1 << 16):
        counts = np.bincount(combined)
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(combined, return_counts=True)
    return pairs // width, pairs % width, counts.astype(np.int64)


# ---------------------------------------------------------------------------
# Pixel-level metrics


def pixel_error(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """Fraction of pixels whose binary class differs (1 - pixel accuracy).

    Parameters
    ----------
    prediction, ground_truth : ndarray of bool
        Cell maps of the same shape.

    Returns
    -------
    float
        Disagreeing pixels over all pixels, in [0, 1].
    """
    _check_pair(prediction, ground_truth)
    return float(np.count_nonzero(prediction != ground_truth) / prediction.size)


def iou(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two boolean maps; 1.0 when both are empty."""
    _check_pair(prediction, ground_truth)
    union = np.count_nonzero(prediction | ground_truth)
    return 1.0 if union == 0 else float(np.count_nonzero(prediction & ground_truth) / union)


def dice(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|) of two boolean maps; 1.0 when both are empty."""
    _check_pair(prediction, ground_truth)
    total = np.count_nonzero(prediction) + np.count_nonzero(ground_truth)
    return 1.0 if total == 0 else float(2 * np.count_nonzero(prediction & ground_truth) / total)


# ---------------------------------------------------------------------------
# Foreground-restricted Rand and information scores (ISBI 2012)


class _RestrictedTable(NamedTuple):
    joint: np.ndarray  # counts of (true object, predicted object) pairs, predicted > 0
    true_sizes: np.ndarray  # pixels of each true object (predicted background included)
    predicted_sizes: np.ndarray  # pixels of each predicted object inside true objects
    singletons: int  # predicted-background pixels inside true objects
    total: int  # pixels inside true objects


def _restricted_table(prediction_labels: np.ndarray, true_labels: np.ndarray) -> _RestrictedTable:
    _check_pair(prediction_labels, true_labels)
    inside = true_labels > 0
    total = int(np.count_nonzero(inside))
    if total == 0:
        raise ValueError("ground_truth has no cell pixel; the Rand and information scores need one")
    true_ids, predicted_ids, counts = contingency_table(
        true_labels[inside], prediction_labels[inside]
    )
    true_sizes = np.bincount(true_ids, weights=counts)
    true_sizes = true_sizes[true_sizes > 0]
    in_object = predicted_ids > 0
    joint = counts[in_object]
    predicted_sizes = np.bincount(predicted_ids[in_object], weights=joint)
    predicted_sizes = predicted_sizes[predicted_sizes > 0]
    singletons = int(counts[~in_object].sum())
    return _RestrictedTable(joint.astype(float), true_sizes, predicted_sizes, singletons, total)


def rand_scores(
    prediction_labels: np.ndarray, true_labels: np.ndarray
) -> tuple[float, float, float]:
    """Foreground-restricted Rand F-score V_rand with its split and merge parts.

    As in the ISBI 2012 challenge (Arganda-Carreras et al. 2015): only pixels
    inside ground-truth objects count. Over the pairs of distinct such pixels,
    with n_ij the overlap of predicted object i and true object j, s_i and t_j
    the object sizes (so a set of size n holds n (n - 1) ordered pairs),

        V_rand_split = sum n_ij (n_ij - 1) / sum t_j (t_j - 1),
        V_rand_merge = sum n_ij (n_ij - 1) / sum s_i (s_i - 1),
        V_rand = 2 sum n_ij (n_ij - 1) / (sum s_i (s_i - 1) + sum t_j (t_j - 1)),

    V_rand being the harmonic mean of the two; the Rand error is 1 - V_rand.
    Predicted background (label 0) inside a true object is membrane where
    there should be cell: each such pixel is its own singleton object and so
    is paired with no other pixel. A score whose denominator holds no pair is 1.

    Parameters
    ----------
    prediction_labels, true_labels : ndarray of int
        Instance labels of the same shape, 0 = background.

    Returns
    -------
    v_rand, v_rand_split, v_rand_merge : float
        Scores in [0, 1], 1 = perfect.

    Notes
    -----
    ``skimage.metrics.adapted_rand_error(true, predicted)`` counts the same
    pairs and returns ``(1 - v_rand, v_rand_split, v_rand_merge)`` (its
    "precision" divides by the true sizes) exactly when the prediction has no
    background inside true objects. Otherwise skimage treats predicted label 0
    as one more object, which rewards membrane placed inside cells; relabelling
    those pixels as singleton objects before calling skimage gives the values
    here. The Arganda-Carreras paper writes the sums with n_ij^2 (pairs of a
    pixel with itself included); the difference is below 1e-4 on ISBI images.

    References
    ----------
    I. Arganda-Carreras et al., "Crowdsourcing the creation of image
    segmentation algorithms for connectomics", Front. Neuroanat. 9:142, 2015.
    """
    table = _restricted_table(prediction_labels, true_labels)

    def pairs(sizes: np.ndarray) -> float:
        return float(np.sum(sizes * (sizes - 1)))

    joint, true_sum, predicted_sum = (
        pairs(table.joint),
        pairs(table.true_sizes),
        pairs(table.predicted_sizes),
    )
    return (
        2 * joint / (true_sum + predicted_sum) if true_sum + predicted_sum else 1.0,
        joint / true_sum if true_sum else 1.0,
        joint / predicted_sum if predicted_sum else 1.0,
    )


def _entropy(sizes: np.ndarray, total: int) -> float:
    # H = log N - (1/N) sum c log c; singletons (c = 1) add nothing to the sum.
    sizes = sizes[sizes > 1]
    return float(np.log(total) - np.sum(sizes * np.log(sizes)) / total)


def info_score(prediction_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Foreground-restricted information-theoretic score V_info (ISBI 2012).

    On the same restricted joint distribution as :func:`rand_scores`,
    V_info = 2 I(S; T) / (H(S) + H(T)), the harmonic mean of the split score
    I/H(S) and the merge score I/H(T); 1 when both entropies are 0 (one object
    each, identical). The information error is 1 - V_info, which equals the
    variation of information divided by H(S) + H(T).

    Parameters
    ----------
    prediction_labels, true_labels : ndarray of int
        Instance labels of the same shape, 0 = background.

    Returns
    -------
    float
        V_info in [0, 1], 1 = perfect.

    Notes
    -----
    ``skimage.metrics.variation_of_information(true, predicted,
    ignore_labels=(0,))`` returns the two conditional entropies; their sum over
    H(S) + H(T) equals 1 - V_info when predicted background inside true objects
    is relabelled as singletons (skimage treats it as one object, label 0).
    """
    table = _restricted_table(prediction_labels, true_labels)
    true_entropy = _entropy(table.true_sizes, table.total)
    predicted_entropy = _entropy(table.predicted_sizes, table.total)
    joint_entropy = _entropy(table.joint, table.total)
    denominator = true_entropy + predicted_entropy
    if denominator <= 0:
        return 1.0
    information = true_entropy + predicted_entropy - joint_entropy
    return float(min(1.0, max(0.0, 2 * information / denominator)))


# ---------------------------------------------------------------------------
# Object-level metrics (cell tracking challenge, StarDist-style matching)


def _object_overlaps(prediction_labels: np.ndarray, true_labels: np.ndarray):
    _check_pair(prediction_labels, true_labels)
    true_ids, predicted_ids, counts = contingency_table(true_labels, prediction_labels)
    true_sizes = np.bincount(true_ids, weights=counts)
    predicted_sizes = np.bincount(predicted_ids, weights=counts)
    both = (true_ids > 0) & (predicted_ids > 0)
    true_ids, predicted_ids, counts = true_ids[both], predicted_ids[both], counts[both]
    union = true_sizes[true_ids] + predicted_sizes[predicted_ids] - counts
    n_true = int(np.count_nonzero(true_sizes[1:]))
    n_predicted = int(np.count_nonzero(predicted_sizes[1:]))
    return true_ids, predicted_ids, counts, counts / union, true_sizes, n_true, n_predicted


def seg_score(prediction_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Cell tracking challenge SEG: mean Jaccard of true objects with their matches.

    A true object R is matched to the predicted object S with |R & S| > |R| / 2
    (at most one can qualify); its score is |R & S| / |R | S|, 0 without a match.
    SEG is the mean over true objects.

    Parameters
    ----------
    prediction_labels, true_labels : ndarray of int
        Instance labels of the same shape, 0 = background.

    Returns
    -------
    float
        SEG in [0, 1].
    """
    true_ids, _, counts, jaccard, true_sizes, n_true, _ = _object_overlaps(
        prediction_labels, true_labels
    )
    if n_true == 0:
        raise ValueError("ground_truth has no object; SEG is undefined")
    matched = counts > 0.5 * true_sizes[true_ids]
    return float(np.sum(jaccard[matched]) / n_true)


def object_counts(prediction_labels: np.ndarray, true_labels: np.ndarray) -> dict[str, int]:
    """Objects predicted and true, and how many were split or merged.

    Each true object's partner is the predicted object that covers most of
    it, and each predicted object's the true object it covers most. A
    predicted object that is the partner of several true objects merged
    them (``merges`` counts the true objects beyond the first); a true
    object that is the partner of several predicted objects was split
    (``splits`` counts the pieces beyond the first).

    >>> truth = np.array([[1, 1, 0, 2, 2, 0, 3, 3, 3]])
    >>> found = np.array([[5, 5, 5, 5, 5, 0, 6, 0, 7]])
    >>> object_counts(found, truth)
    {'objects_predicted': 3, 'objects_true': 3, 'splits': 1, 'merges': 1}
    """
    predicted = np.asarray(prediction_labels).ravel().astype(np.int64)
    true = np.asarray(true_labels).ravel().astype(np.int64)
    counts = {
        "objects_predicted": int(np.unique(predicted[predicted > 0]).size),
        "objects_true": int(np.unique(true[true > 0]).size),
    }
    both = (predicted > 0) & (true > 0)
    pairs, shared = np.unique(
        np.stack([predicted[both], true[both]], axis=1), axis=0, return_counts=True
    )
    return {
        **counts,
        "splits": _extra_partners(pairs[:, 0], pairs[:, 1], shared),
        "merges": _extra_partners(pairs[:, 1], pairs[:, 0], shared),
    }


def _extra_partners(objects: np.ndarray, others: np.ndarray, shared: np.ndarray) -> int:
    """Objects of ``others`` beyond the first that pick the same partner among ``objects``,
    each picking the one it shares most pixels with."""
    if objects.size == 0:
        return 0
    order = np.lexsort((-shared, others))  # by other, then by overlap, largest first
    first = np.ones(order.size, bool)
    first[1:] = others[order][1:] != others[order][:-1]
    partners = objects[order][first]
    return int(partners.size - np.unique(partners).size)


class Matching(NamedTuple):
    """Counts and scores of a one-to-one object matching at one IoU threshold."""

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    precision: float
    recall: float
    f1: float


def match_objects(
    prediction_labels: np.ndarray,
    true_labels: np.ndarray,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> list[Matching]:
    """Optimal one-to-one matching of objects at each IoU threshold.

    Pairs with IoU >= threshold are candidates; the matching maximises the
    number of matched pairs (ties broken by total IoU) by
    ``scipy.optimize.linear_sum_assignment`` on the objects that compete for a
    partner. Above 0.5 no object can have two candidates, so the assignment
    only runs for lower thresholds or exact ties.

    Parameters
    ----------
    prediction_labels, true_labels : ndarray of int
        Instance labels of the same shape, 0 = background.
    iou_thresholds : tuple of float
        IoU thresholds in (0, 1].

    Returns
    -------
    list of Matching
        One entry per threshold; precision = TP / (TP + FP), recall =
        TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN); each 1.0 when both images
        hold no object.
    """
    true_ids, predicted_ids, _, jaccard, _, n_true, n_predicted = _object_overlaps(
        prediction_labels, true_labels
    )
    results = []
    for threshold in iou_thresholds:
        if not 0 < threshold <= 1:
            raise ValueError(f"iou_thresholds must lie in (0, 1], got {threshold}")
        keep = jaccard >= threshold
        rows, columns, weights = true_ids[keep], predicted_ids[keep], jaccard[keep]
        row_ids, row_counts = np.unique(rows, return_counts=True)
        column_ids, column_counts = np.unique(columns, return_counts=True)
        contested = np.isin(rows, row_ids[row_counts > 1]) | np.isin(
            columns, column_ids[column_counts > 1]
        )
        matched = int(np.count_nonzero(~contested))
        if np.any(contested):
            # Objects of contested pairs may also sit in uncontested ones only if
            # they had several candidates, so the two sets share no object.
            sub_rows, row_index = np.unique(rows[contested], return_inverse=True)
            sub_columns, column_index = np.unique(columns[contested], return_inverse=True)
            cost = np.zeros((sub_rows.size, sub_columns.size))
            bonus = weights[contested] / (2 * min(sub_rows.size, sub_columns.size))
            cost[row_index, column_index] = -(1.0 + bonus)
            chosen_rows, chosen_columns = optimize.linear_sum_assignment(cost)
            matched += int(np.count_nonzero(cost[chosen_rows, chosen_columns] < 0))
        false_positives = n_predicted - matched
        false_negatives = n_true - matched
        results.append(
            Matching(
                threshold=float(threshold),
                true_positives=matched,
                false_positives=false_positives,
                false_negatives=false_negatives,
                precision=matched / n_predicted if n_predicted else float(n_true == 0),
                recall=matched / n_true if n_true else float(n_predicted == 0),
                f1=(
                    2 * matched / (2 * matched + false_positives + false_negatives)
                    if n_true + n_predicted
                    else 1.0
                ),
            )
        )
    return results


# ---------------------------------------------------------------------------
# Warping error (Jain et al. 2010)

# The 8 neighbours of a pixel in ring order (clockwise from top-left); bit k of
# a neighbourhood code is set when neighbour k is foreground. Odd positions are
# the 4-neighbours.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _ring_components(members: list[int], eight: bool) -> list[set[int]]:
    """Connected components of ring positions, with 4- or 8-adjacency inside the 3x3 block."""
    remaining = set(members)
    components = []
    while remaining:
        stack = [remaining.pop()]
        component = set(stack)
        while stack:
            position = stack.pop()
            y, x = _RING[position]
            for other in list(remaining):
                oy, ox = _RING[other]
                distance = abs(y - oy) + abs(x - ox)
                if distance == 1 or (eight and max(abs(y - oy), abs(x - ox)) == 1):
                    remaining.discard(other)
                    component.add(other)
                    stack.append(other)
        components.append(component)
    return components


def topological_number(members: list[int], adjacency: int) -> int:
    """Topological number T4 or T8 of a set of neighbours of a pixel (Bertrand 1994).

    Parameters
    ----------
    members : list of int
        Ring positions (0..7, see ``_RING``) of the neighbours in the set.
    adjacency : {4, 8}
        T8 counts the 8-components of the set; T4 counts its 4-components
        that hold a 4-neighbour of the centre.

    Returns
    -------
    int
        The topological number.
    """
    if adjacency == 8:
        return len(_ring_components(members, eight=True))
    if adjacency == 4:
        components = _ring_components(members, eight=False)
        return sum(1 for component in components if any(p % 2 == 1 for p in component))
    raise ValueError(f"adjacency must be 4 or 8, got {adjacency!r}")


@functools.lru_cache(maxsize=2)
def simple_point_table(connectivity: int = 1) -> np.ndarray:
    """Lookup table: is a pixel with this 8-neighbour code a simple point?

    A pixel is simple when flipping it changes no topology: it splits or
    merges no component of either class and makes or fills no hole. In 2D this
    is decided by its 8 neighbours alone: with foreground adjacency n and
    background adjacency n' (the pair (4, 8) or (8, 4)), the pixel is simple
    iff T_n(foreground neighbours) = 1 and T_n'(background neighbours) = 1.
    The test does not depend on the pixel's own value.

    Parameters
    ----------
    connectivity : {1, 2}
        1: cells 4-connected, background 8-connected (ISBI 2012 convention);
        2: cells 8-connected, background 4-connected.

    Returns
    -------
    ndarray of bool, shape (256,)
        Entry ``code`` is True for a simple point, where bit k of ``code`` is
        neighbour k in clockwise order from the top-left.
    """
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity!r}")
    foreground_adjacency, background_adjacency = (4, 8) if connectivity == 1 else (8, 4)
    table = np.zeros(256, dtype=bool)
    for code in range(256):
        foreground = [k for k in range(8) if code >> k & 1]
        background = [k for k in range(8) if not code >> k & 1]
        table[code] = (
            topological_number(foreground, foreground_adjacency) == 1
            and topological_number(background, background_adjacency) == 1
        )
    table.flags.writeable = False
    return table


def neighbourhood_code(block: np.ndarray) -> int:
    """The 8-bit code of a 3x3 boolean block, as indexed by :func:`simple_point_table`."""
    block = np.asarray(block, dtype=bool)
    if block.shape != (3, 3):
        raise ValueError(f"block must be 3x3, got shape {block.shape}")
    return sum(1 << k for k, (dy, dx) in enumerate(_RING) if block[1 + dy, 1 + dx])


def warp(prediction: np.ndarray, ground_truth: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Warp a binary prediction toward the ground truth by flipping simple pixels only.

    Repeatedly flips every disagreeing pixel that is simple in the current
    warped image, until none is left, so the result has the topology of the
    prediction and agrees with the ground truth everywhere except where the
    topologies differ. Pixels are processed in 9 classes of the 3x3 lattice
    (row mod 3, column mod 3): no pixel of a class lies in the 3x3
    neighbourhood of another, so a whole class flips at once and the result is
    one of the sequences of single simple flips that Jain et al. describe.
    Outside the image counts as background.

    Parameters
    ----------
    prediction, ground_truth : ndarray of bool, 2D
        Cell maps of the same shape.
    connectivity : {1, 2}
        See :func:`simple_point_table`.

    Returns
    -------
    ndarray of bool
        The warped prediction.
    """
    prediction = np.asarray(prediction, dtype=bool)
    ground_truth = np.asarray(ground_truth, dtype=bool)
    _check_pair(prediction, ground_truth)
    if prediction.ndim != 2:
        raise ValueError(f"the warping error is 2D only; got a {prediction.ndim}D image")
    table = simple_point_table(connectivity)
    width = prediction.shape[1] + 2  # of the padded image
    warped_image = np.pad(prediction, 1).astype(np.uint8)
    warped = warped_image.ravel()  # a view: flat indices make neighbour look-ups cheap
    disagree = (warped_image != np.pad(ground_truth, 1).astype(np.uint8)).ravel()
    offsets = np.array([dy * width + dx for dy, dx in _RING], dtype=np.intp)

    def pixel_class(indices: np.ndarray) -> np.ndarray:
        return (indices // width % 3) * 3 + indices % width % 3

    # Each class keeps a queue of pixels to test. A pixel that is not simple
    # stays so until a neighbour flips, so it is only queued again then: the
    # work follows the moving front instead of rescanning every disagreeing
    # pixel on each sweep (the difference between 0.1 s and 20 s on 2048x2048).
    start = np.flatnonzero(disagree)
    start_class = pixel_class(start)
    queues = [[start[start_class == k]] for k in range(9)]
    queued = disagree.copy()
    while any(len(queue) for queue in queues):
        for k in range(9):
            if not queues[k]:
                continue
            candidates = np.concatenate(queues[k])
            queues[k] = []
            queued[candidates] = False
            code = np.zeros(candidates.size, dtype=np.intp)
            for bit, offset in enumerate(offsets):
                code |= warped[candidates + offset].astype(np.intp) << bit
            flips = candidates[table[code]]
            if flips.size == 0:
                continue
            warped[flips] ^= 1
            disagree[flips] = False
            neighbours = (flips[:, None] + offsets).ravel()
            neighbours = np.unique(neighbours[disagree[neighbours] & ~queued[neighbours]])
            queued[neighbours] = True
            neighbour_class = pixel_class(neighbours)
            for other in np.unique(neighbour_class):
                queues[other].append(neighbours[neighbour_class == other])
    return warped_image[1:-1, 1:-1].astype(bool)


class WarpingResult(NamedTuple):
    """Warping error with its topological error counts and the warped prediction."""

    error: float
    splits: int
    mergers: int
    warped: np.ndarray


def warping_error(
    prediction: np.ndarray, ground_truth: np.ndarray, connectivity: int = 1
) -> WarpingResult:
    """Warping error of Jain et al. (2010): pixel error left after a topology-preserving warp.

    The prediction is warped toward the ground truth by :func:`warp`; the
    pixels that still disagree are the topological errors, and the warping
    error is their number over all pixels. The splits and mergers are counted
    between the cells (connected components) of the warped prediction W and of
    the ground truth G, over the pixels that are cell in both:

    * splits = sum over G cells of (number of W cells overlapping it - 1),
    * mergers = sum over W cells of (number of G cells overlapping it - 1).

    A cell cut in two by a spurious membrane is one split; a missing membrane
    that joins two cells is one merger. Other topological errors (a spurious or
    missed cell, a hole) add to the error but to neither count.

    Parameters
    ----------
    prediction, ground_truth : ndarray of bool, 2D
        Cell maps of the same shape.
    connectivity : {1, 2}
        See :func:`simple_point_table`.

    Returns
    -------
    WarpingResult
        ``error`` (fraction of pixels), ``splits``, ``mergers`` and ``warped``.

    References
    ----------
    V. Jain et al., "Boundary learning by optimization with topological
    constraints", CVPR 2010.
    """
    warped = warp(prediction, ground_truth, connectivity)
    ground_truth = np.asarray(ground_truth, dtype=bool)
    error = np.count_nonzero(warped != ground_truth) / warped.size
    structure = _structure(2, connectivity)
    warped_labels, _ = ndimage.label(warped, structure=structure)
    true_labels, _ = ndimage.label(ground_truth, structure=structure)
    both = warped & ground_truth
    true_ids, warped_ids, _ = contingency_table(true_labels[both], warped_labels[both])
    splits = true_ids.size - np.unique(true_ids).size
    mergers = warped_ids.size - np.unique(warped_ids).size
    return WarpingResult(float(error), int(splits), int(mergers), warped)


# ---------------------------------------------------------------------------
# One entry point


def _metric_names(metrics, ndim: int, complete: bool = True) -> tuple[str, ...]:
    """The metrics asked for; the default leaves out the warping error in 3D or when
    the annotation is not ``complete`` (pixels ignored)."""
    if metrics is None:
        names = (
            DEFAULT_METRICS
            if ndim == 2 and complete
            else tuple(m for m in DEFAULT_METRICS if m != "warping_error")
        )
        return names
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(dict.fromkeys(metrics))
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not names:
        raise ValueError(f"metrics is empty; choose from {', '.join(METRICS)}")
    if "warping_error" in names and ndim != 2:
        raise ValueError(f"the warping error is 2D only; got {ndim}D images")
    return names


def _threshold_key(threshold: float) -> str:
    return f"{threshold:g}"


def _score_binary(
    predicted_cells: np.ndarray,
    predicted_labels: np.ndarray,
    true_cells: np.ndarray,
    true_labels: np.ndarray,
    names: tuple[str, ...],
    connectivity: int,
    iou_thresholds: tuple[float, ...],
) -> dict[str, float]:
    result: dict[str, float] = {}
    matches = None
    for name in names:
        if name == "pixel_error":
            result[name] = pixel_error(predicted_cells, true_cells)
        elif name == "rand_error":
            result[name] = 1.0 - rand_scores(predicted_labels, true_labels)[0]
        elif name == "info_error":
            result[name] = 1.0 - info_score(predicted_labels, true_labels)
        elif name == "warping_error":
            warping = warping_error(predicted_cells, true_cells, connectivity)
            result.update(warping_error=warping.error, splits=warping.splits)
            result["mergers"] = warping.mergers
        elif name == "iou":
            result["iou"] = iou(predicted_cells, true_cells)
            result["iou_background"] = iou(~predicted_cells, ~true_cells)
        elif name == "dice":
            result[name] = dice(predicted_cells, true_cells)
        elif name == "seg":
            result[name] = seg_score(predicted_labels, true_labels)
        elif name == "objects":
            result.update(object_counts(predicted_labels, true_labels))
        else:  # f1, precision, recall
            if matches is None:
                matches = match_objects(predicted_labels, true_labels, iou_thresholds)
            values = [getattr(match, name) for match in matches]
            result[name] = float(np.mean(values))
            for match, value in zip(matches, values, strict=True):
                result[f"{name}@{_threshold_key(match.threshold)}"] = float(value)
    return result


def _ground_truth_objects(ground_truth, cell_value, connectivity, annotated=None):
    if annotated is not None:
        filler = _unknown_filler(ground_truth[annotated], cell_value)
        ground_truth = np.where(annotated, ground_truth, filler)
    true_cells = cell_map(ground_truth, "ground_truth", cell_value)
    true_labels, _ = object_labels(ground_truth, "ground_truth", cell_value, connectivity)
    if annotated is not None:
        true_cells = true_cells & annotated
        true_labels = np.where(annotated, true_labels, 0)
    if not np.any(true_cells):
        raise ValueError("ground_truth has no cell pixel; check cell_value or the file")
    return true_cells, true_labels


def _unknown_filler(annotated_values: np.ndarray, cell_value):
    """A value for unannotated pixels that is no cell and joins none.

    With ``cell_value``: an annotated value other than it (or ``cell_value + 1``).
    Otherwise instance labels get 0 (background); a two-valued map its smaller
    (membrane) value; a map of one value ``v`` gets 0, so ``v`` stays the larger.
    """
    values = np.unique(annotated_values)
    if values.dtype == bool:
        return False
    if cell_value is not None:
        others = values[values != cell_value]
        return others[0] if others.size else cell_value + 1
    return values[0] if values.size == 2 else values.dtype.type(0)


def _annotated_mask(ground_truth: np.ndarray, ignore_value, names) -> np.ndarray | None:
    """Pixels to score: those whose ground truth is not ``ignore_value`` (None: all)."""
    if ignore_value is None:
        return None
    annotated = ground_truth != ignore_value
    if not np.any(annotated):
        raise ValueError(
            f"ground_truth holds only the ignore value {ignore_value}; nothing to score"
        )
    if "warping_error" in names:
        raise ValueError(
            "the warping error needs a complete annotation; leave it out of the metrics "
            "when pixels are ignored"
        )
    return annotated


def _restrict(annotated, *arrays):
    """The annotated pixels of each array (1D), or the arrays as they are."""
    if annotated is None:
        return arrays
    return tuple(array[annotated] for array in arrays)


def score_per_threshold(
    probabilities: np.ndarray,
    ground_truth: np.ndarray,
    metrics=None,
    *,
    cell_value: float | None = None,
    thresholds: tuple[float, ...] | None = None,
    connectivity: int = 1,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    ignore_value: float | None = None,
) -> dict[float, dict[str, float]]:
    """Every metric at every threshold of a probability map (the challenge's sweep).

    Parameters
    ----------
    probabilities : ndarray of float
        Probability of the cell class per pixel, in [0, 1].
    ground_truth, metrics, cell_value, connectivity, iou_thresholds, ignore_value
        As in :func:`score`.
    thresholds : tuple of float, optional
        Cell where ``probability > threshold``; default :data:`THRESHOLDS`
        (0.0, 0.1, ..., 0.9).

    Returns
    -------
    dict
        ``{threshold: {metric name: value}}``; :func:`best_scores` picks the
        best threshold of each metric.
    """
    probabilities = np.asarray(probabilities)
    ground_truth = np.asarray(ground_truth)
    _check_pair(probabilities, ground_truth)
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise ValueError(
            f"prediction must be a floating-point probability map here, got {probabilities.dtype}"
        )
    low, high = float(np.min(probabilities)), float(np.max(probabilities))
    if not (0.0 <= low and high <= 1.0):  # also rejects NaN
        raise ValueError(
            f"prediction probabilities must lie in [0, 1], found [{low}, {high}]; "
            "rescale it (8-bit maps: divide by 255)"
        )
    thresholds = THRESHOLDS if thresholds is None else tuple(float(t) for t in thresholds)
    if not thresholds or not all(0.0 <= t < 1.0 for t in thresholds):
        raise ValueError(
            f"thresholds must be a non-empty list of values in [0, 1), got {thresholds}"
        )
    names = _metric_names(metrics, probabilities.ndim, ignore_value is None)
    annotated = _annotated_mask(ground_truth, ignore_value, names)
    true_cells, true_labels = _restrict(
        annotated, *_ground_truth_objects(ground_truth, cell_value, connectivity, annotated)
    )
    structure = _structure(probabilities.ndim, connectivity)
    per_threshold = {}
    for threshold in thresholds:
        predicted_cells = probabilities > threshold
        predicted_labels, _ = ndimage.label(predicted_cells, structure=structure)
        per_threshold[threshold] = _score_binary(
            *_restrict(annotated, predicted_cells, predicted_labels),
            true_cells,
            true_labels,
            names,
            connectivity,
            iou_thresholds,
        )
    return per_threshold


def best_scores(per_threshold: dict[float, dict[str, float]]) -> dict[str, float]:
    """Each metric at its best threshold, with ``"<metric>_threshold"`` keys.

    Errors (pixel, Rand, information, warping) take their minimum, scores (IoU,
    Dice, SEG, F1, precision, recall) their maximum; ties go to the lowest
    threshold. Quantities that belong to a metric follow its threshold:
    ``splits`` and ``mergers`` that of ``warping_error``, ``iou_background``
    that of ``iou``, ``f1@0.5`` etc. that of the mean ``f1``.
    """
    if not per_threshold:
        raise ValueError("per_threshold is empty")
    thresholds = list(per_threshold)
    first = per_threshold[thresholds[0]]
    result: dict[str, float] = {}
    for name in METRICS:
        if name not in first:
            continue
        values = np.array([per_threshold[t][name] for t in thresholds])
        best = int(np.argmin(values) if name in _ERRORS else np.argmax(values))
        chosen = per_threshold[thresholds[best]]
        for key in first:
            if key == name or _follows(key, name):
                result[key] = chosen[key]
        result[f"{name}_threshold"] = thresholds[best]
    return result


def _follows(key: str, name: str) -> bool:
    if name == "warping_error":
        return key in ("splits", "mergers")
    if name == "iou":
        return key == "iou_background"
    return key.startswith(f"{name}@")


def score(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    metrics=None,
    *,
    cell_value: float | None = None,
    thresholds: tuple[float, ...] | None = None,
    connectivity: int = 1,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    ignore_value: float | None = None,
) -> dict[str, float]:
    """Score a prediction against the ground truth: the one entry point.

    Parameters
    ----------
    prediction : ndarray
        Either a floating-point probability map of the cell class in [0, 1]
        (scored at the best of ``thresholds`` per metric), or a binary cell map
        / integer instance labels (scored as they are).
    ground_truth : ndarray
        Binary cell map (True, the larger of two values, or ``cell_value`` =
        cell) or instance labels (0 = background), same shape as ``prediction``.
    metrics : str or sequence of str, optional
        Names from :data:`METRICS`; default :data:`DEFAULT_METRICS` (without
        the warping error for 3D images).
    cell_value : number, optional
        Value that marks cells in two-valued maps (in both images, but never in
        a probability map).
    thresholds : sequence of float, optional
        Thresholds for a probability map; default 0.0, 0.1, ..., 0.9.
    connectivity : {1, 2}
        Connectivity of cells: 1 = 4-neighbours in 2D (6 in 3D), the ISBI 2012
        convention; 2 = 8 (26).
    iou_thresholds : sequence of float
        IoU thresholds of the object matching (f1, precision, recall).
    ignore_value : number, optional
        Ground-truth value of unannotated pixels (sparse annotations): every
        metric counts only the other pixels. Objects are found in the whole
        images (an unknown pixel is no cell and joins none) and then cut to
        the annotated pixels, so a predicted cell wholly in the unknown is
        neither right nor wrong. The warping error, a topological measure of
        the whole image, is refused.

    Returns
    -------
    dict of str to float
        Keys by metric:

        * ``pixel_error``: 1 - pixel accuracy of the cell map.
        * ``rand_error``: 1 - V_rand (foreground-restricted, :func:`rand_scores`).
        * ``info_error``: 1 - V_info (:func:`info_score`).
        * ``warping_error``, ``splits``, ``mergers`` (:func:`warping_error`).
        * ``iou`` (cell class), ``iou_background``.
        * ``dice`` (cell class).
        * ``seg``: cell tracking challenge SEG (:func:`seg_score`).
        * ``f1``, ``precision``, ``recall``: means over ``iou_thresholds``, and
          ``f1@0.5``, ..., ``f1@0.95`` etc. at each threshold.

        For a probability map also ``<metric>_threshold`` for each metric
        named (the threshold where it is best).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.zeros((8, 8), bool); truth[1:7, 1:4] = truth[1:7, 5:7] = True
    >>> result = score(truth, truth, ["pixel_error", "rand_error", "seg"])
    >>> result == {"pixel_error": 0.0, "rand_error": 0.0, "seg": 1.0}
    True
    """
    prediction = np.asarray(prediction)
    ground_truth = np.asarray(ground_truth)
    _check_pair(prediction, ground_truth)
    # score's own arguments, in its order: each kind of prediction takes them all.
    options = (metrics, cell_value, thresholds, connectivity, iou_thresholds, ignore_value)
    if np.issubdtype(prediction.dtype, np.floating):
        return _score_probabilities(prediction, ground_truth, *options)
    return _score_labels(prediction, ground_truth, *options)


def _score_probabilities(
    probabilities,
    ground_truth,
    metrics,
    cell_value,
    thresholds,
    connectivity,
    iou_thresholds,
    ignore_value,
) -> dict[str, float]:
    """:func:`score` of a probability map: each metric at its best threshold."""
    per_threshold = score_per_threshold(
        probabilities,
        ground_truth,
        metrics,
        cell_value=cell_value,
        thresholds=thresholds,
        connectivity=connectivity,
        iou_thresholds=iou_thresholds,
        ignore_value=ignore_value,
    )
    return best_scores(per_threshold)


def _score_labels(
    prediction,
    ground_truth,
    metrics,
    cell_value,
    thresholds,
    connectivity,
    iou_thresholds,
    ignore_value,
) -> dict[str, float]:
    """:func:`score` of a binary cell map or instance labels, scored as they are."""
    if thresholds is not None:
        raise ValueError(
            f"thresholds apply to probability maps only; prediction is {prediction.dtype}"
        )
    names = _metric_names(metrics, prediction.ndim, ignore_value is None)
    annotated = _annotated_mask(ground_truth, ignore_value, names)
    true_cells, true_labels = _ground_truth_objects(
        ground_truth, cell_value, connectivity, annotated
    )
    predicted_cells = cell_map(prediction, "prediction", cell_value)
    predicted_labels, _ = object_labels(prediction, "prediction", cell_value, connectivity)
    return _score_binary(
        *_restrict(annotated, predicted_cells, predicted_labels, true_cells, true_labels),
        names,
        connectivity,
        iou_thresholds,
    )
