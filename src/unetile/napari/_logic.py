"""What the napari widgets do, as plain functions on arrays: no Qt, no viewer.

Each step is one call of the library (``load_model``, ``predict``,
``extract_instances``, ``prepare_arrays`` + ``train``, ``score``); the long
ones (:func:`segment`, :func:`run_training`) are generators that yield their
progress and return their result, so that napari runs them in a worker
thread (``thread_worker``) and a test simply iterates them. Every fault a
user can cause ends as :class:`unetile.io.InputError` with one line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..predict import card

#: The instance methods offered (``unetile predict --method``).
METHODS = ("components", "watershed", "distance")
#: The presets offered for training from scratch (``auto`` measures folders, not layers).
PRESETS = ("cpu-fast", "paper")
#: Keys of a run's stored training options that name data or the run itself.
NOT_CARRIED = (
    "images",
    "labels",
    "val_images",
    "val_labels",
    "out",
    "init",
    "holdout",
    "steps",
    "max_minutes",
    "auto",
    "compile",
)


# --------------------------------------------------------------------------
# Models and images
# --------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A run folder's network with its ``config.json``.

    ``source`` is what the user chose: the run folder, or a bioimage.io package
    (``.zip``) of ``unetile export``, whose run files are then unpacked into
    ``run_dir``, a temporary folder that lives as long as this object.
    """

    run_dir: Path
    model: object
    config: dict
    source: Path | None = None
    unpacked: object = field(default=None, repr=False)  # the TemporaryDirectory of a package

    def __post_init__(self):
        if self.source is None:
            self.source = self.run_dir

    @classmethod
    def load(cls, source: str | Path) -> LoadedModel:
        """A run folder (:func:`~unetile.predict.card.load_model`) or a package
        (:func:`unpack_package`);
        InputError with one line."""
        if not str(source).strip():
            raise io.InputError(
                "no model: choose a run folder (the --out of 'unetile train') or a bioimage.io "
                ".zip of 'unetile export'"
            )
        source = Path(source)
        if source.suffix.lower() == ".zip" or source.is_file():
            return cls.load_package(source)
        model, config = card.load_model(source)
        return cls(source, model, config)

    @classmethod
    def load_package(cls, path: str | Path) -> LoadedModel:
        """The model of a bioimage.io package of ``unetile export``, as its run folder."""
        path = Path(path)
        unpacked = tempfile.TemporaryDirectory(prefix="unetile_package_")
        folder = Path(unpacked.name)
        unpack_package(path, folder)
        try:
            model, config = card.load_model(folder)
        except io.InputError as error:  # name the package, not the temporary folder
            raise io.InputError(str(error).replace(str(folder), str(path))) from None
        return cls(folder, model, config, source=path, unpacked=unpacked)

    @property
    def is_package(self) -> bool:
        return self.source != self.run_dir

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def foreground(self) -> int:
        return int(getattr(self.model, "foreground", 1))

    @property
    def name(self) -> str:
        return self.source.stem if self.is_package else self.source.name

    def post_options(self) -> PostOptions:
        """The post-processing the model carries (``config.json`` ``"instances"``)."""
        stored = self.stored_instances()
        threshold = stored.get("threshold")
        if threshold is None:
            threshold = self.model.threshold
        if threshold is None and self.num_classes == 2:
            threshold = 0.5  # the argmax of two classes
        return PostOptions(
            threshold=threshold,
            method=stored.get("method", "components"),
            min_size=int(stored.get("min_size", 0)),
            opening=int(stored.get("opening", 0)),
            fill_holes=bool(stored.get("fill_holes", False)),
        )

    def stored_instances(self) -> dict:
        """The stored instance options; without any, the model's foreground class (as the CLI)."""
        stored = dict(self.config.get("instances") or {})
        if not stored:
            classes = self.config.get("classes", {})
            stored["foreground_classes"] = classes.get(
                "foreground_classes", [int(classes.get("foreground", 1))]
            )
        return stored


@dataclass(frozen=True)
class PostOptions:
    """The post-processing a user adjusts: the labels' threshold and the instance options.

    ``threshold`` is None for a model of more than two classes (the argmax).
    """

    threshold: float | None = 0.5
    method: str = "components"
    min_size: int = 0
    opening: int = 0
    fill_holes: bool = False

    def replace(self, **changes) -> PostOptions:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------
# bioimage.io packages of ``unetile export``
# --------------------------------------------------------------------------

#: What a package must hold to be read as unetile's model.
NOT_A_PACKAGE = (
    "is no model package of 'unetile export --format bioimageio' (it holds neither "
    "unetile's config.json and model.safetensors nor TorchScript weights with unetile's "
    "metadata); choose such a .zip or a run folder"
)


def unpack_package(path: str | Path, folder: str | Path) -> str:
    """Write the run files of a bioimage.io package of ``unetile export`` into ``folder``.

    The package's attached ``config.json`` and ``model.safetensors`` are the
    run's own files, read as they are. A package without them (exported before
    unetile attached them) gives its TorchScript file's weights (loaded, never
    run) and the config its ``unetile.json`` metadata holds: the network,
    normalisation and classes, but not the calibrated threshold, the instance
    options or the training tile. Returns ``"run files"`` or ``"torchscript"``;
    InputError with one line for anything else.
    """
    path, folder = Path(path), Path(folder)
    if not path.is_file():
        raise io.InputError(f"{path}: no such file; choose a run folder or a .zip package")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())  # the packager writes every file at the top
            if {io.MODEL_CONFIG, io.MODEL_WEIGHTS} <= names:
                for name in (io.MODEL_CONFIG, io.MODEL_WEIGHTS):
                    (folder / name).write_bytes(archive.read(name))
                return "run files"
            scripts = sorted(n for n in names if n.endswith(".pt") and "/" not in n)
            if not scripts:
                raise io.InputError(f"{path}: {NOT_A_PACKAGE}")
            weights = archive.read(scripts[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise io.InputError(f"{path}: not a readable .zip ({reason})") from None
    _unpack_torchscript(weights, folder, path)
    return "torchscript"


def _unpack_torchscript(weights: bytes, folder: Path, path: Path) -> None:
    """The network inside an exported TorchScript file as ``model.safetensors`` and its
    ``unetile.json`` metadata as ``config.json``."""
    import io as byte_io

    import torch

    extra = {"unetile.json": ""}
    try:
        network = torch.jit.load(byte_io.BytesIO(weights), map_location="cpu", _extra_files=extra)
        metadata = json.loads(extra["unetile.json"] or "null")
    except Exception as error:  # torch reports a damaged or foreign file in many ways
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise io.InputError(f"{path}: its TorchScript weights cannot be read ({reason})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("model"), dict):
        raise io.InputError(f"{path}: {NOT_A_PACKAGE}")
    prefix = "unet."  # export.ExportedUNet holds the U-Net as ``unet``
    state = {
        key[len(prefix) :]: value.detach().contiguous()
        for key, value in network.state_dict().items()
        if key.startswith(prefix)
    }
    io.save_safetensors(state, folder / io.MODEL_WEIGHTS)
    keys = ("unetile_version", "model", "normalization", "classes", "pixel_size_um")
    io.write_json(folder / io.MODEL_CONFIG, {k: metadata[k] for k in keys if k in metadata})


def model_input(data, model: LoadedModel, rgb: bool = False, multiscale: bool = False):
    """A layer's data laid out as the model reads it (channels first); InputError otherwise.

    An RGB layer (``(H, W, 3)``) becomes ``(3, H, W)``; a multiscale layer's
    full resolution (its level 0) is used. Lazy arrays (zarr, dask) stay lazy:
    prediction reads only the windows of its tiles (:meth:`unetile.tiling.Window.read`).
    """
    if multiscale or isinstance(data, list | tuple):  # napari's MultiScaleData is neither
        data = data[0]
    if rgb:  # dask moves the axis lazily; other array-likes are read here
        data = np.moveaxis(data if hasattr(data, "__array_function__") else np.asarray(data), -1, 0)
    from ..predict.engine import spatial_shape

    try:
        spatial_shape(model.model, data)
    except ValueError as error:
        raise io.InputError(f"{model.name}: {error}") from None
    return data


def plane_shape(data, model: LoadedModel) -> tuple[int, ...]:
    """The spatial shape of an image the model reads (:func:`model_input` first)."""
    from ..predict.engine import spatial_shape

    return tuple(spatial_shape(model.model, data))


# --------------------------------------------------------------------------
# Segment
# --------------------------------------------------------------------------


@dataclass
class Segmentation:
    """One image's prediction: the probabilities and what post-processing drew from them."""

    probabilities: np.ndarray  # (K, *spatial) float32
    labels: np.ndarray  # class map
    instances: np.ndarray | None  # uint32 object ids; None for class maps of > 2 classes

    def foreground(self, model: LoadedModel) -> np.ndarray:
        """The probability image to show: the foreground class's for two classes, else all."""
        if self.probabilities.shape[0] == 2:
            return self.probabilities[model.foreground]
        return self.probabilities


def tile_count(model: LoadedModel, image, **options) -> int:
    """The number of tiles :func:`segment` predicts (its progress total)."""
    from ..network.tiling import Tiling
    from ..predict.engine import PredictOptions, spatial_shape

    spatial = spatial_shape(model.model, image)
    resolved = PredictOptions.of(progress=False, **options).resolve(model.model, spatial)
    return len(Tiling.of(model.model).tiles(spatial, resolved.tile_shape, resolved.overlap))


def segment(model: LoadedModel, image, **options) -> Iterator[tuple[int, int]]:
    """Predict ``image`` tile by tile; yields ``(tiles done, tiles)``, returns the probabilities.

    ``options`` are those of :func:`unetile.predict.predict` (``tile_shape``,
    ``device``, ``tta`` ...). Closing the generator (napari's ``quit``)
    stops after the current tile; nothing else is changed.
    """
    from ..predict.engine import iter_predictions, spatial_shape

    try:
        total = tile_count(model, image, **options)
        spatial = spatial_shape(model.model, image)
        out = np.empty((model.num_classes, *spatial), np.float32)
        done = 0
        yield done, total
        for region, block in iter_predictions(model.model, image, progress=False, **options):
            out[(slice(None), *region)] = block
            done = min(done + 1, total)
            yield done, total
    except ValueError as error:  # options or image that do not fit: the library's one line
        if isinstance(error, io.InputError):
            raise
        raise io.InputError(f"{model.name}: {error}") from None
    return out


def segment_now(model: LoadedModel, image, post: PostOptions | None = None, **options):
    """:func:`segment` run to its end, then :func:`post_process` (tests, scripts)."""
    probabilities = run_to_end(segment(model, image, **options))
    return post_process(probabilities, model, post or model.post_options())


def run_to_end(generator):
    """Iterate a worker generator synchronously; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def instance_options(model: LoadedModel, post: PostOptions):
    """The model's carried instance options with the user's changes (as ``predict --method``)."""
    from ..predict.instances import InstanceOptions

    changes = dict(
        method=post.method,
        min_size=int(post.min_size),
        opening=int(post.opening),
        fill_holes=bool(post.fill_holes),
    )
    if post.threshold is not None and model.num_classes == 2:
        changes["threshold"] = float(post.threshold)  # the cells follow the labels
    try:
        return InstanceOptions.from_dict({**model.stored_instances(), **changes})
    except ValueError as error:
        raise io.InputError(f"instance options: {error}") from None


def post_process(probabilities: np.ndarray, model: LoadedModel, post: PostOptions) -> Segmentation:
    """Labels and instances from probabilities: no network, so it can follow every change."""
    from ..evaluate.calibration import check_threshold
    from ..predict.instances import extract_instances
    from ..predict.postprocessing import labels_from_probabilities

    threshold = None
    if post.threshold is not None and model.num_classes == 2:
        try:
            threshold = check_threshold(float(post.threshold), "threshold")
        except ValueError as error:
            raise io.InputError(str(error)) from None
    labels = labels_from_probabilities(probabilities, threshold, model.foreground)
    options = instance_options(model, post)
    try:
        options.check_classes(model.num_classes)
    except ValueError:
        return Segmentation(probabilities, labels, None)
    try:
        instances = extract_instances(probabilities, options)
    except ValueError as error:
        raise io.InputError(f"instances: {error}") from None
    return Segmentation(probabilities, labels, instances)


# --------------------------------------------------------------------------
# Fine-tune and train
# --------------------------------------------------------------------------


def next_run_folder(run_dir: str | Path, suffix: str = "tuned") -> Path:
    """A new folder beside ``run_dir``: ``NAME_tuned1``, ``NAME_tuned2`` ... (never an old one);
    beside a package ``NAME.zip``, the same."""
    run_dir = Path(run_dir)
    stem = run_dir.stem if run_dir.suffix.lower() == ".zip" else run_dir.name
    # A tuned run tuned again counts on: mine_tuned1 -> mine_tuned2, not mine_tuned1_tuned1.
    base, _, number = stem.rpartition(f"_{suffix}")
    if not (base and number.isdigit()):
        base = stem
    index = 1
    while (run_dir.parent / f"{base}_{suffix}{index}").exists():
        index += 1
    return run_dir.parent / f"{base}_{suffix}{index}"


def _budget(steps: int | None, minutes: float | None) -> dict:
    options = {}
    if steps is not None:
        if int(steps) < 1:
            raise io.InputError(f"steps must be at least 1, got {steps}")
        options["steps"] = int(steps)
    if minutes is not None and minutes > 0:
        options["max_minutes"] = float(minutes)
    return options


def fine_tune_config(
    init: str | Path,
    out: str | Path | None = None,
    *,
    steps: int | None = 200,
    minutes: float | None = None,
    label_mode: str | None = None,
    **options,
):
    """The TrainConfig of ``unetile train --init INIT``: the init run's network and recipe,
    the user's budget, a new run folder beside it (never the init run itself)."""
    from ..train.config import init_options, make_config, upgrade_stored_options

    init = Path(init)
    stored = io.read_json(init / io.MODEL_CONFIG)
    recipe = upgrade_stored_options(dict(stored.get("training") or {}))
    recipe = {k: v for k, v in recipe.items() if k not in NOT_CARRIED}
    if out is None:
        out = next_run_folder(init)
    if Path(out).resolve() == init.resolve():
        raise io.InputError(f"{out}: is the model being fine-tuned; choose another folder")
    settings = {**recipe, **init_options(init), "init": str(init), "out": str(out)}
    settings.update(_budget(steps, minutes))
    if label_mode is not None:
        settings["label_mode"] = label_mode
    settings.update(compile=False, holdout=None)
    settings.update(options)
    try:
        return make_config(**settings)
    except ValueError as error:
        raise io.InputError(f"fine-tuning options: {error}") from None


def train_config(
    out: str | Path,
    preset: str = "cpu-fast",
    *,
    steps: int | None = None,
    minutes: float | None = None,
    label_mode: str = "instances",
    **options,
):
    """The TrainConfig of a new run from ``preset`` (compiling off: the steps run in parts)."""
    from ..train.config import make_config

    if not str(out).strip():
        raise io.InputError("no run folder: choose where the new model goes")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise io.InputError(f"{out}: exists and is not empty; choose a new folder")
    settings = dict(out=str(out), label_mode=label_mode, **_budget(steps, minutes))
    settings.update(compile=False)
    settings.update(options)
    try:
        return make_config(preset, **settings)
    except ValueError as error:
        raise io.InputError(f"training options: {error}") from None


def training_data(config, images: Sequence, labels: Sequence):
    """:func:`unetile.train.prepare_arrays` of image/labels arrays; InputError naming the pair."""
    from ..train.loop import prepare_arrays

    if not images:
        raise io.InputError("no training images: give an image layer and its labels layer")
    try:
        return prepare_arrays(
            config, [np.asarray(i) for i in images], [np.asarray(x) for x in labels]
        )
    except ValueError as error:
        if isinstance(error, io.InputError):
            raise
        raise io.InputError(f"training data: {error}") from None


@dataclass(frozen=True)
class TrainProgress:
    """Where a training run stands: steps done of ``steps``, the last loss, seconds, and the
    ``(step, loss)`` rows ``log.csv`` gained since the last progress (the loss curve)."""

    step: int
    steps: int
    loss: float
    seconds: float
    points: tuple[tuple[int, float], ...] = ()


def logged_losses(run_dir: str | Path, after: int = 0) -> tuple[tuple[int, float], ...]:
    """The ``(step, loss)`` rows of a run's ``log.csv`` past step ``after`` (finite ones)."""
    from ..train import LOG

    try:
        with open(Path(run_dir) / LOG, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return ()
    points = []
    for row in rows:
        try:
            step, loss = int(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
        if step > after and math.isfinite(loss):
            points.append((step, loss))
    return tuple(points)


def run_training(
    config,
    data,
    stop: threading.Event | None = None,
    part_seconds: float = 1.0,
    notes: Callable[[str], None] | None = None,
) -> Iterator[TrainProgress]:
    """Train ``config`` on ``data`` in parts; yields a :class:`TrainProgress` after each part
    and returns the run summary.

    Each part is ``train(..., stop_after=...)`` and the next one resumes it,
    which gives the very weights of one uninterrupted run (``--resume``); the
    parts last about ``part_seconds`` each. ``stop`` (set by another thread:
    the Stop button) ends the part in progress after its current step, as
    Ctrl-C does, and no part follows; closing the generator ends it between
    parts. Either way the run folder is complete: checkpoint,
    ``model.safetensors`` and summary.
    """
    from ..train.run import train

    stop = threading.Event() if stop is None else stop
    step, resume, per_step, overhead = 0, False, None, 0.0
    began = time.perf_counter()
    summary: dict = {}
    while True:
        if per_step is None:
            part = 2
        else:  # long enough that setting up each part (load, checkpoint) stays a small share
            part = max(1, int(max(part_seconds, 2.0 * overhead) / max(per_step, 1e-4)))
        stop_after = min(step + part, config.steps)
        tick = time.perf_counter()
        stepping = summary.get("seconds", 0.0)
        summary = train(
            config,
            resume=resume,
            progress=False,
            data=data,
            stop_after=stop_after,
            notes=notes,
            stop=stop,
        )
        taken = summary["step"] - step
        if taken > 0:
            per_step = max(summary["seconds"] - stepping, 1e-6) / taken
            overhead = max(time.perf_counter() - tick - per_step * taken, 0.0)
        points = logged_losses(config.out, after=step)
        step, resume = summary["step"], True
        loss = summary["loss"] if summary["loss"] is not None else math.nan
        seconds = time.perf_counter() - began
        yield TrainProgress(step, config.steps, float(loss), seconds, points)
        if not summary["interrupted"] or stop.is_set():
            return summary


def fine_tune(
    init: str | Path,
    images: Sequence,
    labels: Sequence,
    out: str | Path | None = None,
    stop: threading.Event | None = None,
    **options,
) -> Iterator[TrainProgress]:
    """Fine-tune the model of ``init`` on image/label arrays into a new run folder beside it;
    yields progress, returns the summary (``summary["run_dir"]`` is the new model)."""
    config = fine_tune_config(init, out, **options)
    data = training_data(config, images, labels)
    return (yield from run_training(config, data, stop))


def train_new(
    out: str | Path,
    images: Sequence,
    labels: Sequence,
    preset: str = "cpu-fast",
    stop: threading.Event | None = None,
    **options,
) -> Iterator[TrainProgress]:
    """Train a new model from ``preset`` on image/label arrays; yields progress, returns the
    summary."""
    config = train_config(out, preset, **options)
    data = training_data(config, images, labels)
    return (yield from run_training(config, data, stop))


# --------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------

#: What is scored for objects on a background, and for a two-valued (membrane) map.
OBJECT_METRICS = ("f1", "seg", "objects", "iou", "dice", "pixel_error")
PIXEL_METRICS = ("pixel_error", "rand_error", "iou", "dice")


def evaluate(prediction, truth) -> list[tuple[str, float]]:
    """``(metric, value)`` rows of :func:`~unetile.evaluate.metrics.score` of a labels layer
    against a ground-truth layer: objects (F1 at IoU 0.5, SEG ...) where the truth holds objects."""
    from ..evaluate.metrics import score

    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise io.InputError(
            f"the labels have shape {prediction.shape} and the ground truth {truth.shape}: "
            "give layers of one image"
        )
    objects = np.unique(truth).size > 2
    metrics = OBJECT_METRICS if objects else PIXEL_METRICS
    try:
        result = score(prediction, truth, metrics)
    except ValueError as error:
        raise io.InputError(f"evaluate: {error}") from None
    wanted = ("f1@0.5", "f1", "seg", "objects_predicted", "objects_true", "splits", "merges")
    order = [k for k in wanted if k in result] + [
        k for k in result if k not in wanted and "@" not in k
    ]
    return [(name, float(result[name])) for name in order]


# --------------------------------------------------------------------------
# Sample data
# --------------------------------------------------------------------------


def synthetic_cells(size: int = 256, seed: int = 2000):
    """The demo's synthetic touching cells: ``(image, instances)``."""
    from ..data.synthetic import cells_like

    cells = cells_like((size, size), touching_fraction=0.7, rng=seed)
    return cells.image, cells.instances.astype(np.uint32)
