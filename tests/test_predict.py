"""Overlap-tile prediction: exact stitching, TTA, blending, out-of-core files, labels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from helpers import relabel_equal
from hypothesis import example, given, settings
from hypothesis import strategies as st

from unetile import io
from unetile.network.model import UNet, input_size_for_output, size_multiple
from unetile.network.tiling import axis_origins, tile_step
from unetile.predict import card
from unetile.predict.engine import (
    _tile_batches,
    activation_bytes_per_pixel,
    auto_tile_shape,
    gaussian_importance,
    predict,
    predict_images,
)
from unetile.predict.files import predict_to_files
from unetile.predict.instances import (
    chunk_regions,
    final_instances,
    grow_cells,
    instances_from_probabilities,
    label_foreground,
    merge_tile_labels,
)
from unetile.predict.postprocessing import labels_from_probabilities


def small_model(depth=2, base=2, seed=0, padding="valid", in_channels=1, dims=2, classes=2):
    torch.manual_seed(seed)
    model = UNet(
        in_channels=in_channels,
        num_classes=classes,
        depth=depth,
        base_channels=base,
        padding=padding,
        dropout=0.0,
        dims=dims,
    )
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def whole_image_reference(model, image, tta=False):
    """One forward pass of the whole image, mirror-padded by numpy to a valid size."""
    config = model.config
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == config.dims:
        image = image[None]
    spatial = image.shape[1:]
    margin = model.context_margin
    pads = [(0, 0)] + [
        (margin, input_size_for_output(s, config.depth) - s - margin) for s in spatial
    ]
    padded = torch.from_numpy(np.pad(image, pads, mode="reflect"))[None]
    views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    total = 0
    with torch.no_grad():
        for turns, mirrored in views:
            view = torch.rot90(padded, turns, dims=(-2, -1))
            view = view.flip(-1) if mirrored else view
            out = torch.softmax(model(view), dim=1)
            out = out.flip(-1) if mirrored else out
            total = total + torch.rot90(out, -turns, dims=(-2, -1))
    crop = (0, slice(None), *(slice(0, s) for s in spatial))
    return (total / len(views))[crop].numpy()


def valid_tile(depth, steps):
    model = small_model(depth=depth)
    smallest = next(
        t for t in range(1, 64) if input_size_for_output(t, depth) - 2 * model.context_margin == t
    )
    return smallest + steps * size_multiple(depth)


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(2, 3),
    base=st.integers(2, 4),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    tile_steps=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    batch_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@example(depth=3, base=2, height=5, width=7, tile_steps=(0, 0), batch_size=1, seed=0)
@example(depth=3, base=4, height=37, width=50, tile_steps=(1, 0), batch_size=2, seed=1)
def test_tiled_equals_whole_image_for_any_tile_image_and_batch(
    depth, base, height, width, tile_steps, batch_size, seed
):
    model = small_model(depth, base, seed)
    tile = tuple(valid_tile(depth, s) for s in tile_steps)
    image = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    tiled = predict(model, image, tile_shape=tile, batch_size=batch_size, progress=False)
    assert tiled.shape == (2, height, width) and tiled.dtype == np.float32
    assert np.abs(tiled - whole_image_reference(model, image)).max() < 1e-5


def test_a_5x7_image_needs_mirroring_past_its_own_width():
    # Depth 3: each 3x3 conv reads 1 px per side at its scale: 4 convs x 1 + 4 x 2 + 2 x 4
    # = 20 px of context per side, four times the image height.
    model = small_model(depth=3, base=3, seed=4)
    assert model.context_margin == 20
    image = np.arange(35, dtype=np.float32).reshape(5, 7) / 35
    tiled = predict(model, image, tile_shape=4, progress=False)
    assert np.abs(tiled - whole_image_reference(model, image)).max() < 1e-5


def test_test_time_augmentation_is_exact_against_the_whole_image_too():
    model = small_model(depth=3, base=3, seed=2)
    image = np.random.default_rng(2).random((29, 45), dtype=np.float32)
    tiled = predict(model, image, tile_shape=(12, 20), batch_size=2, tta=True, progress=False)
    reference = whole_image_reference(model, image, tta=True)
    assert np.abs(tiled - reference).max() < 1e-5
    # The eight views really differ: TTA changes the result.
    assert np.abs(reference - whole_image_reference(model, image)).max() > 1e-3


def test_multichannel_uint8_input_is_normalised_per_tile_like_the_whole_image():
    model = small_model(depth=2, base=3, in_channels=2, classes=3, seed=5)
    image = np.random.default_rng(5).integers(0, 256, (2, 23, 31), dtype=np.uint8)
    mean, std = [100.0, 20.0], [50.0, 10.0]
    tiled = predict(
        model, image, tile_shape=8, normalization={"mean": mean, "std": std}, progress=False
    )
    normalised = (image.astype(np.float32) - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    assert tiled.shape == (3, 23, 31)
    assert np.abs(tiled - whole_image_reference(model, normalised)).max() < 1e-5


def test_tile_size_changes_only_instance_norm_models():
    """The paper's network is tile-exact; instance norm normalises each tile by itself."""
    image = np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)
    for norm, exact in ((None, True), ("batch", True), ("instance", False)):
        torch.manual_seed(0)
        model = UNet(depth=2, base_channels=4, dropout=0.0, norm=norm)
        model.reset_parameters(torch.Generator().manual_seed(0))
        model.eval()
        one_tile = predict(model, image, tile_shape=64, progress=False)
        four_tiles = predict(model, image, tile_shape=32, progress=False)
        np.testing.assert_allclose(four_tiles.sum(0), 1.0, atol=1e-5)
        assert np.allclose(one_tile, four_tiles, atol=1e-5) == exact, norm


def test_3d_tiles_stitch_exactly():
    model = small_model(depth=2, base=2, dims=3, seed=6)
    image = np.random.default_rng(6).random((9, 10, 11), dtype=np.float32)
    tiled = predict(model, image, tile_shape=(4, 8, 4), batch_size=2, progress=False)
    assert np.abs(tiled - whole_image_reference(model, image)).max() < 1e-5


def test_zarr_and_memory_mapped_tiff_inputs_and_zarr_output(tmp_path):
    model = small_model(depth=2, base=2, seed=7)
    image = np.random.default_rng(7).integers(0, 65535, (30, 41), dtype=np.uint16)
    expected = predict(model, image, tile_shape=8, progress=False)
    source = zarr.open_array(
        store=str(tmp_path / "in.zarr"),
        mode="w",
        shape=image.shape,
        chunks=(16, 16),
        dtype=image.dtype,
    )
    source[:] = image
    out = zarr.open_array(
        store=str(tmp_path / "out.zarr"),
        mode="w",
        shape=(2, 30, 41),
        chunks=(2, 16, 16),
        dtype=np.float32,
    )
    predict(model, source, tile_shape=8, progress=False, out=out)
    assert np.array_equal(out[:], expected)
    tifffile.imwrite(tmp_path / "in.tif", image)
    mapped = tifffile.memmap(tmp_path / "in.tif", mode="r")
    assert isinstance(mapped, np.memmap)
    assert np.array_equal(predict(model, mapped, tile_shape=8, progress=False), expected)


def test_same_model_blends_overlapping_tiles_with_gaussian_weights():
    model = small_model(depth=2, base=3, padding="same", seed=8)
    image = np.random.default_rng(8).random((32, 16), dtype=np.float32)
    blended = predict(model, image, tile_shape=16, overlap=0.5, progress=False)
    # Rows tiles start at 0, 8, 16; one column tile.
    with torch.no_grad():
        tiles = [
            torch.softmax(model(torch.from_numpy(image[o : o + 16])[None, None]), 1)[0].numpy()
            for o in (0, 8)
        ]
    weight = gaussian_importance((16, 16))
    # Row 3 lies in the first tile only; row 12 in the tiles at 0 and 8.
    assert np.allclose(blended[:, 3], tiles[0][:, 3], atol=1e-6)
    mixed = (weight[12] * tiles[0][:, 12] + weight[4] * tiles[1][:, 4]) / (weight[12] + weight[4])
    assert np.allclose(blended[:, 12], mixed, atol=1e-6)
    assert np.allclose(blended.sum(0), 1.0, atol=1e-5)


def test_gaussian_importance_peaks_at_the_centre_and_has_no_zeros():
    weight = gaussian_importance((16, 16))
    assert weight.max() == pytest.approx(1.0) and weight.min() > 0
    # sigma = 16 / 8 = 2 px; the maximum sits at the central pixels, 0.5 px off the centre
    # (7.5) along each axis. Pixel (10, 7) is 2.5 px and 0.5 px off: the weight is
    # exp(-2.5**2 / 8) * exp(-0.5**2 / 8) / exp(-0.5**2 / 8)**2 = exp(-0.75).
    assert weight[10, 7] == pytest.approx(np.exp(-0.75), rel=1e-5)
    assert np.array_equal(weight, weight[::-1]) and np.array_equal(weight, weight.T)


def test_auto_tile_fits_the_budget_and_the_image():
    paper = UNet()  # 64 base channels, depth 5: 92 px context, valid tiles 4 + 16 k
    per_pixel = activation_bytes_per_pixel(paper)
    budget = per_pixel * 572**2
    # A budget of exactly one 572 x 572 input tile gives the paper's 388 x 388 output
    # tile; 3844 = 10 * 384 + 4 px is covered by 10 of them (step 384, last at 3456).
    assert auto_tile_shape(paper, (3844, 3844), "cpu", budget) == (388, 388)
    # One byte less: the first axis drops to 372 (+184 = 556 px input); the second takes
    # what is left, 572**2 / 556 = 588.5 px of input -> 404 px output (588 is valid).
    assert auto_tile_shape(paper, (5000, 5000), "cpu", budget - 1) == (372, 404)
    # Balanced: 372 px tiles cover 3844 px in 11 tiles, and so do 356 px tiles (step
    # 352, last at 3488); 404 px tiles take 10, and so do 388 px tiles.
    assert auto_tile_shape(paper, (3844, 3844), "cpu", budget - 1) == (356, 388)
    # Never larger than needed: a 100 px high image gets 100 px rows and longer columns.
    tile = auto_tile_shape(paper, (100, 5000), "cpu", budget)
    assert tile[0] == 100 and tile[1] > 388
    assert (tile[0] + 184) * (tile[1] + 184) <= 572**2
    # Two tiles per batch share the budget.
    halved = auto_tile_shape(paper, (5000, 5000), "cpu", budget, batch_size=2)
    assert (halved[0] + 184) ** 2 * 2 <= 572**2


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 3000), budget_side=st.integers(200, 1500))
def test_auto_tile_never_needs_more_tiles_than_the_largest_tile(size, budget_side):
    paper = UNet(depth=5, base_channels=1)  # geometry only; tiny weights
    per_pixel = activation_bytes_per_pixel(paper)
    # The first axis gets the square root of the budget; the second what is left.
    tile = auto_tile_shape(paper, (size, size), "cpu", per_pixel * budget_side**2)[0]
    assert (tile - 4) % 16 == 0
    # Largest valid tile in the budget, but at least the pooling alignment (16 -> 20 px).
    largest = max(20, (budget_side - 184 - 4) // 16 * 16 + 4)
    assert tile <= largest

    def count(t):
        return len(axis_origins(size, t, tile_step(t, 16), 16))

    assert count(tile) == count(min(largest, tile_at_least(size)))


def tile_at_least(size):
    return 4 + max(0, -(-(size - 4) // 16)) * 16


def test_labels_and_instances_by_hand():
    foreground = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 1, 1],
            [0, 0, 1, 0, 0],  # touches the first cell diagonally only: separate
            [0, 0, 1, 0, 0],
        ],
        dtype=np.float32,
    )
    probabilities = np.stack([1 - foreground, foreground]) * 0.8 + 0.1
    assert np.array_equal(labels_from_probabilities(probabilities), foreground.astype(np.uint8))
    instances = instances_from_probabilities(probabilities)
    assert instances.dtype == np.uint32 and instances.max() == 3
    assert len(np.unique(instances[:2, :2])) == 1 and instances[0, 0] != instances[2, 2]
    assert np.array_equal(instances > 0, foreground > 0)


def test_merge_joins_a_cell_split_by_a_tile_border():
    # Tiles start at column 0 and 3; a cell crosses the border, another does not.
    provisional = np.array(
        [
            [1, 1, 0, 3, 3],
            [0, 1, 0, 3, 0],
            [2, 0, 0, 0, 4],
        ],
        dtype=np.uint64,
    )
    provisional[0, 2] = 1  # piece 1 reaches column 2, piece 3 starts at column 3
    lut = merge_tile_labels(provisional, [[0], [0, 3]], count=4)
    assert lut[0] == 0
    assert lut[1] == lut[3]
    assert len({lut[1], lut[2], lut[4]}) == 3
    assert sorted(set(lut[1:].tolist())) == [1, 2, 3]


def test_grow_fills_the_gap_between_two_cells_and_no_further():
    foreground = np.zeros((5, 9), dtype=np.float32)
    foreground[:, :3] = 1
    foreground[:, 5:7] = 1  # a 2-px membrane, then cell, then 2 px of background
    probabilities = np.stack([1 - foreground, foreground])
    grown = instances_from_probabilities(probabilities, grow=1)
    assert grown[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 0]
    assert instances_from_probabilities(probabilities, grow=0)[0].tolist()[3:5] == [0, 0]
    assert (instances_from_probabilities(probabilities, grow=5) > 0).all()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="grow"):
            grow_cells(grown, bad)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.one_of(
        st.tuples(st.integers(1, 40), st.integers(1, 40)),
        st.tuples(st.integers(1, 12), st.integers(1, 16), st.integers(1, 16)),
    ),
    chunk_size=st.integers(1, 15),
    density=st.floats(0.05, 0.7),
    grow=st.integers(0, 6),
)
def test_cells_grown_region_by_region_equal_the_whole_image(seed, shape, chunk_size, density, grow):
    # As predict_to_files does: components per tile, joined across tile borders
    # by merge_tile_labels, then each output region grown on its own.
    foreground = np.random.default_rng(seed).random(shape) < density
    chunk = (chunk_size,) * len(shape)
    provisional = np.zeros(foreground.shape, dtype=np.uint64)
    count = 0
    regions = list(chunk_regions(foreground.shape, chunk))
    for region in regions:
        pieces, found = label_foreground(foreground[region])
        provisional[region] = np.where(pieces > 0, pieces.astype(np.uint64) + count, 0)
        count += found
    starts = [sorted({region[axis].start for region in regions}) for axis in range(len(shape))]
    lut = merge_tile_labels(provisional, starts, count)
    stitched = np.zeros(foreground.shape, dtype=np.uint32)
    for region in regions:
        stitched[region] = final_instances(provisional, lut, region, grow)
    whole = grow_cells(label_foreground(foreground)[0], grow)
    assert relabel_equal(stitched, whole)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_files_match_in_memory_results_and_cells_get_one_id_across_tiles(tmp_path, suffix):
    model = small_model(depth=2, base=4, seed=9)
    rng = np.random.default_rng(9)
    image = rng.random((70, 90), dtype=np.float32)
    tile = 14  # 5 x 7 tiles: many cells cross tile borders
    probabilities = predict(model, image, tile_shape=tile, progress=False)
    written = predict_to_files(
        model,
        image,
        labels=tmp_path / f"l{suffix}",
        probabilities=tmp_path / f"p{suffix}",
        instances=tmp_path / f"i{suffix}",
        tile_shape=tile,
        progress=False,
    )

    def read(path):
        return (
            tifffile.imread(path)
            if suffix == ".tif"
            else zarr.open_array(store=str(path), mode="r")[:]
        )

    assert np.array_equal(read(written["probabilities"]), probabilities)
    assert np.array_equal(read(written["labels"]), labels_from_probabilities(probabilities))
    expected = instances_from_probabilities(probabilities)
    instances = read(written["instances"])
    assert instances.dtype == np.uint32
    assert relabel_equal(instances, expected)
    assert instances.max() == expected.max()
    # The test is only meaningful if cells do cross the tile border at x = 14.
    left, right = expected[:, tile - 1], expected[:, tile]
    crossing = set(left[left > 0]) & set(right[right > 0])
    assert crossing
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"i{suffix}", f"l{suffix}", f"p{suffix}"]
    )
    grown = predict_to_files(
        model, image, instances=tmp_path / f"g{suffix}", grow=3, tile_shape=tile, progress=False
    )
    expected_grown = instances_from_probabilities(probabilities, grow=3)
    assert (expected_grown > 0).sum() > (expected > 0).sum()
    assert relabel_equal(read(grown["instances"]), expected_grown)
    with pytest.raises(ValueError, match="larger than the output tile"):
        predict_to_files(
            model, image, instances=tmp_path / f"h{suffix}", grow=tile + 1, tile_shape=tile
        )
    with pytest.raises(ValueError, match="give an instances path"):
        predict_to_files(model, image, labels=tmp_path / f"h{suffix}", grow=2, tile_shape=tile)
    assert not (tmp_path / f"h{suffix}").exists()


def test_interrupted_prediction_leaves_no_output_and_no_scratch(tmp_path):
    model = small_model(depth=2, base=2, seed=10)
    calls = []

    def interrupt(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict_to_files(
            model,
            np.zeros((40, 40), np.float32),
            labels=tmp_path / "l.tif",
            tile_shape=8,
            progress=False,
        )
    handle.remove()
    assert list(tmp_path.iterdir()) == []


def test_training_flag_is_restored_and_bad_arguments_are_named():
    model = small_model(depth=2, base=2).train()
    predict(model, np.zeros((10, 10), np.float32), tile_shape=8, progress=False)
    assert model.training
    with pytest.raises(
        ValueError, match=r"tile_shape 9 px is not a valid output tile.*use 8 or 10"
    ):
        predict(model, np.zeros((10, 10)), tile_shape=9, progress=False)
    with pytest.raises(ValueError, match=r"shape \(3, 10, 10\).*1 input channel"):
        predict(model, np.zeros((3, 10, 10)), progress=False)
    deep = small_model(depth=4, base=2)  # alignment 8 px; 4 px tiles are valid but too short
    covered = predict(deep, np.zeros((3, 3), np.float32), tile_shape=4, progress=False)
    assert covered.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="shorter than the 8 px pooling alignment.*at least 12"):
        predict(deep, np.zeros((5, 5)), tile_shape=4, progress=False)
    with pytest.raises(ValueError, match="tile_shape 3 px .*; use 4$"):
        predict(deep, np.zeros((5, 5)), tile_shape=3, progress=False)
    with pytest.raises(ValueError, match="out has shape"):
        predict(model, np.zeros((10, 10)), out=np.zeros((2, 10, 9), np.float32), progress=False)


def test_zarr_input_by_path_and_rerun_replaces_a_zarr_output(tmp_path):
    from unetile import io

    model = small_model(depth=2, base=2, seed=11)
    image = np.random.default_rng(11).random((21, 26), dtype=np.float32)
    source = zarr.open_array(
        store=str(tmp_path / "in.zarr"), mode="w", shape=image.shape, chunks=(8, 8), dtype="f4"
    )
    source[:] = image
    opened = io.open_zarr(tmp_path / "in.zarr")
    labels = tmp_path / "labels.zarr"
    predict_to_files(model, np.zeros_like(image), labels=labels, tile_shape=8, progress=False)
    predict_to_files(model, opened, labels=labels, tile_shape=8, progress=False)
    expected = labels_from_probabilities(predict(model, image, tile_shape=8, progress=False))
    assert np.array_equal(zarr.open_array(store=str(labels), mode="r")[:], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "labels.zarr"]
    with pytest.raises(io.InputError, match="no such zarr store"):
        io.open_zarr(tmp_path / "missing.zarr")


@pytest.mark.parametrize(
    "suffix, opening", [(".zarr", 0), (".tif", 0), (".tif", 1)], ids=["zarr", "tif", "opened"]
)
def test_watershed_instance_files_equal_the_whole_image_across_regions(tmp_path, suffix, opening):
    from unetile.predict.instances import InstanceOptions, extract_instances

    model = small_model(depth=2, base=4, seed=11)
    with torch.no_grad():
        model.classifier.bias[1] -= 0.3  # cells of up to 16 px from an untrained network
    image = np.random.default_rng(11).random((64, 80), dtype=np.float32)
    tile = 14
    probabilities = predict(model, image, tile_shape=tile, progress=False)
    options = InstanceOptions(
        method="distance", h=1.0, min_size=3, fill_holes=True, max_extent=20, opening=opening
    )
    expected = extract_instances(probabilities, options)
    assert expected.max() > 100 // (1 + 3 * opening)
    written = predict_to_files(
        model,
        image,
        instances=tmp_path / f"i{suffix}",
        instance_options=options,
        grow=2,
        tile_shape=tile,
        progress=False,
    )
    path = written["instances"]
    stored = tifffile.imread(path) if suffix == ".tif" else zarr.open_array(str(path), mode="r")[:]
    assert np.array_equal(stored, grow_cells(expected, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"i{suffix}"]
    narrow = InstanceOptions(method="distance", max_extent=2)
    with pytest.raises(ValueError, match="max_extent = 2 px"):
        predict_to_files(
            model,
            image,
            instances=tmp_path / f"n{suffix}",
            instance_options=narrow,
            tile_shape=tile,
        )
    assert not (tmp_path / f"n{suffix}").exists()


def test_a_loaded_model_brings_its_normalisation_and_options_are_one_object(tmp_path):
    from unetile.network.normalization import Normalization
    from unetile.predict.engine import PredictOptions

    model = small_model(depth=2, base=3, seed=4)
    stored = {"mean": [100.0], "std": [50.0]}
    card.save_model(tmp_path, model, {"model": model.config.to_dict(), "normalization": stored})
    loaded, config = card.load_model(tmp_path)
    assert loaded.normalization == Normalization((100.0,), (50.0,))
    image = np.random.default_rng(4).integers(0, 256, (23, 30), dtype=np.uint8)
    expected = whole_image_reference(model, (image.astype(np.float32) - 100.0) / 50.0)
    by_default = predict(loaded, image, tile_shape=8, progress=False)
    assert np.abs(by_default - expected).max() < 1e-5
    # The same options as one object, and the identity to opt out.
    options = PredictOptions(tile_shape=8, progress=False)
    assert np.array_equal(predict(loaded, image, options), by_default)
    raw = predict(loaded, image, options, normalization=Normalization.identity())
    # Raw 0..255 input makes logits in the hundreds: float rounding differs more.
    assert np.abs(raw - whole_image_reference(model, image)).max() < 1e-4
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict(loaded, image, options, batch_size=0)
    with pytest.raises(TypeError):
        predict(loaded, image, tile_size=8)


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=4),
    tile_steps=st.integers(0, 2),
    batch_size=st.integers(1, 5),
    padding=st.sampled_from(["valid", "same"]),
    seed=st.integers(0, 2**16),
)
@example(shapes=[(20, 20)] * 3, tile_steps=1, batch_size=2, padding="valid", seed=0)
def test_tiles_batched_across_images_equal_each_image_alone(
    shapes, tile_steps, batch_size, padding, seed
):
    """A folder of slices: tiles of consecutive images share forward passes, and each
    result is the image predicted alone (and, for valid models, the whole image)."""
    model = small_model(depth=3, base=2, seed=seed, padding=padding)
    rng = np.random.default_rng(seed)
    images = [rng.random(shape, dtype=np.float32) for shape in shapes]
    tile = valid_tile(3, tile_steps) if padding == "valid" else 8 * (1 + tile_steps)
    together = predict_images(model, images, tile_shape=tile, batch_size=batch_size, progress=False)
    for image, result in zip(images, together, strict=True):
        alone = predict(model, image, tile_shape=tile, progress=False)
        assert result.shape == alone.shape == (2, *image.shape)
        assert np.abs(result - alone).max() < 1e-5
        if padding == "valid":
            assert np.abs(result - whole_image_reference(model, image)).max() < 1e-5


def test_batches_of_tiles_cross_images_of_one_shape_only():
    tiles = [["a0", "a1", "a2"], ["b0"], ["c0", "c1"]]
    batches = _tile_batches(tiles, [(8, 8), (8, 8), (16, 8)], batch_size=2)
    assert batches == [
        [(0, "a0"), (0, "a1")],
        [(0, "a2"), (1, "b0")],
        [(2, "c0"), (2, "c1")],
    ]


def test_a_bad_image_among_several_is_named_by_its_number():
    model = small_model(depth=2)
    good = np.zeros((12, 12), dtype=np.float32)
    bad = good.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"^image 1: holds NaN"):
        predict_images(model, [good, bad, good], batch_size=2, progress=False)


def test_a_tile_dependent_model_gives_one_answer_whatever_the_memory():
    from unetile.predict.engine import stable_tile

    torch.manual_seed(5)
    model = UNet(depth=2, base_channels=4, norm="instance", dropout=0.0).eval()
    image = np.random.default_rng(5).random((150, 170), dtype=np.float32)
    # Without a recorded tile the memory decides the tile, and instance norm the answer.
    small, large = 4e6, 4e9
    tiny = predict(model, image, memory_budget=small, progress=False)
    roomy = predict(model, image, memory_budget=large, progress=False)
    assert np.abs(tiny - roomy).max() > 1e-3
    model.training_tile = (44, 44)
    assert stable_tile(model) == (44, 44)
    tiny = predict(model, image, memory_budget=small, progress=False)
    roomy = predict(model, image, memory_budget=large, progress=False)
    np.testing.assert_array_equal(tiny, roomy)
    assert np.array_equal(labels_from_probabilities(tiny), labels_from_probabilities(roomy))
    # A tile-exact model keeps the tile the memory allows: every tile gives its answer.
    exact = small_model(depth=2, base=4, seed=5)
    exact.training_tile = (44, 44)
    assert stable_tile(exact) is None


def test_load_model_records_the_training_tile(tmp_path):
    from unetile.train.config import make_config
    from unetile.train.run import train

    images, labels = tmp_path / "images", tmp_path / "labels"
    for index in range(2):
        cells = (np.indices((48, 48)).sum(axis=0) % 12 < 9).astype(np.uint8) * 255
        io.write_image(images / f"{index}.png", cells // 2 + index)
        io.write_image(labels / f"{index}.png", cells)
    config = make_config(
        "cpu-fast",
        images=str(images),
        labels=str(labels),
        out=str(tmp_path / "run"),
        depth=2,
        tile=(20,),
        steps=1,
        compile=False,
        threads=1,
        augment="none",
    )
    train(config, progress=False)
    model, _ = card.load_model(tmp_path / "run")
    assert model.training_tile == (20, 20) and model.config.norm == "instance"
