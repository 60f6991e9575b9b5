"""Overlap-tile geometry (paper section 2, figure 2): the tiles and their windows.

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
* A tile is an *output* tile; its :class:`Window` is the input the network
  reads for it, the tile widened by the context margin on every side.

:class:`Tiling` is figure 2 for one network: which output tiles it takes, the
grid of tiles over an image and the region each tile alone writes.
:class:`Window` reads one input window from numpy, memory-mapped and zarr
arrays (only the region under it) and torch tensors (on their device): the one
mirrored read that training and prediction share. The functions below it are
the same geometry along one axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .model import (
    UNetConfig,
    context_margin,
    is_valid_input_size,
    size_multiple,
    valid_input_sizes_near,
)

MIRROR_MODE = "reflect"


@dataclass(frozen=True)
class Window:
    """The input window ``start .. stop`` (half-open, per spatial axis) of an image.

    Coordinates are image pixels; those outside ``[0, image_shape)`` read the
    mirrored image (:data:`MIRROR_MODE`, :func:`mirror_indices`).

    Examples
    --------
    >>> Window((-2, 0), (2, 3), (4, 5)).read(np.arange(20).reshape(4, 5)).tolist()
    [[10, 11, 12], [5, 6, 7], [0, 1, 2], [5, 6, 7]]
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]
    image_shape: tuple[int, ...]

    def __post_init__(self):
        for name in ("start", "stop", "image_shape"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.start) == len(self.stop) == len(self.image_shape):
            raise ValueError(
                f"window {self.start}..{self.stop} and image {self.image_shape} need "
                "one entry per spatial axis"
            )
        if any(b <= a for a, b in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"window {self.start}..{self.stop} is empty")
        if min(self.image_shape) < 1:
            raise ValueError(f"image shape {self.image_shape} has an empty axis")

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of what :meth:`read` returns (pixels)."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @functools.cached_property
    def indices(self) -> tuple[np.ndarray, ...]:
        """Per axis, the image index each window pixel reads (:func:`mirror_indices`)."""
        return tuple(
            mirror_indices(a, b, s)
            for a, b, s in zip(self.start, self.stop, self.image_shape, strict=True)
        )

    @property
    def source(self) -> tuple[slice, ...]:
        """The image region the window's pixels come from: all that :meth:`read` touches."""
        return tuple(slice(int(i.min()), int(i.max()) + 1) for i in self.indices)

    @property
    def within_image(self) -> bool:
        """Whether the window lies inside the image: nothing is mirrored."""
        return not self._mirrored_axes()

    def _mirrored_axes(self) -> list[int]:
        return [
            axis
            for axis, (a, b, s) in enumerate(
                zip(self.start, self.stop, self.image_shape, strict=True)
            )
            if a < 0 or b > s
        ]

    def read(self, array):
        """The window of ``array``'s trailing spatial axes, mirrored past the image border.

        Parameters
        ----------
        array : numpy.ndarray, numpy.memmap, zarr array or torch.Tensor
            ``(..., *image_shape)``: leading axes (channels) are kept whole.

        Returns
        -------
        numpy.ndarray or torch.Tensor
            ``(..., *shape)`` in the array's dtype: a numpy array for array
            likes, of which only :attr:`source` is read (zarr and memory-mapped
            images larger than memory stay on disk); a tensor on the array's
            device for a tensor, a view when the window lies inside the image.
            A tensor's border window is cut to :attr:`source` first and then
            gathered along the mirrored axes only: no copy is larger than the
            window, and nothing waits for the device.
        """
        leading = len(array.shape) - len(self.image_shape)
        if leading < 0 or tuple(array.shape[leading:]) != self.image_shape:
            raise ValueError(
                f"array of shape {tuple(array.shape)} does not end in the window's image "
                f"shape {self.image_shape}"
            )
        keep = (slice(None),) * leading
        mirrored = self._mirrored_axes()
        if not isinstance(array, np.ndarray) and hasattr(array, "index_select"):
            return self._read_tensor(array, leading, mirrored)
        block = np.asarray(array[keep + self.source])
        if mirrored:
            local = [i - r.start for i, r in zip(self.indices, self.source, strict=True)]
            block = block[keep + np.ix_(*local)]
        return block

    def _read_tensor(self, tensor, leading: int, mirrored: Sequence[int]):

        if not mirrored:
            return tensor[(slice(None),) * leading + tuple(map(slice, self.start, self.stop))]
        for axis, window in enumerate(self.source):
            tensor = tensor.narrow(leading + axis, window.start, window.stop - window.start)
        for axis in mirrored:
            tensor = tensor.index_select(leading + axis, self._rows(axis, tensor.device))
        return tensor

    def _rows(self, axis: int, device):
        """The gather indices of one axis as a tensor on ``device``, made once per window
        (the training sampler reads an image, its labels and its weights through one)."""
        import torch

        cache = self.__dict__.setdefault("_rows_on", {})
        if (axis, device) not in cache:
            rows = torch.from_numpy(self.indices[axis] - self.source[axis].start)
            cache[axis, device] = rows.to(device, non_blocking=True)
        return cache[axis, device]

    def inside(self, device=None):
        """Boolean mask of the window's pixels that lie in the image (not mirrored).

        A numpy array, or with ``device`` a torch tensor made there (no host
        transfer), broadcastable to :attr:`shape`.
        """
        if device is None:
            mask = np.ones((1,) * len(self.shape), dtype=bool)
            for axis, (a, b, s) in enumerate(
                zip(self.start, self.stop, self.image_shape, strict=True)
            ):
                coordinates = np.arange(a, b)
                mask = mask & ((coordinates >= 0) & (coordinates < s)).reshape(self._line(axis))
            return mask
        import torch

        mask = torch.ones((1,) * len(self.shape), dtype=torch.bool, device=device)
        for axis in self._mirrored_axes():
            a, b, s = self.start[axis], self.stop[axis], self.image_shape[axis]
            coordinates = torch.arange(a, b, device=device)
            mask = mask & ((coordinates >= 0) & (coordinates < s)).reshape(self._line(axis))
        return mask

    def _line(self, axis: int) -> list[int]:
        """Shape that lays one axis's values along ``axis`` for broadcasting."""
        view = [1] * len(self.shape)
        view[axis] = self.shape[axis]
        return view


@dataclass(frozen=True)
class Tile:
    """One output tile of a grid: where it lies, what it alone writes, what it reads."""

    origin: tuple[int, ...]
    shape: tuple[int, ...]
    owned: tuple[slice, ...]
    """Image region that this tile alone writes (:func:`owned_region`)."""
    window: Window
    """Its input window: the tile widened by the context margin."""

    @property
    def region(self) -> tuple[slice, ...]:
        """The tile's output clipped to the image (overlaps its neighbours when stepped < tile)."""
        return tuple(
            slice(o, min(o + t, s))
            for o, t, s in zip(self.origin, self.shape, self.window.image_shape, strict=True)
        )

    def local(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """``region`` (image pixels) in the tile's own output coordinates."""
        return tuple(
            slice(r.start - o, r.stop - o) for r, o in zip(region, self.origin, strict=True)
        )


@dataclass(frozen=True)
class Tiling:
    """Figure 2 for one network: its valid output tiles and their grid over an image.

    Built from the network's architecture (:meth:`of`); all sizes are output
    tile sizes in pixels unless the name says input.

    Examples
    --------
    >>> tiling = Tiling(depth=5)
    >>> tiling.margin, tiling.alignment, tiling.at_least(380), tiling.input_size(388)
    (92, 16, 388, 572)
    """

    depth: int = 5
    padding: str = "valid"
    dims: int = 2

    def __post_init__(self):
        UNetConfig(depth=self.depth, padding=self.padding, dims=self.dims)  # ValueError if bad

    @classmethod
    def of(cls, model) -> Tiling:
        """The tiling of a ``UNet``, a ``UNetConfig`` or its dict."""
        config = getattr(model, "config", model)
        if isinstance(config, dict):
            config = UNetConfig(**config)
        return cls(config.depth, config.padding, config.dims)

    @property
    def margin(self) -> int:
        """Context (pixels per side) the network reads around an output tile."""
        return context_margin(self.depth, self.padding)

    @property
    def alignment(self) -> int:
        """Every tile origin is a multiple of this: the poolings' ``2**(depth-1)``."""
        return size_multiple(self.depth)

    def input_size(self, tile: int) -> int:
        """Input size (pixels) the network reads for an output tile of ``tile`` pixels."""
        return int(tile) + 2 * self.margin

    def input_shape(self, tile_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.input_size(t) for t in tile_shape)

    def is_valid(self, tile: int) -> bool:
        """Whether an output tile of ``tile`` pixels (one axis) fits the network exactly."""
        return tile >= 1 and is_valid_input_size(self.input_size(tile), self.depth, self.padding)

    @property
    def smallest(self) -> int:
        """Smallest valid output tile (pixels)."""
        return self.at_least(1)

    def at_least(self, size: float) -> int:
        """Smallest valid output tile (pixels) of at least ``size`` pixels."""
        size = max(1, math.ceil(size))
        return valid_input_sizes_near(self.input_size(size), self.depth, self.padding)[1] - (
            2 * self.margin
        )

    def at_most(self, size: float) -> int:
        """Largest valid output tile (pixels) of at most ``size`` pixels, or the smallest one."""
        size = math.floor(size)
        below, _ = valid_input_sizes_near(self.input_size(size), self.depth, self.padding)
        return (
            self.smallest
            if below is None or below - 2 * self.margin < 1
            else below - 2 * self.margin
        )

    def check(self, tile_shape) -> tuple[int, ...]:
        """Output tile shape as a tuple of ``dims`` ints; ValueError naming valid sizes nearby."""
        if isinstance(tile_shape, int | np.integer):
            tile_shape = (int(tile_shape),) * self.dims
        tile_shape = tuple(int(t) for t in tile_shape)
        if len(tile_shape) != self.dims:
            raise ValueError(
                f"tile_shape {tile_shape} must have {self.dims} entries, one per spatial axis"
            )
        for tile in tile_shape:
            if not self.is_valid(tile):
                below, above = self.at_most(tile), self.at_least(tile)
                nearby = f"{below} or {above}" if below < tile else f"{above}"
                raise ValueError(
                    f"tile_shape {tile} px is not a valid output tile for this "
                    f"{self.padding!r} U-Net of depth {self.depth}; use {nearby}"
                )
        return tile_shape

    def largest_tile_shape(
        self, image_shapes: Sequence[Sequence[int]], max_input: int
    ) -> tuple[int, ...]:
        """Largest valid output tile whose input is at most ``max_input`` px per axis and that
        is no longer than the smallest image along each axis (so that a tile never holds
        more mirrored than real pixels).

        The paper's network on 512 x 512 ISBI images gets 388 (input 572).
        """
        smallest_input = self.input_size(self.smallest)
        if smallest_input > max_input:
            raise ValueError(
                f"no valid input tile of a depth-{self.depth} {self.padding!r} U-Net is <= "
                f"{max_input} px; the smallest is {smallest_input}: raise the tile limit or "
                "lower the depth"
            )
        extents = np.min(np.asarray([tuple(s) for s in image_shapes]), axis=0)
        shape = []
        for extent in extents.tolist():
            if extent < self.smallest:
                raise ValueError(
                    f"images of extent {extent} px are too small for any tile of a "
                    f"depth-{self.depth} {self.padding!r} U-Net up to {max_input} px; "
                    "use a smaller depth"
                )
            shape.append(self.at_most(min(extent, max_input - 2 * self.margin)))
        return tuple(shape)

    def steps(self, tile_shape: Sequence[int], overlap: float = 0.0) -> tuple[int, ...]:
        """Tile steps (pixels): a ``valid`` network's tiles overlap only by the alignment
        remainder (exact stitching); a ``same`` network's by ``overlap`` (for blending)."""
        overlap = overlap if self.padding == "same" else 0.0
        return tuple(tile_step(t, self.alignment, overlap) for t in tile_shape)

    def window(self, origin: Sequence[int], tile_shape: Sequence[int], image_shape) -> Window:
        """The input window of the output tile at ``origin``."""
        ranges = input_window(origin, tile_shape, self.margin)
        return Window(tuple(a for a, _ in ranges), tuple(b for _, b in ranges), image_shape)

    def tiles(
        self, image_shape: Sequence[int], tile_shape: Sequence[int], overlap: float = 0.0
    ) -> list[Tile]:
        """The grid of output tiles over an image, row-major (last axis fastest).

        Their owned regions partition the image; their windows are what the
        network reads. ValueError for a tile shorter than the alignment on an
        axis it does not cover alone.
        """
        image_shape, tile_shape = tuple(image_shape), self.check(tile_shape)
        for tile, size in zip(tile_shape, image_shape, strict=True):
            if tile < min(self.alignment, size):
                raise ValueError(
                    f"tile_shape {tile} px is shorter than the {self.alignment} px pooling "
                    f"alignment and does not cover the image ({size} px); use at least "
                    f"{self.at_least(self.alignment)}"
                )
        per_axis = grid_axes(
            image_shape, tile_shape, self.steps(tile_shape, overlap), self.alignment
        )
        return [
            Tile(
                origin,
                tile_shape,
                owned_region(origin, per_axis, image_shape),
                self.window(origin, tile_shape, image_shape),
            )
            for origin in (
                tuple(per_axis[axis][i] for axis, i in enumerate(index))
                for index in np.ndindex(*map(len, per_axis))
            )
        ]


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
