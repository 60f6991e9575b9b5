"""Overlap-tile geometry: coverage, alignment, mirroring, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetile.network.model import UNet, is_valid_input_size, output_size
from unetile.network.tiling import (
    MIRROR_MODE,
    Tiling,
    Window,
    axis_origins,
    grid_axes,
    input_window,
    mirror_indices,
    owned_region,
    padding_for,
    tile_grid,
    tile_step,
)

pytestmark = pytest.mark.fast


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


# --------------------------------------------------------------------------
# Tiling: the valid output tiles of a network and their grid.
# --------------------------------------------------------------------------


def test_papers_network_by_hand():
    tiling = Tiling.of(UNet(base_channels=1))
    assert (tiling.margin, tiling.alignment, tiling.smallest) == (92, 16, 4)
    assert tiling.is_valid(388) and not tiling.is_valid(380) and tiling.input_size(388) == 572
    assert (tiling.at_most(380), tiling.at_least(380)) == (372, 388)
    with pytest.raises(
        ValueError, match="tile_shape 380 px is not a valid output tile.*372 or 388"
    ):
        tiling.check(380)
    assert tiling.check(388) == (388, 388)


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(1, 6),
    padding=st.sampled_from(["valid", "same"]),
    size=st.integers(-5, 400),
)
def test_valid_tiles_are_the_sizes_the_network_takes(depth, padding, size):
    tiling = Tiling(depth, padding)
    valid = [t for t in range(1, 800) if is_valid_input_size(t + 2 * tiling.margin, depth, padding)]
    assert tiling.is_valid(size) == (size in valid)
    assert tiling.at_least(size) == min(t for t in valid if t >= size)
    assert tiling.at_most(size) == max((t for t in valid if t <= size), default=valid[0])
    assert tiling.smallest == valid[0]


def test_default_training_tile_is_the_papers_388_on_isbi_images():
    tiling = Tiling()
    assert tiling.largest_tile_shape([(512, 512)] * 3, 572) == (388, 388)
    # Output may not exceed the smallest image: 300 px allows output 292 (input 476).
    assert tiling.largest_tile_shape([(512, 512), (300, 400)], 572) == (292, 388)
    assert tiling.input_shape((292, 388)) == (476, 572)


@settings(max_examples=40, deadline=None)
@given(extent=st.integers(8, 200), depth=st.integers(2, 4), max_input=st.integers(60, 300))
def test_default_training_tile_is_the_largest_valid_tile_that_fits(extent, depth, max_input):
    tiling = Tiling(depth)
    try:
        (tile,) = tiling.largest_tile_shape([(extent,)], max_input)
    except ValueError:
        assert not any(
            is_valid_input_size(s, depth) and output_size(s, depth) <= extent
            for s in range(1, max_input + 1)
        )
        return
    size = tiling.input_size(tile)
    assert size <= max_input and output_size(size, depth) == tile <= extent
    assert not any(
        is_valid_input_size(s, depth) and output_size(s, depth) <= extent
        for s in range(size + 1, max_input + 1)
    )


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    tile=st.sampled_from([4, 12, 20, 36]),
    overlap=st.sampled_from([0.0, 0.5]),
    padding=st.sampled_from(["valid", "same"]),
)
def test_tiles_own_a_partition_and_read_their_windows(shape, tile, overlap, padding):
    tiling = Tiling(depth=3, padding=padding)
    tile = tiling.at_least(max(tile, min(8, *shape)))
    tiles = tiling.tiles(shape, (tile, tile), overlap)
    owner = np.zeros(shape, dtype=int)
    for item in tiles:
        owner[item.owned] += 1
        assert all(o % tiling.alignment == 0 for o in item.origin)
        assert item.window.start == tuple(o - tiling.margin for o in item.origin)
        assert item.window.shape == (tile + 2 * tiling.margin,) * 2
        region = item.region
        assert all(
            r.start <= o.start and o.stop <= r.stop for r, o in zip(region, item.owned, strict=True)
        )
    assert (owner == 1).all()


def test_a_tile_shorter_than_the_alignment_must_cover_its_axis():
    tiling = Tiling(depth=4)  # valid output tiles 4, 12, 20, ...; origins on multiples of 8
    assert len(tiling.tiles((4, 3), (4, 4))) == 1
    with pytest.raises(ValueError, match="shorter than the 8 px pooling alignment.*at least 12"):
        tiling.tiles((5, 30), (4, 4))


# --------------------------------------------------------------------------
# Window: one mirrored read for every kind of array.
# --------------------------------------------------------------------------


def as_kind(array: np.ndarray, kind: str, folder):
    if kind == "numpy":
        return array
    if kind == "memmap":
        path = folder / f"image-{np.random.default_rng().integers(1 << 40)}.npy"
        np.save(path, array)
        return np.load(path, mmap_mode="r")
    if kind == "zarr":
        import zarr

        stored = zarr.create_array(store={}, shape=array.shape, chunks=(2, 5, 5), dtype=array.dtype)
        stored[...] = array
        return stored
    return torch.from_numpy(array)


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    kind=st.sampled_from(["numpy", "memmap", "zarr", "tensor"]),
    data=st.data(),
)
def test_window_read_equals_the_mirror_padded_image(tmp_path_factory, height, width, kind, data):
    image = np.random.default_rng(height * 31 + width).integers(0, 1000, (2, height, width))
    before = data.draw(st.tuples(st.integers(0, 30), st.integers(0, 30)))
    after = data.draw(st.tuples(st.integers(-height + 1, 30), st.integers(-width + 1, 30)))
    window = Window(
        (-before[0], -before[1]), (height + after[0], width + after[1]), (height, width)
    )
    # The whole image mirror-padded (a window may stop short of the image's end).
    pad = [(b, max(a, 0)) for b, a in zip(before, after, strict=True)]
    padded = np.pad(image, ((0, 0), *pad), mode=MIRROR_MODE)[
        :, : window.shape[0], : window.shape[1]
    ]
    array = as_kind(image, kind, tmp_path_factory.mktemp("window"))
    read = window.read(array)
    if kind == "tensor":
        assert isinstance(read, torch.Tensor)
        read = read.numpy()
    assert read.shape == (2, *window.shape)
    assert np.array_equal(read, padded)
    inside = np.zeros(window.shape, bool)
    inside[before[0] : before[0] + height, before[1] : before[1] + width] = True
    assert np.array_equal(np.broadcast_to(window.inside(), window.shape), inside)
    assert torch.equal(window.inside("cpu").expand(window.shape), torch.from_numpy(inside))


def test_window_reads_only_the_region_under_it():
    image = np.arange(100 * 100).reshape(100, 100)

    class Recording:
        shape, ndim = image.shape, 2
        asked = []

        def __getitem__(self, index):
            self.asked.append(index)
            return image[index]

    recording = Recording()
    read = Window((-3, 40), (5, 50), image.shape).read(recording)
    assert np.array_equal(read, np.pad(image, ((3, 0), (0, 0)), mode=MIRROR_MODE)[:8, 40:50])
    assert recording.asked == [(slice(0, 5), slice(40, 50))]
