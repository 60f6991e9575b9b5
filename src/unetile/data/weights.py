"""The pixel-wise loss weight map of the U-Net paper (Ronneberger et al. 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies; ``d1`` and ``d2`` are the distances, in
pixels, from a background pixel to the border of the nearest and of the
second-nearest cell. The border term is large in the thin background gaps
between touching cells, which forces the network to learn to separate them.

Unknown pixels. Sparse annotations (scribbles, points) leave most pixels
unknown: neither cell nor background. They weigh 0, do not count in the
class frequencies of ``w_c`` (its mean over the *annotated* pixels is 1), and
get no border term. ``d1`` and ``d2`` are the distances to the nearest and
second-nearest *annotated* cell, measured straight through unknown pixels: an
unknown pixel neither is a cell, nor ends a cell (no border is drawn where a
cell meets the unknown), nor stops a distance. A cell hidden in an unknown
region therefore cannot raise the weight of a background pixel next to it:
the border term only stresses gaps whose two sides were annotated.

Distance convention. A cell's border is the boundary between its pixels and the
background, half a pixel beyond the centres of its outermost pixels, so
``d = edt - 1/2`` where ``edt`` is the Euclidean distance between pixel centres
(``scipy.ndimage.distance_transform_edt``). Along the grid axes this is exact:
a straight gap of ``g`` background pixels between two cells gives
``d1 + d2 = g`` at every pixel of the gap, the paper's intended reading; along
diagonals it overestimates the distance to the pixel corner by at most
``(sqrt(2) - 1) / 2 ~ 0.21`` px.

References
----------
O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015, arXiv:1505.04597, section 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..network.tiling import widened_box

DEFAULT_TOLERANCE = 1e-6


def class_balance(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class weights that balance the class frequencies of a label map.

    ``weight[c] = N / (K * count[c])`` for the ``K`` classes present, with ``N``
    the number of pixels: inverse class frequency, normalised so that the mean
    of ``weight[labels]`` over the image is 1. Absent classes get weight 0.

    Parameters
    ----------
    labels : ndarray of int
        Class id of every pixel, ``0 <= labels < num_classes``.
    num_classes : int
        Number of classes.

    Returns
    -------
    ndarray of float64, shape (num_classes,)
        Weight of each class.

    Examples
    --------
    >>> class_balance(np.array([[0, 0, 0, 1]]), 2)
    array([0.66666667, 2.        ])
    """
    labels = np.asarray(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_class_ids(labels, "labels")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"labels: class id {labels.max()} >= num_classes={num_classes}; "
            "pass a larger num_classes"
        )
    counts = np.bincount(labels.ravel().astype(np.intp), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = labels.size / (present.sum() * counts[present])
    return weights


def border_cutoff(w0: float = 10.0, sigma: float = 5.0, tolerance: float = DEFAULT_TOLERANCE):
    """Value of ``d1 + d2`` (pixels) beyond which the border term is below ``tolerance``.

    Solves ``w0 * exp(-cutoff^2 / (2 sigma^2)) = tolerance``:
    ``cutoff = sigma * sqrt(2 ln(w0 / tolerance))``. For the paper's ``w0 = 10``,
    ``sigma = 5`` px and ``tolerance = 1e-6`` this is 28.4 px.

    Returns
    -------
    float
        The cutoff in pixels; 0 when ``w0 <= tolerance``, ``inf`` when ``tolerance`` is 0.
    """
    if tolerance <= 0:
        return math.inf
    if w0 <= tolerance:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


def weight_map(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Sequence[float] | None = "balanced",
    labels: np.ndarray | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    unknown: np.ndarray | None = None,
) -> np.ndarray:
    """The paper's loss weight map ``w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2))``.

    ``d1`` and ``d2`` are the distances in pixels from a background pixel to the
    border of the nearest and second-nearest cell (see the module docstring for
    the half-pixel convention: a straight gap of ``g`` pixels gives
    ``d1 + d2 = g``). The border term is 0 on cell pixels and wherever fewer
    than two cells exist.

    Each cell's distance is computed only inside its bounding box grown by
    :func:`border_cutoff`, so the cost grows with the cells' area and not with
    ``cells x image``; the result differs from the exact map by less than
    ``tolerance`` at every pixel (0 for an exact map, at the cost of one
    full-image distance transform per cell).

    Parameters
    ----------
    instances : ndarray of int, 2D or 3D
        Instance ids: 0 is background, each cell a distinct positive id.
    w0 : float
        Weight of the border term (paper: 10).
    sigma : float
        Width of the border term in pixels (paper: about 5 px).
    class_weights : "balanced", None or sequence of float
        ``"balanced"``: inverse class frequency with mean 1 over the image
        (:func:`class_balance`); ``None``: ``w_c = 1``; a sequence: the weight of
        each class id.
    labels : ndarray of int, optional
        Class id of every pixel, same shape as ``instances``, for multi-class
        data. By default the classes are background (0) and cell (1) from
        ``instances > 0``.
    tolerance : float
        Largest allowed error of the border term (absolute, same units as ``w0``).
    unknown : ndarray of bool, optional
        Pixels without annotation (module docstring): weight 0, left out of the
        class balance, neither cells nor background. ``instances`` must be 0
        there; ``labels`` may hold anything there (e.g. -1).

    Returns
    -------
    ndarray of float32, same shape as ``instances``
        The weight of every pixel.

    References
    ----------
    Ronneberger, Fischer, Brox, U-Net, MICCAI 2015, equation 2.

    Examples
    --------
    Two cells separated by a gap of 2 pixels; the gap pixels get
    ``1 + 10 exp(-2^2 / 50)``:

    >>> instances = np.array([[1, 1, 0, 0, 2, 2]])
    >>> weight_map(instances, class_weights=None)[0, 2]
    np.float32(10.231163)
    """
    instances = np.asarray(instances)
    _check_weight_map_arguments(instances, w0, sigma, tolerance)
    known = _known_mask(instances, unknown)
    weights = np.zeros(instances.shape, dtype=np.float64)
    weights[known] = _class_weight_map(
        instances[known], class_weights, _known_labels(labels, instances, known)
    )
    cutoff = border_cutoff(w0, sigma, tolerance)
    if w0 == 0 or cutoff == 0 or instances.size == 0:
        return weights.astype(np.float32)
    _add_border_term(weights, instances, known, w0, sigma, cutoff)
    return weights.astype(np.float32)


def _check_weight_map_arguments(instances: np.ndarray, w0, sigma, tolerance) -> None:
    if instances.ndim < 1:
        raise ValueError("instances: expected an array of instance ids, got a scalar")
    _check_class_ids(instances, "instances")
    if not w0 >= 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")


def _known_labels(labels, instances: np.ndarray, known: np.ndarray) -> np.ndarray | None:
    """The class ids of the annotated pixels (None: classes come from ``instances``)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != instances.shape:
        raise ValueError(f"labels: shape {labels.shape} differs from instances {instances.shape}")
    return labels[known]


def _add_border_term(weights, instances, known, w0: float, sigma: float, cutoff: float) -> None:
    """Add ``w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` to the annotated background pixels."""
    nearest, second = nearest_two_distances(instances, cutoff + 1.0)
    background = (instances == 0) & known
    # Half a pixel from each cell's outermost pixel centre to its border.
    gap = nearest[background] + second[background] - 1.0
    weights[background] += w0 * np.exp(-(gap**2) / (2.0 * sigma**2))


def nearest_two_distances(
    instances: np.ndarray, max_distance: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every pixel to the nearest and second-nearest cell.

    Distances are Euclidean, between pixel centres, in pixels (0 on the cell's
    own pixels). Each cell's distance transform runs only over its bounding box
    grown by ``max_distance``, so distances larger than ``max_distance`` may be
    reported as ``inf`` (or as the distance to a farther cell); distances up to
    ``max_distance`` are exact.

    Parameters
    ----------
    instances : ndarray of int
        Instance ids, 0 = background.
    max_distance : float
        Largest distance in pixels that must be exact; ``inf`` for all.

    Returns
    -------
    nearest, second : ndarray of float64
        Distance to the nearest and to the second-nearest distinct cell;
        ``inf`` where there is none within reach.
    """
    instances = np.asarray(instances)
    _check_class_ids(instances, "instances")
    if instances.dtype == bool:
        instances = instances.astype(np.uint8)
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    if instances.size == 0 or instances.max() == 0:
        return nearest, second
    if instances.max() > instances.size:
        # find_objects allocates one entry per id up to the largest.
        instances = np.unique(instances, return_inverse=True)[1].reshape(instances.shape)
    full = max(instances.shape)
    margin = full if math.isinf(max_distance) else min(full, math.ceil(max_distance))
    for cell, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        grown = widened_box(box, margin, instances.shape)
        # Every pixel of the cell lies inside the grown box, so the transform
        # restricted to the box is exact there; pixels outside it are farther
        # than the margin.
        distance = ndimage.distance_transform_edt(instances[grown] != cell)
        nearest_view = nearest[grown]
        second_view = second[grown]
        np.minimum(second_view, np.maximum(nearest_view, distance), out=second_view)
        np.minimum(nearest_view, distance, out=nearest_view)
    return nearest, second


def touching_borders(instances: np.ndarray) -> np.ndarray:
    """Pixels of a cell that are face-adjacent (4 in 2D, 6 in 3D) to a different cell.

    Instance annotations often let touching cells share a boundary with no
    background between them; the paper's annotations (figure 3c) draw a thin
    background line there, which the weight map's border term then stresses.
    Setting these pixels to background gives that line (1 px on each side).
    """
    instances = np.asarray(instances)
    border = np.zeros(instances.shape, dtype=bool)
    for axis in range(instances.ndim):
        first = [slice(None)] * instances.ndim
        second = [slice(None)] * instances.ndim
        first[axis] = slice(None, -1)
        second[axis] = slice(1, None)
        low, high = instances[tuple(first)], instances[tuple(second)]
        shared = (low != high) & (low > 0) & (high > 0)
        border[tuple(first)] |= shared
        border[tuple(second)] |= shared
    return border


def instances_from_membrane_map(
    binary: np.ndarray, cell_value: int = 255, connectivity: int = 1
) -> np.ndarray:
    """Instance ids from an ISBI-style binary membrane map (cells white, membranes black).

    Each connected component of the cell interior becomes one instance; the
    membranes become background (0).

    Parameters
    ----------
    binary : ndarray
        Membrane map with exactly two values: ``cell_value`` on cells and 0 on
        membranes (ISBI 2012 uses 255 and 0). A boolean map uses True for cells.
    cell_value : int
        Value of cell pixels.
    connectivity : int
        Neighbourhood of a component, as in ``scipy.ndimage.generate_binary_structure``:
        1 = 4-connected in 2D (6 in 3D), ``binary.ndim`` = 8-connected (26 in 3D).

    Returns
    -------
    ndarray of int32, same shape
        Instance ids 1..n, 0 on membranes.
    """
    binary = np.asarray(binary)
    if binary.ndim < 1:
        raise ValueError("binary: expected a membrane map array, got a scalar")
    if not 1 <= connectivity <= binary.ndim:
        raise ValueError(
            f"connectivity must be between 1 and binary.ndim={binary.ndim}, got {connectivity}"
        )
    if binary.dtype == bool:
        cells = binary
    else:
        cells = binary == cell_value
        unexpected = ~cells & (binary != 0)
        if unexpected.any():
            raise ValueError(
                f"binary: value {binary[unexpected].flat[0]} found, expected only 0 (membrane) "
                f"and cell_value={cell_value} (cell); threshold the map or pass cell_value"
            )
    structure = ndimage.generate_binary_structure(binary.ndim, connectivity)
    instances, _ = ndimage.label(cells, structure=structure, output=np.int32)
    return instances


def _class_weight_map(
    instances: np.ndarray,
    class_weights: str | Sequence[float] | None,
    labels: np.ndarray | None,
) -> np.ndarray:
    """``w_c`` of every pixel as float64."""
    if labels is None:
        classes = (instances > 0).astype(np.intp)
    else:
        classes = np.asarray(labels)
        if classes.shape != instances.shape:
            raise ValueError(
                f"labels: shape {classes.shape} differs from instances {instances.shape}"
            )
        _check_class_ids(classes, "labels")
        classes = classes.astype(np.intp, copy=False)
    if class_weights is None:
        return np.ones(instances.shape, dtype=np.float64)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(
                f'class_weights must be "balanced", None or a sequence of floats, '
                f"got {class_weights!r}"
            )
        num_classes = int(classes.max()) + 1 if classes.size else 1
        per_class = class_balance(classes, num_classes)
    else:
        per_class = np.asarray(class_weights, dtype=np.float64)
        if per_class.ndim != 1 or not np.all(np.isfinite(per_class)) or np.any(per_class < 0):
            raise ValueError(
                f"class_weights must be a sequence of finite weights >= 0, got {class_weights!r}"
            )
        if classes.size and classes.max() >= per_class.size:
            raise ValueError(
                f"class_weights has {per_class.size} entries but the labels hold class id "
                f"{classes.max()}; give one weight per class"
            )
    return per_class[classes]


def _known_mask(instances: np.ndarray, unknown: np.ndarray | None) -> np.ndarray:
    """Annotated pixels: all of them, or those outside ``unknown`` (checked against the cells)."""
    if unknown is None:
        return np.ones(instances.shape, dtype=bool)
    unknown = np.asarray(unknown, dtype=bool)
    if unknown.shape != instances.shape:
        raise ValueError(f"unknown: shape {unknown.shape} differs from instances {instances.shape}")
    if np.any(instances[unknown] != 0):
        raise ValueError("unknown: pixels without annotation cannot be cells; set instances to 0")
    return ~unknown


def _check_class_ids(array: np.ndarray, name: str) -> None:
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"{name}: expected integer ids, got dtype {array.dtype}")
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise ValueError(f"{name}: negative id {array.min()} found; ids must be >= 0")
