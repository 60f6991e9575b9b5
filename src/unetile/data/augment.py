"""Data augmentation of section 3: elastic deformation, shift, rotation, flips, gray values.

The paper calls random elastic deformation the key to training from very few
annotated images: displacement vectors on a coarse 3x3 grid, drawn from a
Gaussian with 10 pixels standard deviation, interpolated to every pixel by
bicubic interpolation. Image, labels and weights are deformed together.

Geometry. Every geometric augmentation is one backward map: output pixel ``y``
(of a tile of ``output_shape``, centred on the input tile) reads the input at

    source(y) = centre_in + R F (y - centre_out) + shift + u(y)

with ``F`` the flips, ``R`` the rotation (in the plane of the last two axes)
and ``u`` the elastic displacement field, whose control points span the output
tile. Positions outside the input are mirrored at the border pixels (the
paper's overlap-tile extrapolation), so the output never holds made-up zeros;
a trainer that wants only real data feeds a larger input tile and asks for a
centre ``output_shape``.

Interpolation. Images: bicubic in 2D (``grid_sample``), trilinear in 3D.
Labels and instance ids: nearest neighbour, so no new label values appear.
Weights: nearest neighbour at the very same source pixel as the label, because
the class-balancing part ``w_c`` belongs to the label; bilinear weights would
mix two classes' weights at every label border, and the separation ridge of
the paper's weight map (sigma ~ 5 px) is smooth enough that nothing is lost.
When every source position is a pixel centre (flips, rotations by 90 degrees,
integer shifts) images on the CPU are copied by the same nearest-neighbour
path, so these augmentations are exact there; on a GPU, where checking for
this would stop the host every tile, they are interpolated, exact to rounding.

Randomness. One ``numpy.random.Generator`` draws every random number on the
CPU (:func:`draw_transform`); the device only evaluates the drawn transforms
(:func:`apply_transforms`), so a seed gives the same augmentation on every
device, up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

# A source position closer than this (pixels) to a pixel centre counts as one.
_INTEGER_TOLERANCE = 1e-4


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; serialise with ``dataclasses.asdict``.

    Parameters
    ----------
    elastic : bool
        Random elastic deformation on a coarse grid.
    elastic_sigma : float
        Standard deviation (pixels) of the control-point displacements; the
        paper: 10.
    elastic_grid : int
        Control points per axis (paper: 3, i.e. a 3x3 grid; 3x3x3 in 3D).
    rotation : bool
        Rotation by a uniform angle in [0, 360) degrees, in the plane of the
        last two axes (in 3D: about the depth axis only, because microscopy
        stacks are usually anisotropic).
    flip : bool
        Independent mirror of each spatial axis with probability 1/2.
    shift : float
        Maximum shift (pixels); each axis is shifted by a uniform amount in
        [-shift, shift]. 0 disables it.
    gray : bool
        Gray-value variation (gamma, contrast, brightness, in that order).
    contrast : tuple of float
        Range of the factor that scales gray values about the tile mean.
    brightness : tuple of float
        Range of the offset added, as a fraction of the tile's gray-value range.
    gamma : tuple of float
        Range of the exponent applied to gray values rescaled to [0, 1]; drawn
        log-uniformly so that gamma and 1/gamma are equally likely.
    """

    elastic: bool = True
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    rotation: bool = True
    flip: bool = True
    shift: float = 16.0
    gray: bool = True
    contrast: tuple[float, float] = (0.8, 1.25)
    brightness: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self):
        from ..numbers import check_float, check_int

        # JSON gives lists back; the dataclass is frozen and hashable with tuples.
        for name in ("contrast", "brightness", "gamma"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
                raise ValueError(f"{name} must be a range [low, high], got {value!r}")
            value = tuple(check_float(f"{name} bound", v) for v in value)
            if value[0] > value[1]:
                raise ValueError(
                    f"{name} must be a range (low, high) with low <= high, got {value}"
                )
            object.__setattr__(self, name, value)
        for name in ("elastic", "rotation", "flip", "gray"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(
            self, "elastic_sigma", check_float("elastic_sigma (pixels)", self.elastic_sigma, 0, 1e4)
        )
        grid = check_int("elastic_grid (control points)", self.elastic_grid, 2, 64)
        object.__setattr__(self, "elastic_grid", grid)
        object.__setattr__(self, "shift", check_float("shift (pixels)", self.shift, 0, 1e4))
        if self.contrast[0] <= 0:
            raise ValueError(f"contrast must be a range of positive factors, got {self.contrast}")
        if self.gamma[0] <= 0:
            raise ValueError(f"gamma must be a range of positive exponents, got {self.gamma}")

    @classmethod
    def none(cls) -> AugmentParams:
        """Settings that leave every tile unchanged (the identity)."""
        return cls(elastic=False, rotation=False, flip=False, shift=0.0, gray=False)

    @classmethod
    def from_dict(cls, values: dict) -> AugmentParams:
        """Inverse of ``dataclasses.asdict``; unknown keys raise ``ValueError``."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augmentation settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Transform:
    """One drawn augmentation of one tile (all numbers in pixels and degrees).

    Attributes
    ----------
    angle : float
        Rotation (degrees) in the plane of the last two axes; with rows drawn
        downwards a positive angle turns the content clockwise (90 equals
        ``numpy.rot90(array, k=-1, axes=(-2, -1))``).
    flips : tuple of bool
        Mirror each spatial axis; empty means no flip.
    shift : tuple of float
        Shift (pixels) of the sampling positions per spatial axis; empty means 0.
    control_displacement : numpy.ndarray or None
        Displacements (pixels) of the control points, shape (ndim, grid, ..., grid);
        None for no elastic deformation.
    contrast, brightness, gamma : float
        Gray-value variation; 1, 0, 1 leave the gray values unchanged.
    """

    angle: float = 0.0
    flips: tuple[bool, ...] = ()
    shift: tuple[float, ...] = ()
    control_displacement: np.ndarray | None = None
    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0


# --------------------------------------------------------------------------
# Elastic displacement field: coarse control points, bicubic interpolation.
# --------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps around fractional positions ``t``."""
    # a = -0.75 as in torch's and OpenCV's bicubic, so the 2D field equals
    # F.interpolate(mode="bicubic", align_corners=True) of the control grid.
    distances = np.stack([1.0 + t, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * distances - (a + 3.0)) * distances**2 + 1.0
    far = ((a * distances - 5.0 * a) * distances + 8.0 * a) * distances - 4.0 * a
    return np.where(distances <= 1.0, near, far)


def _interpolation_matrix(grid: int, size: int) -> np.ndarray:
    """Matrix (size, grid) of bicubic interpolation from control points to pixels.

    The control points sit at the first pixel, the last pixel and evenly in
    between (``align_corners``); the cubic is interpolating, so the field
    equals the drawn displacement at every control point.
    """
    position = np.zeros(size) if size == 1 else np.arange(size) * (grid - 1) / (size - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), grid - 1)
    weights = _cubic_weights(position - lower)
    matrix = np.zeros((size, grid))
    for tap in range(4):
        # Taps past the last control point repeat it (replicate border).
        index = np.clip(lower - 1 + tap, 0, grid - 1)
        np.add.at(matrix, (np.arange(size), index), weights[:, tap])
    return matrix


def _to_device(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host array on ``device``, rounded to ``dtype`` on the host first.

    ``non_blocking``: a blocking copy to a GPU waits for all work queued there,
    so each one would stall the host once per tile. The host copy is staged by
    the driver before the call returns, so the source may be freed at once.
    """
    return torch.as_tensor(values, dtype=torch.float64).to(dtype).to(device, non_blocking=True)


def _expand_control_points(
    control: np.ndarray, shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Per-pixel field (ndim, *shape) from control-point displacements (ndim, *grid)."""
    ndim = len(shape)
    matrices = [
        _interpolation_matrix(control.shape[1 + axis], size) for axis, size in enumerate(shape)
    ]
    # Contract every axis but the first on the CPU in float64 (small: grid x the
    # rest); the last contraction runs on the device as a sum of broadcast
    # products, not a matmul, so TF32 matmuls cannot lower its precision.
    partial = control
    for axis in range(ndim - 1, 0, -1):
        partial = np.moveaxis(
            np.tensordot(partial, matrices[axis], axes=([1 + axis], [1])), -1, 1 + axis
        )
    partial_tensor = _to_device(partial, device, dtype)
    first = _to_device(matrices[0], device, dtype)
    field = torch.zeros((ndim, *shape), dtype=dtype, device=device)
    view = (shape[0],) + (1,) * (ndim - 1)
    for point in range(control.shape[1]):
        field += first[:, point].reshape(view) * partial_tensor[:, point : point + 1]
    return field


def _draw_control_points(
    rng: np.random.Generator, ndim: int, sigma: float, grid: int
) -> np.ndarray:
    return rng.normal(0.0, sigma, size=(ndim,) + (grid,) * ndim)


def elastic_displacement(
    shape: Sequence[int], rng: np.random.Generator, sigma: float = 10.0, grid: int = 3
) -> np.ndarray:
    """Random elastic displacement field of the paper, one vector per pixel.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape (pixels) of the field, 2 or 3 axes.
    rng : numpy.random.Generator
        Source of the control-point displacements.
    sigma : float
        Standard deviation (pixels) of each control-point displacement component.
    grid : int
        Control points per axis (>= 2), spanning the whole shape.

    Returns
    -------
    numpy.ndarray
        Float64 array (ndim, *shape): displacement (pixels) along each axis;
        output pixel ``y`` reads the input at ``y + displacement[:, y]``.

    Examples
    --------
    >>> field = elastic_displacement((5, 5), np.random.default_rng(0), sigma=10.0)
    >>> field.shape
    (2, 5, 5)
    """
    shape = tuple(int(size) for size in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be 2 or 3 positive sizes (pixels), got {shape}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 pixels, got {sigma}")
    if grid < 2:
        raise ValueError(f"grid must be >= 2 control points per axis, got {grid}")
    control = _draw_control_points(rng, len(shape), sigma, grid)
    field = _expand_control_points(control, shape, torch.device("cpu"), torch.float64)
    return field.numpy()


# --------------------------------------------------------------------------
# Sampling: mirror at the borders, nearest / linear / cubic.
# --------------------------------------------------------------------------


def _reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror integer positions into [0, size - 1] about the border pixel centres."""
    if size == 1:
        return torch.zeros_like(index)
    last = size - 1
    if index.device.type != "cpu":
        # No min/max read back (it would stop the host on every tile); the
        # general mirror costs the GPU a few elementwise passes.
        return _reflect_any(index, last)
    low, high = int(index.min()), int(index.max())
    if low >= 0 and high <= last:
        return index  # the common case: nothing to mirror, no extra passes
    if low < -last or high > 2 * last:
        index = torch.remainder(index, 2 * last)  # periodic mirror, period 2 (size - 1)
    # One mirror at each end; cheaper than remainder and where on every pixel.
    return last - (last - index.abs()).abs()


def _reflect_any(index: torch.Tensor, last: int) -> torch.Tensor:
    """Mirror integer positions into [0, last] (last >= 1), however far outside."""
    index = torch.remainder(index, 2 * last)  # periodic mirror, period 2 (size - 1)
    return last - (last - index).abs()


def _nearest_index(coordinates: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Flat index (N, P) into arrays of spatial shape S of the pixels nearest to coordinates."""
    flat_index = None
    for axis, size in enumerate(spatial):
        index = _reflect_index(torch.round(coordinates[..., axis]).to(torch.int64), size)
        flat_index = index if flat_index is None else flat_index * size + index
    return flat_index.reshape(coordinates.shape[0], -1)


def _gather(array: torch.Tensor, flat_index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Values of ``array`` (N, C, *S) at ``flat_index`` (N, P), reshaped to (N, C, *shape)."""
    batch, channels = array.shape[:2]
    expanded = flat_index.unsqueeze(1).expand(batch, channels, -1)
    sampled = array.reshape(batch, channels, -1).gather(2, expanded)
    return sampled.reshape(batch, channels, *shape)


def _gather_nearest(array: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour sample of ``array`` (N, C, *S) at ``coordinates`` (N, *O, ndim)."""
    flat_index = _nearest_index(coordinates, array.shape[2:])
    return _gather(array, flat_index, coordinates.shape[1:-1])


def _sample_smooth(array: torch.Tensor, coordinates: torch.Tensor, order: int) -> torch.Tensor:
    """Linear (order 1) or cubic (order 3, 2D only) sample with mirrored borders."""
    spatial = array.shape[2:]
    # grid_sample wants positions in [-1, 1], last axis first (x, y[, z]).
    scale = _to_device(
        [2.0 / (size - 1) if size > 1 else 0.0 for size in spatial],
        coordinates.device,
        coordinates.dtype,
    )
    grid = (coordinates * scale - 1.0).flip(-1)
    if any(size == 1 for size in spatial):
        grid = torch.where(scale.flip(0) == 0, torch.zeros_like(grid), grid)
    mode = "bicubic" if order == 3 else "bilinear"
    return F.grid_sample(array, grid, mode=mode, padding_mode="reflection", align_corners=True)


def _sample(array: torch.Tensor, coordinates: torch.Tensor, order: int) -> torch.Tensor:
    """Sample (N, C, *S) at pixel positions (N, *O, ndim): order 0, 1 or 3."""
    if order == 0:
        return _gather_nearest(array, coordinates)
    integer = coordinates.device.type == "cpu" and bool(
        (coordinates - torch.round(coordinates)).abs().max() <= _INTEGER_TOLERANCE
    )  # on a GPU the check would stop the host; interpolation there is exact to rounding
    if integer:
        # Only pixel centres: interpolation is a copy; do it exactly.
        return _gather_nearest(array, coordinates)
    working = array if array.dtype in (torch.float32, torch.float64) else array.float()
    sampled = _sample_smooth(working, coordinates.to(working.dtype), order)
    return sampled.to(array.dtype)


def warp(array, displacement, order: int):
    """Warp an array by a per-pixel displacement field, mirroring at the borders.

    Parameters
    ----------
    array : numpy.ndarray or torch.Tensor
        Shape (..., *S): the last ``ndim`` axes are spatial, leading axes
        (channels) are warped alike. Integer arrays need ``order=0``.
    displacement : numpy.ndarray or torch.Tensor
        Shape (ndim, *S), pixels: output pixel ``y`` reads the input at
        ``y + displacement[:, y]``; ndim is 2 or 3.
    order : int
        0 nearest neighbour (labels, instance ids), 1 (bi/tri)linear,
        3 bicubic (2D only).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        The warped array, same type, shape, dtype and device as ``array``.
    """
    is_numpy = isinstance(array, np.ndarray)
    tensor = torch.as_tensor(array)
    field = torch.as_tensor(displacement)
    ndim = field.shape[0] if field.ndim else 0
    if ndim not in (2, 3) or field.ndim != ndim + 1:
        raise ValueError(
            f"displacement must have shape (ndim, *S) with ndim 2 or 3, got {tuple(field.shape)}"
        )
    spatial = tuple(field.shape[1:])
    if tensor.ndim < ndim or tuple(tensor.shape[-ndim:]) != spatial:
        raise ValueError(
            f"array must end with the spatial shape {spatial} of displacement, "
            f"got {tuple(tensor.shape)}"
        )
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order}")
    if order == 3 and ndim != 2:
        raise ValueError("order=3 (bicubic) works on 2D arrays only; use order=1 for 3D")
    if order > 0 and not tensor.is_floating_point():
        raise ValueError(f"order={order} needs a floating-point array, got {tensor.dtype}; use 0")
    coordinate_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    field = field.to(device=tensor.device, dtype=coordinate_dtype)
    axes = torch.meshgrid(
        *[torch.arange(size, dtype=coordinate_dtype, device=tensor.device) for size in spatial],
        indexing="ij",
    )
    coordinates = (torch.stack(axes, dim=-1) + field.movedim(0, -1)).unsqueeze(0)
    leading = tensor.shape[:-ndim]
    batch = tensor.reshape(1, -1, *spatial)
    result = _sample(batch, coordinates, order).reshape(*leading, *spatial)
    return result.numpy() if is_numpy else result


# --------------------------------------------------------------------------
# Drawing and applying augmentations.
# --------------------------------------------------------------------------


def draw_transform(rng: np.random.Generator, params: AugmentParams, ndim: int) -> Transform:
    """Draw one tile's augmentation with ``rng`` (all randomness lives here).

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    params : AugmentParams
        What to draw and from which ranges.
    ndim : int
        Number of spatial axes, 2 or 3.

    Returns
    -------
    Transform
        The drawn parameters; disabled augmentations keep their identity values
        and draw no random numbers.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3 spatial axes, got {ndim}")
    control = None
    if params.elastic and params.elastic_sigma > 0:
        control = _draw_control_points(rng, ndim, params.elastic_sigma, params.elastic_grid)
    angle = float(rng.uniform(0.0, 360.0)) if params.rotation else 0.0
    flips = tuple(bool(flag) for flag in rng.random(ndim) < 0.5) if params.flip else ()
    shift = (
        tuple(float(value) for value in rng.uniform(-params.shift, params.shift, ndim))
        if params.shift > 0
        else ()
    )
    contrast, brightness, gamma = 1.0, 0.0, 1.0
    if params.gray:
        gamma = float(np.exp(rng.uniform(np.log(params.gamma[0]), np.log(params.gamma[1]))))
        contrast = float(rng.uniform(*params.contrast))
        brightness = float(rng.uniform(*params.brightness))
    return Transform(angle, flips, shift, control, contrast, brightness, gamma)


def _is_geometric_identity(transform: Transform) -> bool:
    return (
        transform.angle % 360.0 == 0.0
        and not any(transform.flips)
        and not any(transform.shift)
        and (transform.control_displacement is None or not transform.control_displacement.any())
    )


def _source_coordinates(
    transform: Transform,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Input positions (pixels), shape (*output_shape, ndim), read by each output pixel."""
    ndim = len(output_shape)
    for name, value in (("flips", transform.flips), ("shift", transform.shift)):
        if len(value) not in (0, ndim):
            raise ValueError(f"Transform.{name} must be empty or have {ndim} entries, got {value}")
    control = transform.control_displacement
    if control is not None and (control.ndim != ndim + 1 or control.shape[0] != ndim):
        raise ValueError(
            f"Transform.control_displacement must have shape ({ndim}, grid, ...) with {ndim} "
            f"grid axes, got {control.shape}"
        )
    matrix = np.eye(ndim)
    if transform.flips:
        matrix = matrix @ np.diag([-1.0 if flag else 1.0 for flag in transform.flips])
    if transform.angle % 360.0:
        radians = math.radians(transform.angle)
        rotation = np.eye(ndim)
        rotation[-2:, -2:] = [[math.cos(radians), -math.sin(radians)],
                              [math.sin(radians), math.cos(radians)]]  # fmt: skip
        matrix = rotation @ matrix
    # Output centre -> input centre, rounded down to whole pixels when the sizes
    # differ by an odd number, so that the identity is an exact centre crop.
    offset = np.array(
        [
            (out - 1) / 2.0 + (size - out) // 2
            for size, out in zip(input_shape, output_shape, strict=True)
        ]
    )
    if transform.shift:
        offset = offset + np.asarray(transform.shift)
    if transform.control_displacement is not None:
        coordinates = _expand_control_points(
            transform.control_displacement, output_shape, device, dtype
        )
    else:
        coordinates = torch.zeros((ndim, *output_shape), dtype=dtype, device=device)
    centred = [torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0 for size in output_shape]
    for axis in range(ndim):
        # Sum of 1-D terms broadcast over the tile: exact for integer entries.
        coordinates[axis] += offset[axis]
        for other in range(ndim):
            if matrix[axis, other] == 0.0:
                continue
            view = [1] * ndim
            view[other] = output_shape[other]
            term = (matrix[axis, other] * centred[other]).reshape(view)
            coordinates[axis] += _to_device(term, device, dtype)
    return coordinates.movedim(0, -1)


def _vary_gray_values(images: torch.Tensor, transforms: Sequence[Transform]) -> torch.Tensor:
    """Gamma on the tile's [min, max] range, contrast about its mean, brightness offset."""
    batch = images.shape[0]
    view = (batch,) + (1,) * (images.ndim - 1)
    parameters = _to_device(
        [[t.gamma, t.contrast, t.brightness] for t in transforms], images.device, images.dtype
    )
    gamma, contrast, brightness = (parameters[:, column].reshape(view) for column in range(3))
    flat = images.reshape(batch, -1)
    low = flat.min(dim=1).values.reshape(view)
    high = flat.max(dim=1).values.reshape(view)
    span = high - low
    # A constant tile has no range to rescale; a span of 1 keeps it finite.
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    unit = ((images - low) / safe_span).clamp(0.0, 1.0) ** gamma
    varied = low + unit * safe_span
    mean = varied.reshape(batch, -1).mean(dim=1).reshape(view)
    return mean + contrast * (varied - mean) + brightness * span


def apply_transforms(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    transforms: Sequence[Transform],
    output_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Apply drawn transforms to a batch on its own device (no randomness here).

    Parameters
    ----------
    images : torch.Tensor
        Float (N, C, *S), S of 2 or 3 axes.
    labels : torch.Tensor or None
        Integer (N, *S): class labels or instance ids (nearest neighbour).
    weights : torch.Tensor or None
        Float (N, *S): weight map (nearest neighbour, same source pixel as labels).
    transforms : sequence of Transform
        One per image.
    output_shape : sequence of int or None
        Spatial shape (pixels) of the centre crop to return; None keeps S.

    Returns
    -------
    tuple
        ``(images, labels, weights)`` of spatial shape ``output_shape``; None stays None.
    """
    spatial, output = _check_batch(images, labels, weights, output_shape)
    if len(transforms) != images.shape[0]:
        raise ValueError(
            f"transforms must hold one Transform per image: {images.shape[0]} images, "
            f"got {len(transforms)}"
        )
    ndim = len(spatial)
    if all(_is_geometric_identity(t) for t in transforms):
        crop = tuple(
            slice((size - out) // 2, (size - out) // 2 + out)
            for size, out in zip(spatial, output, strict=True)
        )
        images = images[(..., *crop)]
        labels = None if labels is None else labels[(..., *crop)]
        weights = None if weights is None else weights[(..., *crop)]
    else:
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        coordinates = torch.stack(
            [_source_coordinates(t, spatial, output, images.device, dtype) for t in transforms]
        )
        images = _sample(images, coordinates, order=3 if ndim == 2 else 1)
        if labels is not None or weights is not None:
            # One gather index for labels and weights keeps every pair together.
            flat_index = _nearest_index(coordinates, spatial)
            if labels is not None:
                labels = _gather(labels.unsqueeze(1), flat_index, output).squeeze(1)
            if weights is not None:
                weights = _gather(weights.unsqueeze(1), flat_index, output).squeeze(1)
    if any(t.gamma != 1.0 or t.contrast != 1.0 or t.brightness != 0.0 for t in transforms):
        images = _vary_gray_values(images, transforms)
    return images, labels, weights


def _check_batch(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    output_shape: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a tensor (N, C, H, W) or (N, C, D, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    spatial = tuple(images.shape[2:])
    expected = (images.shape[0], *spatial)
    if labels is not None:
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels must have shape {expected}, got {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer (int64), got {labels.dtype}")
    if weights is not None and tuple(weights.shape) != expected:
        raise ValueError(f"weights must have shape {expected}, got {tuple(weights.shape)}")
    for name, tensor in (("labels", labels), ("weights", weights)):
        if tensor is not None and tensor.device != images.device:
            raise ValueError(f"{name} are on {tensor.device}, images on {images.device}")
    if output_shape is None:
        return spatial, spatial
    output = tuple(int(size) for size in output_shape)
    if len(output) != len(spatial) or any(
        not 1 <= out <= size for out, size in zip(output, spatial, strict=True)
    ):
        raise ValueError(
            f"output_shape must have {len(spatial)} sizes between 1 and the input tile "
            f"{spatial}, got {output}"
        )
    return spatial, output


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    rng: np.random.Generator,
    params: AugmentParams,
    output_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch: each tile gets its own random elastic deformation, rotation, etc.

    Parameters
    ----------
    images : torch.Tensor
        Float (N, C, H, W) or (N, C, D, H, W), on any device.
    labels : torch.Tensor
        Integer (N, *S) class labels or instance ids; keep their set of values.
    weights : torch.Tensor or None
        Float (N, *S) weight map, or None.
    rng : numpy.random.Generator
        The only source of randomness; draws on the CPU, so results do not
        depend on the device.
    params : AugmentParams
        Settings; ``AugmentParams.none()`` is the identity.
    output_shape : sequence of int or None
        Spatial shape (pixels) of the centre crop to return (None: the input's).
        Sampling positions outside the input are mirrored at its border; feed a
        larger tile to sample real data only.

    Returns
    -------
    tuple
        ``(images, labels, weights)``, spatial shape ``output_shape``;
        ``weights`` is None when given None.

    Examples
    --------
    >>> images, labels = torch.rand(2, 1, 64, 64), torch.randint(0, 2, (2, 64, 64))
    >>> out = augment_batch(images, labels, None, np.random.default_rng(0), AugmentParams(),
    ...                     output_shape=(48, 48))
    >>> tuple(out[0].shape), tuple(out[1].shape), out[2]
    ((2, 1, 48, 48), (2, 48, 48), None)
    """
    if not isinstance(params, AugmentParams):
        raise ValueError(f"params must be an AugmentParams, got {type(params).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    _check_batch(images, labels, weights, output_shape)
    ndim = images.ndim - 2
    transforms = [draw_transform(rng, params, ndim) for _ in range(images.shape[0])]
    return apply_transforms(images, labels, weights, transforms, output_shape)
