"""Overlap-tile geometry (paper section 2, figure 2): pure functions on shapes.

To predict an output tile, a U-Net with valid convolutions reads the larger
input tile around it: ``context_margin`` pixels more on every side. Where that
context reaches past the image border it is filled by mirroring the image.

Conventions used throughout:

* Coordinates are image pixels along one spatial axis; negative or too large
  coordinates lie in the mirrored extension of the image.
* Mirroring is numpy's ``"reflect"`` mode: the border pixel is the mirror axis
  and is not repeated (``[a b c]`` extends to ``c b [a b c] b a``), repeated
  periodically (period ``2 * (size - 1)``) for context wider than the image.
  A one-pixel axis extends by repeating its pixel.
* Tile origins are multiples of an ``alignment`` (``2**(depth-1)`` for a
  U-Net): the 2x2 max poolings then see the same pixel pairs in every tile as
  in a whole-image pass, which is what makes stitching exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIRROR_MODE = "reflect"


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices into ``range(size)`` of the coordinates ``start .. stop-1`` after mirroring.

    Equal to ``numpy.pad(numpy.arange(size), pad, mode="reflect")`` read at
    the same coordinates, for any amount of padding.

    Parameters
    ----------
    start, stop : int
        Half-open range of coordinates (pixels); may extend past ``[0, size)``.
    size : int
        Length of the image axis (pixels), >= 1.

    Returns
    -------
    numpy.ndarray
        ``stop - start`` integer indices, each in ``[0, size)``.

    Examples
    --------
    >>> mirror_indices(-3, 6, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if stop < start:
        raise ValueError(f"stop ({stop}) must be >= start ({start})")
    coordinates = np.arange(start, stop)
    if size == 1:
        return np.zeros(stop - start, dtype=np.intp)
    period = 2 * (size - 1)
    folded = np.mod(coordinates, period)
    return np.where(folded < size, folded, period - folded).astype(np.intp)


def axis_origins(size: int, tile: int, step: int, alignment: int = 1) -> list[int]:
    """Origins (pixels) of the output tiles along one axis of ``size`` pixels.

    Tiles start at ``0, step, 2*step, ...``; the last tile starts at the
    smallest multiple of ``alignment`` from which it reaches the image end, so
    it overhangs the image by less than ``alignment`` pixels (or by
    ``tile - size`` when the image is smaller than one tile).

    Parameters
    ----------
    size : int
        Image length along the axis (pixels).
    tile : int
        Output tile length (pixels).
    step : int
        Distance between tile origins (pixels); a multiple of ``alignment``,
        at most ``tile`` so that the tiles leave no gap.
    alignment : int
        Every origin is a multiple of this.

    Examples
    --------
    >>> axis_origins(1000, 388, 384, 16)
    [0, 384, 624]
    """
    for name, value in (("size", size), ("tile", tile), ("step", step), ("alignment", alignment)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if tile >= size:
        return [0]
    if step % alignment:
        raise ValueError(f"step {step} must be a multiple of the alignment {alignment}")
    if step > tile:
        raise ValueError(f"step {step} must be <= tile {tile}, or the tiles leave gaps")
    last = math.ceil((size - tile) / alignment) * alignment
    return [*range(0, last, step), last]


def tile_step(tile: int, alignment: int = 1, overlap: float = 0.0) -> int:
    """Largest multiple of ``alignment`` that is at most ``tile * (1 - overlap)``, >= alignment.

    With ``overlap=0`` (valid models) neighbouring outputs overlap by
    ``tile mod alignment`` pixels only, whose values are identical. A tile
    shorter than ``alignment`` gets the step ``alignment``: it can only be used
    alone, on an axis that it covers.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    return max(alignment, int(tile * (1.0 - overlap)) // alignment * alignment)


def tile_grid(
    image_shape: Sequence[int],
    output_tile_shape: Sequence[int],
    step_shape: Sequence[int] | None = None,
    alignment: int = 1,
) -> list[tuple[int, ...]]:
    """Origins of all output tiles, in row-major order (last axis fastest).

    Parameters
    ----------
    image_shape : sequence of int
        Spatial shape of the image (pixels).
    output_tile_shape : sequence of int
        Spatial shape of one output tile (pixels).
    step_shape : sequence of int, optional
        Distance between tile origins per axis; default ``tile_step`` of each
        tile length (no overlap beyond alignment).
    alignment : int
        Every origin is a multiple of this (``2**(depth-1)`` for a U-Net).

    Returns
    -------
    list of tuple of int
        One origin per tile; the output tiles cover the image.
    """
    per_axis = grid_axes(image_shape, output_tile_shape, step_shape, alignment)
    return [
        tuple(per_axis[axis][index] for axis, index in enumerate(indices))
        for indices in np.ndindex(*map(len, per_axis))
    ]


def grid_axes(
    image_shape: Sequence[int],
    output_tile_shape: Sequence[int],
    step_shape: Sequence[int] | None = None,
    alignment: int = 1,
) -> list[list[int]]:
    """Tile origins per axis (the factors of :func:`tile_grid`)."""
    if len(image_shape) != len(output_tile_shape):
        raise ValueError(
            f"output_tile_shape {tuple(output_tile_shape)} must have one entry per image axis "
            f"{tuple(image_shape)}"
        )
    if step_shape is None:
        step_shape = [tile_step(tile, alignment) for tile in output_tile_shape]
    return [
        axis_origins(size, tile, step, alignment)
        for size, tile, step in zip(image_shape, output_tile_shape, step_shape, strict=True)
    ]


def owned_region(
    origin: Sequence[int], per_axis: Sequence[Sequence[int]], image_shape: Sequence[int]
) -> tuple[slice, ...]:
    """Image region that the tile at ``origin`` alone writes: up to the next tile's origin.

    The owned regions of all tiles partition the image, so every output pixel
    is written once, by the tile that reaches it first.
    """
    region = []
    for start, origins, size in zip(origin, per_axis, image_shape, strict=True):
        index = list(origins).index(start)
        stop = origins[index + 1] if index + 1 < len(origins) else size
        region.append(slice(start, min(stop, size)))
    return tuple(region)


def widened_box(box: Sequence[slice], margin: int, image_shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` pixels on every side, clipped to the image.

    Examples
    --------
    >>> widened_box((slice(2, 5), slice(0, 4)), 3, (6, 10))
    (slice(0, 6, None), slice(0, 7, None))
    """
    return tuple(
        slice(max(axis.start - margin, 0), min(axis.stop + margin, size))
        for axis, size in zip(box, image_shape, strict=True)
    )


def input_window(
    origin: Sequence[int], output_tile_shape: Sequence[int], margin: int
) -> tuple[tuple[int, int], ...]:
    """Half-open input range per axis (image pixels) that the network reads for one tile.

    Examples
    --------
    >>> input_window((0, 384), (388, 388), 92)
    ((-92, 480), (292, 864))
    """
    return tuple(
        (start - margin, start + tile + margin)
        for start, tile in zip(origin, output_tile_shape, strict=True)
    )


def padding_for(
    image_shape: Sequence[int],
    output_tile_shape: Sequence[int],
    margin: int,
    step_shape: Sequence[int] | None = None,
    alignment: int = 1,
) -> tuple[tuple[int, int], ...]:
    """Mirror padding ``(before, after)`` per axis that holds every tile's input window.

    Padding the whole image this way (``numpy.pad(..., mode="reflect")``)
    gives the same pixels that the tiles read lazily with
    :func:`mirror_indices`.
    """
    per_axis = grid_axes(image_shape, output_tile_shape, step_shape, alignment)
    return tuple(
        (margin, margin + max(0, origins[-1] + tile - size))
        for origins, tile, size in zip(per_axis, output_tile_shape, image_shape, strict=True)
    )
