"""Overlap-tile geometry: coverage, alignment, mirroring, padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unetile.tiling import (
    axis_origins,
    grid_axes,
    input_window,
    mirror_indices,
    owned_region,
    padding_for,
    tile_grid,
    tile_step,
)


def test_paper_tile_on_a_1000_pixel_axis_by_hand():
    # 388 px output tiles of the depth-5 network, origins on multiples of 16:
    # step 384 (388 is 4 px past a multiple), last origin ceil(612 / 16) * 16 = 624.
    assert tile_step(388, 16) == 384
    assert axis_origins(1000, 388, 384, 16) == [0, 384, 624]
    assert input_window((0, 384), (388, 388), 92) == ((-92, 480), (292, 864))


def test_image_smaller_than_a_tile_gets_one_tile_and_padding_to_fill_it():
    assert axis_origins(5, 12, 8, 4) == [0]
    # A tile shorter than the alignment is fine when it covers the axis alone.
    assert tile_step(4, 16) == 16 and axis_origins(3, 4, 16, 16) == [0]
    assert padding_for((5, 7), (12, 12), 8, alignment=4) == ((8, 15), (8, 13))


def test_mirror_indices_reflect_without_repeating_the_border_pixel():
    assert mirror_indices(-3, 6, 4).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert mirror_indices(-2, 3, 1).tolist() == [0, 0, 0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 12),
    before=st.integers(0, 40),
    after=st.integers(0, 40),
)
def test_mirror_indices_equal_numpy_reflect_pad_for_any_width(size, before, after):
    padded = np.pad(np.arange(size), (before, after), mode="reflect")
    assert mirror_indices(-before, size + after, size).tolist() == padded.tolist()


@st.composite
def axis_layouts(draw):
    alignment = draw(st.sampled_from([1, 2, 4, 8, 16]))
    tile = draw(st.integers(alignment, 200))
    size = draw(st.integers(1, 700))
    overlap = draw(st.sampled_from([0.0, 0.25, 0.5]))
    return size, tile, tile_step(tile, alignment, overlap), alignment


@settings(max_examples=300, deadline=None)
@given(axis_layouts())
def test_tiles_cover_the_axis_with_aligned_origins_and_minimal_overhang(layout):
    size, tile, step, alignment = layout
    origins = axis_origins(size, tile, step, alignment)
    assert origins[0] == 0
    assert all(o % alignment == 0 for o in origins)
    assert origins == sorted(set(origins))
    # No gaps between consecutive tiles, and the last reaches the image end.
    assert all(b - a <= tile for a, b in zip(origins, origins[1:], strict=False))
    end = origins[-1] + tile
    assert end >= size
    assert end - size < max(alignment, tile - size + 1)


@settings(max_examples=100, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    tile=st.tuples(st.integers(4, 40), st.integers(4, 40)),
    alignment=st.sampled_from([1, 4]),
)
def test_owned_regions_partition_the_image(shape, tile, alignment):
    tile = tuple(max(alignment, t) for t in tile)
    per_axis = grid_axes(shape, tile, alignment=alignment)
    written = np.zeros(shape, dtype=int)
    origins = tile_grid(shape, tile, alignment=alignment)
    assert len(origins) == len(per_axis[0]) * len(per_axis[1])
    for origin in origins:
        region = owned_region(origin, per_axis, shape)
        # A tile owns only pixels that its own output covers.
        for r, o, t in zip(region, origin, tile, strict=True):
            assert o <= r.start and r.stop <= o + t
        written[region] += 1
    assert (written == 1).all()


@settings(max_examples=100, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    tile=st.integers(4, 30),
    margin=st.integers(0, 20),
)
def test_padding_holds_every_input_window(shape, tile, margin):
    tile_shape = (tile, tile)
    padding = padding_for(shape, tile_shape, margin)
    for origin in tile_grid(shape, tile_shape):
        for (start, stop), (before, after), size in zip(
            input_window(origin, tile_shape, margin), padding, shape, strict=True
        ):
            assert start >= -before and stop <= size + after


def test_bad_geometry_is_rejected_with_a_message():
    with pytest.raises(ValueError, match="multiple of the alignment"):
        axis_origins(100, 20, 10, 4)
    with pytest.raises(ValueError, match="leave gaps"):
        axis_origins(100, 20, 24, 4)
    with pytest.raises(ValueError, match="one entry per image axis"):
        tile_grid((10, 10), (4,))
