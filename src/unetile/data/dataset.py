"""Training data: labelled images, their weight maps, and random training tiles.

A training set is a list of :class:`LabeledImage`: the image (channels first),
the class of every pixel, the cells as instance ids, and the paper's weight map
computed once from them. :class:`TileSampler` draws the training tiles.

Conventions (the README restates them):

- Image layout. A 2D image is ``(H, W)`` (one channel) or has one extra axis of
  channels. PNG stores channels last (``(H, W, 3)`` for RGB); a TIFF is read
  channels first ``(C, H, W)``, except that a TIFF whose last axis has 3 or 4
  entries and whose first axis has more is taken as RGB(A) channels last. A 3D
  stack (``dims=3``) is ``(Z, H, W)`` or ``(C, Z, H, W)``.
- Label modes. ``"membrane"``: a binary map, ``cell_value`` marks the cells
  (255 on ISBI 2012), every other pixel is membrane; classes are 0 = membrane,
  1 = cell; the cells are the 4-connected components of the cell region.
  ``"instances"``: 0 = background, every other id is one cell; classes are
  0 = background, 1 = cell, and where two cells touch, the pixels along the
  contact (one on each side) become background, the thin line that the
  paper's annotations draw between touching cells; with the ``"three-class"``
  target those contact pixels are class 2 (border) instead, the common
  target for touching nuclei (Caicedo et al. 2019). ``"classes"``: the pixel value is the class id
  (0 = background); the cells of the weight map's border term are the
  connected regions of equal non-zero class.
- Normalisation. Every channel is shifted and scaled by the mean and standard
  deviation of that channel over all training pixels
  (:class:`unetile.network.normalization.Normalization`); the two lists are stored in
  the run's ``config.json`` (``"normalization"``) and applied to every image at
  training and at prediction time.
- Tiles. Output tiles are centred on a pixel drawn uniformly over the whole
  training set (every pixel, border pixels included, is a centre equally
  often). Where the tile's context and the augmentation's slack reach past
  the border, the image is mirrored (as in prediction); label pixels outside
  the image are :data:`IGNORE` and weigh 0, so the loss only sees real
  annotations.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..network.normalization import Normalization
from ..network.tiling import Window, tile_grid

LABEL_MODES = ("membrane", "instances", "classes")
#: Training targets of instance labels: the paper's background / cell, or
#: background / cell interior / border between touching cells (class 2).
TARGETS = ("two-class", "three-class")
IGNORE = -1
MIN_TRAINING_EXTENT = 16
"""Smallest height and width (pixels) of a training image: the default shift alone is 16 px."""
"""Label of pixels without annotation (outside the image); the loss skips them."""


# --------------------------------------------------------------------------
# Arrays: layout, labels, normalisation (pure functions).
# --------------------------------------------------------------------------


def channels_first(image: np.ndarray, dims: int = 2, channels_last: bool = False) -> np.ndarray:
    """Return ``image`` as ``(C, *S)`` with ``len(S) == dims``.

    Parameters
    ----------
    image : ndarray
        ``dims`` spatial axes, optionally one channel axis.
    dims : {2, 3}
        Spatial axes.
    channels_last : bool
        Whether an extra axis is last (PNG) rather than first (TIFF). A TIFF-like
        array whose last axis has 3 or 4 entries and whose first has more is
        taken as channels last too (RGB TIFF).

    Raises
    ------
    ValueError
        When the array has neither ``dims`` nor ``dims + 1`` axes.
    """
    if image.ndim == dims:
        return image[np.newaxis]
    if image.ndim != dims + 1:
        raise ValueError(
            f"image has shape {image.shape}; expected {dims} spatial axes "
            f"and optionally one channel axis"
        )
    rgb_last = image.shape[-1] in (3, 4) and image.shape[0] > image.shape[-1]
    if channels_last or rgb_last:
        return np.moveaxis(image, -1, 0)
    return image


def fit_channels(image, dims: int, channels: int):
    """``image`` as ``(channels, *S)``: gray stored as RGB becomes one channel, gray feeds RGB.

    Parameters
    ----------
    image : array-like, ``S`` or ``(C, *S)`` (channels first)
    dims : {2, 3}
        Spatial axes.
    channels : int
        Channels the model expects.

    Raises
    ------
    ValueError
        When the image has other channels that cannot be read as the expected
        ones (colour into a gray model, 2 channels into 3...).
    """
    if image.ndim == dims:
        image = image[np.newaxis]
    have = image.shape[0]
    if have == channels:
        return image
    if channels == 1 and have in (3, 4):
        first = np.asarray(image[0])
        if all(np.array_equal(first, np.asarray(image[c])) for c in range(1, 3)):
            return image[:1]  # gray stored as RGB(A): every colour channel the same
    if have == 1 and channels == 3:
        # A gray image into a colour model: R = G = B, as a gray picture is in colour.
        return np.broadcast_to(image, (channels, *image.shape[1:]))
    raise ValueError(
        f"has {have} channel(s); the model expects {channels} "
        f"({'gray' if channels == 1 else 'colour or multi-channel'} images)"
    )


def describe_values(values: np.ndarray) -> str:
    """The distinct values of a label image in a few words: ``3 value(s) (0, 1, 255)``."""
    values = np.asarray(values)
    if values.size <= 4:
        return f"{values.size} value(s) ({', '.join(str(v) for v in values.tolist())})"
    return f"{values.size} values ({values[0]}..{values[-1]})"


def label_mode_hint(label: np.ndarray, values: np.ndarray, cell_value) -> str:
    """What a membrane map that is not one looks like, as advice (``; use ...``)."""
    if values.size == 2:
        return f"; no pixel has --cell-value {cell_value}: give --cell-value {values[-1]}"
    if values.size > 2 and soft_edge_mask(label, values[-1]) is not None:
        return (
            f"; it looks like a binary mask with soft edges: give --cell-value {values[-1]} "
            "(it is then binarised at the midpoint)"
        )
    if values.size > 2 and values[0] == 0 and label.dtype.kind in "ui":
        return "; it looks like instance labels (0 = background): use --label-mode instances"
    return "; check --cell-value and --label-mode"


#: Shares of a membrane map with soft (anti-aliased) edges: at least this share of
#: the annotated pixels holds one of the two extreme values...
SOFT_EDGE_EXTREMES = 0.95
#: ...and at least this share of the pixels in between lies on an edge, within
#: 2 px of both extremes (the ids of an instance label fill whole regions), with
#: more than one value in between (one value along the edges is a border class).
SOFT_EDGE_ON_EDGE = 0.9


def soft_edge_mask(
    label: np.ndarray, cell_value, ignore_value=None
) -> tuple[np.ndarray, float, float] | None:
    """A binary mask saved with soft (anti-aliased) edges, binarised at the midpoint.

    Binary masks drawn or resized with anti-aliasing (some copies of MoNuSeg's
    Binary_masks, several EM sets) hold values 0..255, almost all 0 or 255, the
    others along the edges between the two. When ``label`` (uint8/uint16) looks so and
    ``cell_value`` is one of its two extreme values, every pixel takes the
    extreme it is nearer to (ties: the higher); ignored pixels are kept.

    Returns
    -------
    (binary, share, midpoint) or None
        The binarised label, the share of annotated pixels that were in
        between and the midpoint; None when ``label`` is no such mask.
    """
    from scipy import ndimage

    if label.dtype not in (np.uint8, np.uint16) or label.size == 0:
        return None
    annotated = label != ignore_value if ignore_value is not None else np.ones(label.shape, bool)
    values = label[annotated]
    if values.size == 0:
        return None
    low, high = int(values.min()), int(values.max())
    if cell_value not in (low, high) or high - low < 2:
        return None
    extreme_low, extreme_high = label == low, label == high
    between = annotated & ~extreme_low & ~extreme_high
    count = int(between.sum())
    if count == 0 or values.size - count < SOFT_EDGE_EXTREMES * values.size:
        return None
    if np.unique(label[between]).size < 2:
        return None
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    near_low = ndimage.binary_dilation(extreme_low, structure, iterations=2)
    near_high = ndimage.binary_dilation(extreme_high, structure, iterations=2)
    on_edge = int((between & near_low & near_high).sum())
    if on_edge < SOFT_EDGE_ON_EDGE * count:
        return None
    midpoint = (low + high) / 2
    binary = np.where(label.astype(np.float64) >= midpoint, high, low).astype(label.dtype)
    binary[~annotated] = label[~annotated]
    return binary, count / values.size, midpoint


def labels_to_classes(
    label: np.ndarray,
    mode: str,
    num_classes: int = 2,
    cell_value: int = 255,
    ignore_value: int | None = None,
    target: str = "two-class",
) -> tuple[np.ndarray, np.ndarray]:
    """Class of every pixel and the cells as instance ids, from a label image.

    Parameters
    ----------
    label : ndarray of int
        The label image, spatial axes only.
    mode : {"membrane", "instances", "classes"}
        How to read it (module docstring).
    num_classes : int
        Classes of the network; ``"classes"`` values must lie in ``[0, num_classes)``.
    cell_value : int
        Value of the cells in a ``"membrane"`` map.
    ignore_value : int or None
        Label value of pixels without annotation (sparse labels): their class
        is :data:`IGNORE` and they are no cell (instance 0); the other pixels
        are read as ``mode`` says, as if the ignored ones were absent.
    target : {"two-class", "three-class"}
        For ``"instances"``: the pixels along a contact between two cells are
        background (the paper) or class 2, border.

    Returns
    -------
    classes : ndarray of int64
        Class id per pixel, :data:`IGNORE` where the label is ``ignore_value``.
    instances : ndarray of int32
        0 = background (and unannotated), one id per cell (for the weight
        map's border term).

    Raises
    ------
    ValueError
        Naming the first value outside the declared classes.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target != "two-class" and mode != "instances":
        raise ValueError(f"target {target!r} needs instance labels (label mode 'instances')")
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise ValueError("label holds NaN or infinite values")
        if np.any(label != np.round(label)):
            raise ValueError("label holds non-integer values; labels are integer ids")
    if label.dtype.kind not in "uifb":
        raise ValueError(f"label has dtype {label.dtype}; expected integers")
    if ignore_value is None:
        return _annotated_classes(label, mode, num_classes, cell_value, target)
    if mode == "membrane" and ignore_value == cell_value:
        raise ValueError(f"ignore value {ignore_value} equals the cell value; choose another")
    unknown = label == ignore_value
    # Unknown pixels take a value that cannot form cells or borders (the
    # membrane value, background 0), then leave the classes and the cells.
    filler = 0 if mode != "membrane" else _membrane_value(label[~unknown], cell_value)
    classes, instances = _annotated_classes(
        np.where(unknown, filler, label), mode, num_classes, cell_value, target
    )
    classes[unknown] = IGNORE
    if mode != "instances":
        instances = _cells_through_unknown(classes, unknown)
    instances[unknown] = 0
    return classes, instances


def _membrane_value(annotated: np.ndarray, cell_value: int):
    """The membrane value of a membrane map (0 when no membrane pixel is annotated)."""
    others = np.unique(annotated[annotated != cell_value])
    return others[0] if others.size else 0


def _cells_through_unknown(classes: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """Cells as connected regions of one non-zero class, joined also through unknown pixels.

    An unknown pixel may be cell or background, so two annotated pieces of
    one class that meet only across unknown pixels may be one cell: they are
    kept as one, rather than inventing a border between them that the weight
    map would then stress (README, Sparse annotations).
    """
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(classes.ndim, 1)
    instances = np.zeros(classes.shape, dtype=np.int32)
    count = 0
    for value in np.unique(classes[classes > 0]):
        member = classes == value
        components, found = ndimage.label(member | unknown, structure=structure)
        # Only components that hold annotated pixels of this class are cells.
        ids, compact = np.unique(components[member], return_inverse=True)
        instances[member] = compact.reshape(-1) + 1 + count
        count += ids.size
    return instances


def _annotated_classes(label, mode, num_classes, cell_value, target="two-class"):
    from skimage.measure import label as connected_components

    values = np.unique(label)
    if mode == "membrane":
        others = values[values != cell_value]
        if len(others) > 1:
            raise ValueError(
                f"label values {others[:4].tolist()} outside a binary membrane map "
                f"(cell value {cell_value}, one membrane value); found {describe_values(values)}"
                f"{label_mode_hint(label, values, cell_value)} (unannotated pixels: "
                "--ignore-value)"
            )
        from .weights import instances_from_membrane_map

        cells = label == cell_value
        instances = instances_from_membrane_map(cells.astype(np.uint8), cell_value=1)
        return cells.astype(np.int64), np.asarray(instances, dtype=np.int32)
    if values.size and values[0] < 0:
        raise ValueError(f"label value {values[0]} is negative; ids start at 0")
    if mode == "instances":
        expected = 3 if target == "three-class" else 2
        if num_classes != expected:
            raise ValueError(
                f"instance labels give {expected} classes ({target}), got num_classes={num_classes}"
            )
        from .weights import touching_borders

        if values.size == 2 and values[0] == 0:
            count = connected_components(label > 0, connectivity=1).max()
            if count > 1:
                raise ValueError(
                    f"holds one id ({values[1]}) for {count} separate regions: it looks like a "
                    f"binary map, not instance labels; use --label-mode membrane "
                    f"--cell-value {values[1]}"
                )

        # Where two cells touch, a background line separates them, as in the
        # paper's annotations: the network can only learn gaps it is shown.
        borders = touching_borders(label)
        instances = np.where(borders, 0, label).astype(np.int32)
        classes = (instances > 0).astype(np.int64)
        if target == "three-class":
            classes[borders] = 2
        return classes, instances
    if values.size and values[-1] >= num_classes:
        raise ValueError(
            f"label value {values[-1]} outside the classes 0..{num_classes - 1}; "
            f"raise --num-classes or check --label-mode"
        )
    classes = label.astype(np.int64)
    instances = connected_components(classes, background=0, connectivity=1)
    return classes, instances.astype(np.int32)


# --------------------------------------------------------------------------
# Labelled images read from two folders.
# --------------------------------------------------------------------------


@dataclass
class LabeledImage:
    """One training image with its annotation and weight map.

    Attributes
    ----------
    name : str
        File stem shared by image and label.
    image : ndarray of float32, ``(C, *S)``
        As read (not normalised).
    classes : ndarray of int64, ``S``
        Class id per pixel.
    instances : ndarray of int32, ``S``
        0 = background, one id per cell.
    weights : ndarray of float32, ``S``
        The paper's weight map (class balance + border term).
    """

    name: str
    image: np.ndarray
    classes: np.ndarray
    instances: np.ndarray
    weights: np.ndarray


def weight_map_key(instances: np.ndarray, classes: np.ndarray, **parameters) -> str:
    """Hash of a weight map's inputs; the on-disk cache is keyed by it."""
    digest = hashlib.sha256()
    for array in (instances, classes):
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr(sorted(parameters.items())).encode())
    return digest.hexdigest()[:32]


def compute_weight_map(
    instances: np.ndarray,
    classes: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str = "balanced",
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """The paper's weight map, read from / written to ``cache_dir`` when given.

    The cache file is ``cache_dir/weights-<hash>.npy``, the hash taken over the
    instances, the classes and the parameters, so a re-run or a resumed run
    never recomputes a map and a changed label never reuses a stale one.
    """
    from .weights import weight_map

    path = None
    if cache_dir is not None:
        key = weight_map_key(instances, classes, w0=w0, sigma=sigma, class_weights=class_weights)
        path = Path(cache_dir) / f"weights-{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == instances.shape:
                    return cached.astype(np.float32, copy=False)
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed and overwritten
    balance = None if class_weights == "none" else class_weights
    unknown = classes == IGNORE
    weights = np.asarray(
        weight_map(
            instances,
            w0=w0,
            sigma=sigma,
            class_weights=balance,
            labels=classes,
            unknown=unknown if unknown.any() else None,
        ),
        dtype=np.float32,
    )
    if path is not None:
        with io.atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, weights, allow_pickle=False)
    return weights


def count_classes(label_values: Sequence[np.ndarray]) -> int:
    """Classes implied by ``"classes"`` label images: the largest value + 1 (at least 2)."""
    largest = max(int(values.max()) if values.size else 0 for values in label_values)
    return max(2, largest + 1)


def load_labeled_images(
    image_folder: str | os.PathLike,
    label_folder: str | os.PathLike,
    *,
    dims: int = 2,
    label_mode: str = "membrane",
    num_classes: int | None = None,
    cell_value: int = 255,
    target: str = "two-class",
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str = "balanced",
    cache_dir: str | os.PathLike | None = None,
    with_weights: bool = True,
    ignore_value: int | None = None,
    limit: int | None = None,
) -> tuple[list[LabeledImage], int]:
    """Read and check every image/label pair of two folders matched by file stem.

    Every check runs before any training and fails with a one-line
    :class:`unetile.io.InputError` naming the file: an empty folder, a label
    without an image (or the reverse), an unreadable file, NaN pixels, shapes
    that differ, channel counts that differ, a label value outside the
    declared classes.

    Parameters
    ----------
    image_folder, label_folder : path
        Folders of .tif/.tiff/.png files; pairs share the file stem.
    dims : {2, 3}
        Spatial axes of the images.
    label_mode : {"membrane", "instances", "classes"}
        How labels are read (module docstring).
    num_classes : int or None
        Classes of the network; None: 2 for membrane/instances, the largest
        class id + 1 for ``"classes"``.
    cell_value : int
        Cell value of a membrane map.
    target : {"two-class", "three-class"}
        Classes made from instance labels (:func:`labels_to_classes`).
    w0, sigma : float
        Weight map border term: amplitude and width (pixels).
    class_weights : {"balanced", "none"}
        Class balancing term of the weight map.
    cache_dir : path or None
        Folder of cached weight maps (``.npy``).
    with_weights : bool
        Compute weight maps (False for validation images).
    ignore_value : int or None
        Label value of unannotated pixels (:func:`labels_to_classes`).
    limit : int or None
        Read at most this many pairs, evenly spaced in file order (all are matched).

    Returns
    -------
    images : list of LabeledImage
    num_classes : int
    """
    pairs = io.match_by_stem(io.list_images(image_folder), io.list_images(label_folder))
    if limit is not None and len(pairs) > limit:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, limit).round().astype(int)]
    return _labeled_images(
        _image_entries(pairs, dims),
        io.InputError,
        label_mode=label_mode,
        num_classes=num_classes,
        cell_value=cell_value,
        target=target,
        w0=w0,
        sigma=sigma,
        class_weights=class_weights,
        cache_dir=cache_dir,
        with_weights=with_weights,
        ignore_value=ignore_value,
    )


def labeled_images_from_arrays(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    dims: int = 2,
    label_mode: str = "membrane",
    num_classes: int | None = None,
    cell_value: int = 255,
    target: str = "two-class",
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str = "balanced",
    cache_dir: str | os.PathLike | None = None,
    with_weights: bool = True,
    ignore_value: int | None = None,
) -> tuple[list[LabeledImage], int]:
    """:func:`load_labeled_images` for arrays in memory (synthetic data, the demo).

    ``images[i]`` is ``S`` or ``(C, *S)`` (channels first), ``labels[i]`` is
    ``S``; the same checks raise ValueError naming ``images[i]`` / ``labels[i]``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; give one label each")
    entries = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        image = channels_first(np.asarray(image), dims)
        entries.append(
            (f"{index:02d}", f"images[{index}]", f"labels[{index}]", image, np.asarray(label))
        )
    return _labeled_images(
        entries,
        ValueError,
        label_mode=label_mode,
        num_classes=num_classes,
        cell_value=cell_value,
        target=target,
        w0=w0,
        sigma=sigma,
        class_weights=class_weights,
        cache_dir=cache_dir,
        with_weights=with_weights,
        ignore_value=ignore_value,
    )


def _labeled_images(
    entries,
    error_type,
    *,
    label_mode,
    num_classes,
    cell_value,
    target,
    w0,
    sigma,
    class_weights,
    cache_dir,
    with_weights,
    ignore_value=None,
) -> tuple[list[LabeledImage], int]:
    """Check (name, image source, label source, image, label or None) entries and build them.

    A label of None is read from its source (a path) after the image checks,
    so that a bad image is reported before its label is opened.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if not entries:
        raise ValueError("no images given")
    checked = _checked_entries(_gray_widened_to_colour(entries), error_type)
    if num_classes is None:
        num_classes = _implied_num_classes(checked, label_mode, target, ignore_value, error_type)
    labelled = []
    # A loop, not a comprehension: the soft-edge warning's stacklevel counts the frames.
    for name, _, label_source, image, label in checked:
        classes, instances = _classes_and_instances(
            label_source,
            label,
            label_mode,
            num_classes,
            cell_value,
            ignore_value,
            target,
            error_type,
        )
        labelled.append((name, image, classes, instances))
    if ignore_value is not None:
        _check_classes_left(labelled, ignore_value, checked[0][2], error_type)
    weights = dict(w0=w0, sigma=sigma, class_weights=class_weights, cache_dir=cache_dir)
    return [_labeled_image(*entry, with_weights, **weights) for entry in labelled], num_classes


def _gray_widened_to_colour(entries: list[tuple]) -> list[tuple]:
    """Gray images among colour ones get three equal channels (R = G = B)."""
    if {entry[3].shape[0] for entry in entries} == {1, 3}:
        # Gray stored as RGB is read as gray, so a colour set can hold both.
        entries = [
            (*entry[:3], fit_channels(entry[3], entry[3].ndim - 1, 3), *entry[4:])
            for entry in entries
        ]
    return entries


def _checked_entries(entries: list[tuple], error_type) -> list[tuple]:
    """The entries with their labels read, each image checked before its label is opened."""
    checked = []
    for name, image_source, label_source, image, label in entries:
        image_name = getattr(image_source, "name", image_source)
        if image.dtype.kind not in "uifb":
            raise error_type(f"{image_source}: pixel type {image.dtype} is not numeric")
        if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
            raise error_type(f"{image_source}: holds NaN or infinite pixels; fix or drop it")
        if label is None:
            label = io.read_labels(label_source)
        if label.shape != image.shape[1:]:
            raise error_type(
                f"{label_source}: shape {label.shape} differs from image "
                f"{image_name} {image.shape[1:]} (spatial axes)"
            )
        if checked and image.shape[0] != checked[0][3].shape[0]:
            first = checked[0][1]
            raise error_type(
                f"{image_source}: {image.shape[0]} channels, but "
                f"{getattr(first, 'name', first)} has {checked[0][3].shape[0]}; "
                f"every image needs the same channels"
            )
        checked.append((name, image_source, label_source, image, label))
    return checked


def _implied_num_classes(checked, label_mode, target, ignore_value, error_type) -> int:
    """Classes of the network when none are given: the label mode's, or the label values'."""
    if label_mode != "classes":
        return 3 if target == "three-class" else 2
    uniques = [np.unique(entry[4][entry[4] != ignore_value]) for entry in checked]
    num_classes = count_classes(uniques)
    used = np.unique(np.concatenate(uniques))
    if num_classes > 2 and used.size <= num_classes // 2:
        # {0, 255} would silently make a 256-class network.
        raise error_type(
            f"{checked[0][2]}: the labels use {describe_values(used)} of the "
            f"{num_classes} class ids their largest value implies; for a binary map "
            f"use --label-mode membrane --cell-value {used[-1]}, or give --num-classes "
            f"{num_classes} if you mean it"
        )
    return num_classes


def _classes_and_instances(
    label_source, label, label_mode, num_classes, cell_value, ignore_value, target, error_type
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`labels_to_classes` of one label, binarising a soft-edged mask first (warned)."""
    soft = soft_edge_mask(label, cell_value, ignore_value) if label_mode == "membrane" else None
    if soft is not None:
        label, share, midpoint = soft
        warnings.warn(
            f"{label_source}: a binary mask with soft edges ({share:.2%} of pixels between "
            f"its two values); binarised at the midpoint {midpoint:g}; save it with two "
            "values only to avoid this",
            stacklevel=3,  # the line in load_labeled_images / labeled_images_from_arrays
        )
    try:
        return labels_to_classes(label, label_mode, num_classes, cell_value, ignore_value, target)
    except ValueError as error:
        raise error_type(f"{label_source}: {error}") from None


def _labeled_image(
    name, image, classes, instances, with_weights, *, w0, sigma, class_weights, cache_dir
) -> LabeledImage:
    weights = (
        compute_weight_map(instances, classes, w0, sigma, class_weights, cache_dir)
        if with_weights
        else np.ones(classes.shape, np.float32)
    )
    return LabeledImage(
        name=name,
        image=image.astype(np.float32),
        classes=classes,
        instances=instances,
        weights=weights,
    )


def _image_entries(pairs, dims: int) -> list[tuple]:
    """An entry of :func:`_labeled_images` per (image path, label path): labels are read later."""
    entries = []
    for image_path, label_path in pairs:
        image = io.read_image(image_path)
        try:
            image = channels_first(image, dims, channels_last=image_path.suffix.lower() == ".png")
        except ValueError as error:
            raise io.InputError(f"{image_path}: {error}") from None
        entries.append((io.image_stem(image_path), image_path, label_path, image, None))
    return entries


def too_small(where, name: str, plane: Sequence[int]) -> str | None:
    """The message refusing an image whose plane is below :data:`MIN_TRAINING_EXTENT`
    (None: large enough)."""
    if min(plane) >= MIN_TRAINING_EXTENT:
        return None
    return (
        f"{where}/{name}: {plane[0]} x {plane[1]} px is too small to train on: height and "
        f"width need at least {MIN_TRAINING_EXTENT} px (its few labelled pixels would mostly "
        "fall outside the training tiles)"
    )


def check_training_extents(image_folder, label_folder) -> None:
    """InputError (as training gives it) for the first label image too small to train on;
    only shapes are compared, before any planning."""
    pairs = io.match_by_stem(io.list_images(image_folder), io.list_images(label_folder))
    for image_path, label_path in pairs:
        message = too_small(image_folder, io.image_stem(image_path), _plane(label_path))
        if message is not None:
            raise io.InputError(message)


def _plane(path: Path) -> tuple[int, int]:
    """Height and width of a label image, from its header where possible."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as picture:
                return picture.size[1], picture.size[0]
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            if "Y" in series.axes and "X" in series.axes:
                return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
    except Exception:  # noqa: BLE001 - unreadable here: read_labels names what is wrong
        pass
    return tuple(io.read_labels(path).shape[-2:])


def _check_classes_left(labelled, ignore_value, first_label, error_type) -> None:
    """Refuse an ``ignore_value`` that leaves fewer than two classes to learn."""
    present = set()
    for _, _, classes, _ in labelled:
        present.update(np.unique(classes[classes != IGNORE]).tolist())
    if len(present) >= 2:
        return
    folder = getattr(first_label, "parent", "labels")
    if not present:
        raise error_type(
            f"{folder}: every label pixel is the --ignore-value {ignore_value:g}; nothing to "
            "learn (no model written): give the value of the unannotated pixels only"
        )
    raise error_type(
        f"{folder}: --ignore-value {ignore_value:g} leaves only class {present.pop()} "
        "(every pixel of the other classes is ignored); no class left to learn it from: "
        "give the value of the unannotated pixels only"
    )


# --------------------------------------------------------------------------
# Tile geometry and sampling.
# --------------------------------------------------------------------------


def augmentation_slack(params, input_shape: Sequence[int]) -> int:
    """Extra pixels per side to read around an input tile before augmenting it.

    The tile is augmented as a larger window and cropped back, so rotation,
    shift and elastic displacement pull in real (mirrored) image content, never
    empty corners. A rotation by up to 45 degrees needs ``(sqrt(2) - 1) / 2``
    of the tile per side; elastic displacements need about 3 standard
    deviations; shifts their full range.
    """
    from .augment import AugmentParams

    if params is None or params == AugmentParams.none():
        return 0
    extent = max(input_shape)
    slack = 0.0
    if params.rotation:
        # Any angle: the worst case is 45 degrees, the tile's diagonal.
        slack += extent * (math.sqrt(2.0) - 1.0) / 2.0
    if params.elastic:
        slack += 3.0 * params.elastic_sigma
    slack += params.shift
    return int(math.ceil(slack)) + 1


#: Share of a GPU's free memory the training images may take to be stored there.
GPU_STORAGE_FRACTION = 0.25


def _storage_device(device: torch.device, images: Sequence[LabeledImage]) -> torch.device:
    """The sampling device when the training set fits in a quarter of its free memory.

    Images (float32, 4 bytes per channel), classes (int64) and weights
    (float32) take 4 C + 12 bytes per pixel; a set too large for the GPU stays
    in host memory and only the tiles are sent. Memory torch holds cached
    counts as free, so the choice does not depend on what ran before.
    """
    if device.type != "cuda":
        return torch.device("cpu")
    needed = sum(item.image.size * 4 + item.classes.size * 12 for item in images)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if needed <= GPU_STORAGE_FRACTION * free else torch.device("cpu")


class TileSampler:
    """Random training tiles over a list of labelled images.

    Each step draws, for every tile of the batch, an image with probability
    proportional to its pixel count and a centre pixel uniformly within it, so
    that every pixel of the training set is a tile centre equally often. The
    input window is read with mirrored indices around the image border;
    labels and weights outside the image are :data:`IGNORE` and 0.

    Parameters
    ----------
    images : list of LabeledImage
    input_shape, output_shape : tuple of int
        Network tile geometry (pixels); for a valid network their difference
        is twice the context margin.
    normalization : Normalization, dict or None
        Applied once to the stored images.
    augment_params : AugmentParams or None
        None or ``AugmentParams.none()`` skips augmentation.
    rng : numpy.random.Generator
        The only randomness of the sampler; its state is the sampler state.
    device : torch.device or str or None
        Where tiles are augmented and returned (None: the CPU). On a GPU the
        augmentation runs there, so it does not hold back the training step.

    Attributes
    ----------
    storage : torch.device
        Where the (normalised) images, classes and weights are kept, as torch
        tensors in :attr:`images`, :attr:`classes`, :attr:`weights`: ``device``
        when it is a GPU with room for them (a quarter of its free memory),
        else the CPU.
    """

    def __init__(
        self,
        images: Sequence[LabeledImage],
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        normalization: Normalization | dict | None,
        augment_params,
        rng: np.random.Generator,
        device: torch.device | str | None = None,
    ):
        if not images:
            raise ValueError("images is empty; give at least one labelled image")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = tuple(int(s) for s in output_shape)
        if len(self.input_shape) != len(self.output_shape):
            raise ValueError("input_shape and output_shape need the same number of axes")
        differences = {i - o for i, o in zip(self.input_shape, self.output_shape, strict=True)}
        if len(differences) != 1 or min(differences) < 0 or min(differences) % 2:
            raise ValueError(
                f"input {self.input_shape} and output {self.output_shape} tiles must differ "
                f"by the same even context on every axis"
            )
        self.margin = differences.pop() // 2
        from .augment import AugmentParams

        self.augment_params = augment_params
        self.augment = augment_params is not None and augment_params != AugmentParams.none()
        self.slack = augmentation_slack(augment_params, self.input_shape) if self.augment else 0
        self.rng = rng
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.window_shape = tuple(s + 2 * self.slack for s in self.input_shape)
        self.spatial_shapes = [item.classes.shape for item in images]
        # Kept where the tiles are read: on a GPU the window gathers run there
        # and no tile crosses the bus.
        self.storage = _storage_device(self.device, images)
        normalization = Normalization.of(normalization) or Normalization.identity()
        self.images = [self._stored(normalization.apply(item.image)) for item in images]
        self.classes = [self._stored(item.classes) for item in images]
        self.weights = [self._stored(item.weights) for item in images]
        sizes = np.array([math.prod(shape) for shape in self.spatial_shapes], dtype=np.float64)
        self.image_probabilities = sizes / sizes.sum()

    def window_origin(self, centre: Sequence[int]) -> tuple[int, ...]:
        """Image coordinates of the first window pixel for an output tile centred on ``centre``."""
        return tuple(
            c - o // 2 - self.margin - self.slack
            for c, o in zip(centre, self.output_shape, strict=True)
        )

    def _stored(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.storage)

    def read_window(
        self, index: int, centre: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image, labels and weights of the window around ``centre`` of image ``index``.

        Outside the image, the image is mirrored (:meth:`unetile.network.tiling.Window.read`,
        as in prediction), labels are :data:`IGNORE` and weights 0. No padded copy
        of any image is kept, and no step copies more than the window. Tensors
        on the device the images are stored on (:attr:`storage`); a window
        inside the image is a view.
        """
        origin = self.window_origin(centre)
        stop = [start + size for start, size in zip(origin, self.window_shape, strict=True)]
        window = Window(origin, stop, self.spatial_shapes[index])
        image = window.read(self.images[index])
        classes = window.read(self.classes[index])
        weights = window.read(self.weights[index])
        if window.within_image:
            return image, classes, weights
        inside = window.inside(self.storage)
        return image, torch.where(inside, classes, IGNORE), torch.where(inside, weights, 0.0)

    def draw_positions(self, batch_size: int) -> list[tuple[int, tuple[int, ...]]]:
        """``batch_size`` pairs (image index, centre pixel) drawn from the rng."""
        indices = self.rng.choice(
            len(self.spatial_shapes), size=batch_size, p=self.image_probabilities
        )
        positions = []
        for index in indices:
            shape = self.spatial_shapes[index]
            centre = tuple(int(self.rng.integers(0, extent)) for extent in shape)
            positions.append((int(index), centre))
        return positions

    def sample(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch of ``batch_size`` random training tiles (see :meth:`tiles_at`)."""
        return self.tiles_at(self.draw_positions(batch_size))

    def tiles_at(
        self, positions: Sequence[tuple[int, Sequence[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training tiles whose output is centred on the given pixels, augmented.

        Parameters
        ----------
        positions : sequence of (image index, centre pixel)

        Returns
        -------
        images : float32 tensor ``(N, C, *input_shape)``
        labels : int64 tensor ``(N, *output_shape)``, :data:`IGNORE` outside the image
        weights : float32 tensor ``(N, *output_shape)``, 0 outside the image
        """
        images, labels, weights = [], [], []
        for index, centre in positions:
            image, label, weight = self.read_window(index, centre)
            images.append(image)
            labels.append(label)
            weights.append(weight)
        image_batch = torch.stack(images).to(self.device, non_blocking=True)
        label_batch = torch.stack(labels).to(self.device, non_blocking=True)
        weight_batch = torch.stack(weights).to(self.device, non_blocking=True)
        if self.augment:
            from .augment import augment_batch

            image_batch, label_batch, weight_batch = augment_batch(
                image_batch,
                label_batch,
                weight_batch,
                self.rng,
                self.augment_params,
                output_shape=self.input_shape,
            )
        crop = (slice(None),) + tuple(
            slice(self.margin, self.margin + o) for o in self.output_shape
        )
        return (
            image_batch.contiguous(),
            label_batch[crop].contiguous(),
            weight_batch[crop].contiguous(),
        )

    def plain_tiles(self, limit: int | None = None) -> Iterator[torch.Tensor]:
        """Input tiles ``(1, C, *input_shape)`` over the grid of every image, not augmented.

        What prediction would read: the output tiles cover each image, the
        window around each is mirrored at the border. With ``limit``, that
        many tiles spread evenly over the whole list (never random: the rng
        is the sampler's state). Used to estimate batch-norm statistics.
        """
        windows = [
            (index, Window(origin, stop, shape))
            for index, shape in enumerate(self.spatial_shapes)
            for origin, stop in (
                (
                    tuple(o - self.margin for o in start),
                    tuple(
                        o - self.margin + i for o, i in zip(start, self.input_shape, strict=True)
                    ),
                )
                for start in tile_grid(shape, self.output_shape)
            )
        ]
        if limit is not None and len(windows) > limit:
            keep = np.linspace(0, len(windows) - 1, limit).round().astype(int)
            windows = [windows[i] for i in keep]
        for index, window in windows:
            yield window.read(self.images[index])[None].to(self.device).contiguous()

    def state(self) -> dict:
        """JSON-able sampler state (the rng's bit generator state)."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`state`."""
        self.rng.bit_generator.state = state
