"""What the napari widgets do, as plain functions on arrays: no Qt, no viewer.

Each step is one call of the library (``load_model``, ``predict``,
``extract_instances``, ``prepare_arrays`` + ``train``, ``score``); the long
ones (:func:`segment`, :func:`run_training`) are generators that yield their
progress and return their result, so that napari runs them in a worker
thread (``thread_worker``) and a test simply iterates them. Every fault a
user can cause ends as :class:`unetile.io.InputError` with one line.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    """A run folder's network with its ``config.json``."""

    run_dir: Path
    model: object
    config: dict

    @classmethod
    def load(cls, run_dir: str | Path) -> LoadedModel:
        """:func:`unetile.predict.card.load_model`; InputError with its one line."""
        if not str(run_dir).strip():
            raise io.InputError("no model: choose a run folder (the --out of 'unetile train')")
        model, config = card.load_model(run_dir)
        return cls(Path(run_dir), model, config)

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def foreground(self) -> int:
        return int(getattr(self.model, "foreground", 1))

    @property
    def name(self) -> str:
        return self.run_dir.name

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


def model_input(data, model: LoadedModel, rgb: bool = False):
    """A layer's data laid out as the model reads it (channels first); InputError otherwise.

    An RGB layer (``(H, W, 3)``) becomes ``(3, H, W)``; a multiscale layer's
    full resolution is used. Lazy arrays (zarr, dask) stay lazy.
    """
    if isinstance(data, list | tuple):  # a multiscale layer: its full resolution
        data = data[0]
    if rgb:
        data = np.moveaxis(np.asarray(data), -1, 0)
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
    """A new folder beside ``run_dir``: ``NAME_tuned1``, ``NAME_tuned2`` ... (never an old one)."""
    run_dir = Path(run_dir)
    stem = run_dir.name
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
    """Where a training run stands: steps done of ``steps``, the last loss, seconds."""

    step: int
    steps: int
    loss: float
    seconds: float


def run_training(
    config,
    data,
    should_stop: Callable[[], bool] = lambda: False,
    part_seconds: float = 1.0,
    notes: Callable[[str], None] | None = None,
) -> Iterator[TrainProgress]:
    """Train ``config`` on ``data`` in parts; yields a :class:`TrainProgress` after each part
    and returns the run summary.

    Each part is ``train(..., stop_after=...)`` and the next one resumes it,
    which gives the very weights of one uninterrupted run (``--resume``), so a
    Stop between parts (``should_stop()``, or closing the generator) leaves a
    complete run folder: checkpoint, ``model.safetensors`` and summary. The
    parts last about ``part_seconds`` each.
    """
    from ..train.run import train

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
        )
        taken = summary["step"] - step
        if taken > 0:
            per_step = max(summary["seconds"] - stepping, 1e-6) / taken
            overhead = max(time.perf_counter() - tick - per_step * taken, 0.0)
        step, resume = summary["step"], True
        loss = summary["loss"] if summary["loss"] is not None else math.nan
        yield TrainProgress(step, config.steps, float(loss), time.perf_counter() - began)
        if not summary["interrupted"] or should_stop():
            return summary


def fine_tune(
    init: str | Path,
    images: Sequence,
    labels: Sequence,
    out: str | Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    **options,
) -> Iterator[TrainProgress]:
    """Fine-tune the model of ``init`` on image/label arrays into a new run folder beside it;
    yields progress, returns the summary (``summary["run_dir"]`` is the new model)."""
    config = fine_tune_config(init, out, **options)
    data = training_data(config, images, labels)
    return (yield from run_training(config, data, should_stop))


def train_new(
    out: str | Path,
    images: Sequence,
    labels: Sequence,
    preset: str = "cpu-fast",
    should_stop: Callable[[], bool] = lambda: False,
    **options,
) -> Iterator[TrainProgress]:
    """Train a new model from ``preset`` on image/label arrays; yields progress, returns the
    summary."""
    config = train_config(out, preset, **options)
    data = training_data(config, images, labels)
    return (yield from run_training(config, data, should_stop))


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
