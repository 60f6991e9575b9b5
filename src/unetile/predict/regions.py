"""Prediction region by region on a Dask cluster, resumable after a crash.

The overlap-tile grid of :mod:`unetile.predict` is cut into *regions*: groups
of output tiles whose owned pixels (:func:`unetile.network.tiling.owned_region`)
cover whole chunks of the output zarr stores (the chunks are one tile step).
Each region is one ``dask.distributed`` task: the worker reads the input
windows of its tiles itself (a zarr store or a memory-mapped TIFF, by path),
runs the network and writes its region straight into the stores, so no
image crosses the network. The model reaches each worker once, as
safetensors bytes and its config (no pickled module).

Instances follow the single-process algorithm exactly: every tile's cells are
numbered by themselves (face-connected components), each region records the
one-pixel faces of its box, small tasks turn those faces into pairs of labels
that touch across region borders, the client joins the pairs into one lookup
table (:func:`unetile.predict.join_labels`) and a last pass writes the final
ids, grown by ``grow`` px from a ``grow``-wide margin. The tiles, their order
and the label numbering are those of :func:`unetile.predict.files.predict_to_files`,
so both write the same bytes when they compute alike (batch size, torch threads
per task, CPU kind; docs/guide/cluster.md).

A work folder beside the outputs (``.NAME.unetile-work``) holds the stores and
one completion record per region, written atomically after the region's
data; ``resume=True`` skips the regions that have one. Without a ``client``
the same tasks run one after another in this process, which makes
single-machine predictions resumable too.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..network.model import UNet
from ..network.normalization import Normalization
from ..network.tiling import Tiling, grid_axes, owned_region, widened_box
from ..precision import check_precision
from .engine import (
    PredictOptions,
    check_memory,
    forward_batches,
    read_input_image,
    read_inputs,
    resolve_device,
    spatial_shape,
    uses_channels_last,
)
from .files import (
    KINDS,
    block_products,
    create_stores,
    extracts_by_region,
    output_chunks,
    provenance,
    publish,
    requested_outputs,
)
from .instances import grow_cells, join_labels, label_foreground, rank_keys, write_region_keys
from .instances import region_grid as instance_regions
from .postprocessing import PostProcessing, class_dtype, legacy_post

WORK_SUFFIX = ".unetile-work"
MANIFEST = "manifest.json"
RECORDS = "regions"  # one .npz per predicted region: its completion record
FINISHED = "final"  # one marker per region whose final instance ids are written
KEYS = "keys"  # one .npy per extraction region: its object keys (methods beyond components)
TILE_BITS = 32  # provisional id = tile number << 32 | the cell's number within its tile
INSTALL_HINT = "pip install 'unetile[distributed]'"
IN_FLIGHT_PER_THREAD = 4  # tasks submitted ahead per worker thread
IN_FLIGHT_MIN = 16


def _distributed():
    try:
        import distributed
    except ModuleNotFoundError:
        raise io.InputError(
            f"prediction on a Dask cluster needs dask.distributed: {INSTALL_HINT}"
        ) from None
    return distributed


# --------------------------------------------------------------------------
# Geometry: regions of whole chunks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A group of output tiles predicted by one task.

    Attributes
    ----------
    index : int
        Row-major number of the region.
    position : tuple of int
        Region index along each axis.
    origins : tuple of tuple of int
        Output tile origins (pixels), in the tile grid's row-major order.
    tile_numbers : tuple of int
        Row-major numbers of those tiles in the whole tile grid.
    box : tuple of slice
        Pixels the region writes: the union of its tiles' owned regions.
    """

    index: int
    position: tuple[int, ...]
    origins: tuple[tuple[int, ...], ...]
    tile_numbers: tuple[int, ...]
    box: tuple[slice, ...]


def axis_groups(origins: Sequence[int], step: int, region_tiles: int = 1) -> list[list[int]]:
    """Tile indices of one axis grouped so that each group's owned span is whole chunks.

    Tiles are grouped by the chunk (``step`` px) their origin falls in, then
    ``region_tiles`` chunks at a time. Every origin but the last is a multiple
    of ``step``; the last one (moved back to end at the image border) joins
    the group of the chunk it starts in, so no two groups write one chunk.

    Examples
    --------
    >>> axis_groups([0, 384, 624], 384)
    [[0], [1, 2]]
    """
    if step < 1 or region_tiles < 1:
        raise ValueError(f"step and region_tiles must be >= 1, got {step} and {region_tiles}")
    groups: dict[int, list[int]] = {}
    for index, origin in enumerate(origins):
        groups.setdefault(origin // step // region_tiles, []).append(index)
    return list(groups.values())


def region_grid(
    image_shape: Sequence[int],
    tile_shape: Sequence[int],
    steps: Sequence[int],
    alignment: int,
    region_tiles: int = 1,
) -> list[Region]:
    """The regions of an image's tile grid, row-major; their boxes partition the image.

    Parameters
    ----------
    image_shape, tile_shape, steps : sequence of int
        Spatial shape of the image, output tile and tile step (pixels).
    alignment : int
        Tile origins are multiples of this (``2**(depth-1)``).
    region_tiles : int
        Tile steps per region along each axis (``region_tiles ** dims`` tiles a task).
    """
    per_axis = grid_axes(image_shape, tile_shape, steps, alignment)
    counts = [len(origins) for origins in per_axis]
    groups = [
        axis_groups(origins, step, region_tiles)
        for origins, step in zip(per_axis, steps, strict=True)
    ]
    regions = []
    for index, position in enumerate(np.ndindex(*map(len, groups))):
        members = [groups[axis][p] for axis, p in enumerate(position)]
        tiles = list(np.ndindex(*map(len, members)))
        indices = [tuple(members[a][t] for a, t in enumerate(tile)) for tile in tiles]
        origins = tuple(tuple(per_axis[a][i] for a, i in enumerate(ix)) for ix in indices)
        numbers = tuple(int(np.ravel_multi_index(ix, counts)) for ix in indices)
        box = tuple(
            slice(
                owned_region(origins[0], per_axis, image_shape)[axis].start,
                owned_region(origins[-1], per_axis, image_shape)[axis].stop,
            )
            for axis in range(len(image_shape))
        )
        regions.append(Region(index, tuple(position), origins, numbers, box))
    return regions


# --------------------------------------------------------------------------
# What travels to the workers
# --------------------------------------------------------------------------


def model_payload(model: UNet) -> dict:
    """The model as ``{"config": dict, "weights": safetensors bytes, "sha256": str}``."""
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    weights = save(state)
    return {
        "config": model.config.to_dict(),
        "weights": weights,
        "sha256": hashlib.sha256(weights).hexdigest(),
    }


_MODELS: dict[tuple[str, str], UNet] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(payload: dict, device: torch.device) -> UNet:
    """The payload's model, ready for inference on ``device``: built once per process.

    It is shared read-only by the task threads, so its layout is fixed here
    as :func:`unetile.predict.iter_predictions` sets it for one call.
    """
    from safetensors.torch import load

    key = (payload["sha256"], str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            model = UNet.from_config(payload["config"])
            model.load_state_dict(load(payload["weights"]))
            model.eval().to(device)
            if uses_channels_last(model, device):
                model.to(memory_format=torch.channels_last)
            _MODELS[key] = model
        return _MODELS[key]


@dataclass(frozen=True)
class ImagePath:
    """An input image by path, opened lazily where it is read (zarr, memory-mapped TIFF)."""

    path: str
    dims: int
    in_channels: int = 1

    def open(self):
        return read_input_image(Path(self.path), self.dims, self.in_channels)


def _open_image(image):
    return image.open() if isinstance(image, ImagePath) else image


# --------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything a region task needs besides the model, the image and the region."""

    work: str
    spatial: tuple[int, ...]
    tile_shape: tuple[int, ...]
    steps: tuple[int, ...]
    tiling: Tiling
    kinds: tuple[str, ...]
    post: PostProcessing
    by_region: bool
    batch_size: int
    tta: bool
    device: str | None
    normalization: Normalization | None
    num_classes: int
    precision: str = "fp32"


def _store(plan: Plan, name: str):
    import zarr

    return zarr.open_array(store=str(Path(plan.work) / f"{name}.zarr"), mode="r+")


def _local(box: Sequence[slice], within: Sequence[slice]) -> tuple[slice, ...]:
    return tuple(
        slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, within, strict=True)
    )


def predict_region(payload: dict, image, plan: Plan, region: Region) -> int:
    """Predict one region into the work folder's stores and write its completion record.

    Returns the region's index. The record (``regions/<index>.npz``, written
    under a temporary name and renamed) holds the tiles' cell counts, the
    label pairs touching across the region's inner tile borders and the
    region's faces: what joining the cells later needs, and nothing larger.
    """
    device = resolve_device(plan.device)
    check_precision(plan.precision, device)
    model = _worker_model(payload, device)
    check_memory(model, plan.tile_shape, plan.batch_size, device)
    image = _open_image(image)
    per_axis = grid_axes(plan.spatial, plan.tile_shape, plan.steps, plan.tiling.alignment)
    box_shape = tuple(b.stop - b.start for b in region.box)
    classes = np.zeros(box_shape, dtype=class_dtype(plan.num_classes))
    probabilities = None
    if "probabilities" in plan.kinds or plan.by_region:
        probabilities = np.zeros((plan.num_classes, *box_shape), dtype=np.float32)
    provisional = np.zeros(box_shape, dtype=np.uint64)
    counts = []
    for origin, output in _tile_outputs(model, image, region.origins, plan, device):
        owned = owned_region(origin, per_axis, plan.spatial)
        block = output[(slice(None), *_local(owned, [slice(o, None) for o in origin]))]
        where = _local(owned, region.box)
        per_tile = "instances" in plan.kinds and not plan.by_region
        classes[where], foreground = block_products(block, plan.post, per_tile)
        if probabilities is not None:
            probabilities[(slice(None), *where)] = block
        if per_tile:
            pieces, found = label_foreground(foreground)
            number = region.tile_numbers[len(counts)]
            provisional[where] = np.where(
                pieces > 0, (np.uint64(number) << np.uint64(TILE_BITS)) | pieces, 0
            )
            counts.append(found)
    if probabilities is not None:
        _store(plan, "probabilities")[(slice(None), *region.box)] = probabilities
    if "labels" in plan.kinds:
        _store(plan, "labels")[region.box] = classes
    record = {"tile_numbers": np.asarray(region.tile_numbers, dtype=np.int64)}
    if "instances" in plan.kinds and not plan.by_region:
        _store(plan, "provisional")[region.box] = provisional
        record["counts"] = np.asarray(counts, dtype=np.int64)
        record["pairs"] = _inner_pairs(provisional, region, per_axis)
        for axis in range(len(box_shape)):
            record[f"low{axis}"] = np.take(provisional, 0, axis=axis)
            record[f"high{axis}"] = np.take(provisional, -1, axis=axis)
    path = Path(plan.work) / RECORDS / f"{region.index}.npz"
    with io.atomic_path(path) as temporary:
        np.savez(temporary, **record)
    return region.index


def _tile_outputs(model, image, origins, plan: Plan, device):
    """``(origin, probabilities)`` of each tile, in order (the shared tile loop)."""
    batches = [origins[i : i + plan.batch_size] for i in range(0, len(origins), plan.batch_size)]
    how = PredictOptions(tta=plan.tta, precision=plan.precision, progress=False)

    def load(batch):
        windows = [plan.tiling.window(o, plan.tile_shape, plan.spatial) for o in batch]
        return read_inputs(image, windows, plan.normalization)

    for batch, outputs in forward_batches(model, batches, load, device, how):
        yield from zip(batch, outputs, strict=True)


def _touching(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    touching = (before > 0) & (after > 0)
    return np.stack([before[touching], after[touching]], axis=1)


def _inner_pairs(provisional: np.ndarray, region: Region, per_axis) -> np.ndarray:
    """Label pairs touching across the tile borders inside the region box."""
    pairs = [np.zeros((0, 2), dtype=np.uint64)]
    for axis, axis_box in enumerate(region.box):
        starts = sorted({o[axis] for o in region.origins})
        for start in starts[1:]:
            at = start - axis_box.start
            pairs.append(
                _touching(
                    np.take(provisional, at - 1, axis=axis), np.take(provisional, at, axis=axis)
                )
            )
    return np.unique(np.concatenate(pairs), axis=0)


def _read_record(work: str, index: int) -> dict:
    with np.load(Path(work) / RECORDS / f"{index}.npz") as record:
        return dict(record)


def region_pairs(work: str, neighbours: tuple[Region, Sequence[tuple[int, int]]]) -> dict:
    """The region's cell counts and the label pairs touching across its borders.

    ``neighbours`` is the region and the ``(axis, index)`` of the regions just
    before it along each axis; the pairs across those borders come from the
    two faces in the records, so only faces are read, never the stores.
    """
    region, lower = neighbours
    record = _read_record(work, region.index)
    pairs = [record["pairs"]]
    for axis, neighbour in lower:
        before = _read_record(work, neighbour)[f"high{axis}"]
        pairs.append(_touching(before, record[f"low{axis}"]))
    return {
        "tile_numbers": record["tile_numbers"],
        "counts": record["counts"],
        "pairs": np.unique(np.concatenate(pairs).astype(np.uint64), axis=0),
    }


def _dense(packed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Provisional (tile, cell) ids to the consecutive numbering of the single-process run."""
    packed = np.asarray(packed, dtype=np.uint64)
    tiles = (packed >> np.uint64(TILE_BITS)).astype(np.int64)
    cells = (packed & np.uint64(2**TILE_BITS - 1)).astype(np.int64)
    return np.where(packed > 0, offsets[tiles] + cells, 0)


def extraction_keys(plan: Plan, job: tuple[int, tuple[slice, ...]]) -> int:
    """Object keys of one extraction region (watershed, size or hole rules), and its record.

    The region is read from the probabilities with the margin of
    :func:`unetile.predict.instances.write_region_keys`, so its keys are those of the
    whole image; they go to the ``provisional`` store and, as the region's
    completion record, to ``keys/<index>.npy``.
    """
    index, region = job
    found = write_region_keys(
        _store(plan, "probabilities"), _store(plan, "provisional"), region, plan.post.cells
    )
    with io.atomic_path(Path(plan.work) / KEYS / f"{index}.npy") as temporary:
        with open(temporary, "wb") as file:
            np.save(file, found)
    return index


def finish_region(plan: Plan, lut: np.ndarray, offsets: np.ndarray, region: Region) -> int:
    """Write the final instance ids of one region, grown from a ``grow``-px margin.

    ``lut`` maps the joined per-tile labels (components) or, with
    ``plan.by_region``, is the image's sorted object keys.
    """
    window = widened_box(region.box, plan.post.grow, plan.spatial)
    provisional = np.asarray(_store(plan, "provisional")[window])
    if plan.by_region:
        ids = rank_keys(provisional, lut)
    else:
        ids = lut[_dense(provisional, offsets)]
    labels = grow_cells(ids, plan.post.grow)
    _store(plan, "instances")[region.box] = labels[_local(region.box, window)]
    marker = Path(plan.work) / FINISHED / str(region.index)
    with io.atomic_path(marker) as temporary:
        temporary.write_text("")
    return region.index


# --------------------------------------------------------------------------
# Running tasks: on a cluster, or one after another here
# --------------------------------------------------------------------------


def _run(
    client, function: Callable, items: Sequence, shared: Sequence, desc: str, progress: bool
) -> list:
    """``function(*shared, item)`` for every item, results in item order.

    On a client the shared arguments are scattered once to every worker and
    the tasks run where the scheduler puts them (it retries those of workers
    that die); the first failure cancels the rest and is raised here. At most
    :data:`IN_FLIGHT_PER_THREAD` tasks per worker thread are submitted at a
    time, so neither this process nor the scheduler holds millions of tasks.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), unit="region", disable=not progress, desc=desc)
    try:
        if client is None:
            results = []
            for item in items:
                results.append(function(*shared, item))
                bar.update(1)
            return results
        distributed = _distributed()
        # In a list, so that a dict (the model payload) travels as one object
        # rather than as one future per key, named by its keys.
        scattered = [client.scatter([value], broadcast=True, hash=False)[0] for value in shared]
        threads = sum(client.nthreads().values())
        window = max(IN_FLIGHT_MIN, IN_FLIGHT_PER_THREAD * threads)
        waiting = iter(enumerate(items))
        running: dict[str, tuple[int, object]] = {}

        def submit(number, item):
            future = client.submit(function, *scattered, item, pure=False)
            running[future.key] = (number, future)
            return future

        results: list = [None] * len(items)
        finished = distributed.as_completed(
            [submit(*entry) for entry in itertools.islice(waiting, window)]
        )
        try:
            for future in finished:
                number, _ = running.pop(future.key)
                results[number] = future.result()  # raises the task's error here
                bar.update(1)
                entry = next(waiting, None)
                if entry is not None:
                    finished.add(submit(*entry))
            return results
        finally:
            client.cancel([future for _, future in running.values()])
    finally:
        bar.close()


# --------------------------------------------------------------------------
# The whole prediction
# --------------------------------------------------------------------------


def work_folder(first_output: str | os.PathLike) -> Path:
    """The work folder of a prediction whose first output is ``first_output``."""
    first_output = Path(first_output)
    return first_output.parent / f".{first_output.name}{WORK_SUFFIX}"


def _create_stores(work: Path, plan: Plan, chunks: Sequence[int]) -> None:
    create_stores(work, plan.spatial, chunks, plan.kinds, plan.num_classes, plan.by_region)
    for folder in (RECORDS, FINISHED, KEYS):
        (work / folder).mkdir()


def _prepare_work(work: Path, manifest: dict, plan: Plan, chunks, resume: bool) -> None:
    """Create the work folder, or check that the one found belongs to this prediction."""
    if (work / MANIFEST).is_file():
        if not resume:
            raise ValueError(
                f"{work} holds an unfinished prediction of these outputs; continue it with "
                "resume (--resume) or delete that folder"
            )
        found = {"precision": "fp32", **io.read_json(work / MANIFEST)}  # older: fp32 only
        differing = sorted(key for key in manifest if found.get(key) != manifest[key])
        if differing:
            said = [
                f"{key} ({found[key]}, now {manifest[key]})" if key == "precision" else key
                for key in differing
            ]
            raise ValueError(
                f"{work} was started with another {', '.join(said)}; resume with the "
                "same model, image and options, or delete that folder to start afresh"
            )
        return
    # A folder without its manifest was never started: nothing in it is kept.
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _create_stores(work, plan, chunks)
    io.write_json(work / MANIFEST, manifest)


def _intact_records(folder: Path, pattern: str) -> set[int]:
    """The numbers of the readable records in ``folder``; a damaged one (truncated by a
    crash of the file system, say) is removed with one warning, and its region done again."""
    import warnings
    import zipfile

    done = set()
    for path in sorted(folder.glob(pattern)):
        if not path.stem.isdigit():
            continue
        try:
            record = np.load(path)
            if isinstance(record, np.lib.npyio.NpzFile):
                with record:
                    for key in record.files:
                        record[key]  # reads and checks every array
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.warn(
                f"{path}: a damaged completion record ({reason}); removed, its region is "
                "predicted again",
                stacklevel=2,
            )
            path.unlink()
            continue
        done.add(int(path.stem))
    return done


def _region_shape(regions: Sequence[Region]) -> tuple[int, ...]:
    return tuple(p + 1 for p in regions[-1].position)


def _lower_neighbours(region: Region, shape: Sequence[int]) -> list[tuple[int, int]]:
    lower = []
    for axis, p in enumerate(region.position):
        if p > 0:
            before = list(region.position)
            before[axis] -= 1
            lower.append((axis, int(np.ravel_multi_index(before, shape))))
    return lower


def _extract_by_region(client, work: Path, plan: Plan, chunks, regions, progress: bool):
    """Object keys region by region with a margin, then their ranks as the final ids."""
    boxes = instance_regions(plan.spatial, chunks, plan.post.cells.extent(len(plan.spatial)))
    done = _intact_records(work / KEYS, "*.npy")
    todo = [(index, box) for index, box in enumerate(boxes) if index not in done]
    _run(client, extraction_keys, todo, [plan], "instances", progress)
    found = [np.zeros(0, np.uint64)]
    found += [np.load(work / KEYS / f"{index}.npy") for index in range(len(boxes))]
    sorted_keys = np.unique(np.concatenate(found))
    _finish(client, work, plan, regions, sorted_keys, None, progress)


def _finish(client, work: Path, plan: Plan, regions, lut, offsets, progress: bool) -> None:
    finished = {int(p.name) for p in (work / FINISHED).iterdir() if p.name.isdigit()}
    todo = [region for region in regions if region.index not in finished]
    _run(client, finish_region, todo, [plan, lut, offsets], "ids", progress)


def _join_instances(client, work: Path, plan: Plan, regions, tile_count: int, progress: bool):
    """Join the cells across region borders and write their final ids, region by region."""
    shape = _region_shape(regions)
    jobs = [(region, _lower_neighbours(region, shape)) for region in regions]
    found = _run(client, region_pairs, jobs, [str(work)], "join", progress)
    counts = np.zeros(tile_count, dtype=np.int64)
    for entry in found:
        counts[entry["tile_numbers"]] = entry["counts"]
    # Cells numbered consecutively in tile order, as the single-process run numbers them.
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pairs = np.concatenate([np.zeros((0, 2), np.uint64)] + [e["pairs"] for e in found])
    lut = join_labels(_dense(pairs, offsets), int(counts.sum()))
    _finish(client, work, plan, regions, lut, offsets, progress)


def predict_regions(
    model: UNet,
    image,
    options: PredictOptions | None = None,
    *,
    labels: str | os.PathLike | None = None,
    probabilities: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    post: PostProcessing | None = None,
    foreground_class: int = 1,
    grow: int = 0,
    instance_options=None,
    threshold: float | None = None,
    client=None,
    resume: bool = False,
    region_tiles: int = 1,
    **changes,
) -> dict[str, Path]:
    """Predict an image into files region by region, on a Dask cluster or here; resumable.

    Writes what :func:`unetile.predict.predict_to_files` writes, byte for
    byte with the same tile and batch size (``valid`` models only: a ``same``
    model's blending needs the whole image's sums).

    Parameters
    ----------
    model : UNet
        Sent to the workers once, as safetensors bytes and its config.
    image : path or array-like
        A path (zarr store, TIFF, PNG) is opened by each worker itself, lazily;
        an array is sent to every worker once (give a path for an image larger
        than memory). ``(C, *spatial)`` or ``spatial``, as for ``predict``.
    labels, probabilities, instances, post, foreground_class, grow, instance_options, threshold
        As for :func:`unetile.predict.files.predict_to_files`; with a method beyond
        the paper's components the probabilities are kept in the work folder
        and read again region by region with a margin of ``max_extent`` px.
    client : distributed.Client, optional
        Where the regions run; None runs them one after another here.
    resume : bool
        Continue the prediction of these outputs found in their work folder
        (:func:`work_folder`): regions with a completion record are skipped.
    region_tiles : int
        Tile steps per region along each axis: larger regions mean fewer,
        longer tasks for the scheduler.
    options, keywords
        As for :func:`unetile.predict.predict`. ``device`` is resolved on each
        worker (default: its GPU if it has one); the automatic tile is chosen
        for this machine's device.

    Returns
    -------
    dict
        The written paths, keyed by "labels", "probabilities", "instances".
    """
    post = legacy_post(model, threshold, foreground_class, instance_options, grow, post)
    outputs = {"labels": labels, "probabilities": probabilities, "instances": instances}
    requested = requested_outputs(model.config.num_classes, outputs, post)
    _check_regions(model, region_tiles)
    options = PredictOptions.of(options, **changes)
    if isinstance(image, str | os.PathLike):
        image = ImagePath(str(image), model.config.dims, model.config.in_channels)
    plan, chunks = _plan(model, _open_image(image), options, post, requested, client is None)
    payload = model_payload(model)
    work = Path(plan.work)
    _prepare_work(work, _manifest(plan, payload, region_tiles, model), plan, chunks, resume)
    tiling = plan.tiling
    regions = region_grid(plan.spatial, plan.tile_shape, plan.steps, tiling.alignment, region_tiles)
    done = _intact_records(work / RECORDS, "*.npz")
    todo = [region for region in regions if region.index not in done]
    _run(client, predict_region, todo, [payload, image, plan], "predict", options.progress)
    if plan.by_region:
        _extract_by_region(client, work, plan, chunks, regions, options.progress)
    elif "instances" in plan.kinds:
        per_axis = grid_axes(plan.spatial, plan.tile_shape, plan.steps, tiling.alignment)
        tile_count = math.prod(len(origins) for origins in per_axis)
        _join_instances(client, work, plan, regions, tile_count, options.progress)
    how = PredictOptions(plan.tile_shape, plan.batch_size, plan.tta, precision=plan.precision)
    publish(work, requested, provenance(how, post))
    shutil.rmtree(work)
    return requested


def _check_regions(model: UNet, region_tiles: int) -> None:
    if region_tiles < 1:
        raise ValueError(f"region_tiles must be >= 1, got {region_tiles}")
    if model.config.padding != "valid":
        raise ValueError(
            "region-by-region prediction needs a 'valid' model: a 'same' model's "
            "blended tiles depend on their neighbours; predict it in one process"
        )


def _plan(model: UNet, image, options, post, requested, here: bool) -> tuple[Plan, tuple]:
    """The plan of a region prediction and the stores' chunks, the options checked as one
    process checks them; on a cluster (not ``here``) each worker checks its own device."""
    spatial = tuple(spatial_shape(model, image))
    resolved = options.resolve(model, spatial, here)
    chunks = output_chunks(model, spatial, resolved.tile_shape, post.grow)
    normalization = resolved.normalization
    if normalization is not None:
        normalization = normalization.broadcast(model.config.in_channels)
    tiling = Tiling.of(model)
    plan = Plan(
        work=str(work_folder(next(iter(requested.values())))),
        spatial=spatial,
        tile_shape=resolved.tile_shape,
        steps=tiling.steps(resolved.tile_shape),
        tiling=tiling,
        kinds=tuple(kind for kind in KINDS if kind in requested),
        post=post,
        by_region=extracts_by_region(requested, post),
        batch_size=options.batch_size,
        tta=bool(options.tta),
        # Each worker resolves its own device (its GPU if it has one).
        device=None if options.device is None else str(options.device),
        normalization=normalization,
        num_classes=model.config.num_classes,
        precision=options.precision,
    )
    return plan, chunks


def _manifest(plan: Plan, payload: dict, region_tiles: int, model: UNet) -> dict:
    """What a resumed prediction must share with the one it continues."""
    normalization = plan.normalization
    manifest = {
        "model_sha256": payload["sha256"],
        "model": model.config.to_dict(),
        "image_shape": list(plan.spatial),
        "tile_shape": list(plan.tile_shape),
        "region_tiles": region_tiles,
        "outputs": list(plan.kinds),
        "instances": plan.post.cells.to_dict() if "instances" in plan.kinds else None,
        "threshold": plan.post.threshold,
        "grow": plan.post.grow,
        "batch_size": plan.batch_size,
        "tta": plan.tta,
        "precision": plan.precision,
        "normalization": None if normalization is None else [normalization.mean, normalization.std],
    }
    return json.loads(json.dumps(manifest))


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None):
    """A ``distributed.Client``: of ``scheduler`` (an address), or of a new ``LocalCluster``.

    The local cluster has ``workers`` single-thread worker processes (each
    with one torch thread, dask's default for its workers).
    """
    distributed = _distributed()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except OSError as error:
            raise io.InputError(f"--scheduler {scheduler}: cannot connect ({error})") from None
        with client:
            yield client
        return
    with (
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            dashboard_address=None,
            # Its workers' start and stop notices are not the user's business.
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client
