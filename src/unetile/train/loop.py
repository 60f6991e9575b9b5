"""Training: the paper's recipe as a plain loop, with checkpoints and exact resume.

The defaults are the paper's (section 3): stochastic gradient descent with
momentum 0.99, one large tile per step (the largest valid input tile up to
572 px that the images allow: 572 -> 388 on 512x512 images), weighted
cross-entropy with the weight map of ``w0 = 10``, ``sigma = 5`` px, He
initialisation, drop-out 0.5 and elastic deformations. Every knob is a field of
:class:`TrainConfig`; named presets (:data:`PRESETS`) fill other defaults.

A run folder holds (the README restates it):

- ``model.safetensors`` + ``config.json``: the model users want, what
  ``unetile predict`` loads: the best model by ``keep_best`` on the validation
  images, or the last one when there are none. ``config.json`` holds the
  network (``model``), the intensity normalisation, the classes, the tile
  geometry, the training images' pixel size (``pixel_size_um``, null when
  unknown), the run a fine-tuning run started from (``init``) and the
  training options (``training``).
- ``last.safetensors``: the weights after the last step.
- ``checkpoint.safetensors``: everything to continue (weights, optimiser
  state, step, random states), one file written atomically; the non-tensor
  state is JSON in the file's metadata. No pickle anywhere.
- ``log.csv`` (step, loss, lr, seconds, data fraction, validation metrics),
  ``curves.png``, ``summary.json``, and ``cache/`` (weight maps as ``.npy``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..data.dataset import (
    IGNORE,
    LabeledImage,
    TileSampler,
    labeled_images_from_arrays,
    load_labeled_images,
    too_small,
)
from ..network.model import UNet, estimate_batch_norm, freeze_batch_norm
from ..network.normalization import Normalization
from ..network.tiling import Tiling
from ..predict import card
from ..predict.engine import resolve_device
from ..predict.instances import default_options
from . import ddp
from .checkpoint import (  # noqa: F401 - re-exported: they were train.py's
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from .config import (  # noqa: F401 - re-exported: config.py's names were train.py's
    ARCHITECTURE,
    INIT_NORMALIZATIONS,
    LOSSES,
    OPTIMIZERS,
    PAPER_INPUT_TILE,
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    TrainConfig,
    _coerce,
    check_output_tile,
    init_options,
    init_run_config,
    make_config,
)
from .ddp import Ranks

CHECKPOINT = "checkpoint.safetensors"
LAST_WEIGHTS = "last.safetensors"
LOG = "log.csv"
CURVES = "curves.png"
SUMMARY = "summary.json"
CACHE = "cache"


# --------------------------------------------------------------------------
# Pieces of the loop.
# --------------------------------------------------------------------------


def learning_rate_at(config: TrainConfig, step: int, time_fraction: float = 0.0) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then the schedule.

    ``time_fraction`` is the share of ``max_minutes`` used so far; the schedule
    follows whichever of steps and time is further along.
    """
    base = config.learning_rate
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, max((step - config.warmup_steps) / span, time_fraction))
    if config.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "poly":
        return base * (1.0 - progress) ** 0.9
    return base


def lower_is_better(metric: str) -> bool:
    """Errors are minimised; every other metric (IoU, Dice, SEG, F1...) maximised."""
    return metric.endswith("_error")


def build_model(config: TrainConfig, in_channels: int, num_classes: int) -> UNet:
    """The run's U-Net with He initialisation drawn from a generator seeded by ``config.seed``."""
    model = UNet.from_config(config.model_config(in_channels, num_classes))
    model.reset_parameters(torch.Generator().manual_seed(config.seed))
    return model


def load_init(
    config: TrainConfig, in_channels: int, num_classes: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and ``config.json`` of ``config.init``, checked against this run's network.

    Raises
    ------
    unetile.io.InputError
        One line naming the first field that differs, e.g.
        ``runs/em/config.json: base_channels 16 differs from this run's 64``.
    """
    from safetensors import SafetensorError

    run_dir = Path(config.init)
    stored = init_run_config(run_dir)
    ours = config.model_config(in_channels, num_classes).to_dict()
    for name in ARCHITECTURE:
        if stored["model"].get(name) != ours[name]:
            raise io.InputError(
                f"{run_dir / io.MODEL_CONFIG}: {name} {stored['model'].get(name)} differs "
                f"from this run's {ours[name]}; fine-tuning needs the same network"
            )
    weights_path = run_dir / io.MODEL_WEIGHTS
    try:
        weights, _ = io.read_safetensors(weights_path)  # safetensors: no code runs
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise io.InputError(f"{weights_path}: cannot be read as weights ({reason})") from None
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise io.InputError(
                f"{weights_path}: weight {key!r} holds NaN or infinite values; --init needs "
                "a model that trained without diverging"
            )
    if config.init_normalization == "keep":
        stored_channels = len((stored.get("normalization") or {}).get("mean", []))
        if stored_channels != in_channels:
            raise io.InputError(
                f"{run_dir / io.MODEL_CONFIG}: no normalisation for {in_channels} channel(s) "
                f"to keep; use --init-normalization recompute"
            )
    record = {
        "run": str(run_dir),
        "weights_sha256": _sha256(weights_path),
        "normalization": config.init_normalization,
        "freeze_encoder": config.freeze_encoder,
    }
    return weights, {**stored, "init_record": record}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_from(model: UNet, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``weights`` into ``model``; InputError naming ``source`` when they do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise io.InputError(
            f"{source}: weights do not fit the network ({str(error).splitlines()[0]})"
        ) from None


def freeze_encoder(model: UNet) -> None:
    """Stop training the contracting path: its weights get no gradient, its norms keep
    their running statistics (see :func:`training_mode`)."""
    for parameter in model.contracting.parameters():
        parameter.requires_grad_(False)


def training_mode(model: UNet, config: TrainConfig, norms_frozen: bool = False) -> None:
    """``model.train()``, with a frozen contracting path left in evaluation mode
    (batch norm then uses, and keeps, the statistics of the run it came from),
    and every batch norm so once its statistics are frozen (``freeze_batch_norm``)."""
    model.train()
    if config.freeze_encoder:
        model.contracting.eval()
    if norms_frozen:
        freeze_batch_norm(model)


#: Training tiles (no augmentation) over which frozen batch-norm statistics are averaged.
STATISTICS_TILES = 64


def freeze_norms_if_due(run: Run, state: RunState, finishing: bool = False) -> None:
    """At ``freeze_batch_norm`` of the run (or when it finishes short of it), average
    the batch-norm statistics over whole training images and freeze them."""
    share = run.config.freeze_batch_norm
    if share is None or state.norms_frozen:
        return
    done = state.step / run.config.steps
    if run.budget is not None:
        done = max(done, state.wall_seconds() / run.budget)
    (due,) = ddp.agree(run.ranks, finishing or done >= share)
    if not due:
        return
    estimate_batch_norm(run.model, run.sampler.plain_tiles(STATISTICS_TILES))
    freeze_batch_norm(run.model)
    state.norms_frozen = True


def build_sampler(
    config: TrainConfig, data: TrainingData, device: torch.device, ranks: Ranks | None = None
) -> TileSampler:
    """The run's tile sampler: its geometry, normalisation, augmentation and seed (per rank)."""
    return TileSampler(
        data.train,
        data.input_shape,
        data.output_shape,
        data.normalization,
        config.augment,
        ddp.sampler_rng(config.seed, ranks or Ranks()),
        device=device,
    )


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the paper), Adam or AdamW, over the parameters being trained."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def compute_loss(
    config: TrainConfig, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The configured loss over annotated output pixels (float32 whatever the autocast)."""
    from .loss import combined_loss, weighted_cross_entropy

    logits = logits.float()
    if config.loss == "dice_ce":
        return combined_loss(logits, labels, weights, IGNORE, dice_weight=config.dice_weight)
    return weighted_cross_entropy(logits, labels, weights, IGNORE)


def tile_geometry(config: TrainConfig, image_shapes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input and output tile shapes (pixels) of the run, checked against the network.

    ``config.tile`` is the output tile; the input adds the context margin on
    each side. Without it, the largest valid tile whose output fits the
    smallest image, up to ``config.max_tile`` (output) or the paper's input.
    """
    tiling = Tiling(config.depth, config.padding, config.dims)
    if config.tile is None:
        max_input = PAPER_INPUT_TILE[config.dims]
        if config.max_tile is not None:
            max_input = config.max_tile + 2 * tiling.margin
        output_shape = tiling.largest_tile_shape(image_shapes, max_input)
    else:
        output_shape = tuple(config.tile) * (config.dims if len(config.tile) == 1 else 1)
        for size in output_shape:
            check_output_tile(size, config.depth, config.padding)
    return tiling.input_shape(output_shape), tuple(output_shape)


@dataclass
class TrainingData:
    """Everything read from the data folders before the first step."""

    train: list[LabeledImage]
    validation: list[LabeledImage]
    num_classes: int
    in_channels: int
    normalization: dict
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    pixel_size: tuple[float, ...] | None = None
    holdout: dict | None = None  # the validation held out of the training images (holdout.py)


def _label_options(config: TrainConfig) -> dict:
    return dict(
        dims=config.dims,
        label_mode=config.label_mode,
        cell_value=config.cell_value,
        ignore_value=config.ignore_value,
        target=config.target,
        w0=config.w0,
        sigma=config.sigma,
        class_weights=config.class_weights,
    )


def prepare_data(config: TrainConfig, cache_dir: str | os.PathLike | None = None) -> TrainingData:
    """Read and check all data, compute weight maps and normalisation, fix the tile.

    Every data error surfaces here as a one-line :class:`unetile.io.InputError`
    naming the file, before the model is built.
    """
    if config.images is None or config.labels is None:
        raise io.InputError("no training data: give the images and labels folders")
    options = _label_options(config)
    holding_out = holds_out(config, config.val_images is not None)
    train_images, num_classes = load_labeled_images(
        config.images,
        config.labels,
        num_classes=config.num_classes,
        cache_dir=cache_dir,
        with_weights=not holding_out,
        **options,
    )
    validation: list[LabeledImage] = []
    record = None
    if holding_out:
        train_images, validation, record = hold_out(
            config, train_images, cache_dir, config.images, io.InputError
        )
    elif config.val_images is not None:
        validation, _ = load_labeled_images(
            config.val_images,
            config.val_labels,
            num_classes=num_classes,
            with_weights=False,
            **options,
        )
    data = _assemble(
        config, train_images, validation, num_classes, config.val_images, io.InputError
    )
    data.pixel_size = training_pixel_size(config)
    data.holdout = record
    return data


def holds_out(config: TrainConfig, validation_given: bool) -> bool:
    """Whether validation is held out of the training images: ``holdout`` set and no
    validation images given (they win)."""
    return config.holdout is not None and not validation_given


def hold_out(config: TrainConfig, items, cache_dir, source, error_type):
    """Training and validation images split from ``items`` (:func:`unetile.data.holdout.split`),
    the training ones with their weight maps; and the record of the split.

    The weight maps are computed here, after the split, so that a training part's
    map sees its own labels only.
    """
    from ..data.dataset import compute_weight_map
    from ..data.holdout import split

    try:
        train_images, validation, record = split(items, config.holdout, config.foreground)
    except ValueError as error:
        raise error_type(f"{source}: {error}; give --val-images or --no-holdout") from None
    for item in train_images:
        item.weights = compute_weight_map(
            item.instances, item.classes, config.w0, config.sigma, config.class_weights, cache_dir
        )
    return train_images, validation, record


def holdout_note(config: TrainConfig, data: TrainingData) -> str | None:
    """The line said before training about held-out validation (None: nothing to say)."""
    from ..data.holdout import describe

    if data.holdout is not None:
        return describe(data.holdout)
    if config.holdout is not None and data.validation:
        return f"validating on the given validation images; --holdout {config.holdout:g} unused"
    return None


def training_pixel_size(config: TrainConfig) -> tuple[float, ...] | None:
    """The training images' pixel size (micrometres): ``config.pixel_size``, else their metadata.

    Raises
    ------
    unetile.io.InputError
        When two images state pixel sizes that differ by more than 1 %.
    """
    from ..predict.scale import check_pixel_size, describe, relative_difference

    if config.pixel_size is not None:
        return check_pixel_size(config.pixel_size, config.dims, "--pixel-size")
    found = None
    for path in io.list_images(config.images):
        size = io.read_pixel_size(path, config.dims)
        if size is None:
            continue
        if found is None:
            found = (path, size)
        elif relative_difference(size, found[1]) > 0.01:
            raise io.InputError(
                f"{path}: pixel size {describe(size)} differs from {found[0].name} "
                f"({describe(found[1])}); resample the images to one pixel size, or state "
                f"the right one with --pixel-size"
            )
    return None if found is None else found[1]


def prepare_arrays(
    config: TrainConfig,
    images,
    labels,
    val_images=(),
    val_labels=(),
    cache_dir: str | os.PathLike | None = None,
) -> TrainingData:
    """:func:`prepare_data` for arrays in memory; pass the result to ``train(data=...)``.

    Parameters
    ----------
    config : TrainConfig
        Label mode, weight map, network and tile options (its folders are ignored).
    images, labels : sequences of arrays
        Training images (``S`` or ``(C, *S)``) and their labels (``S``), read
        as ``config.label_mode`` says.
    val_images, val_labels : sequences of arrays
        Held-out images for validation (may be empty).
    cache_dir : path or None
        Weight-map cache folder.

    Raises
    ------
    ValueError
        Naming ``images[i]`` / ``labels[i]`` for the same faults files are checked for.
    """
    options = _label_options(config)
    holding_out = holds_out(config, len(val_images) > 0)
    train_images, num_classes = labeled_images_from_arrays(
        images,
        labels,
        num_classes=config.num_classes,
        cache_dir=cache_dir,
        with_weights=not holding_out,
        **options,
    )
    validation: list[LabeledImage] = []
    record = None
    if holding_out:
        train_images, validation, record = hold_out(
            config, train_images, cache_dir, "images", ValueError
        )
    elif len(val_images):
        validation, _ = labeled_images_from_arrays(
            val_images, val_labels, num_classes=num_classes, with_weights=False, **options
        )
    data = _assemble(config, train_images, validation, num_classes, "val_images", ValueError)
    data.holdout = record
    if config.pixel_size is not None:
        from ..predict.scale import check_pixel_size

        data.pixel_size = check_pixel_size(config.pixel_size, config.dims, "pixel_size")
    return data


def _assemble(config, train_images, validation, num_classes, validation_source, error_type):
    for item in train_images:
        message = too_small(config.images or "images", item.name, item.classes.shape[-2:])
        if message is not None:
            raise error_type(message)
    if config.channels is not None:
        from ..data.dataset import fit_channels

        for source, items in (
            (config.images or "images", train_images),
            (validation_source, validation),
        ):
            for item in items:
                try:
                    item.image = np.ascontiguousarray(
                        fit_channels(item.image, config.dims, config.channels)
                    )
                except ValueError as error:
                    raise error_type(f"{source}/{item.name}: {error} (--channels)") from None
    channels = train_images[0].image.shape[0]
    for item in validation:
        if item.image.shape[0] != channels:
            raise error_type(
                f"{validation_source}/{item.name}: {item.image.shape[0]} channels, "
                f"training images have {channels}"
            )
    if not 0 <= config.foreground < num_classes:
        raise error_type(f"--foreground {config.foreground} is not a class of 0..{num_classes - 1}")
    for item in validation:
        if not np.any(item.classes == config.foreground):
            raise error_type(
                f"{validation_source}/{item.name}: no pixel of the foreground class "
                f"{config.foreground}; validation metrics need cells, so leave this image out"
            )
    try:
        input_shape, output_shape = tile_geometry(
            config, [item.classes.shape for item in train_images]
        )
    except ValueError as error:
        raise error_type(f"{config.images or 'images'}: {error}") from None
    return TrainingData(
        train=train_images,
        validation=validation,
        num_classes=num_classes,
        in_channels=channels,
        normalization=Normalization.from_images([item.image for item in train_images]).to_dict(),
        input_shape=input_shape,
        output_shape=output_shape,
    )


def run_config(config: TrainConfig, data: TrainingData) -> dict:
    """The ``config.json`` of a run: everything ``predict`` needs, plus the options."""
    return {
        "model": config.model_config(data.in_channels, data.num_classes).to_dict(),
        "normalization": data.normalization,
        "classes": {
            "num_classes": data.num_classes,
            "foreground": config.foreground,
            "label_mode": config.label_mode,
            "cell_value": config.cell_value,
            "target": config.target,
        },
        "tile": {"input_shape": list(data.input_shape), "output_shape": list(data.output_shape)},
        "pixel_size_um": None if data.pixel_size is None else list(data.pixel_size),
        **fitted_instances(config, data),
        "holdout": data.holdout,
        "calibration": None,  # filled when training ends with validation (calibrate)
        "training": config.to_dict(),
    }


def fitted_instances(config: TrainConfig, data: TrainingData) -> dict:
    """``config.json``'s ``"instances"`` (how objects are extracted) fitted to the training
    labels, and ``"instances_fit"`` (what was measured, why); class maps keep the paper's
    components (:mod:`unetile.train.instance_fit`)."""
    from .instance_fit import fit_from_labels

    base = default_options(config.label_mode, config.target, config.foreground)
    if config.label_mode == "classes":
        return {"instances": base.to_dict(), "instances_fit": None}
    options, record = fit_from_labels(
        [item.instances for item in data.train], base, config.label_mode
    )
    return {"instances": options.to_dict(), "instances_fit": record}


def validate(
    model: UNet,
    images: list[LabeledImage],
    config: TrainConfig,
    normalization: dict,
    output_shape: tuple[int, ...],
    device: torch.device,
) -> dict[str, float]:
    """Mean of each validation metric over whole held-out images.

    The probabilities come from overlap-tile prediction with the training
    tile's output shape; the foreground probability is thresholded at 0.5
    (the network's own decision), not at the best of several thresholds.
    """
    from ..evaluate.metrics import score
    from ..predict.engine import predict

    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for item in images:
            probabilities = predict(
                model,
                item.image,
                tile_shape=output_shape,
                batch_size=1,
                tta=config.val_tta,
                device=device,
                normalization=normalization,
                progress=False,
            )
            values = score(
                probabilities[config.foreground],
                validation_truth(item, config),
                metrics=list(config.metrics),
                thresholds=(0.5,),
                ignore_value=IGNORE if config.ignore_value is not None else None,
            )
            for name in config.metrics:
                totals[name] = totals.get(name, 0.0) + float(values[name])
    finally:
        model.train(was_training)
    return {name: value / len(images) for name, value in totals.items()}


#: Foreground pieces per true cell above which training does not tune the
#: instance extraction (an untrained network's speckle).
UNTRAINED_PIECES = 10


def validation_probabilities(
    run_dir: Path, data: TrainingData, config: TrainConfig, device: torch.device
) -> list[np.ndarray]:
    """The kept model's probabilities on each validation image, predicted as in validation."""
    from ..predict.engine import predict

    model, _ = card.load_model(run_dir)
    return [
        predict(
            model,
            item.image,
            tile_shape=data.output_shape,
            tta=config.val_tta,
            device=device,
            normalization=data.normalization,
            progress=False,
        )
        for item in data.validation
    ]


def calibrate(
    run_dir: Path, data: TrainingData, config: TrainConfig, probabilities: list[np.ndarray]
) -> dict | None:
    """The kept model's foreground threshold for ``keep_best`` on the validation images,
    stored in ``config.json`` (``"calibration"``); None (nothing stored) for a network of
    more than two classes, whose labels stay the argmax.

    The validation images are scored as :func:`validate` scores them.
    """
    from ..evaluate.calibration import calibrate_threshold

    if data.num_classes != 2:
        return None
    truths = [validation_truth(item, config) for item in data.validation]
    calibration = calibrate_threshold(
        [probability[config.foreground] for probability in probabilities],
        truths,
        config.keep_best,
        ignore_value=IGNORE if config.ignore_value is not None else None,
    )
    calibration = _calibration_beyond_noise(calibration, probabilities, truths, config)
    stored = card.ModelCard.read(run_dir)
    # The cells are drawn from the same foreground as the labels.
    instances = {**stored.entries["instances"], "threshold": calibration["threshold"]}
    card.ModelCard.update(run_dir, calibration=calibration, instances=instances)
    return calibration


def _calibration_beyond_noise(calibration, probabilities, truths, config) -> dict:
    """Keep the argmax (0.5) unless the calibrated threshold's gain over it is beyond
    the noise of the paired per-unit scores (:mod:`unetile.evaluate.evidence`)."""
    from ..evaluate.calibration import ARGMAX, lower_is_better
    from ..evaluate.evidence import beyond_noise, scoring_units
    from ..evaluate.metrics import score_per_threshold

    best, metric = calibration["threshold"], calibration["metric"]
    if best == ARGMAX:
        return {**calibration, "moved": False}
    sign = -1.0 if lower_is_better(metric) else 1.0
    ignore = IGNORE if config.ignore_value is not None else None
    at = {best: [], ARGMAX: []}
    foreground = [probability[config.foreground] for probability in probabilities]
    for probability, truth in scoring_units(foreground, truths):
        sweep = score_per_threshold(
            probability, truth, [metric], thresholds=(ARGMAX, best), ignore_value=ignore
        )
        for threshold in at:
            at[threshold].append(sign * float(sweep[threshold][metric]))
    if beyond_noise(at[best], at[ARGMAX]):
        return {**calibration, "moved": True}
    # The best mean is within the noise: the network's own decision stays.
    return {
        **calibration,
        "threshold": ARGMAX,
        "value": calibration["at_0.5"],
        "best_by_mean": best,
        "moved": False,
    }


def validation_truth(item: LabeledImage, config: TrainConfig) -> np.ndarray:
    """What the validation metrics compare with: the cells (instances or the foreground
    class), :data:`IGNORE` where unannotated."""
    if config.label_mode == "instances":
        truth = item.instances.astype(np.int64)
    else:
        truth = (item.classes == config.foreground).astype(np.int64)
    truth[item.classes == IGNORE] = IGNORE
    return truth


def tune_instances(
    run_dir: Path,
    truths: list[np.ndarray],
    probabilities: list[np.ndarray],
    threshold: float | None = None,
    source: str = "validation images",
) -> dict:
    """Tune the kept model's instance extraction on the validation images; store it.

    The options fitted to the training labels (``config.json`` ``"instances"``)
    are compared with a grid around them (:func:`unetile.train.instance_fit.tune`) by
    object F1 at IoU 0.5, and replaced only for a gain beyond the noise. A
    foreground in more than ``UNTRAINED_PIECES`` pieces per true cell keeps
    them (``"validation": None``). The foreground is drawn at the calibrated
    ``threshold`` (None: the argmax), which the stored options carry, as
    ``predict`` draws the labels.
    """
    import dataclasses

    from ..predict.instances import InstanceOptions, count_objects, extract_instances
    from .instance_fit import tune

    stored = dict(card.ModelCard.read(run_dir).entries)
    base = InstanceOptions.from_dict(stored["instances"])
    base = dataclasses.replace(base, threshold=threshold)
    # Pieces the carried options leave (specks under the size floor are not objects).
    pieces = sum(int(extract_instances(p, base).max()) for p in probabilities)
    cells = sum(count_objects(truth > 0) for truth in truths)
    if pieces > UNTRAINED_PIECES * max(cells, 1):
        # A network this far from cells has nothing to tune on; it keeps the defaults.
        stored["instances"] = base.to_dict()
        stored["instances_tuning"] = {
            "scored_on": source,
            "skipped": f"the foreground is in over {UNTRAINED_PIECES} pieces per true object",
        }
        card.ModelCard.from_entries(stored).write(run_dir)
        return {"options": base.to_dict(), "validation": None, "tuning": stored["instances_tuning"]}
    diameter = (stored.get("instances_fit") or {}).get("diameter") or 10.0
    best, record = tune(probabilities, truths, base, diameter)
    record["scored_on"] = source
    stored["instances"] = best.to_dict()
    stored["instances_tuning"] = record
    card.ModelCard.from_entries(stored).write(run_dir)
    chosen = record["best"] if record["moved"] else record["default"]
    scores = {"f1@0.5": chosen["f1@0.5"], "seg": chosen["seg"]}
    return {"options": best.to_dict(), "validation": scores, "tuning": record}


def refit_instances(run_dir: str | os.PathLike) -> dict:
    """Fit a finished run's post-processing again as training now ends: from its training
    labels (:func:`fitted_instances`), then tuned on its validation images if it has
    some. For runs made before this release; the weights stay."""
    from ..predict.engine import resolve_device

    run_dir = Path(run_dir)
    stored = dict(card.ModelCard.read(run_dir).entries)
    config = make_config(**stored["training"])
    data = prepare_data(config)
    stored.update(fitted_instances(config, data))
    stored.pop("instances_tuning", None)
    card.ModelCard.from_entries(stored).write(run_dir)
    if not data.validation:
        return {"options": stored["instances"], "validation": None}
    device = resolve_device(config.device)
    probabilities = validation_probabilities(run_dir, data, config, device)
    threshold = (stored.get("calibration") or {}).get("threshold")
    truths = [item.instances for item in data.validation]
    return tune_instances(run_dir, truths, probabilities, threshold)


class CsvLog:
    """``log.csv`` written row by row (append + flush); a resumed run drops later rows.

    Without a ``path`` (the ranks other than 0) the rows are kept in memory only.
    """

    def __init__(self, path: Path | None, columns: list[str], resume_step: int | None):
        self.path = path
        self.columns = columns
        self.rows: list[dict] = []
        self.handle = None
        if path is None:
            return
        if resume_step is not None and path.is_file():
            try:
                with open(path, newline="") as handle:
                    reader = csv.DictReader(handle)
                    self.rows = [row for row in reader if int(row["step"]) <= resume_step]
            except (KeyError, TypeError, ValueError, csv.Error, UnicodeDecodeError):
                raise io.InputError(
                    f"{path}: not the log.csv of this run (no 'step' column, or a step that is "
                    "no whole number); restore it, or move it away to resume with a new log"
                ) from None
        with io.atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        self.handle = open(path, "a", newline="")  # closed in close()
        self.writer = csv.DictWriter(self.handle, columns, extrasaction="ignore")

    def write(self, row: dict) -> None:
        row = {
            key: (f"{value:.6g}" if isinstance(value, float) else value)
            for key, value in row.items()
        }
        if self.handle is not None:
            self.writer.writerow(row)
            self.handle.flush()
        self.rows.append(row)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def plot_curves(rows: list[dict], metrics: tuple[str, ...], path: Path) -> None:
    """Loss and validation metrics against steps, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def series(name):
        points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    steps, losses = series("loss")
    loss_axis.plot(steps, losses)
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    if losses and min(losses) > 0:
        loss_axis.set_yscale("log")
    for metric in metrics:
        steps, values = series(f"val_{metric}")
        if steps:
            metric_axis.plot(steps, values, marker="o", label=metric)
    metric_axis.set(xlabel="step", title="validation")
    if metric_axis.lines:
        metric_axis.legend()
    figure.tight_layout()
    with io.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    plt.close(figure)


@contextlib.contextmanager
def _stop_on_interrupt(stop: threading.Event | None = None):
    """First Ctrl-C (or ``stop`` set by another thread) asks the loop to stop after the
    current step; a second Ctrl-C aborts."""
    stop = threading.Event() if stop is None else stop
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _compiled(model: UNet):
    """The model's forward pass through ``torch.compile`` (weights stay shared).

    Fusing the elementwise work (instance norm, ReLU, crops) made the
    ``cpu-fast`` step 1.3x faster on a 2-core CPU (0.40 -> 0.31 s) after about
    30 s of compilation. Saving and validation use ``model`` itself.
    """
    return torch.compile(model)


def training_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: ``"bf16"`` where ``device`` computes it natively, else ``"none"``."""
    from ..precision import bf16_unsupported_reason

    if precision != "auto":
        return precision
    return "bf16" if bf16_unsupported_reason(device) is None else "none"


def _autocast(device: torch.device, precision: str):
    precision = training_precision(precision, device)
    if precision == "none":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'none' on a CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


def train_run(config, resume, progress, data, stop_after, overwrite, notes, stop=None) -> dict:
    began = time.perf_counter()
    if config.out is None:
        raise io.InputError("no run folder: give --out")
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise io.InputError(f"{run_dir}: exists and is not a folder; give a folder as --out")
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise io.InputError(f"--device: {error}") from None
    if config.precision == "fp16" and device.type != "cuda":
        raise io.InputError(f"--precision fp16 needs a CUDA device, not {device.type}; use bf16")
    # Under torchrun: one process per GPU or CPU share (ddp.py); rank 0 owns the folder.
    ranks = ddp.ranks_from_environment()
    device = ddp.device_for(ranks, device)
    owner = io.folder_lock(run_dir, "trained") if ranks.writes else contextlib.nullcontext()
    with owner:
        if ranks.writes or resume:
            _claim_run_folder(run_dir, resume, overwrite)
        # Process-wide torch settings of this run, restored when it ends.
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            ranks = ddp.start(ranks, device)
            where = (config, run_dir, device, resume, progress, data, stop_after, began, ranks)
            return _train(*where, notes, stop)
        except OSError as error:
            if error.filename is not None and run_dir.resolve() not in (
                Path(error.filename).resolve().parents
            ):
                raise  # reading the data, not writing the run
            # A full disk, a vanished folder: writes are atomic, the last checkpoint is intact.
            raise io.InputError(_save_failure(run_dir, error)) from None
        finally:
            ddp.stop(ranks)
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


EMPTY_TILE_SHARE = 0.25
"""Share of training tiles without a labelled pixel above which a run warns (once)."""

RUN_FILES = (io.MODEL_WEIGHTS, io.MODEL_CONFIG, LAST_WEIGHTS, CHECKPOINT, LOG, SUMMARY, CURVES)
"""The files a training run writes; a new run never replaces them unless told to."""


def _claim_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a run (or a model) this one did not make; with overwrite, clear it."""
    checkpoint_path = run_dir / CHECKPOINT
    if resume:
        if not checkpoint_path.is_file():
            raise io.InputError(f"{run_dir}: holds no checkpoint to resume; train without --resume")
        return
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        what = "a training run" if CHECKPOINT in found else "a model"
        raise io.InputError(
            f"{run_dir}: already holds {what}; add --resume to continue it, --overwrite to "
            f"replace it, or give another --out (found {', '.join(found)})"
        )
    for name in found:
        (run_dir / name).unlink()


def _save_failure(run_dir: Path, error: OSError) -> str:
    """One line for a failed write during training: what failed and what is kept."""
    try:
        header = io.safetensors_header(run_dir / CHECKPOINT)
        saved_step = json.loads(header["__metadata__"]["state"])["step"]
    except Exception:  # noqa: BLE001 - no readable checkpoint: say so
        return f"could not save the run ({io.describe_os_error(error)}); no checkpoint was kept"
    return (
        f"could not save the run ({io.describe_os_error(error)}); the checkpoint of step "
        f"{saved_step} is kept in {run_dir / CHECKPOINT}: fix this and continue with "
        f"'unetile train --out {run_dir} --resume'"
    )


@dataclass
class Run:
    """The parts of a training run fixed before its first step."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    ranks: Ranks
    data: TrainingData
    saved_config: dict  # the run's config.json
    model: UNet
    wrapped: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    forward: torch.nn.Module  # ``wrapped``, or ``wrapped`` compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: TileSampler
    memory_format: torch.memory_format
    budget: float | None  # seconds (``max_minutes``)


@dataclass
class RunState:
    """What changes as a run trains: the step, the best model, the clocks, the log's running
    sums. A checkpoint stores :meth:`saved` and :meth:`restore` reads it back."""

    began: float  # time.perf_counter() when this process started the run
    loss_sum: torch.Tensor  # on the device: read only when a log row is written
    empty_tiles: torch.Tensor  # tiles without a weighted pixel, on the device
    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    data_seconds: float = 0.0
    step_seconds: float = 0.0
    earlier_wall_seconds: float = 0.0  # of the parts before a resume
    loss_count: int = 0
    tiles_seen: int = 0
    warned_empty: bool = False
    lr: float = 0.0
    last_loss: float = float("nan")
    last_metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    out_of_time: bool = False
    norms_frozen: bool = False  # batch-norm statistics averaged and fixed (freeze_batch_norm)

    def wall_seconds(self) -> float:
        return self.earlier_wall_seconds + time.perf_counter() - self.began

    def saved(self) -> dict:
        return {
            "step": self.step,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "data_seconds": self.data_seconds,
            "step_seconds": self.step_seconds,
            "wall_seconds": self.wall_seconds(),
            "norms_frozen": self.norms_frozen,
        }

    def restore(self, saved: dict) -> None:
        self.step, self.best_value, self.best_step = (
            saved["step"],
            saved["best_value"],
            saved["best_step"],
        )
        self.data_seconds, self.step_seconds = saved["data_seconds"], saved["step_seconds"]
        self.earlier_wall_seconds = saved["wall_seconds"]
        self.norms_frozen = saved.get("norms_frozen", False)


def _train(
    config, run_dir, device, resume, progress, data, stop_after, began, ranks, notes, stop=None
):
    from tqdm.auto import tqdm

    # Set up: data, network, optimiser, sampler; the state of a resumed run.
    run = _set_up(config, run_dir, device, resume, data, ranks)
    note = holdout_note(config, run.data)
    if notes is not None and note is not None and ranks.writes:
        notes(note)
    if notes is not None and ranks.writes and config.precision == "auto":
        if training_precision("auto", device) == "bf16":
            notes(
                f"precision bf16: the {device.type.upper()} computes it natively (1.6-1.8x the "
                "steps of fp32 at equal time on ISBI 2012, scores no worse); --precision none "
                "for fp32"
            )
    state = RunState(
        began=began,
        loss_sum=torch.zeros((), device=device),
        empty_tiles=torch.zeros((), dtype=torch.long, device=device),
    )
    if resume:
        _restore(run, state)
    columns = ["step", "loss", "lr", "seconds", "data_fraction"]
    columns += [f"val_{name}" for name in config.metrics]
    log = CsvLog(run_dir / LOG if ranks.writes else None, columns, state.step if resume else None)
    if ranks.writes:
        card.ModelCard.from_entries(run.saved_config).write(run_dir)
    bar = tqdm(
        total=config.steps,
        initial=state.step,
        disable=not (progress and ranks.writes),
        unit="step",
        dynamic_ncols=True,
    )
    first_step = state.step  # where a compiled forward pass is compiled
    # A resumed run whose budget is spent takes no further step.
    state.out_of_time = (
        resume and run.budget is not None and state.earlier_wall_seconds >= run.budget
    )
    try:
        with _stop_on_interrupt(stop) as stop:
            while state.step < config.steps and not state.out_of_time:
                _step(run, state, compiling=state.step == first_step)
                bar.update(1)

                # Stop: the step count, the time budget, Ctrl-C or stop_after (all ranks agree).
                out_of_time = run.budget is not None and state.wall_seconds() >= run.budget
                stopping = stop.is_set() or (stop_after is not None and state.step >= stop_after)
                state.out_of_time, stopping = ddp.agree(ranks, out_of_time, stopping)
                finishing = state.step >= config.steps or state.out_of_time
                validating = bool(run.data.validation) and (
                    state.step % config.validate_every == 0 or finishing
                )

                # Report: a row of log.csv, with the validation metrics and the best model.
                if state.step % config.log_every == 0 or validating or finishing or stopping:
                    log.write(_report(run, state, validating))
                    bar.set_postfix(loss=f"{state.last_loss:.4f}")
                    if validating and ranks.writes:
                        plot_curves(log.rows, config.metrics, run_dir / CURVES)

                # Checkpoint: everything to continue exactly from here.
                if state.step % config.checkpoint_every == 0 and state.step < config.steps:
                    _checkpoint(run, state)
                if stopping:
                    state.interrupted = state.step < config.steps
                    break
    finally:
        bar.close()
        log.close()
    if not state.interrupted:
        freeze_norms_if_due(run, state, finishing=True)
    _checkpoint(run, state)
    return _finish(run, state, log.rows)


def _set_up(config, run_dir, device, resume, data, ranks) -> Run:
    """Read the data, build the network (from ``--init`` weights), its optimiser and sampler."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        if not ranks.writes:
            ddp.barrier(ranks)  # rank 0 fills the weight-map cache first
        data = prepare_data(config, run_dir / CACHE if config.cache_weights else None)
        if ranks.writes:
            ddp.barrier(ranks)
    init_weights, saved_config = _starting_point(config, run_dir, resume, data, ranks)
    # Drop-out draws from torch's global generator.
    torch.manual_seed(ddp.torch_seed(config.seed, ranks))
    model = build_model(config, data.in_channels, data.num_classes)
    if init_weights is not None:
        start_from(model, init_weights, str(Path(config.init) / io.MODEL_WEIGHTS))
    if config.freeze_encoder:
        freeze_encoder(model)
    model = model.to(device)
    memory_format = torch.preserve_format
    if config.channels_last:
        memory_format = torch.channels_last if config.dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=memory_format)
    training_mode(model, config)
    wrapped = ddp.wrap(model, ranks, device)  # the model itself in one process
    return Run(
        config=config,
        run_dir=run_dir,
        device=device,
        ranks=ranks,
        data=data,
        saved_config=saved_config,
        model=model,
        wrapped=wrapped,
        forward=_compiled(wrapped) if config.compile else wrapped,
        optimizer=build_optimizer(config, model),
        scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        sampler=build_sampler(config, data, device, ranks),
        memory_format=memory_format,
        budget=None if config.max_minutes is None else 60.0 * config.max_minutes,
    )


def _starting_point(config, run_dir, resume, data, ranks) -> tuple[dict | None, dict]:
    """The ``--init`` weights (None without) and the run's ``config.json``.

    The normalisation of ``data`` becomes that of the run being resumed or,
    with ``init_normalization="keep"``, of the init run.
    """
    init_weights, init_record = None, None
    if resume and (run_dir / io.MODEL_CONFIG).is_file():
        # The network was trained on the stored normalisation; keep it even if the images changed.
        stored = io.read_json(run_dir / io.MODEL_CONFIG)
        if stored.get("normalization") is not None:
            data.normalization = stored["normalization"]
        init_record = stored.get("init")
    elif config.init is not None:
        init_weights, init_config = load_init(config, data.in_channels, data.num_classes)
        init_record = init_config["init_record"]
        if config.init_normalization == "keep":
            data.normalization = init_config["normalization"]
    saved_config = run_config(config, data)
    if init_record is not None:
        saved_config["init"] = init_record
    if ranks.distributed:
        saved_config["processes"] = ranks.describe(config.batch_size, config.learning_rate)
    return init_weights, saved_config


def _restore(run: Run, state: RunState) -> None:
    """Continue from the checkpoint: weights, optimiser, every generator, the state."""
    path = run.run_dir / CHECKPOINT
    saved = load_checkpoint(path, run.model, run.optimizer)
    state.restore(saved)
    training_mode(run.model, run.config, state.norms_frozen)
    ddp.restore_generators(run.ranks, saved, run.sampler, path)
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])


def _checkpoint(run: Run, state: RunState) -> None:
    # Every rank's generators, so that each continues its own stream.
    states = ddp.gather_states(run.ranks, ddp.generator_state(run.sampler))
    if not run.ranks.writes:
        return
    save_checkpoint(
        run.run_dir / CHECKPOINT,
        run.model,
        run.optimizer,
        {
            **state.saved(),
            "sampler": run.sampler.state(),
            **({"ranks": states} if run.ranks.distributed else {}),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        },
    )


def _step(run: Run, state: RunState, compiling: bool) -> None:
    """One training step: sample and augment tiles, forward, loss, backward, update."""
    config, device = run.config, run.device
    freeze_norms_if_due(run, state)
    tick = time.perf_counter()
    images, labels, weights = run.sampler.sample(config.batch_size)
    images = images.to(device, non_blocking=True, memory_format=run.memory_format)
    labels = labels.to(device, non_blocking=True)
    weights = weights.to(device, non_blocking=True)
    state.empty_tiles += (weights.flatten(1).amax(1) <= 0).sum()
    state.tiles_seen += weights.shape[0]
    fetched = time.perf_counter()
    time_fraction = 0.0 if run.budget is None else state.wall_seconds() / run.budget
    state.lr = learning_rate_at(config, state.step, time_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = state.lr
    with _autocast(device, config.precision):
        logits = _forward(run, images, compiling)
    loss = compute_loss(config, logits, labels, weights)
    if config.loss == "ce":
        loss = ddp.scale_loss(run.ranks, loss, (labels != IGNORE).sum())
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.clip_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    state.step += 1
    state.loss_sum += loss.detach()
    state.loss_count += 1
    state.data_seconds += fetched - tick
    state.step_seconds += time.perf_counter() - tick


def _forward(run: Run, images: torch.Tensor, compiling: bool) -> torch.Tensor:
    """The network's logits; a compiler failure (first call only) falls back to eager."""
    try:
        return run.forward(images)
    except Exception as error:  # noqa: BLE001 - any compiler failure
        if run.forward is run.wrapped or not compiling:
            raise  # compiling happens in the first call only
        warnings.warn(
            f"torch.compile failed ({type(error).__name__}); training uncompiled", stacklevel=1
        )
        run.forward = run.wrapped
        return run.wrapped(images)


def _report(run: Run, state: RunState, validating: bool) -> dict:
    """The row of ``log.csv`` for this step: mean loss since the last row, validation metrics.

    A better validation score by ``keep_best`` saves ``model.safetensors``.
    """
    config = run.config
    state.last_loss = float(ddp.mean_over_ranks(run.ranks, state.loss_sum)) / state.loss_count
    if not math.isfinite(state.last_loss):
        raise FloatingPointError(
            f"training loss became {state.last_loss} at step {state.step}; "
            f"lower the learning rate (now {config.learning_rate})"
        )
    state.loss_sum.zero_()
    state.loss_count = 0
    _warn_empty_tiles(state)
    row = {
        "step": state.step,
        "loss": state.last_loss,
        "lr": state.lr,
        "seconds": state.step_seconds,
        "data_fraction": state.data_seconds / max(state.step_seconds, 1e-12),
    }
    if not (validating and run.ranks.writes):
        return row
    data = run.data
    state.last_metrics = validate(
        run.model, data.validation, config, data.normalization, data.output_shape, run.device
    )
    training_mode(run.model, config, state.norms_frozen)
    value = state.last_metrics[config.keep_best]
    better = state.best_value is None or (
        value < state.best_value if lower_is_better(config.keep_best) else value > state.best_value
    )
    # Before its statistics are frozen the network is not the one that will predict.
    better = better and (config.freeze_batch_norm is None or state.norms_frozen)
    if better:
        state.best_value, state.best_step = value, state.step
        card.save_model(run.run_dir, run.model, run.saved_config)
    return {**row, **{f"val_{name}": value for name, value in state.last_metrics.items()}}


def _warn_empty_tiles(state: RunState) -> None:
    if state.warned_empty or int(state.empty_tiles) < EMPTY_TILE_SHARE * state.tiles_seen:
        return
    state.warned_empty = True
    warnings.warn(
        f"{int(state.empty_tiles)} of the first {state.tiles_seen} training tiles held no "
        "labelled pixel (augmentation moved the labels out of view, or the images are small), "
        "so they teach nothing; use larger images, a smaller [augment] shift or --augment none",
        stacklevel=1,
    )


def _finish(run: Run, state: RunState, rows: list[dict]) -> dict:
    """Save the last and the kept model, draw the curves, calibrate the threshold and tune
    instances on the validation images; the summary."""
    config, run_dir, writes = run.config, run.run_dir, run.ranks.writes
    tuned = calibration = None
    if writes:
        card.save_model(run_dir, run.model, run.saved_config, name=LAST_WEIGHTS)
        if state.best_step is None:
            card.save_model(run_dir, run.model, run.saved_config)
        plot_curves(rows, config.metrics, run_dir / CURVES)
        if run.data.validation and not state.interrupted:
            probabilities = validation_probabilities(run_dir, run.data, config, run.device)
            calibration = calibrate(run_dir, run.data, config, probabilities)
            if config.label_mode != "classes":
                threshold = None if calibration is None else calibration["threshold"]
                truths = [item.instances for item in run.data.validation]
                tuned = tune_instances(run_dir, truths, probabilities, threshold)
    summary = {
        "run_dir": str(run_dir),
        "step": state.step,
        "steps": config.steps,
        "loss": state.last_loss,
        "best_metric": config.keep_best if state.best_step is not None else None,
        "best_value": state.best_value,
        "best_step": state.best_step,
        "validation": state.last_metrics,
        "seconds": state.step_seconds,
        "steps_per_second": state.step / max(state.step_seconds, 1e-12),
        "data_fraction": state.data_seconds / max(state.step_seconds, 1e-12),
        "interrupted": state.interrupted,
        "out_of_time": state.out_of_time,
        "wall_seconds": state.wall_seconds(),
        "input_shape": list(run.data.input_shape),
        "output_shape": list(run.data.output_shape),
        "num_parameters": sum(p.numel() for p in run.model.parameters()),
        "instances": tuned,
        "calibration": calibration,
        "precision": training_precision(config.precision, run.device),
    }
    if run.ranks.distributed:
        summary["processes"] = run.ranks.describe(config.batch_size, config.learning_rate)
    if writes:
        io.write_json(run_dir / SUMMARY, summary)
    return summary
