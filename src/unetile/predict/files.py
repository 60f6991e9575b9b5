"""Prediction straight to files, for images of any size: the writer of every runner.

Tiles are written as they are predicted into zarr stores in a scratch (or
work) folder beside the outputs, chunked one tile step; the cells of each
tile are numbered as it comes and joined across tiles at the end. The TIFFs
are streamed from the stores, and every output appears under its final name
only when complete (:func:`publish`). The in-process runner
(:func:`predict_images_to_files`) and the region runner
(:mod:`unetile.predict.regions`) share the stores, the per-block products
(:func:`block_products`) and the publishing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io
from ..network.model import UNet
from ..network.tiling import Tiling
from .engine import PredictOptions, _iter_resolved, _resolve_each
from .instances import (
    InstanceOptions,
    chunk_regions,
    final_instances,
    keys_by_region,
    label_foreground,
    merge_tile_labels,
    rank_keys,
    region_grid,
)
from .postprocessing import PostProcessing, class_dtype, legacy_post

KINDS = ("labels", "probabilities", "instances")


def predict_to_files(
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
    instance_options: InstanceOptions | None = None,
    threshold: float | None = None,
    **changes,
) -> dict[str, Path]:
    """Predict an image of any size into files, holding only a few tiles in memory.

    (Bounded memory holds for ``valid`` models, the paper's; a ``same`` model's
    Gaussian blending keeps whole-image sums in memory.)

    Each output path ending in ``.zarr`` becomes a zarr store, ``.tif`` or
    ``.tiff`` a tiled (256 x 256) BigTIFF. Tiles are written as they are
    predicted into zarr stores in a scratch folder beside the outputs; the
    TIFFs are streamed from those, and every output appears under its final
    name only when complete.

    Parameters
    ----------
    labels, probabilities, instances : path, optional
        Where to write the class map (argmax, uint8), the ``(K, *spatial)``
        float32 probabilities and the instance labels (uint32, one id per cell
        across tiles, the same as :func:`unetile.predict.instances.extract_instances`
        of the whole image).
    post : PostProcessing, optional
        How labels and instances are drawn from the probabilities; without
        one, from the keywords below (the keyword API).
    foreground_class : int
        Class index of the cells, for ``instances`` without ``instance_options``.
    grow : int
        Pixels by which each cell of ``instances`` grows into the background
        (:func:`unetile.predict.instances.grow_cells`); 0 keeps the cells as they are.
    instance_options : InstanceOptions, optional
        How ``instances`` are extracted; default the paper's connected
        components of ``foreground_class``. The paper's components are joined
        across tiles without bound; the other methods read each region with a
        margin of ``max_extent`` px and raise ValueError when a connected group
        of cells is wider.
    threshold : float, optional
        The labels' (and cells') foreground threshold; default the model's
        calibrated one (``model.threshold``), else the argmax.
    options, keywords
        As for :func:`predict`.

    Returns
    -------
    dict
        The written paths, keyed by "labels", "probabilities", "instances".
    """
    outputs = {"labels": labels, "probabilities": probabilities, "instances": instances}
    post = legacy_post(model, threshold, foreground_class, instance_options, grow, post)
    for _ in predict_images_to_files(model, [image], [outputs], options, post=post, **changes):
        pass
    return {kind: Path(path) for kind, path in outputs.items() if path is not None}


def predict_images_to_files(
    model: UNet,
    images: Sequence,
    outputs: Sequence[dict],
    options: PredictOptions | None = None,
    *,
    post: PostProcessing | None = None,
    foreground_class: int = 1,
    grow: int = 0,
    instance_options: InstanceOptions | None = None,
    threshold: float | None = None,
    **changes,
) -> Iterator[int]:
    """:func:`predict_to_files` for several images, their tiles batched together.

    The network is set up once and the tiles of consecutive images share
    forward passes (:func:`iter_image_predictions`), ``batch_size`` at a
    time: a folder of small slices runs several slices per pass. Each
    image's files are written as :func:`predict_to_files` writes them.

    Parameters
    ----------
    images : sequence of array-like
        As :func:`predict` takes them.
    outputs : sequence of dict
        Per image, its ``labels``, ``probabilities`` and ``instances`` paths
        (as the keywords of :func:`predict_to_files`; None or absent: not written).
    options, post, foreground_class, grow, instance_options, threshold, keywords
        As for :func:`predict_to_files`, the same for every image.

    Yields
    ------
    int
        The number of each image whose files are complete, in order.
    """
    images = list(images)
    if len(outputs) != len(images):
        raise ValueError(f"give one outputs dict per image: {len(outputs)} for {len(images)}")
    post = legacy_post(model, threshold, foreground_class, instance_options, grow, post)
    requested = [requested_outputs(model.config.num_classes, paths, post) for paths in outputs]
    spatials, resolved = _resolve_each(model, images, PredictOptions.of(options, **changes))
    # Checked for every image before any is predicted (a grow wider than the tile).
    chunks = [
        output_chunks(model, spatial, each.tile_shape, post.grow)
        for spatial, each in zip(spatials, resolved, strict=True)
    ]
    blocks = _iter_resolved(model, images, spatials, resolved) if images else iter(())
    with contextlib.ExitStack() as stack:
        # Each image's files are opened when its first block comes, closed after its last.
        current, files = None, None
        for number, region, block in blocks:
            if number != current:
                if files is not None:
                    files.finish(resolved[current].progress)
                    stack.close()
                    yield current
                files = _ImageFiles.open(
                    model,
                    spatials[number],
                    post,
                    requested[number],
                    chunks[number],
                    stack,
                    provenance(resolved[number], post),
                )
                current = number
            files.write(region, block)
        if files is not None:
            files.finish(resolved[current].progress)
            stack.close()
            yield current


@dataclass
class _ImageFiles:
    """One image's output files while its predictions stream in (:func:`predict_to_files`)."""

    requested: dict[str, Path]
    arrays: dict
    folder: Path
    spatial: tuple[int, ...]
    cells: _TileCells
    chunks: tuple[int, ...]
    post: PostProcessing
    by_region: bool
    metadata: dict

    @classmethod
    def open(cls, model, spatial, post, requested, chunks, stack: contextlib.ExitStack, metadata):
        """The scratch stores of one image, in a scratch folder that ``stack`` removes."""
        first = next(iter(requested.values()))
        first.parent.mkdir(parents=True, exist_ok=True)
        io.remove_stale_scratch(first.parent)
        scratch = stack.enter_context(io.scratch_folder(first.parent))
        by_region = extracts_by_region(requested, post)
        kinds = tuple(kind for kind in KINDS if kind in requested)
        arrays = create_stores(scratch, spatial, chunks, kinds, model.config.num_classes, by_region)
        cells = _TileCells(arrays.get("provisional"))
        spatial = tuple(spatial)
        return cls(requested, arrays, scratch, spatial, cells, chunks, post, by_region, metadata)

    def write(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        """Stream one predicted block into the stores; label the cells of each tile."""
        per_tile = "instances" in self.requested and not self.by_region
        classes, foreground = block_products(block, self.post, per_tile)
        if "probabilities" in self.arrays:
            self.arrays["probabilities"][(slice(None), *region)] = block
        if "labels" in self.arrays:
            self.arrays["labels"][region] = classes
        if per_tile:
            self.cells.add(region, foreground)

    def finish(self, progress: bool) -> None:
        """Instances joined across tiles; every output moved or written under its final name."""
        if "instances" in self.requested:
            provisional = self.cells.provisional
            if self.by_region:
                lut = _ranked_objects(self.arrays, provisional, self.chunks, self.post, progress)
            else:
                lut = self.cells.lookup()
            for region in chunk_regions(self.spatial, self.chunks):
                ids = final_instances(provisional, lut, region, self.post.grow)
                self.arrays["instances"][region] = ids
        publish(self.folder, self.requested, self.metadata, self.arrays)


def extracts_by_region(requested: dict, post: PostProcessing) -> bool:
    """Whether the objects are extracted region by region with a margin (after all tiles),
    rather than tile by tile as they come: when an object depends on more than its pixels."""
    return "instances" in requested and post.cells.needs_whole_objects


def block_products(block: np.ndarray, post: PostProcessing, cells: bool):
    """What every runner makes of one predicted block: its class map, and with ``cells``
    the foreground its objects are drawn from (else None)."""
    return post.labels(block), (post.foreground_mask(block) if cells else None)


def create_stores(folder: Path, spatial, chunks, kinds, num_classes: int, by_region: bool):
    """The zarr stores of a prediction in ``folder``, by name, chunked like the output tiles:
    the requested ``kinds``, the cells' provisional labels, and the probabilities also when
    the objects are extracted region by region (which reads them again)."""
    import zarr

    def store(name, dtype, channels=None):
        return zarr.open_array(
            store=str(folder / f"{name}.zarr"),
            mode="w",
            shape=tuple(spatial) if channels is None else (channels, *spatial),
            chunks=tuple(chunks) if channels is None else (channels, *chunks),
            dtype=dtype,
            fill_value=0,
        )

    arrays = {}
    if "probabilities" in kinds or ("instances" in kinds and by_region):
        arrays["probabilities"] = store("probabilities", np.float32, num_classes)
    if "labels" in kinds:
        arrays["labels"] = store("labels", class_dtype(num_classes))
    if "instances" in kinds:
        arrays["provisional"] = store("provisional", np.uint64)
        arrays["instances"] = store("instances", np.uint32)
    return arrays


def provenance(options: PredictOptions, post: PostProcessing) -> dict:
    """How the outputs were made, stored with each of them (zarr attributes, the TIFF's
    description): the arithmetic, the tile and the labels' threshold."""
    from .. import __version__

    tile = options.tile_shape
    return {
        "unetile": {
            "version": __version__,
            "precision": options.precision,
            "tile_shape": list(tile) if isinstance(tile, tuple) else tile,
            "batch_size": options.batch_size,
            "tta": bool(options.tta),
            "threshold": post.threshold,
        }
    }


def publish(folder: Path, requested: dict[str, Path], metadata: dict, arrays=None) -> None:
    """Each finished store of ``folder`` under its final name, with ``metadata``: a zarr
    store moved into place, a TIFF written inside ``folder`` then renamed (a killed run
    leaves nothing beside the outputs that the next run would not remove). ``arrays``:
    the stores already open, by kind (else they are opened)."""
    import zarr

    for kind, path in requested.items():
        store = (arrays or {}).get(kind)
        if store is None:
            store = zarr.open_array(store=str(folder / f"{kind}.zarr"), mode="r+")
        if path.suffix.lower() == ".zarr":
            store.attrs.update(metadata or {})
            io.move_directory(folder / f"{kind}.zarr", path)
        else:
            io.write_tiled_tiff(folder / f"{kind}{path.suffix}", store, metadata=metadata)
            os.replace(folder / f"{kind}{path.suffix}", path)


def requested_outputs(num_classes: int, outputs: dict, post: PostProcessing) -> dict[str, Path]:
    """The output paths given (``labels``, ``probabilities``, ``instances``; None: not
    written), checked with the post-processing: ValueError for no output, a suffix that is
    not written, a grow without instances or classes the model does not have."""
    unknown = sorted(set(outputs) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}; give {', '.join(KINDS)}")
    requested = {kind: Path(outputs[kind]) for kind in KINDS if outputs.get(kind) is not None}
    if not requested:
        raise ValueError("give at least one of labels, probabilities, instances")
    for kind, path in requested.items():
        if path.suffix.lower() not in (".zarr", ".tif", ".tiff"):
            raise ValueError(f"{kind} path {path} must end in .zarr, .tif or .tiff")
    if post.grow and "instances" not in requested:
        raise ValueError("grow grows the cells of instances: give an instances path")
    post.check(num_classes, objects="instances" in requested)
    return requested


def output_chunks(model: UNet, spatial, tile_shape, grow: int = 0) -> tuple[int, ...]:
    """Chunks of the output stores: one tile step, so that each tile writes whole chunks."""
    steps = Tiling.of(model).steps(tile_shape)
    if grow > min(steps):
        # Each output region is grown from a grow-wide margin: keep it within a tile.
        raise ValueError(
            f"grow {grow} px is larger than the output tile ({min(steps)} px): "
            "use a smaller grow or a larger tile"
        )
    return tuple(min(s, step) for s, step in zip(spatial, steps, strict=True))


@dataclass
class _TileCells:
    """The cells of each tile numbered one after another, and where tiles meet."""

    provisional: object
    count: int = 0
    boundaries: list = dataclasses.field(default_factory=list)

    def add(self, region: tuple[slice, ...], foreground: np.ndarray) -> None:
        pieces, found = label_foreground(foreground)
        pieces = pieces.astype(np.uint64)
        pieces[pieces > 0] += self.count
        self.count += found
        self.provisional[region] = pieces
        if not self.boundaries:
            self.boundaries = [set() for _ in region]
        for axis, r in enumerate(region):
            self.boundaries[axis].add(r.start)

    def lookup(self) -> np.ndarray:
        """The table joining the pieces of a cell across tiles (:func:`merge_tile_labels`)."""
        return merge_tile_labels(self.provisional, [sorted(b) for b in self.boundaries], self.count)


def _ranked_objects(arrays, provisional, chunks, post: PostProcessing, progress: bool):
    """Objects extracted region by region with a margin, ranked to final ids (a lookup)."""
    spatial = tuple(provisional.shape)
    regions = region_grid(spatial, chunks, post.cells.extent(len(spatial)))
    if progress:
        from tqdm.auto import tqdm

        regions = tqdm(regions, desc="instances", unit="region", dynamic_ncols=True)
    sorted_keys = keys_by_region(arrays["probabilities"], provisional, regions, post.cells)

    def lut(block):
        return rank_keys(block, sorted_keys)

    return lut
