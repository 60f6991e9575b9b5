"""Models that travel: a trained U-Net as ONNX, TorchScript or a bioimage.io package.

A valid U-Net is exact under tiling only when every tile sees the same 2x2
max-pooling grid as a whole-image pass, i.e. when tile origins are multiples of
``2**(depth-1)`` (:mod:`unetile.network.tiling`). Other tools tile by the sizes the
model declares, so the exported network is wrapped to accept exactly the sizes
that keep that grid: **input = output + 2 * margin, the output a multiple of
2**(depth-1)**. The paper's raw valid sizes (572 -> 388) are not of that form
(388 = 24 * 16 + 4): the raw outputs exceed a multiple of 16 by ``extra`` = 4
pixels, and the last of the kept outputs read up to ``extra`` pixels past the
network's own context margin (92). The wrapper's margin is therefore
``92 + 4 = 96``: it drops the first ``extra`` input pixels of every spatial
axis, runs the U-Net (92 px of context on each side of what it keeps) and drops
its last ``extra`` outputs. It ends with the soft-max: it returns probabilities.

The bioimage.io package adds one step, because a consumer's tiler (spec 0.5:
pad the input by the output's ``halo``, crop the ``halo`` from the output)
expects an output as large as the input. Its network returns the
probabilities surrounded by a ``margin``-wide border of zeros, which the
declared ``halo = margin`` crops away.

The libraries (onnx, onnxruntime, bioimageio.spec, bioimageio.core) are the
``export`` extra; they are imported here only, inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ..io import MODEL_CONFIG, MODEL_WEIGHTS
from ..network.model import UNet
from ..network.normalization import Normalization
from ..network.tiling import Tiling, Window
from .card import save_model

FORMATS = ("onnx", "torchscript", "bioimageio")
ONNX_OPSET = 17  # run on the CPU by every onnxruntime since 1.14
TOLERANCE = 1e-4  # max |probability difference| accepted by the check (float32)
TEST_SIZE = {2: 256, 3: 64}  # test image side (pixels) for the package and the check
EXTRA_HINT = 'pip install "unetile[export]"'
RUN_FILES = (MODEL_CONFIG, MODEL_WEIGHTS)  # attached to the bioimage.io package


class MissingExtraError(ImportError):
    """The export libraries are not installed; the message says how to install them."""


def require(module: str):
    """Import an optional export library, or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"export needs the package {error.name or module!r}: {EXTRA_HINT}"
        ) from None


# --------------------------------------------------------------------------
# Geometry of the exported network
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportGeometry:
    """Sizes (pixels, per spatial axis) that the exported network accepts.

    Attributes
    ----------
    margin : int
        Context per side of the exported network: input = output + 2 * margin
        (96 for the paper's depth 5); the halo a consumer's tiler pads and crops.
    multiple : int
        Outputs are multiples of this (2**(depth-1)), so tiles keep the pooling grid.
    min_output : int
        Smallest output (a multiple of ``multiple``).
    extra : int
        Raw U-Net outputs exceed a multiple of ``multiple`` by this many pixels
        (4 for depth 5); the wrapper drops as many inputs at the start and
        outputs at the end.
    """

    margin: int
    multiple: int
    min_output: int
    extra: int

    @property
    def min_input(self) -> int:
        return self.min_output + 2 * self.margin

    def rule(self) -> str:
        return (
            f"input = output + 2 * {self.margin} pixels per spatial axis, the output a "
            f"multiple of {self.multiple} and >= {self.min_output}; tiles are exact when "
            f"their output origins are multiples of {self.multiple}"
        )


def export_geometry(depth: int, padding: str = "valid") -> ExportGeometry:
    """Valid sizes of the exported network of a ``depth``-level U-Net.

    Examples
    --------
    >>> export_geometry(5)
    ExportGeometry(margin=96, multiple=16, min_output=16, extra=4)
    """
    tiling = Tiling(depth, padding)
    network_margin, multiple = tiling.margin, tiling.alignment
    smallest_output = tiling.smallest
    # All raw outputs are congruent modulo `multiple`; `extra` is that remainder.
    extra = smallest_output % multiple
    min_output = smallest_output - extra or multiple
    return ExportGeometry(network_margin + extra, multiple, min_output, extra)


class ExportedUNet(nn.Module):
    """The U-Net wrapped for other tools: exact sizes, soft-max, optional zero border.

    Parameters
    ----------
    unet : UNet
        The trained network (put in eval mode).
    border : bool
        Surround the output by ``margin`` zeros so that it is as large as the
        input (the bioimage.io package, whose consumers crop it as the halo).
    """

    def __init__(self, unet: UNet, border: bool = False):
        super().__init__()
        self.unet = unet.eval()
        geometry = export_geometry(unet.config.depth, unet.config.padding)
        self.dims = unet.config.dims
        self.extra = geometry.extra
        self.border = geometry.margin if border else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Constant crops and pads only: the traced graph holds no input size.
        spatial = (slice(None), slice(None))
        if self.extra:
            x = x[spatial + (slice(self.extra, None),) * self.dims]
        scores = self.unet(x)
        if self.extra:
            scores = scores[spatial + (slice(None, -self.extra),) * self.dims]
        probabilities = torch.softmax(scores, dim=1)
        if self.border:
            probabilities = functional.pad(probabilities, (self.border, self.border) * self.dims)
        return probabilities


def metadata(model: UNet, config: dict) -> dict:
    """What a user of the exported file needs: sizes, normalisation, classes, architecture."""
    geometry = export_geometry(model.config.depth, model.config.padding)
    from .. import __version__

    return {
        "unetile_version": __version__,
        "valid_size_rule": geometry.rule(),
        "geometry": {**asdict(geometry), "min_input": geometry.min_input},
        "input": "float32 (batch, channel, *spatial), normalised: (image - mean) / std per channel",
        "output": "float32 (batch, class, *spatial) class probabilities (soft-max included)",
        "normalization": config.get("normalization"),
        "classes": config.get("classes"),
        "pixel_size_um": config.get("pixel_size_um"),
        "model": model.config.to_dict(),
    }


def _example_input(model: UNet, geometry: ExportGeometry, batch: int = 1) -> torch.Tensor:
    side = geometry.min_input + geometry.multiple
    shape = (batch, model.config.in_channels) + (side,) * model.config.dims
    return torch.zeros(shape)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    # torch warns that jit.trace and the TorchScript ONNX exporter are deprecated; both
    # still write files that current runtimes read, and their graphs are checked below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


# --------------------------------------------------------------------------
# Writers (each writes under a temporary name and renames)
# --------------------------------------------------------------------------


def write_torchscript(model: UNet, config: dict, path: str | os.PathLike, border: bool = False):
    """Trace the exported network to a TorchScript file; the metadata as ``unetile.json``.

    Load it with ``torch.jit.load(path)``; ``torch.jit.load(path, _extra_files=
    {"unetile.json": ""})`` also returns the metadata.
    """
    from ..io import atomic_path

    wrapped = ExportedUNet(model, border=border).eval()
    geometry = export_geometry(model.config.depth, model.config.padding)
    with _quiet_tracer(), torch.no_grad():
        traced = torch.jit.trace(wrapped, _example_input(model, geometry), check_trace=False)
    extra_files = {"unetile.json": json.dumps(metadata(model, config))}
    with atomic_path(path) as temporary, _quiet_tracer():
        torch.jit.save(traced, str(temporary), _extra_files=extra_files)


def write_onnx(model: UNet, config: dict, path: str | os.PathLike, border: bool = False):
    """Export the network to ONNX (opset 17) with dynamic batch and spatial axes.

    The input is named ``input``, the output ``probabilities``; the metadata
    (``valid_size_rule``, ``normalization``, ``classes``, ``unetile`` with all
    of it as JSON) is in the model's ``metadata_props``.
    """
    onnx = require("onnx")
    from ..io import atomic_path

    wrapped = ExportedUNet(model, border=border).eval()
    geometry = export_geometry(model.config.depth, model.config.padding)
    spatial = ("z", "y", "x")[-model.config.dims :]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(spatial)}}
    out_axes = {0: "batch", **{2 + i: f"{name}_out" for i, name in enumerate(spatial)}}
    info = metadata(model, config)
    with tempfile.TemporaryDirectory() as folder, _quiet_tracer(), torch.no_grad():
        raw = Path(folder) / "model.onnx"
        torch.onnx.export(
            wrapped,
            (_example_input(model, geometry),),
            str(raw),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": axes, "probabilities": out_axes},
        )
        proto = onnx.load(str(raw))
    entries = {
        "unetile": json.dumps(info),
        "valid_size_rule": info["valid_size_rule"],
        "normalization": json.dumps(info["normalization"]),
        "classes": json.dumps(info["classes"]),
    }
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "unetile U-Net (Ronneberger et al. 2015): " + info["valid_size_rule"]
    with atomic_path(path) as temporary:
        onnx.save(proto, str(temporary))


# --------------------------------------------------------------------------
# The bioimage.io package
# --------------------------------------------------------------------------


def sample_crop(model: UNet, image: np.ndarray) -> np.ndarray:
    """Central crop ``(C, *S)`` of an image, its sides a multiple of ``2**(depth-1)``.

    Each side is at most 256 px (64 in 3D), but in 2D at least four margins,
    so that a consumer's tiler can cut it into two blocks per axis (the check
    tests the stitching), and never below the exported network's smallest
    input. An image smaller than that is mirrored past its border, as in
    prediction. Sides that are multiples of ``2**(depth-1)`` keep a consumer's
    tiling exact everywhere (its last block ends at the border).
    """
    geometry = export_geometry(model.config.depth, model.config.padding)
    dims = model.config.dims
    image = np.asarray(image)
    if image.ndim == dims:
        image = image[None]
    least = max(geometry.min_input, 4 * geometry.margin if dims == 2 else 0)
    least += -least % geometry.multiple
    starts, stops = [], []
    for size in image.shape[1:]:
        side = min(size, TEST_SIZE[dims]) // geometry.multiple * geometry.multiple
        side = max(side, least)
        starts.append((size - side) // 2)
        stops.append(starts[-1] + side)
    return Window(starts, stops, image.shape[1:]).read(image).astype(np.float32)


def _cover(image: np.ndarray, probabilities: np.ndarray, foreground: int) -> np.ndarray:
    """The input and the foreground probability side by side, uint8 (mid plane in 3D)."""
    first = image[0]
    second = probabilities[min(foreground, probabilities.shape[0] - 1)]
    while first.ndim > 2:
        first, second = first[first.shape[0] // 2], second[second.shape[0] // 2]
    low, high = np.percentile(first, (0.5, 99.5))
    scaled = np.clip((first - low) / max(high - low, 1e-12), 0, 1)
    gap = np.ones((first.shape[0], max(2, first.shape[1] // 32)))
    return (np.concatenate([scaled, gap, second], axis=1) * 255).round().astype(np.uint8)


def _preprocessing_note(config: dict) -> str:
    normalization = config.get("normalization")
    if normalization is None:
        return "No preprocessing (the model was trained on raw values)."
    return (
        "Preprocessing: `(image - mean) / std` per channel with the training statistics "
        f"(mean {normalization['mean']}, std {normalization['std']})."
    )


def _documentation(model: UNet, config: dict, name: str) -> str:
    info = metadata(model, config)
    geometry = info["geometry"]
    architecture = model.config
    classes = (config.get("classes") or {}).get("num_classes", architecture.num_classes)
    return f"""# {name}

A U-Net (Ronneberger, Fischer and Brox, MICCAI 2015) trained with unetile
{info["unetile_version"]}: depth {architecture.depth}, {architecture.base_channels} channels at the
first level, `{architecture.padding}` convolutions, {architecture.dims}D,
{architecture.in_channels} input channel(s), {classes} classes.

## Input

`(batch, channel, {", ".join(_spatial_axis_ids(architecture.dims))})`, float32.
{_preprocessing_note(config)}

## Output

Class probabilities (the soft-max is the network's last layer), one channel per
class, as large as the input. The network reads
{geometry["margin"]} pixels of context on each side: that border of the output is
zero and is the declared halo, which a consumer crops; tiles then stitch without
seams. Valid tile sizes: {info["valid_size_rule"]}. Images whose sides are
multiples of {geometry["multiple"]} (at least {geometry["min_input"]}) are tiled exactly;
mirror-pad others to such a size and crop the result. Past the image border the
input is mirrored (reflect padding), as in unetile.

{_tiling_note(model)}
## Validation

The test output is unetile's own whole-image prediction of the test image (the
test input is that image mirrored by the margin). `unetile export --check`
predicts the test image with bioimageio.core's tiling, once per weight format,
and requires a max absolute difference of probabilities <= 1e-4 from unetile.

## Use

In unetile: `unetile predict RUN_DIR images/ --out predictions/`; unetile's napari
plugin segments with this `.zip` itself, from the run files it carries
(`config.json`, `model.safetensors`). Elsewhere: a bioimage.io consumer that runs
TorchScript or ONNX weights and crops the halo (tested with bioimageio.core).
"""


def _tiling_note(model: UNet) -> str:
    if tile_exact(model):
        return ""
    reason = "instance norm" if model.config.norm == "instance" else "`same` padding"
    return (
        f"**Not tile-exact**: with {reason} the output depends on the tile; use blocks as\n"
        "large as memory allows (unetile checks this package with one block per image).\n"
    )


def write_bioimageio(
    model: UNet,
    config: dict,
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    name: str = "unetile U-Net",
    authors: Sequence[str] = ("unetile user",),
) -> None:
    """Write a bioimage.io (spec 0.5) zip package of a trained model.

    Parameters
    ----------
    model : UNet
        The trained network.
    config : dict
        The run's ``config.json`` (normalisation and classes are used).
    path : path-like
        The ``.zip`` to write (atomically).
    image : ndarray
        ``(*S)`` or ``(C, *S)`` image, unnormalised. Its crop
        (:func:`sample_crop`) mirrored by the margin is the test input;
        unetile's prediction of the crop framed by the zero halo is the test
        output; the crop and its prediction are the sample tensors and the cover.
    name, authors : str
        Shown on bioimage.io and in the consumers.
    """
    spec = require("bioimageio.spec")
    from ..io import atomic_path

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        _write_package_files(model, config, image, folder, name)
        import pydantic

        try:
            with _quiet_bioimageio():
                descr = _model_description(model, config, folder, name, authors)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"bioimage.io refuses {where} ({first['msg']})") from None
        with atomic_path(path) as temporary:
            os.remove(temporary)  # the packager refuses to overwrite
            spec.save_bioimageio_package(descr, output_path=temporary)


def _write_package_files(model, config, image, folder: Path, name: str) -> None:
    import tifffile
    from skimage import io as skio

    geometry = export_geometry(model.config.depth, model.config.padding)
    sample = sample_crop(model, image)
    probabilities = reference_prediction(model, config, sample)
    # The package's self-test runs the network on the test input without tiling:
    # the crop mirrored by the margin in, unetile's prediction framed by the halo out.
    border = ((0, 0),) + ((geometry.margin, geometry.margin),) * model.config.dims
    np.save(folder / "test_input.npy", np.pad(sample, border, mode="reflect")[None])
    np.save(folder / "test_output.npy", np.pad(probabilities, border)[None])
    tifffile.imwrite(folder / "sample_input.tif", sample, photometric="minisblack")
    tifffile.imwrite(folder / "sample_output.tif", probabilities, photometric="minisblack")
    foreground = int((config.get("classes") or {}).get("foreground", 1))
    cover = _cover(sample, probabilities, foreground)
    skio.imsave(folder / "cover.png", cover, check_contrast=False)
    (folder / "README.md").write_text(_documentation(model, config, name))
    write_torchscript(model, config, folder / "weights.torchscript.pt", border=True)
    write_onnx(model, config, folder / "weights.onnx", border=True)
    # unetile's own run files, attached: its napari plugin reads the package as a run folder.
    save_model(folder, model, config)


def _model_description(model, config, folder: Path, name: str, authors: Sequence[str]):
    from bioimageio.spec.model import v0_5

    architecture = model.config
    description = (
        f"U-Net (Ronneberger et al. 2015), {architecture.dims}D, "
        f"{architecture.num_classes} classes, trained with unetile; exact overlap-tile prediction"
    )
    return v0_5.ModelDescr(
        name=name,
        description=description,
        authors=[v0_5.Author(name=author) for author in authors],
        cite=[
            v0_5.CiteEntry(
                text="Ronneberger, Fischer and Brox. U-Net: Convolutional Networks for "
                "Biomedical Image Segmentation. MICCAI 2015",
                doi=v0_5.Doi("10.1007/978-3-319-24574-4_28"),
            )
        ],
        license=v0_5.LicenseId("MIT"),
        documentation=v0_5.FileDescr(source=folder / "README.md"),
        covers=[v0_5.FileDescr(source=folder / "cover.png")],
        tags=["unet", "segmentation", f"{architecture.dims}d", "unetile"],
        attachments=[v0_5.FileDescr(source=folder / name) for name in RUN_FILES],
        inputs=[_input_description(v0_5, model, config, folder)],
        outputs=[_output_description(v0_5, model, config, folder)],
        weights=v0_5.WeightsDescr(
            torchscript=v0_5.TorchscriptWeightsDescr(
                source=folder / "weights.torchscript.pt",
                pytorch_version=v0_5.Version(torch.__version__.split("+")[0]),
            ),
            onnx=v0_5.OnnxWeightsDescr(
                source=folder / "weights.onnx", opset_version=ONNX_OPSET, parent="torchscript"
            ),
        ),
    )


def _spatial_axis_ids(dims: int) -> tuple[str, ...]:
    return ("z", "y", "x")[-dims:]


def _input_description(v0_5, model: UNet, config: dict, folder: Path):
    geometry = export_geometry(model.config.depth, model.config.padding)
    channels = model.config.in_channels
    size = v0_5.ParameterizedSize(min=geometry.min_input, step=geometry.multiple)
    axes = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier(f"channel{i}") for i in range(channels)]),
        *(
            v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=size, **physical)
            for a, physical in _physical(config, model.config.dims)
        ),
    ]
    preprocessing = [v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))]
    if config.get("normalization") is not None:
        preprocessing.append(_normalization_descr(v0_5, config["normalization"], channels))
    return v0_5.InputTensorDescr(
        id=v0_5.TensorId("input"),
        axes=axes,
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=v0_5.FileDescr(source=folder / "sample_input.tif"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing,
        # Mirrored borders as in unetile. The mode is set explicitly: a mode left
        # at its default is dropped from rdf.yaml and read back as constant padding.
        pad=v0_5.ReflectPadding(mode="reflect"),
    )


def _physical(config: dict, dims: int) -> list[tuple[str, dict]]:
    """Spatial axis ids with unit and scale (micrometres per pixel) when the run knows them."""
    axes = _spatial_axis_ids(dims)
    pixel_size = config.get("pixel_size_um")
    if not pixel_size:
        return [(axis, {}) for axis in axes]
    sizes = np.broadcast_to(np.asarray(pixel_size, dtype=float), (dims,))
    return [
        (a, {"unit": "micrometer", "scale": float(s)}) for a, s in zip(axes, sizes, strict=True)
    ]


def _output_space_axis(v0_5, axis: str, halo: int, physical: dict):
    size = v0_5.SizeReference(tensor_id=v0_5.TensorId("input"), axis_id=v0_5.AxisId(axis))
    if halo == 0:  # `same` padding: nothing to crop, and the spec wants a halo >= 1
        return v0_5.SpaceOutputAxis(id=v0_5.AxisId(axis), size=size, **physical)
    return v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(axis), size=size, halo=halo, **physical)


def _output_description(v0_5, model: UNet, config: dict, folder: Path):
    geometry = export_geometry(model.config.depth, model.config.padding)
    classes = model.config.num_classes
    axes = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier(f"class{k}") for k in range(classes)]),
        *(
            _output_space_axis(v0_5, a, geometry.margin, physical)
            for a, physical in _physical(config, model.config.dims)
        ),
    ]
    return v0_5.OutputTensorDescr(
        id=v0_5.TensorId("probabilities"),
        description="class probabilities (the soft-max is the network's last layer)",
        axes=axes,
        test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=v0_5.FileDescr(source=folder / "sample_output.tif"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )


def _normalization_descr(v0_5, normalization: dict, channels: int):
    mean = np.broadcast_to(np.asarray(normalization["mean"], dtype=float), (channels,))
    std = np.broadcast_to(np.asarray(normalization["std"], dtype=float), (channels,))
    if channels == 1:
        kwargs = v0_5.FixedZeroMeanUnitVarianceKwargs(mean=float(mean[0]), std=float(std[0]))
    else:
        kwargs = v0_5.FixedZeroMeanUnitVarianceAlongAxisKwargs(
            axis=v0_5.AxisId("channel"), mean=mean.tolist(), std=std.tolist()
        )
    return v0_5.FixedZeroMeanUnitVarianceDescr(kwargs=kwargs)


# --------------------------------------------------------------------------
# The check: each format against unetile's whole-image prediction
# --------------------------------------------------------------------------


def tile_exact(model: UNet) -> bool:
    """Whether any tiling gives the whole-image result (valid convolutions, no instance norm)."""
    return model.config.padding == "valid" and model.config.norm != "instance"


def reference_prediction(model: UNet, config: dict, sample: np.ndarray) -> np.ndarray:
    """unetile's probabilities ``(K, *S)`` of a test crop, predicted as one tile.

    The one tile reads the same window as the exported network given the crop
    mirrored by its margin, so the two agree even for models whose output
    depends on the tile (instance norm, ``same`` padding).
    """
    from .engine import predict

    geometry = export_geometry(model.config.depth, model.config.padding)
    tile = tuple(side + geometry.extra for side in sample.shape[1:])
    normalization = config.get("normalization")
    return predict(
        model, sample, tile_shape=tile, normalization=normalization, progress=False, device="cpu"
    )


def _network_input(model: UNet, config: dict, image: np.ndarray) -> np.ndarray:
    """The test crop normalised and mirrored by the exported margin, with a batch axis."""
    geometry = export_geometry(model.config.depth, model.config.padding)
    normalization = Normalization.of(config.get("normalization")) or Normalization.identity()
    sample = normalization.apply(sample_crop(model, image))
    border = ((0, 0),) + ((geometry.margin, geometry.margin),) * model.config.dims
    return np.pad(sample, border, mode="reflect")[None].astype(np.float32)


def run_onnx(path: str | os.PathLike, batch: np.ndarray) -> np.ndarray:
    """Run an exported ONNX file with onnxruntime on the CPU."""
    onnxruntime = require("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch})[0]


def run_torchscript(path: str | os.PathLike, batch: np.ndarray) -> np.ndarray:
    """Run an exported TorchScript file on the CPU."""
    network = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return network(torch.from_numpy(batch)).numpy()


def run_bioimageio(
    path: str | os.PathLike, image: np.ndarray, weight_format: str, blocks: int = 2
) -> np.ndarray:
    """Predict ``image`` ``(C, *S)`` with bioimageio.core's own tiling; ``(K, *S)`` out.

    The block size is the largest the package allows with at least ``blocks``
    blocks along every spatial axis, so that the consumer's stitching is tested.
    """
    spec = require("bioimageio.spec")
    require("bioimageio.core")
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model

    descr = load_package(path)
    axes = [a for a in descr.inputs[0].axes if a.type == "space"]
    halo = next(getattr(a, "halo", 0) for a in descr.outputs[0].axes if a.type == "space")
    sizes = {}
    for axis, length in zip(axes, image.shape[1:], strict=True):
        step, smallest = axis.size.step, axis.size.min
        inner = min(length // blocks, length - 2 * halo)
        sizes[(spec.model.v0_5.TensorId("input"), axis.id)] = max(
            0, (inner + 2 * halo - smallest) // step
        )
    with _quiet_bioimageio():
        pipeline = create_prediction_pipeline(descr, weight_format=weight_format, devices=["cpu"])
        sample = create_sample_for_model(descr, inputs={"input": image[None]}, sample_id="check")
        if blocks == 1:  # core's blocks may not exceed the image: one padded pass instead
            output = pipeline.predict_sample_without_blocking(sample)
        else:
            output = pipeline.predict_sample_with_blocking(sample, ns=sizes)
    return np.asarray(output.members["probabilities"].data)[0]


def load_package(path: str | os.PathLike):
    """Load and validate a bioimage.io package (local files only); ValueError if invalid."""
    spec = require("bioimageio.spec")
    with _quiet_bioimageio():
        descr = spec.load_description(str(path), perform_io_checks=True)
    if not isinstance(descr, spec.model.v0_5.ModelDescr):
        errors = descr.validation_summary.errors
        reason = f"{errors[0].loc}: {errors[0].msg}" if errors else "invalid"
        raise ValueError(f"not a valid bioimage.io model package ({reason})")
    return descr


@contextlib.contextmanager
def _quiet_bioimageio() -> Iterator[None]:
    """Silence bioimageio's log and progress bars (they go to stderr)."""
    import io as text_io

    from loguru import logger

    logger.disable("bioimageio")
    try:
        with contextlib.redirect_stderr(text_io.StringIO()):
            yield
    finally:
        logger.enable("bioimageio")


def check_export(
    model: UNet, config: dict, path: str | os.PathLike, export_format: str, image: np.ndarray
) -> dict[str, float]:
    """Max |probability difference| between an exported file and unetile, per runtime.

    Parameters
    ----------
    model, config : the run the file was exported from.
    path : the exported file.
    export_format : {"onnx", "torchscript", "bioimageio"}
    image : ndarray
        ``(*S)`` or ``(C, *S)``; its test crop (:func:`sample_crop`) is predicted
        by unetile (whole image) and by the exported file (ONNX and TorchScript
        on the mirrored crop in one pass; the package by bioimageio.core with
        its own tiling, once per weight format: two blocks per axis, or one
        block for a model that is not tile-exact, see :func:`tile_exact`).

    Returns
    -------
    dict
        ``{"onnx": 1.2e-06}``, or ``{"bioimageio/torchscript": ..., "bioimageio/onnx": ...}``.
    """
    sample = sample_crop(model, image)
    reference = reference_prediction(model, config, sample)
    if export_format == "bioimageio":
        # A model that is not tile-exact differs between any two tilings: one block then.
        blocks = 2 if tile_exact(model) else 1
        return {
            f"bioimageio/{weights}": _max_difference(
                run_bioimageio(path, sample, weights, blocks), reference
            )
            for weights in ("torchscript", "onnx")
        }
    runner = {"onnx": run_onnx, "torchscript": run_torchscript}[export_format]
    output = runner(path, _network_input(model, config, image))[0]
    return {export_format: _max_difference(output, reference)}


def _max_difference(output: np.ndarray, reference: np.ndarray) -> float:
    if output.shape != reference.shape:
        raise ValueError(f"the export gave shape {output.shape}, unetile {reference.shape}")
    difference = np.abs(output.astype(np.float64) - reference)
    # NaN anywhere must fail the check, not vanish in a max.
    return float("inf") if not np.all(np.isfinite(difference)) else float(difference.max())


def export(
    model: UNet,
    config: dict,
    path: str | os.PathLike,
    export_format: str,
    image: np.ndarray | None = None,
    **package_options,
) -> None:
    """Write ``model`` as ``export_format`` (one of :data:`FORMATS`) to ``path``.

    ``image`` (unnormalised, ``(*S)`` or ``(C, *S)``) is needed for the
    bioimage.io package (its test tensors and cover).
    """
    if export_format == "onnx":
        write_onnx(model, config, path)
    elif export_format == "torchscript":
        write_torchscript(model, config, path)
    elif export_format == "bioimageio":
        if image is None:
            raise ValueError("a bioimage.io package needs an image for its test tensors")
        write_bioimageio(model, config, path, image, **package_options)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {export_format!r}")
