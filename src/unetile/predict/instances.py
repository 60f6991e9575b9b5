"""Instance extraction: one id per cell from the network's class probabilities.

The paper separates touching cells by the background gaps its weight map
teaches the network; its instances are the connected components of the
foreground class (``method="components"``). Where a predicted gap is
incomplete, two cells fuse into one component. The other methods split each
connected component of the foreground with a seeded watershed
(``skimage.segmentation.watershed``, flooding limited to the component):

- ``"watershed"``: seeds are the high-confidence cores, the connected pieces
  where the seed class's probability is at least ``seed_threshold``
  (the interior class of a three-class network, else the foreground); the
  flood follows the falling probability.
- ``"distance"``: seeds are the h-maxima (height ``h`` px) of the distance
  to the background, the usual rule for round cells; the flood follows the
  falling distance.

A component without a seed stays one object. Before the split, a
morphological ``opening`` (a disk of that radius) can remove specks and
ragged edges and cut thin bridges; each piece it leaves is split on its own.
Each object's background holes are then filled (``fill_holes``) and objects
under ``min_size`` pixels are removed. The opening of the whole foreground is
the union of its components' openings (a disk that fits the foreground fits
inside one component), so doing it component by component changes nothing.

Every connected component of the foreground is processed on its own, in its
bounding box widened by one pixel, so an object depends only on its own
component. That makes region-by-region processing exact
(:func:`region_instances`): a region read with a margin of ``max_extent``
pixels holds every component that reaches into it whole, as long as no
component is wider than the margin, which is checked (ValueError naming
``max_extent``). Objects are numbered 1, 2, ... in raster order of their
first pixel, the same order whichever regions computed them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from scipy import ndimage

from ..network.tiling import widened_box
from ..numbers import flag, real_option, whole_option

METHODS = ("components", "watershed", "distance")
#: Largest extent (px per axis) of a connected component of the foreground that
#: region-by-region extraction accepts by default, for 2D and 3D images; the
#: regions are read with this margin (a 3D window grows with its cube).
DEFAULT_MAX_EXTENT = {2: 512, 3: 64}


@dataclass(frozen=True)
class InstanceOptions:
    """How instances are extracted; serialises to ``config.json`` ``"instances"``.

    Attributes
    ----------
    method : {"components", "watershed", "distance"}
        The paper's connected components, or a watershed seeded by
        probability cores or by distance maxima (module docstring).
    seed_threshold : float
        ``"watershed"``: seed-class probability of a core, in (0, 1].
    h : float
        ``"distance"``: height (px) a distance maximum must rise above its
        surroundings to seed an object.
    min_size : int
        Objects with fewer pixels are removed (0 keeps all).
    fill_holes : bool
        Fill the background holes enclosed by an object.
    foreground_classes : tuple of int
        Classes whose argmax makes the foreground (cells).
    seed_class : int or None
        Class whose probability gives cores and the flood's relief; None:
        the first foreground class.
    max_extent : int or None
        Largest component extent (px per axis) region-by-region extraction
        accepts (its margin); None: :data:`DEFAULT_MAX_EXTENT` of the image's
        dimensions.
    connectivity : int
        Neighbours that join foreground pixels into one component: 1 = faces
        only (4 in 2D, the paper's), up to the number of axes (8 in 2D), for
        masks whose objects link through corners (thin vessels, fibres).
    opening : int
        Radius (px) of the disk of a morphological opening of each component
        before it is split; 0: none.
    threshold : float or None
        Two-class networks: foreground where the foreground class's
        probability is above this, in (0, 1), as the labels are drawn with a
        calibrated threshold (:mod:`unetile.evaluate.calibration`, which training
        stores here too); None: the argmax, or in ``predict_to_files`` the
        labels' threshold.
    """

    method: str = field(
        default="components",
        metadata=flag(
            "'components' (the paper: connected components of the class map), 'watershed' "
            "(seeded by probability cores) or 'distance' (seeded by maxima of the distance to "
            "the background)",
            choices=METHODS,
        ),
    )
    seed_threshold: float = field(
        default=0.9,
        metadata=flag(
            "watershed: probability of the seed class that makes a core (0 < P <= 1)",
            metavar="P",
            kind=real_option(0, 1, open_minimum=True),
        ),
    )
    h: float = field(
        default=2.0,
        metadata=flag(
            "distance: height (px) a distance maximum must have to seed a cell",
            metavar="PX",
            kind=real_option(0, None, open_minimum=True),
        ),
    )
    min_size: int = field(
        default=0,
        metadata=flag(
            "remove cells of fewer pixels (0: keep all)", metavar="PX", kind=whole_option(0)
        ),
    )
    fill_holes: bool = field(
        default=False, metadata=flag("fill the background holes inside each cell", kind=bool)
    )
    foreground_classes: tuple[int, ...] = (1,)
    seed_class: int | None = None
    max_extent: int | None = field(
        default=None,
        metadata=flag(
            "largest extent of a group of touching cells that the tiled watershed accepts "
            "(its margin; default 512 in 2D, 64 in 3D); larger groups stop with an error",
            metavar="PX",
            kind=whole_option(1),
        ),
    )
    threshold: float | None = None
    opening: int = field(
        default=0,
        metadata=flag(
            "open each cell with a disk of radius PX before splitting: removes specks and "
            "ragged edges, cuts thin bridges (0: none)",
            metavar="PX",
            kind=whole_option(0, 1000),
        ),
    )
    connectivity: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.threshold is not None:
            from ..numbers import check_threshold

            object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if not 0 < self.seed_threshold <= 1:
            raise ValueError(f"seed_threshold must be in (0, 1], got {self.seed_threshold}")
        if not self.h > 0:
            raise ValueError(f"h must be > 0 px, got {self.h}")
        for name, lowest in (("min_size", 0), ("max_extent", 1), ("opening", 0)):
            value = getattr(self, name)
            if value is None and name == "max_extent":
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lowest:
                raise ValueError(
                    f"{name} must be a whole number of pixels >= {lowest}, got {value!r}"
                )
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {self.connectivity!r}")
        if not self.foreground_classes:
            raise ValueError("foreground_classes must name at least one class")

    @property
    def seed(self) -> int:
        """The class whose probability seeds and guides the watershed."""
        return self.foreground_classes[0] if self.seed_class is None else self.seed_class

    def extent(self, dims: int) -> int:
        """The margin (px) of region-by-region extraction for images of ``dims`` axes."""
        return DEFAULT_MAX_EXTENT.get(dims, 64) if self.max_extent is None else self.max_extent

    @property
    def needs_whole_objects(self) -> bool:
        """Whether an object depends on more than its own pixels (so regions need a margin)."""
        return (
            self.method != "components"
            or self.min_size > 0
            or self.fill_holes
            or self.opening > 0
            or self.connectivity != 1
        )

    def check_classes(self, num_classes: int) -> None:
        """ValueError when a class named here is not one of ``num_classes``."""
        for name, value in (("foreground class", c) for c in self.foreground_classes):
            if not 0 <= value < num_classes:
                raise ValueError(f"{name} {value} is not one of the {num_classes} classes")
        if not 0 <= self.seed < num_classes:
            raise ValueError(f"seed class {self.seed} is not one of the {num_classes} classes")
        if self.threshold is not None and (num_classes != 2 or len(self.foreground_classes) != 1):
            raise ValueError(
                f"a foreground threshold decides between two classes; this network has "
                f"{num_classes}: its instances come from the argmax"
            )

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        options = asdict(self)
        options["foreground_classes"] = list(self.foreground_classes)
        return options

    @classmethod
    def from_dict(cls, options: dict) -> InstanceOptions:
        """From :meth:`to_dict` output (or a subset); ValueError on unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown instance option {unknown[0]!r}")
        options = dict(options)
        if "foreground_classes" in options:
            options["foreground_classes"] = tuple(int(c) for c in options["foreground_classes"])
        return cls(**options)


@functools.cache
def _face_structure(ndim: int) -> np.ndarray:
    # Face connectivity: cells that only touch diagonally stay apart, so the
    # one-pixel gaps the weight map teaches the network separate cells.
    return ndimage.generate_binary_structure(ndim, 1)


def foreground_mask(probabilities: np.ndarray, options: InstanceOptions) -> np.ndarray:
    """Pixels whose most probable class is one of ``options.foreground_classes``; with
    ``options.threshold``, whose foreground probability is above it (two classes)."""
    probabilities = np.asarray(probabilities)
    if options.threshold is not None:
        options.check_classes(probabilities.shape[0])
        return probabilities[options.foreground_classes[0]] > options.threshold
    if probabilities.shape[0] == 2 and len(set(options.foreground_classes)) == 1:
        # argmax of two classes, ties to the first, without the K-axis pass.
        cell = options.foreground_classes[0]
        return (
            probabilities[cell] > probabilities[1 - cell]
            if cell
            else (probabilities[0] >= probabilities[1])
        )
    return np.isin(probabilities.argmax(axis=0), options.foreground_classes)


def _structure(ndim: int, options: InstanceOptions) -> np.ndarray:
    """Neighbours that join foreground pixels into one component."""
    return ndimage.generate_binary_structure(ndim, min(options.connectivity, ndim))


def count_objects(mask: np.ndarray) -> int:
    """Face-connected pieces of a binary mask."""
    return int(ndimage.label(mask, structure=_face_structure(mask.ndim))[1])


@functools.cache
def _disk(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius**2


def _component_objects(
    seed_probability: np.ndarray, component: np.ndarray, options: InstanceOptions
) -> np.ndarray:
    """Objects (1..n, 0 outside) of one connected component: opened, then each piece split."""
    if options.opening == 0:
        return _split_component(seed_probability, component, options)
    # The crop has a 1-px background border, so the erosion sees the component's own edge.
    opened = ndimage.binary_opening(component, _disk(options.opening, component.ndim))
    pieces, count = ndimage.label(opened, structure=_structure(component.ndim, options))
    objects = np.zeros(component.shape, dtype=np.int32)
    for piece in range(1, count + 1):
        member = pieces == piece
        split = _split_component(seed_probability, member, options)
        objects[member] = split[member] + objects.max()
    return objects


def _split_component(
    seed_probability: np.ndarray, component: np.ndarray, options: InstanceOptions
) -> np.ndarray:
    """Objects (1..n, 0 outside) of one connected component, in a crop around it."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    structure = _face_structure(component.ndim)
    if options.method == "components":
        return component.astype(np.int32)
    if options.method == "watershed":
        cores = component & (seed_probability >= options.seed_threshold)
        relief = -seed_probability
    else:
        distance = ndimage.distance_transform_edt(component)
        # Inside a component the distance is >= 1, so two maxima each rising
        # h above the pass between them need a value of at least 1 + h.
        if distance.max() < 1 + options.h:
            return component.astype(np.int32)
        cores = h_maxima(distance, options.h, footprint=structure).astype(bool) & component
        relief = -distance
    markers, count = ndimage.label(cores, structure=structure)
    if count <= 1:
        return component.astype(np.int32)
    return watershed(relief, markers, connectivity=1, mask=component).astype(np.int32)


def _finish_objects(
    objects: np.ndarray, foreground: np.ndarray, options: InstanceOptions
) -> np.ndarray:
    """Fill each object's background holes, then drop objects under ``min_size`` px."""
    if options.fill_holes:
        structure = _face_structure(objects.ndim)
        for index in range(1, int(objects.max()) + 1):
            own = objects == index
            # Holes: background pieces that do not reach the crop's border.
            pieces, count = ndimage.label(~own, structure=structure)
            if count <= 1:
                continue
            open_pieces = np.unique(_border_values(pieces))
            hole = np.ones(count + 1, dtype=bool)
            hole[open_pieces] = False
            hole[0] = False
            # A hole that holds any foreground (another cell) is left as it is.
            occupied = ndimage.maximum(foreground, pieces, np.arange(count + 1))
            hole &= ~np.asarray(occupied, dtype=bool)
            objects[hole[pieces]] = index
    if options.min_size > 0:
        sizes = np.bincount(objects.ravel())
        small = sizes < options.min_size
        small[0] = False
        objects[small[objects]] = 0
    return objects


def _border_values(array: np.ndarray) -> np.ndarray:
    """The values on the faces of an array."""
    return np.concatenate(
        [np.take(array, i, axis=a).ravel() for a in range(array.ndim) for i in (0, -1)]
    )


def _crop_around(box: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` widened by one pixel, clipped to ``shape``: holds the background around it."""
    return tuple(
        slice(max(b.start - 1, 0), min(b.stop + 1, s)) for b, s in zip(box, shape, strict=True)
    )


def region_instances(
    probabilities: np.ndarray,
    region: Sequence[slice],
    window: Sequence[slice],
    image_shape: Sequence[int],
    options: InstanceOptions,
) -> np.ndarray:
    """Object keys of ``region``, computed from the probabilities of a window around it.

    Every connected component of the foreground that reaches into ``region``
    must lie inside ``window`` (so that it is processed whole, as on the whole
    image): the window is the region widened by ``options.max_extent`` px
    (:func:`unetile.network.tiling.widened_box`), and a component that touches a
    window side inside the image raises ValueError.

    Parameters
    ----------
    probabilities : ndarray, ``(K, *window shape)``
        Class probabilities of ``window``.
    region, window : tuple of slice
        Image coordinates (pixels) of the region and of the window holding it.
    image_shape : sequence of int
        Spatial shape of the whole image.
    options : InstanceOptions

    Returns
    -------
    ndarray of uint64, region shape
        0 = background; each object's key is 1 + the raster index (in the
        whole image) of its first pixel, the same whichever region computed
        it. :func:`rank_keys` turns keys into ids 1..n.
    """
    probabilities = np.asarray(probabilities)
    window = tuple(window)
    foreground = foreground_mask(probabilities, options)
    seed_probability = probabilities[options.seed]
    components, count = ndimage.label(foreground, structure=_structure(foreground.ndim, options))
    inner = tuple(
        slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window, strict=True)
    )
    present = np.bincount(components[inner].ravel(), minlength=count + 1)
    reaching = np.flatnonzero(present[1:]) + 1
    _check_inside(components, reaching, window, image_shape, options.extent(len(image_shape)))
    keys = np.zeros(foreground.shape, dtype=np.uint64)
    boxes = ndimage.find_objects(components)
    strides = np.cumprod((1,) + tuple(image_shape[:0:-1]))[::-1].astype(np.uint64)
    for label in reaching.tolist():
        box = boxes[label - 1]
        if math.prod(b.stop - b.start for b in box) < options.min_size:
            continue  # even with its holes filled it would be too small
        thin = min(b.stop - b.start for b in box) <= 2
        if options.method != "watershed" and options.opening == 0 and thin:
            # A component at most 2 px thin has no hole and a distance of at
            # most 1 px: it is one object, as the general path would find.
            component = components[box] == label
            if np.count_nonzero(component) >= options.min_size:
                _write_keys(keys, component.astype(np.int32), box, window, strides)
            continue
        crop = _crop_around(box, foreground.shape)
        component = components[crop] == label
        objects = _component_objects(seed_probability[crop], component, options)
        objects = _finish_objects(objects, foreground[crop], options)
        _write_keys(keys, objects, crop, window, strides)
    return keys[inner]


def _write_keys(keys, objects, crop, window, strides) -> None:
    """Key each object of a crop by the whole-image raster index of its first pixel (+1)."""
    count = int(objects.max())
    if count == 0:
        return
    flat = objects.ravel()
    present, first = np.unique(flat, return_index=True)
    coordinates = np.unravel_index(first, objects.shape)
    offsets = [c.start + w.start for c, w in zip(crop, window, strict=True)]
    raster = sum(
        (coordinate + offset).astype(np.uint64) * stride
        for coordinate, offset, stride in zip(coordinates, offsets, strides, strict=True)
    )
    table = np.zeros(count + 1, dtype=np.uint64)
    table[present] = raster + np.uint64(1)
    table[0] = 0
    view = keys[crop]
    inside = objects > 0
    view[inside] = table[objects[inside]]


def _check_inside(components, reaching, window, image_shape, max_extent) -> None:
    """ValueError if a component reaching into the region touches a window side inside the image."""
    for axis, (side, size) in enumerate(zip(window, image_shape, strict=True)):
        for index, at_edge in ((0, side.start == 0), (-1, side.stop == size)):
            if at_edge:
                continue
            face = np.take(components, index, axis=axis)
            if np.isin(face, reaching).any():
                raise ValueError(
                    f"a connected group of cells is wider than max_extent = {max_extent} px, "
                    "the margin of region-by-region instance extraction; raise max_extent "
                    "(--max-extent) or predict the image whole"
                )


def rank_keys(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Ids 1..n (uint32) of object keys, by their rank among all the image's ``sorted_keys``."""
    keys = np.asarray(keys)
    ids = np.searchsorted(sorted_keys, keys).astype(np.uint32) + np.uint32(1)
    ids[keys == 0] = 0
    return ids


def region_grid(
    image_shape: Sequence[int], chunks: Sequence[int], extent: int
) -> list[tuple[slice, ...]]:
    """Regions of region-by-region extraction: whole chunks, each axis at least ``extent`` px.

    Regions no shorter than the margin keep the share of pixels read twice
    small; whole chunks keep every write chunk-aligned.
    """
    sizes = [
        min(size, chunk * max(1, -(-extent // chunk)))
        for size, chunk in zip(image_shape, chunks, strict=True)
    ]
    return [
        tuple(
            slice(i * step, min((i + 1) * step, size))
            for i, step, size in zip(index, sizes, image_shape, strict=True)
        )
        for index in np.ndindex(*(-(-s // t) for s, t in zip(image_shape, sizes, strict=True)))
    ]


def keys_by_region(probabilities, keys, regions, options: InstanceOptions) -> np.ndarray:
    """Write the object keys of every region into ``keys``; return all keys, sorted.

    Parameters
    ----------
    probabilities : array-like, ``(K, *spatial)``
        numpy or zarr; each region is read with a margin of ``max_extent + 1`` px.
    keys : array-like, spatial shape, uint64
        Destination (numpy or zarr).
    regions : iterable of tuple of slice
        Regions that tile the image (:func:`region_grid`).
    options : InstanceOptions

    Returns
    -------
    ndarray of uint64
        The image's distinct keys, sorted: :func:`rank_keys` numbers them.
    """
    found = [np.zeros(0, dtype=np.uint64)]
    for region in regions:
        found.append(write_region_keys(probabilities, keys, region, options))
    return np.unique(np.concatenate(found))


def write_region_keys(probabilities, keys, region, options: InstanceOptions) -> np.ndarray:
    """Write the object keys of one region into ``keys``; return its distinct keys, sorted.

    The region's probabilities are read with a margin of ``max_extent + 1`` px
    (the 1 px shows whether a component stops at the margin).
    """
    from ..network.tiling import widened_box

    spatial = tuple(probabilities.shape[1:])
    window = widened_box(region, options.extent(len(spatial)) + 1, spatial)
    block = np.asarray(probabilities[(slice(None), *window)])
    region_keys = region_instances(block, region, window, spatial, options)
    keys[region] = region_keys
    return np.unique(region_keys[region_keys > 0])


def extract_instances(probabilities: np.ndarray, options: InstanceOptions | None = None, **kwargs):
    """Instance labels of a whole image (uint32, 0 = background, 1..n in raster order).

    Parameters
    ----------
    probabilities : ndarray, ``(K, *spatial)``
        Class probabilities (as :func:`unetile.predict.predict` returns).
    options : InstanceOptions, optional
        How to extract; keyword arguments build one (or override its fields).

    Returns
    -------
    ndarray of uint32
        The same labels as any region-by-region extraction of the image.

    Examples
    --------
    >>> p = np.zeros((2, 1, 7), np.float32); p[1, 0, [0, 1, 3, 5, 6]] = 1; p[0] = 1 - p[1]
    >>> extract_instances(p).tolist()
    [[1, 1, 0, 2, 0, 3, 3]]
    """
    probabilities = np.asarray(probabilities)
    options = _options(options, kwargs)
    options.check_classes(probabilities.shape[0])
    if not options.needs_whole_objects:
        # The paper's components: ndimage numbers them in raster order too.
        labels, _ = ndimage.label(
            foreground_mask(probabilities, options),
            structure=_face_structure(probabilities.ndim - 1),
        )
        return labels.astype(np.uint32)
    spatial = probabilities.shape[1:]
    whole = tuple(slice(0, s) for s in spatial)
    keys = region_instances(probabilities, whole, whole, spatial, options)
    return rank_keys(keys, np.unique(keys[keys > 0]))


def _options(options: InstanceOptions | None, overrides: dict) -> InstanceOptions:
    if options is None:
        return InstanceOptions.from_dict(overrides)
    if overrides:
        return InstanceOptions.from_dict({**options.to_dict(), **overrides})
    return options


def check_grow(grow) -> int:
    if isinstance(grow, bool) or not isinstance(grow, int | np.integer) or grow < 0:
        raise ValueError(f"grow must be a whole number of pixels >= 0, got {grow!r}")
    return int(grow)


def grow_cells(instances: np.ndarray, grow: int) -> np.ndarray:
    """Grow each cell by up to ``grow`` pixels into the background, never into another cell.

    Each background pixel within ``grow`` px (Euclidean) of a cell joins the
    nearest one (``skimage.segmentation.expand_labels``). On EM membrane maps
    this gives cells that meet at the membranes, as a full segmentation does;
    the network's gaps still decide which cells are apart.
    """
    grow = check_grow(grow)
    if grow == 0:
        return instances
    from skimage.segmentation import expand_labels

    return expand_labels(instances, grow)


def instances_from_probabilities(
    probabilities: np.ndarray,
    foreground_class: int = 1,
    grow: int = 0,
    options: InstanceOptions | None = None,
    **kwargs,
) -> np.ndarray:
    """Instance labels (uint32, 0 = background), cells grown by ``grow`` px (:func:`grow_cells`).

    Without ``options`` (or keyword fields of :class:`InstanceOptions`) these
    are the paper's: the face-connected components (4-connected in 2D) of
    ``foreground_class``, separated by the background gaps the network
    predicts between touching cells (the paper's weight map trains exactly
    those). With them, :func:`extract_instances`.
    """
    probabilities = np.asarray(probabilities)
    grow = check_grow(grow)
    if options is None and "foreground_classes" not in kwargs:
        if not 0 <= foreground_class < probabilities.shape[0]:
            raise ValueError(
                f"foreground_class {foreground_class} is not one of the "
                f"{probabilities.shape[0]} classes"
            )
        kwargs["foreground_classes"] = (foreground_class,)
    return grow_cells(extract_instances(probabilities, options, **kwargs), grow)


#: The starting point of instance labels' post-processing, before
#: :func:`unetile.train.instance_fit.fit_from_labels` fits it to the training labels
#: (the classes and the cores' threshold stay; two-class models get the paper's
#: components, the size floor and holes from the labels). Chosen on the demo's
#: data; a model that reads no labels (class maps) keeps the paper's components.
MEASURED_DEFAULTS = {
    "two-class": dict(method="watershed", seed_threshold=0.9, min_size=16, fill_holes=True),
    "three-class": dict(method="watershed", seed_threshold=0.5, min_size=16, fill_holes=True),
}


def default_options(label_mode: str, target: str = "two-class", foreground: int = 1):
    """The :class:`InstanceOptions` training starts from for these labels (then fitted to
    them, :func:`unetile.train.instance_fit.fit_from_labels`)."""
    if target == "three-class":
        return InstanceOptions(
            foreground_classes=(foreground, 2), seed_class=foreground, **MEASURED_DEFAULTS[target]
        )
    if label_mode == "instances":
        return InstanceOptions(foreground_classes=(foreground,), **MEASURED_DEFAULTS[target])
    return InstanceOptions(foreground_classes=(foreground,))


def candidate_options(
    truths: Sequence[np.ndarray], base: InstanceOptions, methods: Sequence[str] = METHODS
) -> list[InstanceOptions]:
    """Options to try on validation images, scaled by the size of their true cells.

    ``h`` spans 0.1-0.45 of the median cell radius, ``min_size`` 0, 10 % and
    25 % of the median cell size; ``seed_threshold`` 0.5-0.9. The paper's
    components come first, so they win ties.
    """
    sizes = np.concatenate([np.bincount(np.asarray(t).ravel())[1:] for t in truths])
    sizes = sizes[sizes > 0]
    area = float(np.median(sizes)) if sizes.size else 1.0
    dims = np.asarray(truths[0]).ndim
    radius = (area / math.pi) ** 0.5 if dims == 2 else (3 * area / (4 * math.pi)) ** (1 / 3)
    min_sizes = sorted({0, int(0.1 * area), int(0.25 * area)})
    heights = sorted({max(1.0, round(f * radius)) for f in (0.1, 0.2, 0.3, 0.45)})
    common = dict(
        foreground_classes=base.foreground_classes,
        seed_class=base.seed_class,
        max_extent=base.max_extent,
        threshold=base.threshold,
    )
    grid = {
        "components": [InstanceOptions(min_size=m, fill_holes=m > 0, **common) for m in min_sizes],
        "watershed": [
            InstanceOptions(
                method="watershed", seed_threshold=t, min_size=m, fill_holes=True, **common
            )
            for t in (0.5, 0.7, 0.8, 0.9)
            for m in min_sizes
        ],
        "distance": [
            InstanceOptions(method="distance", h=h, min_size=m, fill_holes=True, **common)
            for h in heights
            for m in min_sizes
        ],
    }
    return [options for method in methods for options in grid[method]]


def tune_options(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    candidates: Sequence[InstanceOptions],
) -> tuple[InstanceOptions, dict]:
    """The candidate with the best mean F1 at IoU 0.5 (then SEG) over validation images.

    Parameters
    ----------
    probabilities : sequence of ndarray ``(K, *spatial)``
        The network's probabilities of each validation image.
    truths : sequence of ndarray
        Their true instance labels.
    candidates : sequence of InstanceOptions
        Options to try (:func:`candidate_options`); ties go to the first.

    Returns
    -------
    best : InstanceOptions
    scores : dict
        ``{"f1@0.5": ..., "seg": ...}`` of the best, means over the images.
    """
    from ..evaluate.metrics import match_objects, seg_score

    best, best_scores = None, None
    for options in candidates:
        f1, seg = [], []
        for probability, truth in zip(probabilities, truths, strict=True):
            instances = extract_instances(probability, options)
            f1.append(match_objects(instances, truth, (0.5,))[0].f1)
            seg.append(seg_score(instances, truth))
        scores = {"f1@0.5": float(np.mean(f1)), "seg": float(np.mean(seg))}
        if best is None or (scores["f1@0.5"], scores["seg"]) > (
            best_scores["f1@0.5"],
            best_scores["seg"],
        ):
            best, best_scores = options, scores
    return best, best_scores


# --------------------------------------------------------------------------
# Stitching the cells of tiles: provisional labels per tile, joined across borders.
# --------------------------------------------------------------------------


def label_foreground(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (face connectivity) of a foreground mask and their count."""
    # Face connectivity: cells that only touch diagonally stay apart, so the
    # one-pixel gaps the weight map teaches the network separate cells.
    labels, count = ndimage.label(
        foreground, structure=ndimage.generate_binary_structure(foreground.ndim, 1)
    )
    return labels.astype(np.uint32), int(count)


def merge_tile_labels(provisional, boundaries: Sequence[Sequence[int]], count: int) -> np.ndarray:
    """Lookup table joining labels of tile pieces that touch across tile borders.

    Parameters
    ----------
    provisional : array-like
        Labels numbered per tile (1..count, 0 = background), numpy or zarr.
    boundaries : sequence of sequence of int
        Per axis, the coordinates (pixels) where a tile's region starts; the
        pixels at ``b - 1`` and ``b`` are compared.
    count : int
        Number of provisional labels.

    Returns
    -------
    numpy.ndarray
        ``lut`` of length ``count + 1``, uint32: ``lut[provisional]`` has one
        consecutive id per connected cell and 0 for background.
    """
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for axis, coordinates in enumerate(boundaries):
        for boundary in coordinates:
            if not 0 < boundary < provisional.shape[axis]:
                continue
            index = [slice(None)] * provisional.ndim
            index[axis] = slice(boundary - 1, boundary + 1)
            slab = np.asarray(provisional[tuple(index)])
            before, after = np.take(slab, 0, axis=axis), np.take(slab, 1, axis=axis)
            touching = (before > 0) & (after > 0)
            pairs.append(np.stack([before[touching], after[touching]], axis=1).astype(np.int64))
    return join_labels(np.concatenate(pairs), count)


def join_labels(pairs: np.ndarray, count: int) -> np.ndarray:
    """Lookup table giving the labels ``1..count`` one consecutive id per joined group.

    Parameters
    ----------
    pairs : numpy.ndarray
        ``(N, 2)`` labels that belong to the same cell (pieces touching across
        a tile border).
    count : int
        Number of labels.

    Returns
    -------
    numpy.ndarray
        ``lut`` of length ``count + 1``, uint32; groups are numbered in the
        order of their smallest label, and ``lut[0] = 0`` (background).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    graph = coo_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
        shape=(count + 1, count + 1),
    )
    _, component = connected_components(graph, directed=False)
    # Background (label 0) is its own component; renumber so that it is 0.
    background = component[0]
    lut = np.where(component < background, component + 1, component)
    lut[0] = 0
    return lut.astype(np.uint32)


def final_instances(provisional, lut, region: tuple[slice, ...], grow: int = 0):
    """The final ids of ``region``: ``lut`` of the per-tile labels, cells grown by ``grow`` px.

    ``lut`` is an array indexed by the provisional labels, or a function of a
    block of them.

    The region is read with a ``grow``-px margin, which holds every cell a
    pixel of the region can be grown from, so region by region the result is
    the whole image's (a property test checks it, ties between equally near
    cells included).
    """
    window = widened_box(region, check_grow(grow), provisional.shape)
    block = np.asarray(provisional[window])
    labels = grow_cells(lut(block) if callable(lut) else lut[block], grow)
    return labels[
        tuple(
            slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window, strict=True)
        )
    ]


def chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The regions of a chunked array of ``shape``, one per chunk, row-major."""
    for index in np.ndindex(*(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))):
        yield tuple(
            slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape, strict=True)
        )
