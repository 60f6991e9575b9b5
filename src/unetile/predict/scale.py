"""Physical pixel size: compare an image's with the model's, and resample between them.

A U-Net learns structures of a size in pixels: a membrane 3 px wide, a cell
of 40 px. An image taken at twice the pixel size shows them half as large,
and the network has never seen that. The run's ``config.json`` stores the
pixel size of its training images (``"pixel_size_um"``, micrometres per pixel
along each spatial axis); prediction compares it with each input's and can
resample the input to the model's pixel size and the outputs back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import io

#: Relative difference of pixel sizes beyond which prediction warns.
TOLERANCE = 0.2
#: Relative difference below which two pixel sizes count as equal (no resampling).
SAME = 1e-3


def relative_difference(first: Sequence[float], second: Sequence[float]) -> float:
    """Largest ``|a / b - 1|`` over the axes: 0.25 for 5 nm against 4 nm pixels.

    Examples
    --------
    >>> relative_difference((5.0, 5.0), (4.0, 4.0))
    0.25
    """
    if len(first) != len(second):
        raise ValueError(f"pixel sizes {tuple(first)} and {tuple(second)} have different axes")
    return max(abs(a / b - 1.0) for a, b in zip(first, second, strict=True))


def scaled_shape(
    shape: Sequence[int], pixel_size: Sequence[float], target_pixel_size: Sequence[float]
) -> tuple[int, ...]:
    """Shape of an image of ``shape`` resampled from ``pixel_size`` to ``target_pixel_size``.

    The physical extent is kept: ``round(shape * pixel_size / target_pixel_size)``
    pixels per axis, at least 1.

    Examples
    --------
    >>> scaled_shape((100, 60), (0.008, 0.008), (0.004, 0.004))
    (200, 120)
    """
    return tuple(
        max(1, round(s * p / t))
        for s, p, t in zip(shape, pixel_size, target_pixel_size, strict=True)
    )


def resample(array: np.ndarray, spatial_shape: Sequence[int], labels: bool = False) -> np.ndarray:
    """Resample the last ``len(spatial_shape)`` axes of ``array`` to ``spatial_shape``.

    Parameters
    ----------
    array : ndarray
        Leading axes (channels, classes) are kept as they are.
    spatial_shape : sequence of int
        New size of the spatial axes (pixels).
    labels : bool
        False: linear interpolation (images, probabilities), with Gaussian
        anti-aliasing when an axis shrinks; the result is float32. True:
        nearest neighbour (class maps, instance ids), the dtype kept, no new value.

    Returns
    -------
    ndarray
    """
    from skimage.transform import resize

    array = np.asarray(array)
    spatial_shape = tuple(int(s) for s in spatial_shape)
    leading = array.shape[: array.ndim - len(spatial_shape)]
    if labels:
        resized = resize(
            array,
            leading + spatial_shape,
            order=0,
            preserve_range=True,
            anti_aliasing=False,
            mode="edge",
        )
        return resized.astype(array.dtype, copy=False)
    shrinks = any(
        new < old for new, old in zip(spatial_shape, array.shape[len(leading) :], strict=True)
    )
    resized = resize(
        array.astype(np.float32, copy=False),
        leading + spatial_shape,
        order=1,
        preserve_range=True,
        anti_aliasing=shrinks,
        mode="reflect",
    )
    return resized.astype(np.float32, copy=False)


def predict_rescaled_to_files(
    model,
    image: np.ndarray,
    pixel_size: Sequence[float],
    model_pixel_size: Sequence[float],
    **options,
) -> dict[str, Path]:
    """:func:`unetile.predict.predict_to_files` at the model's pixel size, outputs at the image's.

    The image (``(C, *S)`` or ``S``, held in memory) is resampled to
    ``model_pixel_size`` (linear interpolation), predicted, and every output is
    resampled back to the image's own shape: probabilities by linear
    interpolation, the class map and instance ids by nearest neighbour. The
    outputs appear under their final names only when complete.

    Parameters
    ----------
    model : UNet
    image : ndarray
    pixel_size, model_pixel_size : sequence of float
        Micrometres per pixel of the image and of the model's training images,
        one per spatial axis.
    **options
        Output paths (``labels``, ``probabilities``, ``instances``) and the
        other options of ``predict_to_files``.
    """
    from .files import KINDS, predict_to_files

    dims = model.config.dims
    image = np.asarray(image)
    spatial = image.shape[-dims:]
    working = resample(image, scaled_shape(spatial, pixel_size, model_pixel_size))
    requested = {kind: Path(options.pop(kind)) for kind in KINDS if options.get(kind) is not None}
    if not requested:
        raise ValueError("give at least one of labels, probabilities, instances")
    first = next(iter(requested.values()))
    first.parent.mkdir(parents=True, exist_ok=True)
    io.remove_stale_scratch(first.parent)
    # Locked while in use, so another run into the same folder never takes it for stale.
    with io.scratch_folder(first.parent) as scratch:
        scaled = {kind: Path(scratch) / f"{kind}.zarr" for kind in requested}
        predict_to_files(model, working, **scaled, **options)
        for kind, path in requested.items():
            store = io.open_zarr(scaled[kind])
            values = resample(np.asarray(store), spatial, labels=kind != "probabilities")
            _write_output(path, values, store.attrs.asdict())
    return requested


def _write_output(path: Path, array: np.ndarray, metadata: dict) -> None:
    """A finished output as a tiled TIFF or a zarr store, under its final name at once."""
    if path.suffix.lower() != ".zarr":
        io.write_tiled_tiff(path, array, metadata=metadata)
        return
    import zarr

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        store = zarr.open_array(
            store=str(staging / path.name), mode="w", shape=array.shape, dtype=array.dtype
        )
        store[...] = array
        store.attrs.update(metadata)
        io.move_directory(staging / path.name, path)
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def check_pixel_size(values: Sequence[float], dims: int, source: str) -> tuple[float, ...]:
    """``values`` as one positive size per spatial axis (one value is used for all).

    Raises ValueError naming ``source`` otherwise.
    """
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * dims
    if len(values) != dims or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"{source}: pixel size needs 1 or {dims} positive values (micrometres), got {values}"
        )
    return values


def describe(pixel_size: Sequence[float]) -> str:
    """``0.004 x 0.004 µm`` for messages."""
    return " x ".join(f"{v:.4g}" for v in pixel_size) + " µm"


__all__ = [
    "TOLERANCE",
    "check_pixel_size",
    "describe",
    "predict_rescaled_to_files",
    "relative_difference",
    "resample",
    "scaled_shape",
]
