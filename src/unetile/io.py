"""Reading and writing images and models: the one place that touches files.

Every failure here raises :class:`InputError` with a one-line message that
names the file, says what is wrong and what to do; the CLI prints it and exits
non-zero. Writes go to a temporary name in the same folder and are renamed
into place, so an interrupted run never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import errno
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


# What to do about the file-system errors users meet, by errno.
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "no permission: choose a folder you can write to",
    errno.EPERM: "no permission: choose a folder you can write to",
    errno.EROFS: "read-only file system: choose a folder you can write to",
    errno.EISDIR: "it is a folder: give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it exists and is not a folder: give another path",
    errno.ENAMETOOLONG: "give a shorter name",
}


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the path, what failed and what to do."""
    where = "" if error.filename is None else str(error.filename)
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    reason = error.strerror or str(error) or type(error).__name__
    advice = OS_ADVICE.get(error.errno)
    text = f"{reason} ({advice})" if advice else reason
    return f"{where}: {text}" if where else text


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
    images = [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    for path in images:
        _refuse_dead_link(path)
    paths = sorted(p for p in images if p.is_file())
    if not paths:
        raise InputError(f"{folder}: no .tif/.tiff/.png images in this folder")
    return paths


def _refuse_dead_link(path: Path) -> None:
    """InputError for a symbolic link that leads to no file (a loop or a missing target)."""
    try:
        path.stat()
    except OSError as error:
        if path.is_symlink():
            why = "a loop of links" if error.errno == errno.ELOOP else "its target is missing"
            raise InputError(
                f"{path}: a symbolic link that leads to no file ({why}); remove it or point it "
                "at an image"
            ) from None


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a zarr store (a folder ending in .zarr)."""
    path = Path(path)
    return path.suffix.lower() == ".zarr" and path.is_dir()


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and zarr stores given as they are, other folders replaced by their images."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        _refuse_dead_link(item)
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
    """Read a TIFF or PNG image as a numpy array, its values as stored.

    16-bit and float images keep their type and range. Colour channels are
    read as a user means them (:func:`plain_channels`): a constant alpha
    channel is dropped with a warning and gray stored as RGB is one channel.

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

            array = None
            if memmap:
                with contextlib.suppress(ValueError):
                    array = tifffile.memmap(path, mode="r")
            if array is None:
                array = tifffile.imread(path)
            return plain_channels(array, path) if _is_rgb_tiff(path) else array
        if suffix == ".png":
            from skimage import io as skio

            return plain_channels(np.asarray(skio.imread(path)), path)
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


def _is_rgb_tiff(path: Path) -> bool:
    import tifffile

    with contextlib.suppress(Exception), tifffile.TiffFile(path) as tiff:
        return tiff.series[0].axes.endswith("S")
    return False


def plain_channels(array, path: str | os.PathLike):
    """Colour channels as a user means them: constant alpha dropped, gray stored as RGB as gray.

    ``array`` is channels last (``(H, W, C)``, C = 2 to 4: gray + alpha, RGB,
    RGBA), as PNG and RGB TIFF files store them. Image editors save gray
    pictures as RGB or with an opaque alpha channel; read as they are, the
    alpha would become an input channel and a label would not fit its image.
    A constant alpha is dropped with a warning; an alpha that varies is kept.
    """
    import warnings

    if array.ndim != 3 or array.shape[-1] not in (2, 3, 4):
        return array
    if array.shape[-1] in (2, 4):
        alpha = np.asarray(array[..., -1])
        if alpha.min() != alpha.max():
            return array  # a real mask: the user decides what it means
        warnings.warn(f"{path}: constant alpha channel ({alpha.flat[0]}) dropped", stacklevel=3)
        array = array[..., :-1]
    if array.shape[-1] == 3:
        red = np.asarray(array[..., 0])
        if np.array_equal(red, array[..., 1]) and np.array_equal(red, array[..., 2]):
            return array[..., 0]
    if array.shape[-1] == 1:
        return array[..., 0]
    return array


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label image: an indexed (palette) PNG gives its indices, colour is refused.

    Image editors save label maps as palette PNGs, whose colours are only a
    display of the class or cell indices stored in the file.
    """
    path = Path(path)
    if path.suffix.lower() == ".png" and path.is_file():
        from PIL import Image

        with contextlib.suppress(Exception), Image.open(path) as picture:
            if picture.mode == "P":
                return np.asarray(picture)
    array = read_image(path)
    colour = path.suffix.lower() == ".png" or (not is_zarr_path(path) and _is_rgb_tiff(path))
    if colour and array.ndim == 3 and array.shape[-1] in (2, 3, 4):
        raise InputError(
            f"{path}: is a colour image ({array.shape[-1]} channels); labels need one value "
            "per pixel: save it as a gray or an indexed (palette) image"
        )
    return array


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one file or folder (links followed)."""
    with contextlib.suppress(OSError):
        return os.path.samefile(first, second)
    return os.path.realpath(first) == os.path.realpath(second)


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links followed)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def refuse_output_on_input(
    outputs: dict[str, str | os.PathLike | None],
    inputs: dict[str, Iterable[str | os.PathLike]],
    folders: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """InputError when an output would overwrite an input, or two outputs one file.

    Parameters
    ----------
    outputs : dict
        Option -> path to be written (None: not asked for).
    inputs : dict
        What they are (``"the model of RUN"``) -> files the command reads.
    folders : dict, optional
        What they are -> input folders no output may be written into (a run
        folder inside the labels folder pollutes the data set).
    """
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for index, (option, path) in enumerate(given):
        for what, files in inputs.items():
            for file in files:
                if os.path.lexists(path) and same_file(path, file):
                    raise InputError(
                        f"{path}: {option} would overwrite {what} ({file}), which this command "
                        f"reads; give another {option}"
                    )
        for what, folder in (folders or {}).items():
            if folder is not None and inside(path, folder):
                raise InputError(
                    f"{path}: {option} lies inside {what} ({folder}); its files would mix with "
                    f"the data: give an {option} outside it"
                )
        for other, second in given[:index]:
            if same_file(path, second):
                raise InputError(f"{path}: given to both {other} and {option}; give two files")


def _temporary_path(path: Path) -> Path:
    # Keep the real suffix last so that writers that go by it pick the format.
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent
    )
    os.close(fd)
    return Path(name)


def remove_stale_parts(path: str | os.PathLike) -> int:
    """Remove the temporary files that a killed write of ``path`` left beside it
    (``.NAME.*.partSUFFIX``, nested ones too), with one warning; return the bytes freed."""
    import glob
    import warnings

    path = Path(path)
    stem, suffix = glob.escape(path.stem), glob.escape(path.suffix)
    found = sorted(
        {
            part
            for pattern in (f".{stem}.*.part{suffix}", f"..{stem}.*.part{suffix}")
            for part in path.parent.glob(pattern)
            if part.is_file()
        }
    )
    freed = 0
    for part in found:
        with contextlib.suppress(FileNotFoundError):
            freed += part.stat().st_size
            part.unlink()
    if found:
        warnings.warn(
            f"{path.parent}: removed {len(found)} partial file(s) of an interrupted write of "
            f"{path.name} ({freed / 2**20:.1f} MiB)",
            stacklevel=2,
        )
    return freed


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions an ordinary write gives (files 0666, folders 0777, less umask).

    Temporary files (``mkstemp``) are created readable by their owner only;
    renamed into place as they are, a colleague on a shared server could not
    open a prediction or a model.
    """
    import stat

    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return
        full = 0o777 if stat.S_ISDIR(mode) else 0o666
        os.chmod(path, full & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success only.

    The final file gets the permissions of an ordinary write (:func:`ordinary_mode`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        yield temporary
        ordinary_mode(temporary)
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
    except RecursionError:
        raise InputError(
            f"{path}: nested too deeply to read (lists or tables inside each other thousands of "
            "times); it is no file that unetile wrote: restore or rewrite it"
        ) from None


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, ``__metadata__``),
    read with Python's own file calls so that any path opens (safetensors' own reader
    refuses a path that is not UTF-8). ValueError for a file that is not safetensors."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > 100 * 2**20 or length > os.fstat(file.fileno()).st_size - 8:
            raise ValueError(f"header of {length} bytes does not fit the file")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"header is not JSON ({error})") from None
        except RecursionError:
            raise ValueError("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a table")
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if name != "__metadata__" and not (
            isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise ValueError(f"tensor {name!r} has no shape")
    return header


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file, from any path (no code is executed)."""
    from safetensors.torch import load

    metadata = safetensors_header(path).get("__metadata__") or {}
    with open(path, "rb") as file:
        return load(file.read()), metadata


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically.

    A failed write (a full disk) raises OSError naming ``path``: safetensors
    reports it as a SafetensorError holding the OS error's code in its text.
    """
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:
            code = re.search(r"code: (\d+)", str(error))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number), str(path)) from None


def __getattr__(name: str):
    # load_model and save_model moved up to the predict floor (unetile.predict.card).
    if name in ("load_model", "save_model"):
        from ._moved import forward_to

        return forward_to("unetile.io", "unetile.predict.card", name)
    raise AttributeError(f"module 'unetile.io' has no attribute {name!r}")


# --------------------------------------------------------------------------
# Owned folders: a lock while a process works in them, scratch it can leave.
# --------------------------------------------------------------------------

LOCK_NAME = ".lock"
SCRATCH_PREFIX = ".unetile-"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on ``path``, or None if another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "trained") -> Iterator[Path]:
    """Own ``folder`` while the block runs: a second process gets InputError with our PID.

    The lock is an ``flock`` on ``folder/.lock``, which the kernel releases
    when the process ends however it ends, so the lock of a killed run is
    stale by construction; the PID written in the file says who held it.
    """
    import warnings

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _try_lock(path)
    if fd is None:
        holder = path.read_text().strip() or "unknown"
        raise InputError(
            f"{folder}: is being {what} by another process (PID {holder}, lock {path}); "
            "wait for it to finish or give another --out"
        )
    previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if previous and previous != str(os.getpid()):
        warnings.warn(
            f"{path}: process {previous} was stopped while it held this folder; taking it over",
            stacklevel=2,
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield path
    finally:
        # Emptied, not removed: removing it would let two later runs lock two different files.
        os.ftruncate(fd, 0)
        os.close(fd)


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary folder in ``parent``, locked while in use and removed after."""
    import shutil

    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    fd = _try_lock(scratch / LOCK_NAME)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def remove_stale_scratch(parent: str | os.PathLike, min_age_seconds: float = 60.0) -> int:
    """Remove the scratch folders of killed runs in ``parent``; return the bytes freed.

    A scratch folder is stale when no process holds its lock; one without a
    lock file (killed before making it) only once it is ``min_age_seconds`` old,
    so that a run that is just starting keeps its own.
    """
    import shutil
    import time
    import warnings

    parent = Path(parent)
    freed = 0
    if not parent.is_dir():
        return freed
    for scratch in sorted(parent.glob(f"{SCRATCH_PREFIX}*")):
        if not scratch.is_dir():
            continue
        lock = scratch / LOCK_NAME
        if lock.exists():
            fd = _try_lock(lock)
            if fd is None:
                continue  # a live run's
            os.close(fd)
        elif time.time() - scratch.stat().st_mtime < min_age_seconds:
            continue
        size = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file())
        shutil.rmtree(scratch, ignore_errors=True)
        freed += size
        warnings.warn(
            f"{scratch}: removed the scratch of an interrupted run ({size / 2**20:.1f} MiB)",
            stacklevel=2,
        )
    return freed


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


def write_tiled_tiff(
    path: str | os.PathLike, array, tile: tuple[int, int] = TIFF_TILE, metadata: dict | None = None
) -> None:
    """Write an array-like (numpy, zarr) as a tiled BigTIFF, one band of tile rows at a time.

    The last two axes are the image plane; leading axes become pages. Only
    ``tile[0]`` rows of one page are in memory at once, so the array may be
    larger than memory. Integer data is zlib-compressed; float data is not
    (it hardly compresses and would cost time). Written atomically. ``metadata`` (JSON
    values) goes into the first page's description, where ``tifffile`` reads it back as
    ``TiffFile(path).shaped_metadata[0]``.
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
            metadata=dict(metadata or {}),
        )
