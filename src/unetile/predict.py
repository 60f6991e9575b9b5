"""Overlap-tile prediction (paper section 2): any image size, memory set by the tile.

A ``padding="valid"`` U-Net computes each output pixel from its own context
window only, so predicting tile by tile and stitching gives exactly the
whole-image result (up to float rounding) as long as the tile origins keep the
max-pooling grid aligned (:mod:`unetile.tiling`). Tiles are read lazily from
numpy arrays, memory-mapped TIFFs or zarr arrays, mirrored past the image
border, normalised, batched, and written straight into the output.

``padding="same"`` models see zero padding at every tile border, so their
output depends on the tiling; their overlapping tiles (``overlap``) are
blended with a Gaussian importance map, as nnU-Net does.

Instance norm (``norm="instance"``) normalises each tile by the tile's own
statistics, so such a network's output also depends on the tile size (on
ISBI 2012 by 0.03 on average between 132-px output tiles and one tile per
512-px slice); the automatic tile is as large as the memory budget allows.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import io
from .instances import (
    InstanceOptions,
    _check_grow,
    grow_cells,
    instances_from_probabilities,  # noqa: F401 - importable from here as before
    keys_by_region,
    rank_keys,
    region_grid,
)
from .model import UNet, is_valid_input_size, size_multiple
from .tiling import (
    axis_origins,
    grid_axes,
    input_window,
    mirror_indices,
    owned_region,
    tile_grid,
    tile_step,
    widened_box,
)

GIB = 2**30
CPU_BUDGET = 1.5 * GIB  # activations; keeps a base-16 run under 2 GB resident
CUDA_BUDGET_FRACTION = 0.7  # of the free device memory, the rest for cuDNN workspaces
SAME_OVERLAP = 0.5  # nnU-Net's tile step for blended ("same") models
GAUSSIAN_SIGMA = 1.0 / 8.0  # of the tile length, as in nnU-Net
MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"  # read by torch once, when it is imported


# --------------------------------------------------------------------------
# Tile sizes
# --------------------------------------------------------------------------


def _margin(model: UNet) -> int:
    return model.context_margin


def is_valid_tile(model: UNet, tile: int) -> bool:
    """Whether an output tile of ``tile`` pixels (one axis) fits the network exactly."""
    config = model.config
    return tile >= 1 and is_valid_input_size(
        tile + 2 * _margin(model), config.depth, config.padding
    )


def _smallest_tile(model: UNet) -> int:
    return next(
        t for t in range(1, 4 * size_multiple(model.config.depth) + 1) if is_valid_tile(model, t)
    )


def _tile_at_least(model: UNet, size: int) -> int:
    """Smallest valid output tile (pixels) of at least ``size`` pixels."""
    smallest = _smallest_tile(model)
    multiple = size_multiple(model.config.depth)
    return smallest + max(0, math.ceil((size - smallest) / multiple)) * multiple


def _tile_at_most(model: UNet, size: float) -> int:
    """Largest valid output tile (pixels) of at most ``size`` pixels, or the smallest one."""
    smallest = _smallest_tile(model)
    multiple = size_multiple(model.config.depth)
    return smallest + max(0, math.floor((size - smallest) / multiple)) * multiple


def activation_bytes_per_pixel(model: UNet) -> int:
    """Estimated peak inference memory per input-tile pixel (bytes), one tile.

    Measured on CPU with ``inference_mode``: the skip connections and the
    working tensors of the first level dominate, about ``4 * base_channels``
    float32 values per pixel, plus a fixed part for the input, the output and
    the concatenations.
    """
    config = model.config
    return 4 * (4 * config.base_channels + 64 + 2 * (config.in_channels + config.num_classes))


def default_memory_budget(device: torch.device) -> int:
    """Memory (bytes) for activations: ``CUDA_BUDGET_FRACTION`` of the free GPU
    memory, or on CPU ``CPU_BUDGET`` capped at a quarter of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_BUDGET_FRACTION * free)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(CPU_BUDGET, available / 4))
    return int(CPU_BUDGET)


def available_memory(device: torch.device) -> int:
    """Bytes this process can still take: free (and torch-cached) GPU memory, or the RAM
    Linux calls available (MPS shares it)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch caches but does not use is free to this process.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(64 * GIB)  # unknown: do not refuse what may well fit


def check_memory(
    model: UNet, tile_shape: Sequence[int], batch_size: int, device: torch.device
) -> None:
    """ValueError naming the options to change when a batch of tiles cannot fit in memory.

    The estimate is :func:`activation_bytes_per_pixel` times the input tile's
    pixels times the batch; it is compared with :func:`available_memory`.
    """
    pixels = math.prod(t + 2 * _margin(model) for t in tile_shape)
    needed = activation_bytes_per_pixel(model) * pixels * batch_size
    free = available_memory(device)
    if needed > free:
        raise ValueError(
            f"an output tile of {'x'.join(map(str, tile_shape))} px in batches of {batch_size} "
            f"needs about {needed / GIB:.1f} GiB for activations, more than the "
            f"{free / GIB:.1f} GiB free on {device.type}; use a smaller --tile or --batch-size "
            "(or leave --tile out to size it automatically)"
        )


def auto_tile_shape(
    model: UNet,
    image_shape: Sequence[int],
    device: str | torch.device | None = None,
    memory_budget: float | None = None,
    batch_size: int = 1,
    overlap: float = SAME_OVERLAP,
) -> tuple[int, ...]:
    """Valid output tile (pixels per spatial axis) for the fewest tiles whose activations fit.

    The largest tile within the memory budget sets the number of tiles along
    each axis; the tile is then shrunk to the smallest valid one that still
    covers the image with that many tiles, so no compute is spent on a last
    tile that mostly overhangs the image.

    Parameters
    ----------
    model : UNet
    image_shape : sequence of int
        Spatial shape of the image (pixels).
    device : str or torch.device, optional
        Sets the default budget; CUDA if available when omitted.
    memory_budget : float, optional
        Bytes for the activations of one batch; default :func:`default_memory_budget`.
    batch_size : int
        Tiles per forward pass; the budget is shared among them.
    overlap : float
        Tile overlap fraction of ``same`` models (see :func:`predict`).

    Returns
    -------
    tuple of int
        Output tile shape, never larger than the smallest valid tile that
        covers the image along each axis.
    """
    device = resolve_device(device)
    if len(image_shape) != model.config.dims:
        raise ValueError(
            f"image_shape {tuple(image_shape)} must have {model.config.dims} spatial axes"
        )
    budget = default_memory_budget(device) if memory_budget is None else float(memory_budget)
    if not 0 < budget < math.inf:
        raise ValueError(f"memory_budget must be a finite number > 0 bytes, got {memory_budget}")
    free = available_memory(device)
    if budget > free:
        raise ValueError(
            f"a memory budget of {budget / GIB:.3g} GiB is more than the {free / GIB:.1f} GiB "
            f"free on {device.type}; lower --memory-budget or leave it out"
        )
    margin = _margin(model)
    alignment = size_multiple(model.config.depth)
    pixels_left = budget / (activation_bytes_per_pixel(model) * max(1, batch_size))
    tile = [0] * len(image_shape)
    # Axes that the image caps go first, so the others can take the memory they leave.
    order = sorted(range(len(image_shape)), key=lambda axis: image_shape[axis])
    for position, axis in enumerate(order):
        side = pixels_left ** (1.0 / (len(order) - position)) - 2 * margin
        # Tiles shorter than the pooling alignment cannot be stepped exactly.
        usable = max(_tile_at_most(model, side), _tile_at_least(model, alignment))
        largest = min(usable, _tile_at_least(model, image_shape[axis]))
        tile[axis] = _balanced_tile(model, image_shape[axis], largest, overlap)
        pixels_left /= tile[axis] + 2 * margin
    return tuple(tile)


def _balanced_tile(model: UNet, size: int, largest: int, overlap: float) -> int:
    """Smallest valid tile that covers ``size`` pixels with as few tiles as ``largest`` does.

    The largest tile sets the number of tiles; shrinking them to share the
    image evenly avoids computing a last tile that mostly overhangs the image.
    """
    alignment = size_multiple(model.config.depth)
    overlap = overlap if model.config.padding == "same" else 0.0

    def count(tile):
        if tile < min(size, alignment):
            return math.inf
        return len(axis_origins(size, tile, tile_step(tile, alignment, overlap), alignment))

    needed = count(largest)
    tile = max(_smallest_tile(model), _tile_at_least(model, math.ceil(size / needed)))
    while tile < largest and count(tile) > needed:
        tile += alignment
    return min(tile, largest)


def check_tile_shape(model: UNet, tile_shape, dims: int) -> tuple[int, ...]:
    """Output tile shape as a tuple of ``dims`` ints; ValueError naming valid sizes nearby."""
    if isinstance(tile_shape, int | np.integer):
        tile_shape = (int(tile_shape),) * dims
    tile_shape = tuple(int(t) for t in tile_shape)
    if len(tile_shape) != dims:
        raise ValueError(f"tile_shape {tile_shape} must have {dims} entries, one per spatial axis")
    for tile in tile_shape:
        if not is_valid_tile(model, tile):
            below = _tile_at_most(model, tile)
            above = _tile_at_least(model, tile)
            nearby = f"{below} or {above}" if below < tile else f"{above}"
            raise ValueError(
                f"tile_shape {tile} px is not a valid output tile for this "
                f"{model.config.padding!r} U-Net of depth {model.config.depth}; use {nearby}"
            )
    return tile_shape


# --------------------------------------------------------------------------
# Reading tiles
# --------------------------------------------------------------------------


def _spatial_shape(model: UNet, image) -> tuple[tuple[int, ...], bool]:
    """Spatial shape and whether the image has a leading channel axis; ValueError otherwise."""
    config = model.config
    shape = tuple(image.shape)
    axes = "DHW"[-config.dims :] if config.dims == 3 else "HW"
    if len(shape) == config.dims and config.in_channels == 1:
        return shape, False
    if len(shape) == config.dims + 1 and shape[0] == config.in_channels:
        return shape[1:], True
    raise ValueError(
        f"image of shape {shape} does not fit a model with {config.in_channels} input "
        f"channel(s); give ({', '.join(axes)})"
        + (" or " if config.in_channels == 1 else " as ")
        + f"({config.in_channels}, {', '.join(axes)}), channels first"
    )


def _normalization(normalization, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if normalization is None:
        return None
    if isinstance(normalization, dict):
        normalization = (normalization["mean"], normalization["std"])
    mean, std = (np.atleast_1d(np.asarray(v, dtype=np.float32)) for v in normalization)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"normalization must be finite, got {mean.tolist()} and {std.tolist()}")
    if mean.shape not in ((1,), (channels,)) or std.shape not in ((1,), (channels,)):
        raise ValueError(
            f"normalization must give 1 or {channels} mean and std values, "
            f"got {mean.size} and {std.size}"
        )
    if np.any(std <= 0):
        raise ValueError(f"normalization std must be > 0, got {std.tolist()}")
    return np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy()


def read_tile(
    image,
    window: Sequence[tuple[int, int]],
    has_channels: bool,
    normalization: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Input tile ``(C, *window)`` as float32, mirrored past the border, normalised.

    Only the image region under the window is read, so ``image`` may be a
    memory-mapped or zarr array larger than memory.
    """
    spatial = image.shape[1:] if has_channels else image.shape
    indices = [mirror_indices(a, b, size) for (a, b), size in zip(window, spatial, strict=True)]
    region = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    block = np.asarray(image[((slice(None),) if has_channels else ()) + region])
    if not has_channels:
        block = block[None]
    local = [i - r.start for i, r in zip(indices, region, strict=True)]
    if not all(np.array_equal(i, np.arange(len(i))) for i in local):
        block = block[(slice(None), *np.ix_(*local))]
    tile = block.astype(np.float32)
    if normalization is not None:
        mean, std = normalization
        expand = (slice(None),) + (None,) * len(spatial)
        tile -= mean[expand]
        tile /= std[expand]
    if not np.isfinite(tile).all():
        # One NaN spreads over the whole context window of every output pixel near it.
        rows = ", ".join(f"{a}..{b - 1}" for a, b in window)
        raise ValueError(
            f"holds NaN or infinite pixel values (in the window {rows}, or too large for "
            "float32 after normalisation); replace them before predicting"
        )
    return tile


# --------------------------------------------------------------------------
# Running the network
# --------------------------------------------------------------------------


def mps_available() -> bool:
    """Whether torch can use an Apple GPU (Metal Performance Shaders) here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: the first CUDA device, else an Apple GPU (MPS), else the CPU.

    A device torch does not know, or CUDA or MPS where torch sees none, raises
    ValueError. On MPS, operations it lacks run on the CPU when the variable
    ``PYTORCH_ENABLE_MPS_FALLBACK=1`` was set before torch was imported (the
    ``unetile`` package sets it on import; a warning says when it is missing).
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        device = "mps" if mps_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {device!r} is not one torch knows; use 'cpu', 'cuda' or 'mps'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU; use 'cpu'")
    if device.type == "mps":
        if not mps_available():
            raise ValueError(
                "device 'mps' asked for, but torch sees no Apple GPU (it needs macOS 12.3+ "
                "on Apple silicon and a torch built with MPS); use 'cpu'"
            )
        if os.environ.get(MPS_FALLBACK) != "1":
            warnings.warn(
                f"{MPS_FALLBACK} is not 1: an operation MPS lacks will fail instead of running "
                f"on the CPU; set it before torch is imported",
                stacklevel=2,
            )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return device


def memory_format_of(model: torch.nn.Module) -> torch.memory_format:
    """The channels-last format the model's widest convolution is stored in, else contiguous."""
    weights = [p for p in model.parameters() if p.dim() in (4, 5)]
    if not weights:
        return torch.contiguous_format
    # A weight with one input channel is contiguous in both layouts: ask the widest.
    widest = max(weights, key=lambda weight: weight.shape[1])
    layout = torch.channels_last if widest.dim() == 4 else torch.channels_last_3d
    if not widest.is_contiguous() and widest.is_contiguous(memory_format=layout):
        return layout
    return torch.contiguous_format


@contextlib.contextmanager
def _inference(model: UNet, device: torch.device, channels_last: bool):
    """Model in eval mode on ``device``; its training flag, device and layout are restored after."""
    was_training = model.training
    home = next(model.parameters()).device
    layout = memory_format_of(model)
    model.eval()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        # A channels-last model in training must stay so, or a resumed run would differ.
        model.to(memory_format=layout)
        model.to(home)
        model.train(was_training)


def dihedral_transforms(tta: bool) -> list[tuple[int, bool]]:
    """(quarter turns, mirrored) pairs of the plane's 8 symmetries, or the identity only."""
    if not tta:
        return [(0, False)]
    return [(turns, mirrored) for mirrored in (False, True) for turns in range(4)]


def _forward(
    model: UNet, batch: np.ndarray, device: torch.device, tta: bool, channels_last: bool
) -> np.ndarray:
    """Class probabilities (softmax) of a batch of input tiles, averaged over the TTA views."""
    with torch.inference_mode():
        return _forward_views(model, batch, device, tta, channels_last)


def _forward_views(model, batch, device, tta, channels_last) -> np.ndarray:
    inputs = torch.from_numpy(batch).to(device)
    total = None
    transforms = dihedral_transforms(tta)
    for turns, mirrored in transforms:
        view = torch.rot90(inputs, turns, dims=(-2, -1)) if turns else inputs
        if mirrored:
            view = view.flip(-1)
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        probabilities = torch.softmax(model(view), dim=1)
        # De-augment the output of this view before averaging.
        if mirrored:
            probabilities = probabilities.flip(-1)
        if turns:
            probabilities = torch.rot90(probabilities, -turns, dims=(-2, -1))
        total = probabilities if total is None else total + probabilities
    if len(transforms) > 1:
        total /= len(transforms)
    return total.float().cpu().numpy()


def gaussian_importance(
    tile_shape: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA
) -> np.ndarray:
    """Gaussian weight map over a tile (max 1, no zeros), for blending ``same`` models.

    The tile centre, far from the zero padding of a same-padded network,
    weighs most; ``sigma = sigma_scale * tile length`` per axis.
    """
    weights = np.ones((), dtype=np.float64)
    for length in tile_shape:
        coordinate = np.arange(length) - (length - 1) / 2
        axis = np.exp(-0.5 * (coordinate / (sigma_scale * length)) ** 2)
        weights = np.multiply.outer(weights, axis)
    weights /= weights.max()
    weights = np.maximum(weights, weights[weights > 0].min())
    return weights.astype(np.float32)


def iter_predictions(
    model: UNet,
    image,
    *,
    tile_shape: int | Sequence[int] | None = None,
    batch_size: int = 1,
    tta: bool = False,
    device: str | torch.device | None = None,
    memory_budget: float | None = None,
    normalization=None,
    progress: bool = True,
    overlap: float = SAME_OVERLAP,
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yield ``(region, probabilities)`` blocks that together cover the image once.

    For a ``valid`` model each block is the part of one output tile that no
    earlier tile wrote (:func:`unetile.tiling.owned_region`), in tile order, so
    a consumer can stream them to disk. For a ``same`` model the blended
    probabilities of the whole image are yielded as one block. Arguments as
    for :func:`predict`.
    """
    config = model.config
    spatial, has_channels = _spatial_shape(model, image)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    if tile_shape is None:
        tile_shape = auto_tile_shape(model, spatial, device, memory_budget, batch_size, overlap)
    tile_shape = check_tile_shape(model, tile_shape, config.dims)
    check_memory(model, tile_shape, batch_size, device)
    norm = _normalization(normalization, config.in_channels)
    margin = _margin(model)
    alignment = size_multiple(config.depth)
    valid = config.padding == "valid"
    for tile, size in zip(tile_shape, spatial, strict=True):
        if tile < min(alignment, size):
            raise ValueError(
                f"tile_shape {tile} px is shorter than the {alignment} px pooling alignment "
                f"and does not cover the image ({size} px); use at least "
                f"{_tile_at_least(model, alignment)}"
            )
    steps = [tile_step(t, alignment, 0.0 if valid else overlap) for t in tile_shape]
    per_axis = grid_axes(spatial, tile_shape, steps, alignment)
    origins = tile_grid(spatial, tile_shape, steps, alignment)
    batches = [origins[i : i + batch_size] for i in range(0, len(origins), batch_size)]
    channels_last = device.type == "cpu" and config.dims == 2

    def load(batch_origins):
        return np.stack(
            [
                read_tile(image, input_window(o, tile_shape, margin), has_channels, norm)
                for o in batch_origins
            ]
        )

    if not valid:
        weight = gaussian_importance(tile_shape)
        numerator = np.zeros((config.num_classes, *spatial), dtype=np.float32)
        denominator = np.zeros(spatial, dtype=np.float32)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(origins), unit="tile", disable=not progress, desc="predict")
    # One reader thread fetches the next batch of tiles while the network runs.
    reader = ThreadPoolExecutor(max_workers=1)
    try:
        with _inference(model, device, channels_last):
            pending = reader.submit(load, batches[0])
            for number, batch_origins in enumerate(batches):
                inputs = pending.result()
                if number + 1 < len(batches):
                    pending = reader.submit(load, batches[number + 1])
                outputs = _forward(model, inputs, device, tta, channels_last)
                if not np.isfinite(outputs).all():
                    raise ValueError(
                        "the network gave NaN probabilities from finite input: its weights "
                        "or normalisation are broken; train again or take an earlier checkpoint"
                    )
                for origin, output in zip(batch_origins, outputs, strict=True):
                    if valid:
                        region = owned_region(origin, per_axis, spatial)
                    else:
                        region = tuple(
                            slice(o, min(o + t, s))
                            for o, t, s in zip(origin, tile_shape, spatial, strict=True)
                        )
                    local = tuple(
                        slice(r.start - o, r.stop - o) for r, o in zip(region, origin, strict=True)
                    )
                    if valid:
                        yield region, output[(slice(None), *local)]
                    else:
                        numerator[(slice(None), *region)] += (
                            output[(slice(None), *local)] * weight[local]
                        )
                        denominator[region] += weight[local]
                    bar.update(1)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if not valid:
        numerator /= denominator
        yield tuple(slice(0, s) for s in spatial), numerator


def predict(
    model: UNet,
    image,
    *,
    tile_shape: int | Sequence[int] | None = None,
    batch_size: int = 1,
    tta: bool = False,
    device: str | torch.device | None = None,
    memory_budget: float | None = None,
    normalization=None,
    progress: bool = True,
    out=None,
    overlap: float = SAME_OVERLAP,
):
    """Per-class probability map of an image of any size, predicted tile by tile.

    Parameters
    ----------
    model : UNet
        Put in eval mode on ``device`` for the call; its training flag, device
        and memory layout are restored after.
    image : array-like
        ``(H, W)`` or ``(C, H, W)`` (``(D, H, W)`` or ``(C, D, H, W)`` for a
        3D model), any dtype; a numpy array, a memory-mapped TIFF
        (``io.read_image(path, memmap=True)``) or a zarr array. Only the
        tiles being predicted are read.
    tile_shape : int or sequence of int, optional
        Output tile (pixels per spatial axis); the network reads
        ``2 * context_margin`` pixels more. Default :func:`auto_tile_shape`.
    batch_size : int
        Tiles per forward pass.
    tta : bool
        Average the probabilities over the 8 flips and rotations of the plane
        (the paper averaged 7 rotated versions), each de-augmented per tile.
    device : str or torch.device, optional
        "cpu" or "cuda"; CUDA if available when omitted.
    memory_budget : float, optional
        Bytes for activations when the tile size is automatic.
    normalization : (mean, std) or dict with "mean" and "std", optional
        Per-channel values; each tile becomes ``(tile - mean) / std`` as it is read.
    progress : bool
        Show a progress bar over the tiles.
    out : array-like, optional
        ``(K, *spatial)`` float32 destination (numpy or zarr) written tile by tile.
    overlap : float
        Tile overlap fraction for ``same`` models (blended); ignored for
        ``valid`` models, which are exact without overlap.

    Returns
    -------
    array-like
        ``out``, or a new ``(K, *spatial)`` float32 numpy array of probabilities.
    """
    spatial, _ = _spatial_shape(model, image)
    shape = (model.config.num_classes, *spatial)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; it must be {shape}")
    for region, block in iter_predictions(
        model,
        image,
        tile_shape=tile_shape,
        batch_size=batch_size,
        tta=tta,
        device=device,
        memory_budget=memory_budget,
        normalization=normalization,
        progress=progress,
        overlap=overlap,
    ):
        out[(slice(None), *region)] = block
    return out


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


def _class_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.uint16


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Class map (argmax over the first axis) of ``(K, *spatial)`` probabilities."""
    probabilities = np.asarray(probabilities)
    return probabilities.argmax(axis=0).astype(_class_dtype(probabilities.shape[0]))


def _label_foreground(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

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
    window = widened_box(region, _check_grow(grow), provisional.shape)
    block = np.asarray(provisional[window])
    labels = grow_cells(lut(block) if callable(lut) else lut[block], grow)
    return labels[
        tuple(
            slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window, strict=True)
        )
    ]


# --------------------------------------------------------------------------
# Out of core: prediction straight to files
# --------------------------------------------------------------------------


def _chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    for index in np.ndindex(*(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))):
        yield tuple(
            slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape, strict=True)
        )


def predict_to_files(
    model: UNet,
    image,
    *,
    labels: str | os.PathLike | None = None,
    probabilities: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    foreground_class: int = 1,
    grow: int = 0,
    instance_options: InstanceOptions | None = None,
    tile_shape: int | Sequence[int] | None = None,
    batch_size: int = 1,
    tta: bool = False,
    device: str | torch.device | None = None,
    memory_budget: float | None = None,
    normalization=None,
    progress: bool = True,
    overlap: float = SAME_OVERLAP,
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
        across tiles, the same as :func:`unetile.instances.extract_instances`
        of the whole image).
    foreground_class : int
        Class index of the cells, for ``instances`` without ``instance_options``.
    grow : int
        Pixels by which each cell of ``instances`` grows into the background
        (:func:`grow_cells`); 0 keeps the cells as they are.
    instance_options : InstanceOptions, optional
        How ``instances`` are extracted; default the paper's connected
        components of ``foreground_class``. The paper's components are joined
        across tiles without bound; the other methods read each region with a
        margin of ``max_extent`` px and raise ValueError when a connected group
        of cells is wider.
    Others
        As for :func:`predict`.

    Returns
    -------
    dict
        The written paths, keyed by "labels", "probabilities", "instances".
    """
    import zarr

    requested = {
        kind: Path(path)
        for kind, path in (
            ("labels", labels),
            ("probabilities", probabilities),
            ("instances", instances),
        )
        if path is not None
    }
    if not requested:
        raise ValueError("give at least one of labels, probabilities, instances")
    for kind, path in requested.items():
        if path.suffix.lower() not in (".zarr", ".tif", ".tiff"):
            raise ValueError(f"{kind} path {path} must end in .zarr, .tif or .tiff")
    grow = _check_grow(grow)
    if grow and instances is None:
        raise ValueError("grow grows the cells of instances: give an instances path")
    num_classes = model.config.num_classes
    if instance_options is None:
        instance_options = InstanceOptions(foreground_classes=(foreground_class,))
    if instances is not None:
        instance_options.check_classes(num_classes)
    by_region = instances is not None and instance_options.needs_whole_objects
    spatial, _ = _spatial_shape(model, image)
    device = resolve_device(device)
    if tile_shape is None:
        tile_shape = auto_tile_shape(model, spatial, device, memory_budget, batch_size, overlap)
    tile_shape = check_tile_shape(model, tile_shape, model.config.dims)
    check_memory(model, tile_shape, batch_size, device)
    steps = [tile_step(t, size_multiple(model.config.depth)) for t in tile_shape]
    if grow > min(steps):
        # Each output region is grown from a grow-wide margin: keep it within a tile.
        raise ValueError(
            f"grow {grow} px is larger than the output tile ({min(steps)} px): "
            "use a smaller grow or a larger tile"
        )
    chunks = tuple(min(s, step) for s, step in zip(spatial, steps, strict=True))
    first = next(iter(requested.values()))
    first.parent.mkdir(parents=True, exist_ok=True)
    io.remove_stale_scratch(first.parent)
    with io.scratch_folder(first.parent) as scratch:

        def store(name, shape, dtype, chunk_shape):
            return zarr.open_array(
                store=str(scratch / f"{name}.zarr"),
                mode="w",
                shape=shape,
                chunks=chunk_shape,
                dtype=dtype,
                fill_value=0,
            )

        arrays = {}
        if "probabilities" in requested:
            arrays["probabilities"] = store(
                "probabilities", (num_classes, *spatial), np.float32, (num_classes, *chunks)
            )
        if "labels" in requested:
            arrays["labels"] = store("labels", spatial, _class_dtype(num_classes), chunks)
        if by_region and "probabilities" not in arrays:
            arrays["probabilities"] = store(
                "scratch_probabilities",
                (num_classes, *spatial),
                np.float32,
                (num_classes, *chunks),
            )
        if "instances" in requested:
            provisional = store("provisional", spatial, np.uint64, chunks)
        count = 0
        boundaries: list[set[int]] = [set() for _ in spatial]
        for region, block in iter_predictions(
            model,
            image,
            tile_shape=tile_shape,
            batch_size=batch_size,
            tta=tta,
            device=device,
            memory_budget=memory_budget,
            normalization=normalization,
            progress=progress,
            overlap=overlap,
        ):
            if "probabilities" in arrays:
                arrays["probabilities"][(slice(None), *region)] = block
            classes = block.argmax(axis=0)
            if "labels" in arrays:
                arrays["labels"][region] = classes.astype(_class_dtype(num_classes))
            if "instances" in requested and not by_region:
                foreground = np.isin(classes, instance_options.foreground_classes)
                pieces, found = _label_foreground(foreground)
                pieces = pieces.astype(np.uint64)
                pieces[pieces > 0] += count
                count += found
                provisional[region] = pieces
                for axis, r in enumerate(region):
                    boundaries[axis].add(r.start)
        if by_region:
            extent = instance_options.extent(len(spatial))
            regions = region_grid(spatial, chunks, extent)
            if progress:
                from tqdm.auto import tqdm

                regions = tqdm(regions, desc="instances", unit="region", dynamic_ncols=True)
            sorted_keys = keys_by_region(
                arrays["probabilities"], provisional, regions, instance_options
            )

            def lut(block):
                return rank_keys(block, sorted_keys)

        elif "instances" in requested:
            lut = merge_tile_labels(provisional, [sorted(b) for b in boundaries], count)
        if "instances" in requested:
            arrays["instances"] = store("instances", spatial, np.uint32, chunks)
            for region in _chunk_regions(spatial, chunks):
                arrays["instances"][region] = final_instances(provisional, lut, region, grow)
        for kind, path in requested.items():
            if path.suffix.lower() == ".zarr":
                io.move_directory(scratch / f"{kind}.zarr", path)
            else:
                # Written inside the scratch folder, then renamed: a killed run leaves
                # nothing beside the outputs that the next run would not remove.
                io.write_tiled_tiff(scratch / f"{kind}{path.suffix}", arrays[kind])
                os.replace(scratch / f"{kind}{path.suffix}", path)
    return requested
