"""Overlap-tile prediction (paper section 2): any image size, memory set by the tile.

A ``padding="valid"`` U-Net computes each output pixel from its own context
window only, so predicting tile by tile and stitching gives exactly the
whole-image result (up to float rounding) as long as the tile origins keep the
max-pooling grid aligned (:mod:`unetile.network.tiling`). Tiles are read lazily from
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
import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..network.model import UNet
from ..network.normalization import Normalization
from ..network.tiling import Tiling, Window, axis_origins
from ..numbers import flag, real_option, whole_option
from ..precision import autocast, check_precision
from .postprocessing import class_dtype, labels_from_probabilities  # noqa: F401 - as before

GIB = 2**30
CPU_BUDGET = 1.5 * GIB  # activations; keeps a base-16 run under 2 GB resident
CUDA_BUDGET_FRACTION = 0.7  # of the free device memory, the rest for cuDNN workspaces
SAME_OVERLAP = 0.5  # nnU-Net's tile step for blended ("same") models
GAUSSIAN_SIGMA = 1.0 / 8.0  # of the tile length, as in nnU-Net
MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"  # read by torch once, when it is imported


# --------------------------------------------------------------------------
# Tile sizes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict` runs; every prediction function takes these as keywords.

    Attributes
    ----------
    tile_shape : int or tuple of int, optional
        Output tile (pixels per spatial axis); the network reads
        ``2 * context_margin`` pixels more. Default :func:`auto_tile_shape`.
    batch_size : int
        Tiles per forward pass.
    tta : bool
        Average the probabilities over the 8 flips and rotations of the plane
        (the paper averaged 7 rotated versions), each de-augmented per tile.
    device : str or torch.device, optional
        "cpu", "cuda" or "mps"; the first GPU if there is one when omitted.
    memory_budget : float, optional
        Bytes for activations when the tile size is automatic.
    normalization : Normalization, dict or (mean, std), optional
        Applied to each tile as it is read; default the model's own
        (``model.normalization``, which :func:`unetile.predict.card.load_model` sets from
        ``config.json``; none for a new network). ``Normalization.identity()``
        turns it off.
    progress : bool
        Show a progress bar over the tiles.
    overlap : float
        Tile overlap fraction for ``same`` models (blended); ignored for
        ``valid`` models, which are exact without overlap.
    precision : {"fp32", "bf16"}
        Arithmetic of the network (:mod:`unetile.precision`); ``bf16`` only
        where the device computes it natively (ValueError otherwise).
    """

    tile_shape: int | tuple[int, ...] | None = field(
        default=None,
        metadata=flag(
            "output tile size in pixels (default: the largest that fits the memory budget)",
            name="--tile",
            metavar="N",
            kind=whole_option(1, 65536),
        ),
    )
    batch_size: int = field(
        default=1,
        metadata=flag("tiles per forward pass", metavar="B", kind=whole_option(1, 4096)),
    )
    tta: bool = field(
        default=False,
        metadata=flag("average over the 8 flips and rotations of the plane", action="store_true"),
    )
    device: str | torch.device | None = field(
        default=None,
        metadata=flag(
            "'cpu', 'cuda', 'cuda:N' or 'mps' (Apple GPU) (default: cuda if available, else "
            "mps, else cpu)",
            metavar="DEVICE",
        ),
    )
    memory_budget: float | None = field(
        default=None,
        metadata=flag(
            "memory for activations when the tile size is automatic (GiB)",
            metavar="GB",
            kind=real_option(0, 10**6, open_minimum=True),
        ),
    )
    normalization: Normalization | dict | tuple | None = None
    progress: bool = field(
        default=True, metadata=flag("no progress bar", name="--no-progress", action="store_false")
    )
    overlap: float = SAME_OVERLAP
    precision: str = field(
        default="fp32",
        metadata=flag(
            "arithmetic of the network: bf16 only where the processor computes it natively "
            "(CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else fp32; 'auto' (default) takes "
            "bf16 where it is native, fp32 elsewhere",
            choices=("auto", "fp32", "bf16"),
        ),
    )

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def of(cls, options: PredictOptions | None = None, **changes) -> PredictOptions:
        """``options`` (default all defaults) with the keyword ``changes`` applied."""
        return dataclasses.replace(options or cls(), **changes)

    def resolve(self, model: UNet, spatial: Sequence[int], here: bool = True) -> PredictOptions:
        """These options with the device, the tile shape and the normalisation settled for
        ``model`` on an image of ``spatial`` shape; ValueError naming what does not fit.
        ``here=False`` (other machines compute): the device's precision and memory are
        checked where it runs, not here."""
        device = resolve_device(self.device)
        if here:
            check_precision(self.precision, device)
        tile_shape = self.tile_shape
        if tile_shape is None:
            tile_shape = stable_tile(model) or auto_tile_shape(
                model, spatial, device, self.memory_budget, self.batch_size, self.overlap
            )
        tile_shape = Tiling.of(model).check(tile_shape)
        if here:
            check_memory(model, tile_shape, self.batch_size, device)
        normalization = Normalization.of(self.normalization) or getattr(
            model, "normalization", None
        )
        if normalization is not None:
            normalization.check_channels(model.config.in_channels)
        return dataclasses.replace(
            self,
            device=device,
            tile_shape=tile_shape,
            normalization=normalization,
        )


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
    pixels = math.prod(Tiling.of(model).input_shape(tile_shape))
    needed = activation_bytes_per_pixel(model) * pixels * batch_size
    free = available_memory(device)
    if needed > free:
        raise ValueError(
            f"an output tile of {'x'.join(map(str, tile_shape))} px in batches of {batch_size} "
            f"needs about {needed / GIB:.1f} GiB for activations, more than the "
            f"{free / GIB:.1f} GiB free on {device.type}; use a smaller --tile or --batch-size "
            "(or leave --tile out to size it automatically)"
        )


def tile_dependent(model: UNet) -> bool:
    """Whether the model's probabilities depend on the tile: instance norm normalises each
    tile by its own statistics, and ``same`` tiles are blended with their neighbours."""
    return model.config.norm == "instance" or model.config.padding != "valid"


def stable_tile(model: UNet) -> tuple[int, ...] | None:
    """The output tile a tile-dependent model predicts with by default: the one it was
    trained with (``config.json`` ``"tile"``), so that its answer depends on the model and
    the image only, not on the machine's memory; None for tile-exact models (any tile
    gives the same answer) and for networks without a recorded tile."""
    if not tile_dependent(model):
        return None
    tile = getattr(model, "training_tile", None)
    if not tile or min(tile) < Tiling.of(model).alignment:
        return None  # a tile too small to step over whole images: the memory decides
    return tuple(int(t) for t in tile)


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
    tiling = Tiling.of(model)
    margin, alignment = tiling.margin, tiling.alignment
    pixels_left = budget / (activation_bytes_per_pixel(model) * max(1, batch_size))
    tile = [0] * len(image_shape)
    # Axes that the image caps go first, so the others can take the memory they leave.
    order = sorted(range(len(image_shape)), key=lambda axis: image_shape[axis])
    for position, axis in enumerate(order):
        side = pixels_left ** (1.0 / (len(order) - position)) - 2 * margin
        # Tiles shorter than the pooling alignment cannot be stepped exactly.
        usable = max(tiling.at_most(side), tiling.at_least(alignment))
        largest = min(usable, tiling.at_least(image_shape[axis]))
        tile[axis] = _balanced_tile(tiling, image_shape[axis], largest, overlap)
        pixels_left /= tile[axis] + 2 * margin
    return tuple(tile)


def _balanced_tile(tiling: Tiling, size: int, largest: int, overlap: float) -> int:
    """Smallest valid tile that covers ``size`` pixels with as few tiles as ``largest`` does.

    The largest tile sets the number of tiles; shrinking them to share the
    image evenly avoids computing a last tile that mostly overhangs the image.
    """

    def count(tile):
        if tile < min(size, tiling.alignment):
            return math.inf
        (step,) = tiling.steps((tile,), overlap)
        return len(axis_origins(size, tile, step, tiling.alignment))

    needed = count(largest)
    tile = tiling.at_least(math.ceil(size / needed))
    while tile < largest and count(tile) > needed:
        tile += tiling.alignment
    return min(tile, largest)


# --------------------------------------------------------------------------
# Reading tiles
# --------------------------------------------------------------------------


def spatial_shape(model: UNet, image) -> tuple[int, ...]:
    """Spatial shape of an image ``model`` takes (with or without a leading channel axis);
    ValueError saying the layouts it takes otherwise."""
    config = model.config
    shape = tuple(image.shape)
    axes = "DHW"[-config.dims :] if config.dims == 3 else "HW"
    if len(shape) == config.dims and config.in_channels == 1:
        return shape
    if len(shape) == config.dims + 1 and shape[0] == config.in_channels:
        return shape[1:]
    raise ValueError(
        f"image of shape {shape} does not fit a model with {config.in_channels} input "
        f"channel(s); give ({', '.join(axes)})"
        + (" or " if config.in_channels == 1 else " as ")
        + f"({config.in_channels}, {', '.join(axes)}), channels first"
    )


def read_input(image, window: Window, normalization: Normalization | None = None) -> np.ndarray:
    """Input tile ``(C, *window.shape)`` as float32: mirrored past the border, normalised.

    Only the image region under the window is read (:meth:`Window.read`), so
    ``image`` may be a memory-mapped or zarr array larger than memory.
    """
    rows = ", ".join(f"{a}..{b - 1}" for a, b in zip(window.start, window.stop, strict=True))
    try:
        block = window.read(image)
    except (ValueError, MemoryError):
        raise
    except Exception as error:  # a zarr chunk that does not decode, a file cut short
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"cannot read its pixels in the window {rows} ({type(error).__name__}: {reason}); "
            "a damaged chunk or file: restore or re-write it"
        ) from None
    if block.ndim == len(window.shape):
        block = block[None]
    tile = (normalization or Normalization.identity()).apply(block)
    if not np.isfinite(tile).all():
        # One NaN spreads over the whole context window of every output pixel near it.
        raise ValueError(
            f"holds NaN or infinite pixel values (in the window {rows}, or too large for "
            "float32 after normalisation); replace them before predicting"
        )
    return tile


def read_input_image(path: Path, dims: int, in_channels: int):
    """An input file, memory-mapped where it can be, channels first as training reads it
    (PNG and RGB TIFF channels last), fitted to the model's input channels: the one layout
    rule of every runner."""
    from ..data.dataset import channels_first, fit_channels

    image = io.read_image(path, memmap=True)
    if image.ndim == dims + 1:
        image = channels_first(image, dims, channels_last=path.suffix.lower() == ".png")
    if image.ndim == dims + 1 or in_channels > 1:
        image = fit_channels(image, dims, in_channels)
    return image


def read_inputs(image, windows: Sequence[Window], normalization: Normalization | None):
    """A batch ``(N, C, *S)`` of input tiles (:func:`read_input`)."""
    return np.stack([read_input(image, window, normalization) for window in windows])


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


def forward_probabilities(
    model: UNet,
    batch: np.ndarray,
    device: torch.device,
    tta: bool,
    channels_last: bool,
    precision: str = "fp32",
) -> np.ndarray:
    """Class probabilities (softmax) of a batch of input tiles, averaged over the TTA views;
    the network runs at ``precision`` (:mod:`unetile.precision`), the soft-max in float32."""
    with torch.inference_mode():
        return _forward_views(model, batch, device, tta, channels_last, precision)


def _forward_views(model, batch, device, tta, channels_last, precision) -> np.ndarray:
    inputs = torch.from_numpy(batch).to(device)
    total = None
    transforms = dihedral_transforms(tta)
    for turns, mirrored in transforms:
        view = torch.rot90(inputs, turns, dims=(-2, -1)) if turns else inputs
        if mirrored:
            view = view.flip(-1)
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            scores = model(view)
        probabilities = torch.softmax(scores.float(), dim=1)
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
    model: UNet, image, options: PredictOptions | None = None, **changes
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yield ``(region, probabilities)`` blocks that together cover the image once.

    For a ``valid`` model each block is the part of one output tile that no
    earlier tile wrote (:attr:`unetile.network.tiling.Tile.owned`), in tile order, so
    a consumer can stream them to disk. For a ``same`` model the blended
    probabilities of the whole image are yielded as one block. Options as
    for :func:`predict`.
    """
    for _, region, block in iter_image_predictions(model, [image], options, **changes):
        yield region, block


@dataclass
class _Blend:
    """Gaussian-weighted sum of one image's overlapping tiles (``same`` models)."""

    weight: np.ndarray
    numerator: np.ndarray
    denominator: np.ndarray

    @classmethod
    def of(cls, num_classes: int, spatial, tile_shape) -> _Blend:
        return cls(
            gaussian_importance(tile_shape),
            np.zeros((num_classes, *spatial), dtype=np.float32),
            np.zeros(spatial, dtype=np.float32),
        )

    def add(self, tile, output: np.ndarray) -> None:
        local = tile.local(tile.region)
        self.numerator[(slice(None), *tile.region)] += (
            output[(slice(None), *local)] * (self.weight[local])
        )
        self.denominator[tile.region] += self.weight[local]

    def result(self) -> np.ndarray:
        self.numerator /= self.denominator
        return self.numerator


def _tile_batches(tiles_per_image, tile_shapes, batch_size: int) -> list[list]:
    """``(image number, tile)`` pairs in order, cut into batches of at most ``batch_size``
    tiles of the same shape: consecutive images of one tile shape share forward passes."""
    batches, batch, shape = [], [], None
    for number, tiles in enumerate(tiles_per_image):
        for tile in tiles:
            if batch and (len(batch) == batch_size or tile_shapes[number] != shape):
                batches.append(batch)
                batch = []
            batch.append((number, tile))
            shape = tile_shapes[number]
    return batches + [batch] if batch else batches


def iter_image_predictions(
    model: UNet, images: Sequence, options: PredictOptions | None = None, **changes
) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray]]:
    """Yield ``(image number, region, probabilities)`` blocks of several images, in order.

    The network is set up on the device once for all the images, and the
    tiles of consecutive images of one tile shape share forward passes,
    ``batch_size`` tiles at a time: a folder of small slices, one tile each,
    runs ``batch_size`` slices per pass. The blocks of each image are those
    of :func:`iter_predictions` for it alone (the same numbers up to float
    rounding of a batched convolution; ``same`` models are blended per image).
    Options as for :func:`predict`; an automatic tile is chosen per image.
    """
    images = list(images)
    if not images:
        return
    spatials, resolved = _resolve_each(model, images, PredictOptions.of(options, **changes))
    yield from _iter_resolved(model, images, spatials, resolved)


def _resolve_each(model: UNet, images: list, options: PredictOptions):
    """Each image's spatial shape and its options resolved (tile shape, device...)."""
    spatials = [spatial_shape(model, image) for image in images]
    return spatials, [options.resolve(model, spatial) for spatial in spatials]


def _iter_resolved(model, images, spatials, resolved):
    """:func:`iter_image_predictions` with each image's options already resolved."""
    options, device, config = resolved[0], resolved[0].device, model.config
    tiling = Tiling.of(model)
    tiles = [
        tiling.tiles(s, o.tile_shape, o.overlap) for s, o in zip(spatials, resolved, strict=True)
    ]
    batches = _tile_batches(tiles, [o.tile_shape for o in resolved], options.batch_size)
    left = [len(image_tiles) for image_tiles in tiles]
    channels_last = uses_channels_last(model, device)
    valid = config.padding == "valid"
    blends = {}

    def load(batch):
        inputs = []
        for number, tile in batch:
            try:
                inputs.append(read_input(images[number], tile.window, options.normalization))
            except ValueError as error:
                raise ValueError(f"image {number}: {error}" if len(images) > 1 else error) from None
        return np.stack(inputs)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(left), unit="tile", disable=not options.progress, desc="predict")
    try:
        with _inference(model, device, channels_last):
            for batch, outputs in forward_batches(model, batches, load, device, options):
                for (number, tile), output in zip(batch, outputs, strict=True):
                    bar.update(1)
                    left[number] -= 1
                    if valid:
                        yield number, tile.owned, output[(slice(None), *tile.local(tile.owned))]
                        continue
                    if number not in blends:
                        blends[number] = _Blend.of(
                            config.num_classes, spatials[number], resolved[number].tile_shape
                        )
                    blends[number].add(tile, output)
                    if not left[number]:
                        whole = tuple(slice(0, s) for s in spatials[number])
                        yield number, whole, blends.pop(number).result()
    finally:
        bar.close()


def forward_batches(model: UNet, batches: Sequence, load, device, options: PredictOptions):
    """The tile loop of every runner: ``(batch, probabilities)`` for each batch, in order.

    ``load(batch)`` reads a batch's input tiles; one reader thread reads the
    next batch while the network runs this one. The model must be ready on
    ``device`` (in eval mode, in the layout :func:`channels_last` says).
    ValueError when the network gives NaN.
    """
    channels_last = uses_channels_last(model, device)
    reader = ThreadPoolExecutor(max_workers=1)
    try:
        pending = reader.submit(load, batches[0])
        for index, batch in enumerate(batches):
            inputs = pending.result()
            if index + 1 < len(batches):
                pending = reader.submit(load, batches[index + 1])
            outputs = forward_probabilities(
                model, inputs, device, options.tta, channels_last, options.precision
            )
            if not np.isfinite(outputs).all():
                raise ValueError(
                    "the network gave NaN probabilities from finite input: its weights "
                    "or normalisation are broken; train again or take an earlier checkpoint"
                )
            yield batch, outputs
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def uses_channels_last(model: UNet, device: torch.device) -> bool:
    """Whether a 2D network runs channels-last here (faster with oneDNN on the CPU)."""
    return device.type == "cpu" and model.config.dims == 2


def predict_images(
    model: UNet, images: Sequence, options: PredictOptions | None = None, **changes
) -> list[np.ndarray]:
    """Per-class probability maps of several images, their tiles batched together.

    For a stack or folder of small images (EM slices): the network is set up
    once and ``batch_size`` tiles, from one image or the next, run in each
    forward pass (:func:`iter_image_predictions`). Each result equals
    :func:`predict` of that image alone up to float rounding.

    Parameters
    ----------
    model : UNet
    images : sequence of array-like
        Images as :func:`predict` takes them, of any (also differing) sizes.
    options, keywords
        As for :func:`predict`.

    Returns
    -------
    list of ndarray
        A ``(K, *spatial)`` float32 probability map per image, in order.
    """
    images = list(images)
    results = [
        np.empty((model.config.num_classes, *spatial_shape(model, image)), dtype=np.float32)
        for image in images
    ]
    for number, region, block in iter_image_predictions(model, images, options, **changes):
        results[number][(slice(None), *region)] = block
    return results


def predict(model: UNet, image, options: PredictOptions | None = None, *, out=None, **changes):
    """Per-class probability map of an image of any size, predicted tile by tile.

    Parameters
    ----------
    model : UNet
        Put in eval mode on the device for the call; its training flag, device
        and memory layout are restored after. A model from
        :func:`unetile.predict.card.load_model` brings its normalisation.
    image : array-like
        ``(H, W)`` or ``(C, H, W)`` (``(D, H, W)`` or ``(C, D, H, W)`` for a
        3D model), any dtype; a numpy array, a memory-mapped TIFF
        (``io.read_image(path, memmap=True)``) or a zarr array. Only the
        tiles being predicted are read.
    options : PredictOptions, optional
        How to predict; any of its fields may also be given as a keyword
        (``tile_shape``, ``batch_size``, ``tta``, ``device``,
        ``memory_budget``, ``normalization``, ``progress``, ``overlap``).
    out : array-like, optional
        ``(K, *spatial)`` float32 destination (numpy or zarr) written tile by tile.

    Returns
    -------
    array-like
        ``out``, or a new ``(K, *spatial)`` float32 numpy array of probabilities.

    Examples
    --------
    >>> model, config = unetile.predict.card.load_model("runs/isbi")  # doctest: +SKIP
    >>> probabilities = predict(model, image, tile_shape=388, tta=True)  # doctest: +SKIP
    """
    shape = (model.config.num_classes, *spatial_shape(model, image))
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; it must be {shape}")
    for region, block in iter_predictions(model, image, options, **changes):
        out[(slice(None), *region)] = block
    return out
