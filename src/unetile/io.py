"""Reading and writing images and models: the one place that touches files.

Every failure here raises :class:`InputError` with a one-line message that
names the file, says what is wrong and what to do; the CLI prints it and exits
non-zero. Writes go to a temporary name in the same folder and are renamed
into place, so an interrupted run never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


class InputError(ValueError):
    """Bad input from a user: the message is one line and names the file."""


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a/07.ome.tif`` -> ``07.ome``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def list_images(folder: str | os.PathLike) -> list[Path]:
    """TIFF and PNG files of a folder, sorted by name; InputError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of .tif/.tiff/.png images")
    # Hidden files are macOS sidecars (._07.tif) or temporaries of an interrupted write.
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not paths:
        raise InputError(f"{folder}: no .tif/.tiff/.png images in this folder")
    return paths


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a zarr store (a folder ending in .zarr)."""
    path = Path(path)
    return path.suffix.lower() == ".zarr" and path.is_dir()


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and zarr stores given as they are, other folders replaced by their images."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        paths.extend(list_images(item) if item.is_dir() and not is_zarr_path(item) else [item])
    return paths


def match_by_stem(
    images: list[Path], labels: list[Path], image_kind: str = "image", label_kind: str = "label"
) -> list[tuple[Path, Path]]:
    """Pair files of two lists by stem; InputError for a label without an image."""
    by_stem = {}
    for path in images:
        stem = image_stem(path)
        if stem in by_stem:
            raise InputError(
                f"{path}: two {image_kind}s share the stem {stem!r} ({by_stem[stem].name})"
            )
        by_stem[stem] = path
    pairs = []
    for label in labels:
        stem = image_stem(label)
        if stem not in by_stem:
            raise InputError(
                f"{label}: {label_kind} has no {image_kind} with the stem {stem!r} "
                f"in {images[0].parent if images else 'the image folder'}"
            )
        pairs.append((by_stem.pop(stem), label))
    if by_stem:
        orphan = next(iter(by_stem.values()))
        raise InputError(f"{orphan}: {image_kind} has no {label_kind} with the same stem")
    return pairs


def read_image(path: str | os.PathLike, memmap: bool = False) -> np.ndarray:
    """Read a TIFF or PNG image as a numpy array, as stored (no conversion).

    A zarr store (a folder ending in .zarr) is opened lazily as a zarr array.
    With ``memmap=True`` an uncompressed TIFF is memory-mapped instead of read,
    so that images larger than memory can be predicted tile by tile.
    """
    path = Path(path)
    if is_zarr_path(path):
        return open_zarr(path)  # lazy: only the chunks a caller slices are read
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            if memmap:
                with contextlib.suppress(ValueError):
                    return tifffile.memmap(path, mode="r")
            return tifffile.imread(path)
        if suffix == ".png":
            from skimage import io as skio

            return np.asarray(skio.imread(path))
    except InputError:
        raise
    except Exception as error:  # any decoder failure is the file's fault here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: cannot be read as an image ({reason})") from None
    raise InputError(f"{path}: unsupported file type {suffix!r}; use .tif, .tiff or .png")


#: Lengths in micrometres, by the unit names TIFF writers use (OME, ImageJ, Fiji).
MICROMETRES = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
CENTIMETRE_UNIT = 3  # TIFF ResolutionUnit; 2 (inch) is a printing setting, 1 none


def read_pixel_size(path: str | os.PathLike, dims: int = 2) -> tuple[float, ...] | None:
    """Pixel size in micrometres along each spatial axis (``(y, x)`` or ``(z, y, x)``).

    Read from the TIFF metadata, in this order: OME-XML (``PhysicalSizeX/Y/Z``
    with their units), ImageJ (``XResolution`` / ``YResolution`` with the
    ``unit`` entry, ``spacing`` for z), a resolution in pixels per centimetre.
    None when the file states none (PNG, zarr, a TIFF without these tags, a
    3D stack without its z step, a resolution in dots per inch): give it with
    ``--pixel-size`` then.
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            if tiff.is_ome:
                return _ome_pixel_size(tiff.ome_metadata, dims)
            page = tiff.pages[0]
            sizes = _resolution_sizes(page)
            if tiff.is_imagej:
                metadata = tiff.imagej_metadata or {}
                scale = _micrometres(str(metadata.get("unit", "")).replace("\\u00B5", "µ"))
                if scale is None or sizes is None:
                    return None
                sizes = tuple(size * scale for size in sizes)
                if dims == 3:
                    spacing = metadata.get("spacing")
                    return None if spacing is None else (float(spacing) * scale, *sizes)
                return sizes
            unit = page.tags.get("ResolutionUnit")
            if sizes is None or unit is None or int(unit.value) != CENTIMETRE_UNIT or dims != 2:
                return None
            return tuple(size * MICROMETRES["cm"] for size in sizes)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, ZeroDivisionError):
        return None  # the image reader reports an unreadable file


def _micrometres(unit: str) -> float | None:
    return MICROMETRES.get(unit.strip()) if unit else None


def _resolution_sizes(page) -> tuple[float, float] | None:
    """(y, x) pixel sizes in the resolution unit, from pixels per unit; None if absent."""
    sizes = []
    for name in ("YResolution", "XResolution"):
        tag = page.tags.get(name)
        if tag is None:
            return None
        numerator, denominator = tag.value
        if numerator <= 0 or denominator <= 0:
            return None
        sizes.append(denominator / numerator)
    if sizes == [1.0, 1.0]:
        return None  # what writers put when they know nothing
    return tuple(sizes)


def _ome_pixel_size(xml: str | None, dims: int) -> tuple[float, ...] | None:
    import xml.etree.ElementTree as ElementTree

    if not xml:
        return None
    root = ElementTree.fromstring(xml)
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    if pixels is None:
        return None
    axes = ("Z", "Y", "X")[-dims:]
    sizes = []
    for axis in axes:
        value = pixels.get(f"PhysicalSize{axis}")
        scale = _micrometres(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is None or scale is None:
            return None
        sizes.append(float(value) * scale)
    return tuple(sizes)


def _temporary_path(path: Path) -> Path:
    # Keep the real suffix last so that writers that go by it pick the format.
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent
    )
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a TIFF (any dtype) or PNG (uint8/uint16) atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as temporary:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(temporary, array, compression="zlib")
        elif suffix == ".png":
            from skimage import io as skio

            if array.dtype not in (np.uint8, np.uint16):
                raise InputError(f"{path}: PNG holds uint8 or uint16, got {array.dtype}; use .tif")
            skio.imsave(temporary, array, check_contrast=False)
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}; use .tif, .tiff or .png")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically, indented for people."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


def save_model(run_dir: str | os.PathLike, model, config: dict, name: str = MODEL_WEIGHTS) -> None:
    """Save weights as safetensors and the run's config as JSON, both atomically.

    ``config`` must hold ``model`` (the UNetConfig as a dict); everything else
    (normalisation, classes, tile geometry) is what ``predict`` needs later.
    """
    from safetensors.torch import save_file

    from . import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(run_dir / name) as temporary:
        save_file(state, str(temporary))
    write_json(run_dir / MODEL_CONFIG, {"unetile_version": __version__, **config})


def load_model(run_dir: str | os.PathLike, name: str = MODEL_WEIGHTS):
    """Load ``(model, config)`` from a run folder without executing any code (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import UNet

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run folder; give the --out folder of 'unetile train'")
    config = read_json(run_dir / MODEL_CONFIG)
    if "model" not in config:
        raise InputError(f"{run_dir / MODEL_CONFIG}: has no 'model' entry; is it a unetile run?")
    try:
        model = UNet.from_config(config["model"])
    except (TypeError, ValueError) as error:
        raise InputError(f"{run_dir / MODEL_CONFIG}: bad 'model' entry ({error})") from None
    weights_path = run_dir / name
    if not weights_path.is_file():
        raise InputError(f"{weights_path}: no such file; training may not have saved a model yet")
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0]
        raise InputError(f"{weights_path}: weights do not fit config.json ({reason})") from None
    model.eval()
    return model, config


# --------------------------------------------------------------------------
# Out of core: zarr stores and tiled BigTIFFs, read and written by regions.
# --------------------------------------------------------------------------

TIFF_TILE = (256, 256)


def open_zarr(path: str | os.PathLike):
    """Open a zarr array read-only (nothing is loaded); InputError if it is not one."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such zarr store")
    try:
        array = zarr.open_array(store=str(path), mode="r")
    except Exception as error:  # zarr raises several types for a folder that is not an array
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: not a zarr array ({reason})") from None
    return array


def move_directory(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Rename a finished folder (e.g. a zarr store) into place, replacing an old one.

    The new folder is renamed beside the old one first, so the final name
    holds either the old or the complete new content, never a partial one.
    """
    import shutil

    source, destination = Path(source), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        os.replace(destination, retired / destination.name)
        os.replace(source, destination)
        shutil.rmtree(retired)
    else:
        os.replace(source, destination)


def write_tiled_tiff(path: str | os.PathLike, array, tile: tuple[int, int] = TIFF_TILE) -> None:
    """Write an array-like (numpy, zarr) as a tiled BigTIFF, one band of tile rows at a time.

    The last two axes are the image plane; leading axes become pages. Only
    ``tile[0]`` rows of one page are in memory at once, so the array may be
    larger than memory. Integer data is zlib-compressed; float data is not
    (it hardly compresses and would cost time). Written atomically.
    """
    import tifffile

    shape = tuple(array.shape)
    if len(shape) < 2:
        raise ValueError(f"array must have at least 2 axes to write a TIFF, got shape {shape}")
    dtype = np.dtype(array.dtype)
    height, width = shape[-2:]
    pages = list(np.ndindex(*shape[:-2]))

    def tiles():
        for page in pages:
            for top in range(0, height, tile[0]):
                band = np.asarray(array[(*page, slice(top, min(top + tile[0], height)))])
                for left in range(0, width, tile[1]):
                    block = np.zeros(tile, dtype=dtype)
                    piece = band[:, left : left + tile[1]]
                    block[: piece.shape[0], : piece.shape[1]] = piece
                    yield block

    compression = "zlib" if dtype.kind in "iub" else None
    with atomic_path(path) as temporary:
        tifffile.imwrite(
            temporary,
            tiles(),
            shape=shape,
            dtype=dtype,
            tile=tile,
            bigtiff=True,
            compression=compression,
            photometric="minisblack",
        )
