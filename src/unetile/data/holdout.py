"""Validation held out of the training images when none is given (``--holdout FRACTION``).

The split depends on the data and the fraction only, never on the seed, so
the same data always gives the same split and ``--resume`` finds it again:

- With :data:`MIN_WHOLE_IMAGES` images or more, ``round(fraction * n)``
  whole images (at least 1) are held out, evenly spaced in the sorted order
  of their names among the images that hold the foreground class (validation
  scores cells).
- With fewer images, a strip at the far end of each image along its longest
  axis (the near end when the far one holds no foreground) is held out:
  ``ceil(fraction * length)`` pixels, at least :data:`MIN_STRIP` px and at
  most half the image (smaller images are refused). The rest
  of the image trains. The training part is a copy of the rest: the tile
  sampler cannot read the strip (it mirrors at the cut as at any border), and
  its weight map and the normalisation are computed from the rest alone, its
  cells renumbered as the pieces they form there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dataset import MIN_TRAINING_EXTENT, LabeledImage

#: Images from which whole images are held out; with fewer, a strip of each.
MIN_WHOLE_IMAGES = 4
#: Narrowest held-out strip (pixels): validation metrics need a few cells.
MIN_STRIP = 2 * MIN_TRAINING_EXTENT
#: Largest share that may be held out: the training part stays the larger.
MAX_FRACTION = 0.5


@dataclass(frozen=True)
class Strip:
    """The held-out part of one image: pixels ``start:stop`` along ``axis`` (spatial axes)."""

    image: str
    axis: int
    start: int
    stop: int

    def to_dict(self, dims: int) -> dict:
        """For ``config.json``, with the region as numpy indexing (``[:, 410:512]``)."""
        region = [f"{self.start}:{self.stop}" if axis == self.axis else ":" for axis in range(dims)]
        return {
            "image": self.image,
            "axis": self.axis,
            "start": self.start,
            "stop": self.stop,
            "region": f"[{', '.join(region)}]",
        }

    def region(self, shape) -> tuple[slice, ...]:
        return tuple(
            slice(self.start, self.stop) if axis == self.axis else slice(0, size)
            for axis, size in enumerate(shape)
        )

    def rest(self, shape) -> tuple[slice, ...]:
        """The training part: the image without the strip (which lies at one end)."""
        kept = slice(0, self.start) if self.stop == shape[self.axis] else slice(self.stop, None)
        return tuple(
            kept if axis == self.axis else slice(0, size) for axis, size in enumerate(shape)
        )


def held_out_count(count: int, fraction: float) -> int:
    """Whole images held out of ``count``: ``round(fraction * count)``, at least 1."""
    return max(1, round(fraction * count))


def evenly_spaced(count: int, chosen: int) -> list[int]:
    """``chosen`` indices of ``range(count)`` spread evenly (the middle of each share)."""
    return [int((index + 0.5) * count / chosen) for index in range(chosen)]


def choose_images(names: list[str], has_foreground: list[bool], fraction: float) -> list[str]:
    """Names of the whole images to hold out, evenly spaced in sorted order.

    Raises
    ------
    ValueError
        When no image holds the foreground class.
    """
    candidates = sorted(name for name, found in zip(names, has_foreground, strict=True) if found)
    if not candidates:
        raise ValueError("no training image holds the foreground class to validate on")
    chosen = min(held_out_count(len(names), fraction), len(candidates))
    return [candidates[index] for index in evenly_spaced(len(candidates), chosen)]


def strip_width(length: int, fraction: float) -> int:
    """Pixels of the held-out strip of an image ``length`` px along its longest axis."""
    return max(math.ceil(fraction * length), MIN_STRIP)


def choose_strip(item: LabeledImage, fraction: float, foreground: int) -> Strip | None:
    """The strip held out of ``item``: the far end of its longest axis, else the near end;
    None when neither holds the foreground class.

    Raises
    ------
    ValueError
        When the strip would be more than half the image (an image under
        ``2 * MIN_STRIP`` px along its longest axis): the training part stays the larger.
    """
    shape = item.classes.shape
    # The longest axis; among equals the last (x), so a 3D stack keeps all its planes.
    axis = max(range(len(shape)), key=lambda index: (shape[index], index))
    width = strip_width(shape[axis], fraction)
    if width > shape[axis] // 2:
        raise ValueError(
            f"{shape[axis]} px along its longest axis cannot give a {width} px validation "
            f"strip and keep as much to train on"
        )
    length = shape[axis]
    for start, stop in ((length - width, length), (0, width)):
        strip = Strip(item.name, axis, start, stop)
        if np.any(item.classes[strip.region(shape)] == foreground):
            return strip
    return None


def training_part(item: LabeledImage, strip: Strip) -> LabeledImage:
    """``item`` without ``strip``: copies, cells renumbered as the pieces they form there.

    The weights are left to be computed on this part (ones until then).
    """
    from skimage.measure import label as connected_regions

    region = strip.rest(item.classes.shape)
    instances = np.ascontiguousarray(item.instances[region])
    # A cell cut by the strip may fall into pieces joined only through the strip.
    instances = connected_regions(instances, background=0, connectivity=1).astype(np.int32)
    return LabeledImage(
        name=item.name,
        image=np.ascontiguousarray(item.image[(slice(None), *region)]),
        classes=np.ascontiguousarray(item.classes[region]),
        instances=instances,
        weights=np.ones(instances.shape, np.float32),
    )


def held_out_part(item: LabeledImage, strip: Strip) -> LabeledImage:
    """The strip of ``item`` as a validation image (copies; weights unused)."""
    region = strip.region(item.classes.shape)
    classes = np.ascontiguousarray(item.classes[region])
    return LabeledImage(
        name=item.name,
        image=np.ascontiguousarray(item.image[(slice(None), *region)]),
        classes=classes,
        instances=np.ascontiguousarray(item.instances[region]),
        weights=np.ones(classes.shape, np.float32),
    )


def split(
    items: list[LabeledImage], fraction: float, foreground: int = 1
) -> tuple[list[LabeledImage], list[LabeledImage], dict]:
    """Training and validation images held out of ``items``, and the record of the split.

    Parameters
    ----------
    items : list of LabeledImage
        The training images; the caller computes the weight maps of the
        training images returned (a training part's are ones until then).
    fraction : float
        Share to hold out, in (0, :data:`MAX_FRACTION`].
    foreground : int
        Class the validation scores; held-out images and strips must hold it.

    Returns
    -------
    train, validation : lists of LabeledImage
    record : dict
        For ``config.json``: ``{"fraction", "kind": "images", "images": [names],
        "of": n}`` or ``{"fraction", "kind": "strips", "strips": [{"image",
        "axis", "start", "stop", "region"}]}`` (``axis`` counts spatial axes;
        ``region`` is the strip as numpy indexing, ``[:, 410:512]``).

    Raises
    ------
    ValueError
        When nothing with the foreground class can be held out, or an image is
        too small for a strip (the message names the image).
    """
    if not 0 < fraction <= MAX_FRACTION:
        raise ValueError(f"holdout fraction must be in (0, {MAX_FRACTION}], got {fraction}")
    if len(items) >= MIN_WHOLE_IMAGES:
        has_cells = [bool(np.any(item.classes == foreground)) for item in items]
        names = choose_images([item.name for item in items], has_cells, fraction)
        held = set(names)
        train = [item for item in items if item.name not in held]
        validation = [item for item in items if item.name in held]
        record = {"fraction": fraction, "kind": "images", "images": names, "of": len(items)}
        return train, validation, record
    train, validation, strips = [], [], []
    for item in items:
        try:
            strip = choose_strip(item, fraction, foreground)
        except ValueError as error:
            raise ValueError(f"{item.name}: {error}") from None
        if strip is None:
            train.append(item)  # no cells at either end: the whole image trains
            continue
        train.append(training_part(item, strip))
        validation.append(held_out_part(item, strip))
        strips.append(strip.to_dict(item.classes.ndim))
    if not validation:
        raise ValueError(
            "no strip at either end of the training images holds the foreground class to "
            "validate on"
        )
    return train, validation, {"fraction": fraction, "kind": "strips", "strips": strips}


def describe(record: dict) -> str:
    """The split in one line, for the user before training."""
    if record["kind"] == "images":
        return (
            f"holding out {len(record['images'])} of {record['of']} images for validation: "
            f"{', '.join(record['images'])}; --no-holdout to train on all"
        )
    parts = ", ".join(f"{strip['image']}{strip['region']}" for strip in record["strips"])
    return (
        f"holding out a strip of {len(record['strips'])} training image(s) for validation "
        f"({record['fraction']:g} of the longest axis, at least {MIN_STRIP} px): {parts}; "
        "--no-holdout to train on all"
    )
