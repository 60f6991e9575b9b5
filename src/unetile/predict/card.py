"""A run's ``config.json`` as one typed, versioned object: the :class:`ModelCard`.

It has one reader (:meth:`ModelCard.read`, which checks every entry that
prediction uses before a network is built) and one writer
(:meth:`ModelCard.write`); training writes through it and prediction reads
through it. The entries it does not type (the training options, the fits and
their evidence) are kept as they are, for people and for ``--resume``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, io
from ..io import MODEL_CONFIG, MODEL_WEIGHTS, InputError
from ..network.model import UNet, UNetConfig
from ..network.normalization import Normalization
from ..numbers import check_float, check_int
from .instances import InstanceOptions
from .postprocessing import PostProcessing

#: Bumped when an entry changes meaning; a card without one is version 1.
CARD_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """What a trained model is and how its outputs are made.

    Attributes
    ----------
    entries : dict
        Every entry of ``config.json`` (the typed ones included, as stored).
    network : UNetConfig
    normalization : Normalization or None
        Of the training images; None: trained on raw values.
    post : PostProcessing
        The labels' threshold and class, the instance options.
    pixel_size_um : tuple of float or None
    training_tile : tuple of int or None
        The output tile it was trained with (tile-dependent models predict with it).
    """

    entries: dict
    network: UNetConfig
    normalization: Normalization | None
    post: PostProcessing
    pixel_size_um: tuple[float, ...] | None = None
    training_tile: tuple[int, ...] | None = None

    @classmethod
    def from_entries(cls, entries: dict, source: str | os.PathLike = MODEL_CONFIG) -> ModelCard:
        """The card of ``entries``; InputError naming ``source`` for a bad entry."""
        if not isinstance(entries, dict) or not isinstance(entries.get("model"), dict):
            raise InputError(f"{source}: has no 'model' entry; is it a unetile run?")
        version = entries.get("card_version", 1)
        if not isinstance(version, int) or version > CARD_VERSION:
            raise InputError(
                f"{source}: card_version {version!r} is newer than this unetile reads "
                f"({CARD_VERSION}): upgrade unetile"
            )
        try:
            network = UNetConfig(**entries["model"])
        except (TypeError, ValueError) as error:
            raise InputError(f"{source}: bad 'model' entry ({error})") from None
        try:
            _check_entries(entries, network)
            post = PostProcessing.from_card(entries)
        except (TypeError, ValueError) as error:
            raise InputError(f"{source}: {error}") from None
        return cls(
            entries=entries,
            network=network,
            normalization=Normalization.of(entries.get("normalization")),
            post=post,
            pixel_size_um=_pixel_size(entries, network.dims),
            training_tile=_training_tile(entries, network.dims),
        )

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> ModelCard:
        """The card of a run folder; InputError for a folder that is none."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise InputError(
                f"{run_dir}: not a run folder; give the --out folder of 'unetile train'"
            )
        return cls.from_entries(io.read_json(run_dir / MODEL_CONFIG), run_dir / MODEL_CONFIG)

    def to_dict(self) -> dict:
        return stamped(self.entries)

    def write(self, run_dir: str | os.PathLike) -> None:
        """Write ``config.json`` into ``run_dir`` (atomically)."""
        write_entries(run_dir, self.entries)

    def updated(self, **entries) -> ModelCard:
        """This card with some entries replaced (checked as on reading)."""
        return ModelCard.from_entries({**self.entries, **entries})

    @classmethod
    def update(cls, run_dir: str | os.PathLike, **entries) -> ModelCard:
        """Replace entries of the card in ``run_dir``; returns the new card."""
        card = cls.read(run_dir).updated(**entries)
        card.write(run_dir)
        return card


def stamped(entries: dict) -> dict:
    """``entries`` as ``config.json`` holds them: with this unetile's version and the card's."""
    kept = {k: v for k, v in entries.items() if k not in ("unetile_version", "card_version")}
    return {"unetile_version": __version__, "card_version": CARD_VERSION, **kept}


def write_entries(run_dir: str | os.PathLike, entries: dict) -> None:
    """The one writer of ``config.json`` (atomic). :meth:`ModelCard.write` writes a checked
    card through it; :func:`save_model` writes what training gives, as it gives it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    io.write_json(Path(run_dir) / MODEL_CONFIG, stamped(entries))


def _pixel_size(entries: dict, dims: int) -> tuple[float, ...] | None:
    size = entries.get("pixel_size_um")
    if size is None:
        return None
    values = size if isinstance(size, list) else [size]
    return tuple(float(v) for v in (values * dims if len(values) == 1 else values))


def _training_tile(entries: dict, dims: int) -> tuple[int, ...] | None:
    shape = (entries.get("tile") or {}).get("output_shape")
    if not isinstance(shape, list) or len(shape) != dims:
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 65536 for s in shape):
        return None
    return tuple(shape)


# --------------------------------------------------------------------------
# The checks of the entries prediction uses (ValueError; the card names the file)
# --------------------------------------------------------------------------


def _check_entries(entries: dict, network: UNetConfig) -> None:
    if network.num_classes < 2:
        raise ValueError(
            f"model num_classes {network.num_classes}: a soft-max over one class is 1 "
            "everywhere, every label would be 0; a unetile model has 2 or more classes: "
            "train it again"
        )
    _check_normalization(entries, network)
    _check_pixel_size(entries.get("pixel_size_um"), network.dims)
    _check_classes(entries.get("classes", {}), network.num_classes)
    _check_calibration(entries.get("calibration"), network.num_classes)
    _check_instances(entries.get("instances"), network.num_classes)


def _check_normalization(entries: dict, network: UNetConfig) -> None:
    if "normalization" not in entries:
        raise ValueError(
            "has no 'normalization' entry (the mean and std of the training images), "
            "so prediction would see raw pixel values: train it again, or add "
            '"normalization": {"mean": [M], "std": [S]} (null: trained on raw values)'
        )
    normalization = entries["normalization"]
    if normalization is None:
        return
    if not isinstance(normalization, dict):
        raise ValueError("'normalization' must hold 'mean' and 'std' lists")
    for key in ("mean", "std"):
        values = normalization.get(key)
        values = values if isinstance(values, list) else [values]
        if len(values) not in (1, network.in_channels):
            raise ValueError(
                f"'normalization' {key} has {len(values)} values; the model has "
                f"{network.in_channels} input channel(s)"
            )
        for value in values:
            lowest = 0.0 if key == "std" else None
            check_float(f"normalization {key}", value, lowest, open_minimum=key == "std")


def _check_pixel_size(size, dims: int) -> None:
    if size is None:
        return
    values = size if isinstance(size, list) else [size]
    if len(values) not in (1, dims) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")
        for v in values
    ):
        raise ValueError(
            f"'pixel_size_um' must be 1 or {dims} positive numbers (micrometres per pixel "
            f"of the training images), got {size!r}; fix it or remove the entry"
        )


def _check_classes(classes, num_classes: int) -> None:
    if not isinstance(classes, dict):
        raise ValueError("'classes' must be a table such as {\"foreground\": 1}")
    if (
        "num_classes" in classes
        and check_int("classes num_classes", classes["num_classes"], 1) != num_classes
    ):
        raise ValueError(
            f"classes num_classes {classes['num_classes']} differs from the model's {num_classes}"
        )
    if "foreground" in classes:
        check_int("classes foreground", classes["foreground"], 0, num_classes - 1)


def _check_calibration(calibration, num_classes: int) -> None:
    if calibration is None:
        return
    if not isinstance(calibration, dict) or "threshold" not in calibration:
        raise ValueError("'calibration' must hold a 'threshold'")
    from ..numbers import check_threshold

    check_threshold(calibration["threshold"], "calibration threshold")
    if num_classes != 2:
        raise ValueError(f"'calibration' thresholds two classes; the model has {num_classes}")


def _check_instances(instances, num_classes: int) -> None:
    if instances is None:
        return
    if not isinstance(instances, dict):
        raise ValueError(
            "'instances' must be a table of instance options such as "
            '{"method": "watershed", "min_size": 10}; fix it or remove the entry'
        )
    try:
        InstanceOptions.from_dict(instances).check_classes(num_classes)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad 'instances' entry ({error}); fix it or remove the entry") from None


# --------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------


def save_model(run_dir: str | os.PathLike, model, config: dict, name: str = MODEL_WEIGHTS) -> None:
    """Save weights as safetensors and the run's card (``config`` entries), both atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    io.save_safetensors(state, run_dir / name)
    write_entries(run_dir, config)


def load_network(run_dir: str | os.PathLike, card: ModelCard, name: str = MODEL_WEIGHTS) -> UNet:
    """The network of ``card`` with the weights of ``run_dir/name``, in eval mode, without
    executing any code (no pickle). The stored shapes are checked against the card before
    anything is allocated, then every weight finite; InputError otherwise."""
    from safetensors import SafetensorError

    path = Path(run_dir) / name
    if not path.is_file():
        raise InputError(f"{path}: no such file; training may not have saved a model yet")
    with torch.device("meta"):  # the shapes the card implies: nothing is allocated
        expected = {
            k: tuple(v.shape) for k, v in UNet.from_config(card.network).state_dict().items()
        }
    try:
        header = io.safetensors_header(path)
        stored = {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__"}
        if stored != expected:
            difference = _shape_difference(stored, expected)
            raise InputError(f"{path}: weights do not fit {MODEL_CONFIG} ({difference})")
        state, _ = io.read_safetensors(path)
    except (SafetensorError, OSError, ValueError, AttributeError) as error:
        if isinstance(error, InputError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: not a safetensors weights file ({reason})") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"{path}: weight {key!r} holds NaN or infinite values; the model is "
                "broken: train it again or take an earlier checkpoint"
            )
    model = UNet.from_config(card.network)
    model.load_state_dict(state)
    return model.eval()


def _shape_difference(stored: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(stored))
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}"
    extra = sorted(set(stored) - set(expected))
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}"
    key = next(k for k in expected if stored[k] != expected[k])
    return f"{key!r} has shape {list(stored[key])}, the config implies {list(expected[key])}"


def load_model(run_dir: str | os.PathLike, name: str = MODEL_WEIGHTS):
    """``(model, config)`` of a run folder, the network carrying what the keyword API reads
    (``normalization``, the labels' ``threshold`` and ``foreground``, ``training_tile``).

    :meth:`unetile.predict.segmenter.Segmenter.load` is the same with the card and its
    post-processing held together.
    """
    card = ModelCard.read(run_dir)
    model = load_network(run_dir, card, name)
    carry(model, card)
    return model, card.entries


def carry(model: UNet, card: ModelCard) -> None:
    """Give a network what its card says prediction needs (the keyword API reads these)."""
    model.normalization = card.normalization
    model.threshold = card.post.threshold
    model.foreground = card.post.foreground
    model.training_tile = card.training_tile
