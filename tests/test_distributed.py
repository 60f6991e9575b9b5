"""Prediction region by region on a real Dask cluster: the same bytes, and resume."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import example, given, settings
from hypothesis import strategies as st

from unetile import io
from unetile.cli import main
from unetile.network.model import UNet, input_size_for_output, size_multiple
from unetile.network.tiling import grid_axes, owned_region, tile_step
from unetile.predict import card
from unetile.predict.files import predict_to_files
from unetile.predict.instances import InstanceOptions
from unetile.predict.regions import (
    RECORDS,
    _distributed,
    axis_groups,
    model_payload,
    predict_regions,
    region_grid,
    work_folder,
)

distributed = pytest.importorskip("distributed")


def small_model(depth=2, base=2, seed=0, dims=2, in_channels=1):
    torch.manual_seed(seed)
    model = UNet(
        in_channels=in_channels,
        num_classes=2,
        depth=depth,
        base_channels=base,
        dropout=0.0,
        dims=dims,
    )
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def valid_tile(model, steps=0):
    margin, depth = model.context_margin, model.config.depth
    smallest = next(t for t in range(1, 64) if input_size_for_output(t, depth) - 2 * margin == t)
    return smallest + steps * size_multiple(depth)


def read(path):
    path = str(path)
    return tifffile.imread(path) if path.endswith(".tif") else zarr.open_array(path, mode="r")[:]


def outputs(folder, name, suffix=".zarr", kinds=("labels", "probabilities", "instances")):
    return {kind: folder / f"{name}_{kind}{suffix}" for kind in kinds}


def assert_same_files(first: dict, second: dict):
    for kind in first:
        a, b = read(first[kind]), read(second[kind])
        assert a.dtype == b.dtype, kind
        assert np.array_equal(a, b), kind


@pytest.fixture(scope="module")
def client():
    """A real scheduler and two single-thread workers, in this process (starts in ~0.2 s)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as connected,
    ):
        yield connected


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def test_the_last_tile_joins_the_chunk_it_starts_in():
    assert axis_groups([0, 384, 624], 384) == [[0], [1, 2]]
    assert axis_groups([0, 16, 32, 48], 16) == [[0], [1], [2], [3]]
    assert axis_groups([0, 16, 32, 40], 16, region_tiles=2) == [[0, 1], [2, 3]]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 90), min_size=2, max_size=3),
    tile_steps=st.integers(1, 4),
    extra=st.integers(0, 7),
    region_tiles=st.integers(1, 3),
)
def test_regions_partition_the_image_in_whole_chunks_and_hold_every_tile_once(
    shape, tile_steps, extra, region_tiles
):
    alignment = 8
    tile_shape = [tile_steps * alignment + extra] * len(shape)
    steps = [tile_step(t, alignment) for t in tile_shape]
    regions = region_grid(shape, tile_shape, steps, alignment, region_tiles)
    per_axis = grid_axes(shape, tile_shape, steps, alignment)
    cover = np.zeros(shape, dtype=np.int64)
    numbers = []
    chunks = [min(s, step) for s, step in zip(shape, steps, strict=True)]
    for index, region in enumerate(regions):
        assert region.index == index
        cover[region.box] += 1
        for axis, box in enumerate(region.box):
            # Whole chunks: no two regions ever write one chunk.
            assert box.start % chunks[axis] == 0
            assert box.stop % chunks[axis] == 0 or box.stop == shape[axis]
        for origin in region.origins:
            owned = owned_region(origin, per_axis, shape)
            assert all(
                b.start <= o.start and o.stop <= b.stop
                for o, b in zip(owned, region.box, strict=True)
            )
        numbers.extend(region.tile_numbers)
    assert np.all(cover == 1)
    assert sorted(numbers) == list(range(math.prod(len(o) for o in per_axis)))


# --------------------------------------------------------------------------
# The same bytes as one process
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "region_tiles", "grow"), [(".zarr", 1, 2), (".tif", 2, 0)])
def test_a_cluster_writes_the_single_process_files_bit_for_bit(
    client, tmp_path, suffix, region_tiles, grow
):
    model = small_model(depth=2, base=4, seed=1)
    image = np.random.default_rng(9).random((70, 90), dtype=np.float32)
    tile = valid_tile(model, 6)  # 14 px: 5 x 7 tiles, cells cross many borders
    options = dict(tile_shape=tile, grow=grow, progress=False)
    single = predict_to_files(model, image, **outputs(tmp_path, "single", suffix), **options)
    spread = predict_regions(
        model,
        image,
        **outputs(tmp_path, "spread", suffix),
        client=client,
        region_tiles=region_tiles,
        **options,
    )
    assert_same_files(single, spread)
    assert read(single["instances"]).max() > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [*single.values(), *spread.values()]
    )


def test_workers_read_a_zarr_input_by_path_and_3d_stacks_match(client, tmp_path):
    model = small_model(depth=2, base=2, seed=4, dims=3)
    stack = np.random.default_rng(4).integers(0, 255, (2, 12, 30, 26), dtype=np.uint8)
    source = tmp_path / "stack.zarr"
    zarr.open_array(store=str(source), mode="w", shape=stack.shape, dtype=stack.dtype)[:] = stack
    tile = valid_tile(model, 3)
    options = dict(tile_shape=tile, grow=1, progress=False, normalization=(100.0, 50.0))
    model = UNet.from_config({**model.config.to_dict(), "in_channels": 2})
    model.reset_parameters(torch.Generator().manual_seed(4))
    model.eval()
    single = predict_to_files(model, stack, **outputs(tmp_path, "single"), **options)
    spread = predict_regions(model, source, **outputs(tmp_path, "spread"), client=client, **options)
    assert_same_files(single, spread)


@settings(max_examples=6, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    tile_steps=st.integers(0, 3),
    region_tiles=st.integers(1, 3),
    grow=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
@example(height=37, width=40, tile_steps=0, region_tiles=2, grow=3, seed=1)
def test_regions_run_here_equal_the_single_process_files_for_any_grid(
    tmp_path_factory, height, width, tile_steps, region_tiles, grow, seed
):
    # Bit for bit with one tile per forward pass; a larger batch groups other
    # tiles together than the single process does, which changes the rounding.
    folder = tmp_path_factory.mktemp("any")
    model = small_model(depth=2, base=2, seed=seed % 5)
    image = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    tile = valid_tile(model, 3 + 2 * tile_steps)
    options = dict(tile_shape=tile, grow=grow, progress=False)
    single = predict_to_files(model, image, **outputs(folder, "single"), **options)
    here = predict_regions(
        model, image, **outputs(folder, "here"), region_tiles=region_tiles, **options
    )
    assert_same_files(single, here)


def test_the_model_travels_as_safetensors_bytes_and_config():
    model = small_model(depth=3, base=2, seed=2)
    payload = model_payload(model)
    assert set(payload) == {"config", "weights", "sha256"}
    assert isinstance(payload["weights"], bytes)
    from safetensors.torch import load

    state = load(payload["weights"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert UNet.from_config(payload["config"]).config == model.config


# --------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------


class FailingImage:
    """An image whose rows from ``fail_from`` on cannot be read (a worker that dies there)."""

    def __init__(self, array, fail_from):
        self.array, self.fail_from = array, fail_from
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, index):
        rows = index[-2]
        if rows.stop > self.fail_from:
            raise RuntimeError(f"rows {rows.start}-{rows.stop} lost")
        return self.array[index]


@pytest.mark.parametrize("on_cluster", [True, False])
def test_a_failed_run_resumes_from_its_records_to_the_same_files(client, tmp_path, on_cluster):
    model = small_model(depth=2, base=4, seed=2)
    image = np.random.default_rng(2).random((80, 60), dtype=np.float32)
    options = dict(tile_shape=valid_tile(model, 6), grow=2, progress=False)
    options["client"] = client if on_cluster else None
    reference = predict_regions(model, image, **outputs(tmp_path, "whole"), **options)
    assert read(reference["instances"]).max() > 100
    wanted = outputs(tmp_path, "resumed")
    with pytest.raises((RuntimeError, ValueError), match="lost"):
        predict_regions(model, FailingImage(image, fail_from=60), **wanted, **options)
    work = work_folder(wanted["labels"])
    records = {p.name: p.stat().st_mtime_ns for p in (work / RECORDS).iterdir()}
    tile = options["tile_shape"]
    total = len(region_grid((80, 60), (tile, tile), (tile_step(tile, 2),) * 2, 2))
    assert 0 < len(records) < total
    assert not any(path.exists() for path in wanted.values())
    with pytest.raises(ValueError, match="unfinished prediction"):
        predict_regions(model, image, **wanted, **options)
    with pytest.raises(ValueError, match="another grow"):
        predict_regions(model, image, **wanted, **{**options, "grow": 1}, resume=True)
    resumed = predict_regions(model, image, **wanted, **options, resume=True)
    assert_same_files(reference, resumed)
    assert not work.exists()


WATERSHED = InstanceOptions(method="watershed", seed_threshold=0.501, min_size=2, max_extent=16)
DISTANCE = InstanceOptions(method="distance", h=1.0, min_size=3, fill_holes=True, max_extent=16)
# Fitted from labels: a size floor and an opening.
OPENED = InstanceOptions(min_size=4, opening=1, max_extent=16)


@pytest.mark.parametrize(
    "options", [WATERSHED, DISTANCE, OPENED], ids=["watershed", "distance", "opened"]
)
def test_watershed_instances_on_a_cluster_are_the_single_process_ids_and_resume(
    client, tmp_path, options
):
    # Seed 2 gives ~1,100 foreground components, none wider than 14 px: the
    # 16-px margin holds them, and the 14-px tiles cut through many.
    model = small_model(depth=2, base=4, seed=2)
    image = np.random.default_rng(2).random((70, 90), dtype=np.float32)
    common = dict(tile_shape=valid_tile(model, 6), grow=1, progress=False)
    common["instance_options"] = options
    kinds = ("labels", "instances")
    single = predict_to_files(model, image, **outputs(tmp_path, "single", ".tif", kinds), **common)
    assert read(single["instances"]).max() > (20 if options.opening else 150)
    wanted = outputs(tmp_path, "spread", ".tif", kinds)
    with pytest.raises((RuntimeError, ValueError), match="lost"):
        predict_regions(model, FailingImage(image, fail_from=50), **wanted, client=client, **common)
    with pytest.raises(ValueError, match="another instances"):
        changed = {**common, "instance_options": InstanceOptions(method="distance", h=2.0)}
        predict_regions(model, image, **wanted, client=client, resume=True, **changed)
    spread = predict_regions(model, image, **wanted, client=client, resume=True, **common)
    assert_same_files(single, spread)
    # The probabilities the watershed read were scratch: only what was asked for is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [*single.values(), *spread.values()]
    )


def test_a_group_of_cells_wider_than_the_margin_is_refused_region_by_region(tmp_path):
    model = small_model(depth=2, base=4, seed=2)
    image = np.random.default_rng(2).random((70, 90), dtype=np.float32)
    narrow = InstanceOptions(method="distance", max_extent=4)
    with pytest.raises(ValueError, match="wider than max_extent = 4 px"):
        predict_regions(
            model,
            image,
            instances=tmp_path / "cells.zarr",
            tile_shape=valid_tile(model, 6),
            instance_options=narrow,
            progress=False,
        )


def test_cli_resume_after_ctrl_c_and_a_cluster_by_its_address(
    client, tmp_path, capsys, monkeypatch
):
    model = small_model(depth=2, base=4, seed=1)
    card.save_model(
        tmp_path / "run", model, {"model": model.config.to_dict(), "normalization": None}
    )
    image = np.random.default_rng(1).random((60, 50), dtype=np.float32)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    tile = str(valid_tile(model, 6))
    common = ["predict", str(tmp_path / "run"), str(tmp_path / "cells.tif"), "--tile", tile]
    common += ["--instances", "--grow", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0

    calls = []
    original = UNet.forward

    def interrupted(self, inputs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the seventh tile
        return original(self, inputs)

    # Without a cluster the regions run in this process, where Ctrl-C lands.
    monkeypatch.setattr(UNet, "forward", interrupted)
    assert main([*common, "--out", str(tmp_path / "two"), "--resume"]) == 130
    monkeypatch.setattr(UNet, "forward", original)
    assert "add --resume" in capsys.readouterr().err
    records = list((work_folder(tmp_path / "two" / "cells_labels.tif") / RECORDS).iterdir())
    assert len(records) == 5  # regions 0-4 hold the first six tiles (region 2 two)
    assert main([*common, "--out", str(tmp_path / "two"), "--resume"]) == 0
    address = client.scheduler.address
    assert main([*common, "--out", str(tmp_path / "three"), "--scheduler", address]) == 0
    assert tifffile.imread(tmp_path / "one" / "cells_instances.tif").max() > 20
    for name in ("two", "three"):
        for kind in ("labels", "instances"):
            first = tifffile.imread(tmp_path / "one" / f"cells_{kind}.tif")
            assert np.array_equal(first, tifffile.imread(tmp_path / name / f"cells_{kind}.tif"))
    written = sorted(name for name in os.listdir(tmp_path / "two") if not name.startswith("."))
    assert written == ["cells_instances.tif", "cells_labels.tif"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--workers", "2", "--scheduler", "tcp://x:1"], "not both"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--region-tiles", "0", "--resume"], "--region-tiles must be >= 1"),
    ],
)
def test_bad_cluster_options_are_one_line_errors(tmp_path, capsys, options, message):
    model = small_model()
    card.save_model(
        tmp_path / "run", model, {"model": model.config.to_dict(), "normalization": None}
    )
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 20), np.float32))
    status = main(
        ["predict", str(tmp_path / "run"), str(tmp_path / "a.tif")]
        + options
        + [
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_same_model_and_a_missing_dask_are_refused_in_one_line(tmp_path, monkeypatch):
    same = UNet(depth=2, base_channels=2, padding="same")
    with pytest.raises(ValueError, match="needs a 'valid' model"):
        predict_regions(same, np.zeros((20, 20), np.float32), labels=tmp_path / "l.zarr")
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)
    with pytest.raises(io.InputError, match=r"pip install 'unetile\[distributed\]'"):
        _distributed()
