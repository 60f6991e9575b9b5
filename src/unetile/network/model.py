"""The U-Net of Ronneberger, Fischer and Brox (2015) and its geometry.

The network reads top to bottom like figure 1 of the paper: a contracting path
of double 3x3 convolutions and 2x2 max pooling, an expansive path of 2x2
up-convolutions, crop-and-concatenate and double 3x3 convolutions, and a final
1x1 convolution. With ``padding="valid"`` (the paper) a 572x572 tile gives a
388x388 output; the geometry helpers below say which sizes are valid.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

PADDINGS = ("valid", "same")
NORMS = (None, "batch", "instance")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net; serialises to the ``model`` entry of ``config.json``."""

    in_channels: int = 1
    num_classes: int = 2
    depth: int = 5
    base_channels: int = 64
    padding: str = "valid"
    dropout: float = 0.5
    norm: str | None = None
    dims: int = 2

    def __post_init__(self):
        from ..numbers import (
            MAX_BASE_CHANNELS,
            MAX_CHANNELS,
            MAX_CLASSES,
            MAX_DEPTH,
            check_float,
            check_int,
        )

        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.dims not in (2, 3) or isinstance(self.dims, bool):
            raise ValueError(f"dims must be 2 or 3, got {self.dims!r}")
        for name, maximum in (
            ("depth", MAX_DEPTH),
            ("in_channels", MAX_CHANNELS),
            ("num_classes", MAX_CLASSES),
            ("base_channels", MAX_BASE_CHANNELS),
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1, maximum))
        dropout = check_float("dropout", self.dropout, 0.0, 1.0)
        if dropout == 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout", dropout)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------
# Geometry: pure functions on sizes along one axis.
# --------------------------------------------------------------------------


def _trace_size(input_size: int, depth: int, padding: str) -> int | None:
    """Output size along one axis, or None when the input size is not valid."""
    shrink = 4 if padding == "valid" else 0  # two 3x3 convolutions per block
    size = input_size
    for _ in range(depth - 1):
        size -= shrink
        if size < 2 or size % 2:
            return None  # every 2x2 max pooling must see an even size
        size //= 2
    size -= shrink
    if size < 1:
        return None
    for _ in range(depth - 1):
        size = 2 * size - shrink
    return size if size >= 1 else None


def output_size(input_size: int, depth: int = 5, padding: str = "valid") -> int:
    """Size (pixels, one axis) of the network's output for a given input size.

    Raises ``ValueError`` naming the nearest valid input sizes when the input
    size is not valid (a max pooling would see an odd size, or nothing is left).

    Examples
    --------
    >>> output_size(572)
    388
    """
    out = _trace_size(int(input_size), depth, padding)
    if out is None:
        raise ValueError(invalid_input_message(int(input_size), depth, padding))
    return out


def invalid_input_message(size: int, depth: int, padding: str) -> str:
    """The message for an input size the network does not take, with the valid sizes nearby."""
    below, above = valid_input_sizes_near(size, depth, padding)
    nearby = " or ".join(str(s) for s in (below, above) if s is not None)
    return (
        f"input size {size} is not valid for a depth-{depth} {padding!r} U-Net; "
        f"valid sizes nearby: {nearby}"
    )


def is_valid_input_size(input_size: int, depth: int = 5, padding: str = "valid") -> bool:
    """Whether a tile of ``input_size`` pixels passes through the network."""
    return _trace_size(int(input_size), depth, padding) is not None


@functools.cache
def smallest_input_size(depth: int = 5, padding: str = "valid") -> int:
    """Smallest valid input size (pixels, one axis): 188 for the paper's network.

    The valid sizes are this one plus any multiple of :func:`size_multiple`:
    each pooling halves the size, so the sizes that pool evenly repeat every
    ``2**(depth-1)`` pixels, and every size above a valid one leaves more.
    """
    return next(s for s in itertools.count(1) if _trace_size(s, depth, padding))


def valid_input_sizes_near(
    size: int, depth: int = 5, padding: str = "valid"
) -> tuple[int | None, int]:
    """The largest valid input size ``<= size`` (None if none is) and the smallest ``>= size``.

    Examples
    --------
    >>> valid_input_sizes_near(570)
    (556, 572)
    """
    smallest = smallest_input_size(depth, padding)
    multiple = size_multiple(depth)
    steps = (size - smallest) / multiple
    below = smallest + math.floor(steps) * multiple if size >= smallest else None
    above = smallest + max(0, math.ceil(steps)) * multiple
    return below, above


def input_size_for_output(output: int, depth: int = 5, padding: str = "valid") -> int:
    """Smallest valid input size (pixels) whose output is at least ``output`` pixels.

    Examples
    --------
    >>> input_size_for_output(388)
    572
    """
    if output < 1:
        raise ValueError(f"output size must be >= 1, got {output}")
    # A valid input loses exactly 2 * context_margin pixels, whatever its size.
    return valid_input_sizes_near(output + 2 * context_margin(depth, padding), depth, padding)[1]


def context_margin(depth: int = 5, padding: str = "valid") -> int:
    """Context (pixels per side) that a valid network reads around its output.

    It is the same for every valid input size: 92 px for the paper's
    depth-5 network (572 - 388 = 2 * 92), 0 for ``padding="same"``.
    """
    if padding == "same":
        return 0
    # Each 3x3 conv at level l (pooled l times) removes 2 px at that scale,
    # i.e. 2 * 2**l px of input context; two convs per block on both paths.
    margin = 0
    for level in range(depth - 1):
        margin += 2 * 2 * 2**level  # contracting block at this level
        margin += 2 * 2 * 2**level  # expansive block back at this level
    margin += 2 * 2 * 2 ** (depth - 1)  # the bottom block
    return margin // 2


def size_multiple(depth: int = 5) -> int:
    """Valid input sizes are spaced by this many pixels (2**(depth-1))."""
    return 2 ** (depth - 1)


# --------------------------------------------------------------------------
# Building blocks named after the paper's words.
# --------------------------------------------------------------------------


def _layers(dims: int):
    if dims == 2:
        return nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d
    return nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU (and a norm layer if asked)."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig):
        conv, _, _, batch_norm, instance_norm = _layers(config.dims)
        pad = 1 if config.padding == "same" else 0
        layers: list[nn.Module] = []
        for channels_in in (in_channels, out_channels):
            layers.append(
                conv(
                    channels_in, out_channels, kernel_size=3, padding=pad, bias=config.norm is None
                )
            )
            if config.norm == "batch":
                layers.append(batch_norm(out_channels))
            elif config.norm == "instance":
                layers.append(instance_norm(out_channels, affine=True))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(features: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``features`` to ``spatial_shape`` around the centre."""
    slices = [slice(None), slice(None)]
    for have, want in zip(features.shape[2:], spatial_shape, strict=True):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return features[tuple(slices)]


class ExpansiveStep(nn.Module):
    """2x2 up-convolution halving the channels, crop-and-concatenate, double conv."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig):
        super().__init__()
        _, _, up_conv, _, _ = _layers(config.dims)
        self.up = up_conv(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels, config)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = center_crop(skip, x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015).

    Parameters
    ----------
    in_channels : int
        Channels of the input image (1 for grayscale EM).
    num_classes : int
        Channels of the output score map, one per class.
    depth : int
        Number of resolution levels; the paper's 5 gives 64..1024 channels.
    base_channels : int
        Channels at the first level (64 in the paper); doubled at each level.
    padding : {"valid", "same"}
        "valid" is the paper: unpadded convolutions, output smaller than input,
        exact overlap-tile stitching. "same" keeps the size (not tile-exact).
    dropout : float
        Drop-out probability at the end of the contracting path (the two
        deepest levels, as in the authors' Caffe model).
    norm : {None, "batch", "instance"}
        Optional normalisation after every convolution (not in the paper).
    dims : {2, 3}
        2D images or 3D stacks (3x3x3 convolutions, 2x2x2 pooling).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 5,
        base_channels: int = 64,
        padding: str = "valid",
        dropout: float = 0.5,
        norm: str | None = None,
        dims: int = 2,
    ):
        super().__init__()
        config = UNetConfig(
            in_channels, num_classes, depth, base_channels, padding, dropout, norm, dims
        )
        self.config = config
        conv, max_pool, _, _, _ = _layers(dims)
        widths = [base_channels * 2**level for level in range(depth)]

        self.contracting = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.contracting.append(DoubleConv(channels, width, config))
            channels = width
        self.pool = max_pool(kernel_size=2, stride=2)
        # Caffe model of the paper: drop-out after the last two contracting blocks.
        self.dropout_levels = set(range(max(0, depth - 2), depth)) if dropout > 0 else set()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.expansive = nn.ModuleList(
            ExpansiveStep(widths[level + 1], widths[level], config)
            for level in reversed(range(depth - 1))
        )
        self.classifier = conv(widths[0], num_classes, kernel_size=1)
        #: The input normalisation it was trained with (a Normalization,
        #: set by unetile.predict.card.load_model); prediction applies it. None: the input as it is.
        self.normalization = None
        # Valid input sizes are smallest + k * multiple (plain ints for a cheap check).
        self._valid_sizes = (smallest_input_size(depth, padding), size_multiple(depth))
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: UNetConfig | dict) -> UNet:
        if isinstance(config, dict):
            config = UNetConfig(**config)
        return cls(**asdict(config))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He initialisation: Gaussian with std sqrt(2 / N), N the fan-in of one neuron."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            elif isinstance(module, nn.ConvTranspose2d | nn.ConvTranspose3d):
                # With kernel == stride each output pixel sees one input pixel per channel.
                fan_in = (
                    module.in_channels * math.prod(module.kernel_size) // math.prod(module.stride)
                )
            else:
                continue
            with torch.no_grad():
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager calls only: traced exports and compiled graphs keep the shapes symbolic.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input_shape(x.shape[2:])
        skips = []
        for level, block in enumerate(self.contracting):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            if level in self.dropout_levels:
                x = self.dropout(x)
            skips.append(x)
        for step, skip in zip(self.expansive, reversed(skips[:-1]), strict=True):
            x = step(x, skip)
        return self.classifier(x)

    # Geometry of this network, per spatial axis.
    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """ValueError naming the valid sizes nearby when a spatial input size is not valid.

        Plain integer arithmetic on the shape (no device work): a size the
        poolings cannot halve evenly would otherwise give an output shifted by
        half a pixel against the input.
        """
        smallest, multiple = self._valid_sizes
        for size in input_shape:
            if size < smallest or (size - smallest) % multiple:
                config = self.config
                raise ValueError(invalid_input_message(int(size), config.depth, config.padding))

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape; ValueError if invalid."""
        return tuple(output_size(s, self.config.depth, self.config.padding) for s in input_shape)

    @property
    def context_margin(self) -> int:
        """Pixels of context per side that each output pixel needs (92 for the paper)."""
        return context_margin(self.config.depth, self.config.padding)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def estimate_batch_norm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Set every batch norm's statistics to the plain average over ``inputs``; return their count.

    Training with one tile per step normalises each tile by its own
    statistics (as instance norm does); evaluation then uses the stored
    averages, which are only as good as the tiles they came from. Averaging
    over un-augmented tiles of the training images, with no momentum, gives
    the statistics that prediction will meet, and makes the network's output
    independent of the tile (the paper's overlap-tile promise). Weights are
    untouched; each layer sees the inputs as the layers before it already
    normalise them in training mode.
    """
    norms = batch_norms(model)
    modes = [m.training for m in norms]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    count = 0
    try:
        for batch in inputs:
            model(batch)
            count += 1
    finally:
        for norm, mode, momentum in zip(norms, modes, momenta, strict=True):
            norm.momentum = momentum
            norm.train(mode)
    if count == 0:
        raise ValueError("estimate_batch_norm needs at least one input tile")
    return count


def freeze_batch_norm(model: nn.Module) -> None:
    """Batch norms in evaluation mode: they use, and no longer update, their statistics."""
    for norm in batch_norms(model):
        norm.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (31,030,658 for the paper's 1-in, 2-class network)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_conv_layers(model: nn.Module) -> int:
    """Convolutional layers, up-convolutions included (23 in the paper)."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return sum(isinstance(m, kinds) for m in model.modules())


def forward_flops(config: UNetConfig | dict, input_shape: Sequence[int]) -> int:
    """FLOPs (multiply-add = 2) of one forward pass on one tile of ``input_shape``.

    Counted analytically from the convolutions; ReLU, pooling and copies are
    ignored. About 300 GFLOP for the paper's network on a 572x572 tile.
    """
    if isinstance(config, dict):
        config = UNetConfig(**config)
    shrink = 4 if config.padding == "valid" else 0
    kernel3 = 3**config.dims
    widths = [config.base_channels * 2**level for level in range(config.depth)]
    flops = 0
    sizes = list(input_shape)
    channels = config.in_channels
    level_sizes = []
    for level, width in enumerate(widths):
        if level > 0:
            sizes = [s // 2 for s in sizes]
        mid = [s - shrink // 2 for s in sizes]
        out = [s - shrink for s in sizes]
        flops += 2 * kernel3 * channels * width * math.prod(mid)
        flops += 2 * kernel3 * width * width * math.prod(out)
        sizes, channels = out, width
        level_sizes.append(sizes)
    for level in reversed(range(config.depth - 1)):
        width = widths[level]
        sizes = [2 * s for s in sizes]
        flops += 2 * channels * width * math.prod(sizes)  # one kernel tap per output pixel
        mid = [s - shrink // 2 for s in sizes]
        out = [s - shrink for s in sizes]
        flops += 2 * kernel3 * 2 * width * width * math.prod(mid)
        flops += 2 * kernel3 * width * width * math.prod(out)
        sizes, channels = out, width
    flops += 2 * channels * config.num_classes * math.prod(sizes)
    return flops
