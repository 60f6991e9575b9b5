"""Training options: :class:`TrainConfig`, the presets, TOML files, old spellings.

Each field of :class:`TrainConfig` carries its command-line flag, its help
text and its group in ``dataclasses.field(metadata=...)``: ``unetile train``'s
parser and the README's table of options are generated from them, so the
defaults, the choices and the help have one source. Options are layered, later
ones winning: the preset (:data:`PRESETS`), the ``--init`` run's network, the
options stored in a run folder (``--resume``), a TOML file, the command line
(:func:`make_config` takes the merged result). The ``auto`` preset's plan comes
from :mod:`unetile.auto`, which this module builds on (auto imports nothing
of it: the defaults it plans from are passed in, :func:`auto_defaults`).

"Tile" is the output tile, in pixels, here as in ``unetile predict``: the
input tile adds the network's context margin on every side (572 -> 388 for
the paper's network). Until this release ``tile_shape`` named the input tile
and ``max_tile`` bounded it; both are still read (:func:`make_config`,
:func:`upgrade_stored_options`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import typing
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .. import io
from ..data.augment import AugmentParams
from ..data.dataset import LABEL_MODES, TARGETS
from ..network.model import UNetConfig, context_margin, is_valid_input_size
from ..network.tiling import Tiling
from ..numbers import check_int
from . import auto as planner  # config builds on auto, which reads no configuration

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the 'tomli' package
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly")
LOSSES = ("ce", "dice_ce")
PRECISIONS = ("none", "bf16", "fp16", "auto")
INIT_NORMALIZATIONS = ("recompute", "keep")
#: The network's fields that must agree between a run and the run it starts from.
ARCHITECTURE = ("dims", "in_channels", "num_classes", "depth", "base_channels", "padding", "norm")
#: Largest input tile (pixels per axis) of the automatic tile without ``max_tile``: the paper's.
PAPER_INPUT_TILE = {2: 572, 3: 132}

PRESETS: dict[str, dict] = {
    # The paper's recipe: every TrainConfig default as declared below.
    "paper": {},
    # A CPU in minutes: a quarter of the width, instance norm, Adam with a cosine schedule.
    "cpu-fast": {
        # Chosen on ISBI 2012 with a fixed CPU budget (README, benchmarks/isbi2012.py):
        # 16 base channels at the paper's 572 tile did more, better steps than 32
        # channels; without w_c and drop-out, instance norm cut the Rand error of
        # a short run from 0.16 to 0.07; with sigma = 5 the border term weighs
        # every ISBI membrane (all are gaps of a few px) and draws them too thick
        # at 0.5; sigma = 2 keeps the paper's w0 = 10 for the narrowest gaps only.
        "base_channels": 16,
        "norm": "instance",
        "dropout": 0.0,
        "class_weights": "none",
        "w0": 10.0,
        "sigma": 2.0,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "schedule": "cosine",
        "steps": 3000,
        "validate_every": 250,
        "checkpoint_every": 250,
        # 1.23x the steps in 4 minutes (699 against 568), after ~30 s of compiling.
        "compile": True,
        # bf16 where native: 1.6-1.8x the steps at equal time on ISBI 2012, scores no worse.
        "precision": "auto",
    },
    # What the data and the device say (unetile.train.auto chooses the weight map, tile, depth,
    # width, normalisation, augmentation and budget; these are the rest).
    "auto": {
        "dropout": 0.0,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "schedule": "cosine",
        # unetile.train.auto sets the steps a measured step time allows; the budget ends the run.
        "validate_every": 250,
        "checkpoint_every": 250,
        "compile": True,
        "precision": "auto",
    },
}
"""Named configurations: each fills TrainConfig defaults; explicit options override them."""

#: Groups of ``unetile train --help``, in order.
GROUPS = (
    "run",
    "labels",
    "weight map (paper: w0 = 10, sigma = 5 px)",
    "network",
    "fine-tuning",
    "tiles and augmentation",
    "optimisation",
    "engine",
    "monitoring",
)
RUN, LABELS, WEIGHTS, NETWORK, FINE_TUNING, TILES, OPTIMISATION, ENGINE, MONITORING = GROUPS


def option(default=MISSING, *, group, help, flag=None, choices=None, shown=None, metavar=None):
    """A TrainConfig field with its command line: flag (``--name`` by default), help, group.

    ``choices`` are checked for string values; ``shown`` replaces the
    default in the help where the value itself says little (None, a rule).
    """
    metadata = dict(
        group=group, help=help, flag=flag, choices=choices, shown=shown, metavar=metavar
    )
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; serialises to ``config.json`` ``"training"``.

    The defaults are the paper's (section 3). Each field's ``metadata`` holds
    its flag, help text and group: ``unetile train --help`` and
    ``docs/options.md`` (:func:`options_table`) describe them all. Lengths are
    pixels; ``tile`` and ``max_tile`` are output sizes.
    ``preset`` names the preset whose values filled the defaults.
    """

    images: str | None = option(
        None, group=RUN, help="folder of training images", metavar="DIR", shown="required"
    )
    labels: str | None = option(
        None, group=RUN, help="folder of training labels", metavar="DIR", shown="required"
    )
    val_images: str | None = option(
        None, group=RUN, help="folder of validation images", metavar="DIR", shown="none"
    )
    val_labels: str | None = option(
        None, group=RUN, help="folder of validation labels", metavar="DIR", shown="none"
    )
    holdout: float | None = option(
        None,
        group=RUN,
        help="without --val-images, hold out this share (at most 0.5) of the training data for "
        "validation "
        "(the kept model, the calibrated threshold): whole images when there are 4 or more, "
        "else a strip at one end of each image; chosen from the file names, not the seed; "
        "--no-holdout turns it off",
        metavar="FRACTION",
        shown="none",
    )
    out: str | None = option(
        None, group=RUN, help="run folder to write", metavar="RUN_DIR", shown="required"
    )
    preset: str = option(
        "paper",
        group=RUN,
        choices=tuple(PRESETS),
        help="named configuration filling the defaults: 'paper' (the paper's recipe), "
        "'cpu-fast' (base 16, instance norm, w0 10, sigma 2, Adam 1e-3 cosine, torch.compile) "
        "or 'auto' (measured from the training data and the device; printed before training)",
    )
    auto: dict | None = option(
        None,
        group=RUN,
        flag=False,
        help="the plan of --preset auto: fingerprint, choices and reasons (written by unetile)",
        shown="none",
    )
    label_mode: str = option(
        "membrane",
        group=LABELS,
        choices=LABEL_MODES,
        help="'membrane': binary map, --cell-value marks cells (classes 0 = membrane, "
        "1 = cell); 'instances': 0 = background, one id per cell; 'classes': pixel value "
        "= class id",
    )
    cell_value: int = option(255, group=LABELS, help="cell value of a membrane map")
    target: str = option(
        "two-class",
        group=LABELS,
        choices=TARGETS,
        help="with --label-mode instances: 'two-class' (the paper: background / cell, a "
        "background line where cells touch) or 'three-class' (that line is class 2, border; "
        "instances grow from the cell interiors)",
    )
    num_classes: int | None = option(
        None, group=LABELS, help="classes of the network", shown="2, or the largest class id + 1"
    )
    foreground: int = option(
        1, group=LABELS, help="class scored in validation (its probability map)"
    )
    ignore_value: int | None = option(
        None,
        group=LABELS,
        help="label value of unannotated pixels (scribbles, points, partial labels): no loss, "
        "no weight, not scored in validation",
        shown="none",
    )
    dims: int = option(2, group=LABELS, choices=(2, 3), help="2 for images, 3 for stacks")
    channels: int | None = option(
        None,
        group=LABELS,
        help="input channels the model expects: 1 (gray; gray stored as RGB is gray) or 3 "
        "(RGB; gray images become R = G = B); predict checks images against it",
        shown="those of the images",
    )
    pixel_size: tuple[float, ...] | None = option(
        None,
        group=LABELS,
        help="micrometres per pixel of the training images, one value or one per axis "
        "(z,y,x); overrides their TIFF metadata; stored for predict to compare",
        shown="read from the TIFF/OME-TIFF/ImageJ metadata",
    )
    w0: float = option(10.0, group=WEIGHTS, help="amplitude of the border term")
    sigma: float = option(5.0, group=WEIGHTS, help="width (pixels) of the border term")
    class_weights: str = option(
        "balanced", group=WEIGHTS, choices=("balanced", "none"), help="class balancing term"
    )
    cache_weights: bool = option(True, group=WEIGHTS, help="cache weight maps in RUN_DIR/cache")
    depth: int = option(5, group=NETWORK, help="resolution levels")
    base_channels: int = option(64, group=NETWORK, help="channels of the first level")
    padding: str = option(
        "valid",
        group=NETWORK,
        choices=("valid", "same"),
        help="'valid' (paper, exact tiling) or 'same'",
    )
    norm: str | None = option(
        None,
        group=NETWORK,
        choices=("none", "batch", "instance"),
        help="normalisation after each convolution",
        shown="none",
    )
    dropout: float = option(0.5, group=NETWORK, help="drop-out at the end of the contracting path")
    freeze_batch_norm: float | None = option(
        None,
        group=NETWORK,
        help="with --norm batch: at this share of the run (0-1), set the statistics to their "
        "average over whole training images (no augmentation) and freeze them for the rest, so "
        "that prediction does not depend on the tile",
        shown="off",
        metavar="SHARE",
    )

    init: str | None = option(
        None,
        group=FINE_TUNING,
        help="start from the model of this run folder (its network options become the "
        "defaults; they must match)",
        metavar="RUN_DIR",
        shown="none: He initialisation",
    )
    init_normalization: str = option(
        "recompute",
        group=FINE_TUNING,
        choices=INIT_NORMALIZATIONS,
        help="with --init: 'recompute' the intensity normalisation on the new images, or "
        "'keep' the init run's (same microscope and settings)",
    )
    freeze_encoder: bool = option(
        False,
        group=FINE_TUNING,
        help="with --init: train only the expansive path and the classifier",
    )
    tile: tuple[int, ...] | None = option(
        None,
        group=TILES,
        help="output tile in pixels, as in 'unetile predict': one size or one per axis "
        "(e.g. 388, the paper's, or 20,92,92 for a depth-3 3D network); the network reads "
        "its context margin around it (572 px in for 388 out). An input size that is no "
        "output size (572) is still read as before this release, with a warning",
        shown="the largest valid tile up to --max-tile whose output fits the smallest image",
    )
    max_tile: int | None = option(
        None,
        group=TILES,
        help="upper bound (pixels) of the automatic output tile",
        shown="that of the paper's 572 px input tile in 2D (388 at depth 5), "
        "of a 132 px input in 3D",
    )
    batch_size: int = option(1, group=TILES, help="tiles per step")
    augment: AugmentParams = option(
        AugmentParams,
        group=TILES,
        choices=("paper", "none"),
        help="'paper': elastic (sigma 10 px, 3x3 grid), rotation, flip, shift, gray values; "
        "'none': no augmentation; fine settings in the TOML [augment] table",
        shown="paper",
    )
    optimizer: str = option("sgd", group=OPTIMISATION, choices=OPTIMIZERS, help="optimiser")
    # The paper gives none. With its He init (logits ~20 at the start) and momentum
    # 0.99, larger rates gave NaN within 5-50 steps at small tiles
    # (benchmarks/learning_rate.py; README, Presets).
    learning_rate: float = option(1e-4, group=OPTIMISATION, flag="--lr", help="learning rate")
    momentum: float = option(0.99, group=OPTIMISATION, help="SGD momentum (paper: 0.99)")
    weight_decay: float = option(0.0, group=OPTIMISATION, help="weight decay")
    schedule: str = option(
        "constant",
        group=OPTIMISATION,
        choices=SCHEDULES,
        help="learning-rate schedule: constant, cosine (to 0) or poly (power 0.9)",
    )
    warmup_steps: int = option(0, group=OPTIMISATION, help="linear warm-up steps")
    loss: str = option(
        "ce",
        group=OPTIMISATION,
        choices=LOSSES,
        help="'ce': weighted cross-entropy (paper); 'dice_ce': plus soft Dice",
    )
    dice_weight: float = option(1.0, group=OPTIMISATION, help="factor of the Dice term")
    clip_grad_norm: float | None = option(
        None, group=OPTIMISATION, help="clip the gradient norm to this value", shown="off"
    )
    steps: int = option(10000, group=OPTIMISATION, help="training steps")
    seed: int = option(0, group=OPTIMISATION, help="seed of every random draw")
    max_minutes: float | None = option(
        None,
        group=OPTIMISATION,
        help="wall-clock budget: stop after this many minutes, all resumed parts together (the "
        "schedule follows steps or time, whichever is further along)",
        shown="none",
    )
    device: str = option(
        "auto",
        group=ENGINE,
        help="'auto' (CUDA, else Apple MPS, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    precision: str = option(
        "none",
        group=ENGINE,
        choices=PRECISIONS,
        help="autocast precision: none (fp32), bf16, fp16 (CUDA, with gradient scaling), or "
        "auto: bf16 where the processor computes it natively, else none",
    )
    threads: int | None = option(
        None, group=ENGINE, help="torch CPU threads", shown="torch's default"
    )
    channels_last: bool = option(False, group=ENGINE, help="channels-last memory layout")
    deterministic: bool = option(False, group=ENGINE, help="torch deterministic algorithms")
    compile: bool = option(
        False,
        group=ENGINE,
        help="torch.compile the training step's network (slow first step, tens of seconds; "
        "falls back if it fails)",
    )
    validate_every: int = option(500, group=MONITORING, help="steps between validations")
    checkpoint_every: int = option(500, group=MONITORING, help="steps between checkpoints")
    log_every: int = option(10, group=MONITORING, help="steps between rows of log.csv")
    metrics: tuple[str, ...] = option(
        ("pixel_error", "rand_error", "iou"),
        group=MONITORING,
        help="validation metrics, comma-separated (see unetile evaluate)",
    )
    keep_best: str = option(
        "rand_error",
        group=MONITORING,
        help="metric that picks model.safetensors (errors minimised, scores maximised)",
    )
    val_tta: bool = option(
        False, group=MONITORING, help="test-time augmentation (8 flips and rotations) in validation"
    )

    def __post_init__(self):
        for item in fields(self):
            allowed, value = item.metadata["choices"], getattr(self, item.name)
            if isinstance(value, str) and allowed and value not in allowed:
                raise ValueError(f"{item.name} must be one of {allowed}, got {value!r}")
        self._check_numbers()
        if self.tile is not None and len(self.tile) not in (1, self.dims):
            raise ValueError(f"tile {self.tile} needs 1 or {self.dims} sizes for dims={self.dims}")
        from ..evaluate.metrics import METRICS

        unknown = [name for name in self.metrics if name not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics must be names from {METRICS}, got {self.metrics}")
        if self.keep_best not in self.metrics:
            raise ValueError(
                f"keep_best {self.keep_best!r} must be one of the metrics {self.metrics}"
            )
        if self.ignore_value is not None and "warping_error" in self.metrics:
            raise ValueError("the warping error needs complete labels; drop it with ignore_value")
        if self.freeze_encoder and self.init is None:
            raise ValueError("freeze_encoder keeps trained weights; give init, the run to start")
        if self.target != "two-class" and self.label_mode != "instances":
            raise ValueError(
                f"target {self.target!r} needs instance labels: use label_mode 'instances'"
            )
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("val_images and val_labels go together; give both or neither")
        if self.pixel_size is not None:
            from ..predict.scale import check_pixel_size

            check_pixel_size(self.pixel_size, self.dims, "pixel_size")
        # Fail early on a bad architecture rather than after reading the data.
        self.model_config(in_channels=1, num_classes=max(2, self.num_classes or 2))
        self._read_input_tile()

    def _check_numbers(self) -> None:
        """Every number whole or finite, of its type and in range (TOML, JSON and CLI alike)."""
        from ..numbers import MAX_CLASSES, check_float

        def whole(name, low, high=None, optional=False):
            value = getattr(self, name)
            if not (optional and value is None):
                object.__setattr__(self, name, check_int(name, value, low, high))

        def real(name, low, high=None, open_low=False, optional=False):
            value = getattr(self, name)
            if not (optional and value is None):
                object.__setattr__(self, name, check_float(name, value, low, high, open_low))

        for name in ("steps", "validate_every", "checkpoint_every", "log_every"):
            whole(name, 1, 10**9)
        whole("batch_size", 1, 4096)
        whole("warmup_steps", 0, 10**9)
        whole("seed", 0, 2**63 - 1)
        whole("cell_value", None)
        whole("ignore_value", None, optional=True)
        whole("num_classes", 2, MAX_CLASSES, optional=True)
        whole("foreground", 0, MAX_CLASSES - 1)
        whole("threads", 1, 1024, optional=True)
        whole("channels", 1, 1024, optional=True)
        whole("max_tile", 1, 65536, optional=True)
        if self.dims not in (2, 3) or isinstance(self.dims, bool):
            raise ValueError(f"dims must be 2 or 3, got {self.dims!r}")
        real("learning_rate", 0.0, 10.0, open_low=True)
        real("momentum", 0.0, 1.0)
        if self.momentum == 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        real("w0", 0.0, 1000.0)
        real("sigma", 0.0, 1000.0, open_low=True)
        real("dice_weight", 0.0, 1000.0)
        real("weight_decay", 0.0, 1000.0)
        real("clip_grad_norm", 0.0, None, open_low=True, optional=True)
        real("max_minutes", 0.0, 10**7, open_low=True, optional=True)
        real("holdout", 0.0, 0.5, open_low=True, optional=True)
        real("freeze_batch_norm", 0.0, 1.0, optional=True)
        if self.freeze_batch_norm is not None and self.norm != "batch":
            raise ValueError(
                f"freeze_batch_norm needs norm 'batch' (it freezes batch-norm statistics), "
                f"got norm {self.norm!r}"
            )
        if self.tile is not None:
            object.__setattr__(
                self,
                "tile",
                tuple(check_int("tile entry (pixels)", v, 1, 65536) for v in self.tile),
            )
        for item in fields(self):
            if item.type == "bool" and not isinstance(getattr(self, item.name), bool):
                raise ValueError(
                    f"{item.name} must be true or false, got {getattr(self, item.name)!r}"
                )
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a name such as 'cpu' or 'cuda', got {self.device!r}")

    def _read_input_tile(self) -> None:
        """A tile given as an input size (the meaning before this release) becomes its output;
        a size that is neither gets a ValueError naming the valid tiles nearby."""
        if self.tile is None or all(
            is_valid_output_size(size, self.depth, self.padding) for size in self.tile
        ):
            return
        if not all(is_valid_input_size(size, self.depth, self.padding) for size in self.tile):
            for size in self.tile:
                check_output_tile(size, self.depth, self.padding)
        output = input_to_output(self.tile, self.depth, self.padding)
        warnings.warn(
            f"tile {_sizes(self.tile)} is an input size; the tile is now the output tile, as in "
            f"'unetile predict': training with tile {_sizes(output)} (input {_sizes(self.tile)}); "
            f"write --tile {_sizes(output)} (the input reading ends with the next release)",
            FutureWarning,
            stacklevel=2,
        )
        object.__setattr__(self, "tile", output)

    def model_config(self, in_channels: int, num_classes: int) -> UNetConfig:
        """The network of this run for the given data."""
        return UNetConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            depth=self.depth,
            base_channels=self.base_channels,
            padding=self.padding,
            dropout=self.dropout,
            norm=self.norm,
            dims=self.dims,
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, options: dict) -> TrainConfig:
        """Build from ``to_dict`` output, TOML or CLI options; ValueError on unknown keys."""
        return make_config(**options)


def _sizes(shape) -> str:
    return ",".join(str(size) for size in shape)


def is_valid_output_size(size: int, depth: int = 5, padding: str = "valid") -> bool:
    """Whether ``size`` pixels is the output of a valid input tile (388 for the paper's net)."""
    return Tiling(depth, padding).is_valid(size)


def check_output_tile(size: int, depth: int = 5, padding: str = "valid") -> None:
    """ValueError naming the valid output tiles next to ``size`` when it is not one."""
    tiling = Tiling(depth, padding)
    if tiling.is_valid(size):
        return
    below, above = tiling.at_most(size), tiling.at_least(size)
    nearby = f"{below} or {above}" if below < size else f"{above}"
    raise ValueError(
        f"tile {size} is not an output size of a depth-{depth} {padding!r} U-Net; valid tiles "
        f"nearby: {nearby}"
    )


def input_to_output(input_shape, depth: int, padding: str) -> tuple[int, ...]:
    """Output tile of valid input sizes: the context margin off each side (572 -> 388)."""
    return tuple(int(size) - 2 * context_margin(depth, padding) for size in input_shape)


# --------------------------------------------------------------------------
# Options from a preset, files and the command line.
# --------------------------------------------------------------------------


def field_defaults() -> dict:
    """Each TrainConfig field's default value."""
    config = TrainConfig()
    return {item.name: getattr(config, item.name) for item in fields(TrainConfig)}


def field_type(item) -> type | None:
    """``int``, ``float`` or ``bool`` for a field of that type (optional or not), else None."""
    hint = _type_hints()[item.name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool) else None


@functools.cache
def _type_hints() -> dict:
    # Resolving the annotations costs about 1 ms; each command line asks for every field.
    return typing.get_type_hints(TrainConfig)


#: Option names still read, with a warning, though no longer fields.
OLD_NAMES = ("tile_shape",)


def _coerce(name: str, value):
    """Convert JSON/TOML/CLI values to the field's Python type (lists to tuples...)."""
    if name == "augment":
        if isinstance(value, AugmentParams):
            return value
        if isinstance(value, str):
            if value == "none":
                return AugmentParams.none()
            if value == "paper":
                return AugmentParams()
            raise ValueError(f"augment must be 'paper', 'none' or a table, got {value!r}")
        if not isinstance(value, dict):
            raise ValueError(f"augment must be a table of AugmentParams fields, got {value!r}")
        return AugmentParams.from_dict(value)
    if name == "pixel_size" and value is not None:
        if isinstance(value, int | float):
            return (float(value),)
        if isinstance(value, str):
            value = [part for part in value.replace("x", ",").split(",") if part.strip()]
        return tuple(float(part) for part in value)
    if name in ("tile", "tile_shape", "metrics") and value is not None:
        if isinstance(value, int):
            return (value,)
        if isinstance(value, str):
            if name != "metrics":  # "388", "388,388" or "20x92x92"
                parts = [part.strip() for part in value.replace("x", ",").split(",")]
                parts = [part for part in parts if part]
                if not parts or not all(part.isdigit() for part in parts):
                    raise ValueError(
                        f"{name} must be whole pixel sizes such as 388 or 20,92,92, got {value!r}"
                    )
                value = [int(part) for part in parts]
            else:
                value = [part.strip() for part in value.split(",") if part.strip()]
        return tuple(value)
    if name in ("norm",) and value in ("none", ""):
        return None
    paths = ("images", "labels", "val_images", "val_labels", "out", "init")
    if name in paths and value is not None:
        return str(value)
    return value


def make_config(preset: str | None = None, **options) -> TrainConfig:
    """A TrainConfig from a preset plus explicit options (the options win).

    Parameters
    ----------
    preset : str or None
        Key of :data:`PRESETS`; None takes ``options["preset"]`` or "paper".
    **options
        TrainConfig fields. An unknown name raises ValueError naming it.
        ``tile_shape``, the input tile before this release, is read as the
        ``tile`` it gives, with a FutureWarning.

    Examples
    --------
    >>> make_config("cpu-fast", steps=10).base_channels
    16
    """
    known = {item.name for item in fields(TrainConfig)}
    unknown = sorted(set(options) - known - set(OLD_NAMES))
    if unknown:
        raise ValueError(f"unknown training option {unknown[0]!r}")
    preset = preset or options.pop("preset", None) or "paper"
    options.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if preset == "auto" and options.get("auto") is None:
        options = _planned(options)
    merged = {**PRESETS[preset], **options, "preset": preset}
    if "tile_shape" in merged:
        merged = _read_tile_shape(merged, warn=True)
    return TrainConfig(**{name: _coerce(name, value) for name, value in merged.items()})


def auto_defaults() -> dict:
    """Each TrainConfig field's value under the auto preset before its plan fills it in."""
    return {**field_defaults(), **PRESETS["auto"]}


def _planned(options: dict) -> dict:
    """``options`` with what :func:`.auto.plan` chose where they are silent, and the plan.

    Without training folders (a config built before the data is known) the
    preset's fixed values stand alone and nothing is measured.
    """
    if options.get("images") is None or options.get("labels") is None:
        return options
    timed = ("base_channels", "steps")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(options.get(n) is None for n in timed):
        raise ValueError(
            "--preset auto times this device, and each process would time it apart: write the "
            "plan once with 'unetile plan IMAGES LABELS ... > plan.toml' and start torchrun "
            "with --config plan.toml"
        )

    from ..data.dataset import check_training_extents

    check_training_extents(options["images"], options["labels"])  # as training would refuse
    defaults = auto_defaults()
    typed = dict(options)
    if options.get("tile") is not None:  # "388" from the command line: the plan times it
        tile = _coerce("tile", options["tile"])
        typed["tile"] = tile * options.get("dims", defaults["dims"]) if len(tile) == 1 else tile
    record = planner.plan(typed, defaults=defaults)
    return {**record["choices"], **options, "auto": record}


def _read_tile_shape(options: dict, warn: bool) -> dict:
    """Options with the input tile ``tile_shape`` (before this release) as the output ``tile``."""
    options = dict(options)
    input_shape = _coerce("tile_shape", options.pop("tile_shape"))
    if input_shape is None:
        return options
    if options.get("tile") is not None:
        raise ValueError("give the output tile 'tile' only; 'tile_shape' is its old input form")
    defaults = field_defaults()
    depth = options.get("depth", defaults["depth"])
    padding = options.get("padding", defaults["padding"])
    for size in input_shape:
        check_int("tile_shape entry (pixels)", size, 1, 65536)
        if not is_valid_input_size(size, depth, padding):
            raise ValueError(
                f"tile_shape {size} (an input size) is not valid for a depth-{depth} {padding!r} "
                "U-Net; give 'tile', the output tile, instead"
            )
    options["tile"] = input_to_output(input_shape, depth, padding)
    if warn:
        warnings.warn(
            f"'tile_shape' (the input tile) is replaced by 'tile', the output tile: read as "
            f"tile = {_sizes(options['tile'])}; write that (the old name ends with the next "
            "release)",
            FutureWarning,
            stacklevel=3,
        )
    return options


def upgrade_stored_options(training: dict) -> dict:
    """The ``"training"`` options of a run's ``config.json`` in today's terms, silently.

    A run from before this release stored the input tile as ``tile_shape`` and
    bounded the input with ``max_tile``; they become the same output ``tile``
    and output bound, so ``--resume`` continues with the very same tiles.
    """
    if "tile_shape" not in training:
        return training
    options = _read_tile_shape(training, warn=False)
    if options.get("max_tile") is not None:
        defaults = field_defaults()
        depth = options.get("depth", defaults["depth"])
        margin = context_margin(depth, options.get("padding", defaults["padding"]))
        options["max_tile"] = max(1, options["max_tile"] - 2 * margin)
    return options


def note_input_max_tile(options: dict) -> None:
    """Warn where ``max_tile`` reads as an input size: it bounded the input before this release."""
    defaults = field_defaults()
    depth = options.get("depth", defaults["depth"])
    padding = options.get("padding", defaults["padding"])
    bound = options["max_tile"]
    with contextlib.suppress(TypeError, ValueError):  # make_config names a bad value
        if is_valid_output_size(bound, depth, padding) or not is_valid_input_size(
            bound, depth, padding
        ):
            return
        former = input_to_output((bound,), depth, padding)[0]
        largest_input = bound + 2 * context_margin(depth, padding)
        warnings.warn(
            f"max_tile {bound} now bounds the output tile (inputs up to {largest_input} px); "
            f"until this release it bounded the input: for that write max_tile {former}",
            FutureWarning,
            stacklevel=2,
        )


def read_toml(path: str | Path) -> dict:
    """Options of a TOML file as TrainConfig field names; InputError for unknown keys."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise io.InputError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise io.InputError(f"{path}: not valid TOML ({error})") from None
    known = {item.name for item in fields(TrainConfig)} | set(OLD_NAMES)
    options = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise io.InputError(f"{path}: unknown option {key!r}; see 'unetile train --help'")
        options[name] = value
    if isinstance(options.get("augment"), dict):
        augment_fields = {item.name for item in fields(AugmentParams)}
        augment = {}
        for key, value in options["augment"].items():
            name = key.replace("-", "_")
            if name not in augment_fields:
                raise io.InputError(
                    f"{path}: unknown option {key!r} in [augment]; known: {sorted(augment_fields)}"
                )
            augment[name] = value
        options["augment"] = augment
    return options


def init_run_config(run_dir: str | Path) -> dict:
    """The ``config.json`` of the run an ``--init`` names; InputError when it is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise io.InputError(f"{run_dir}: --init needs a run folder of 'unetile train'")
    stored = io.read_json(run_dir / io.MODEL_CONFIG)
    if not isinstance(stored.get("model"), dict):
        raise io.InputError(f"{run_dir / io.MODEL_CONFIG}: has no 'model' entry; not a unetile run")
    return stored


def init_options(run_dir: str | Path) -> dict:
    """The architecture of the run in ``run_dir`` as TrainConfig options (for ``--init``).

    A fine-tuning run takes these unless told otherwise, so that
    ``unetile train --init RUN`` needs no network options.
    """
    stored = init_run_config(run_dir)["model"]
    return {name: stored[name] for name in ARCHITECTURE if name not in ("in_channels",)}


def options_table() -> str:
    """The options as a Markdown table (TOML name, flag, default, meaning) for the README."""
    defaults = field_defaults()
    rows = ["| TOML name | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for item in fields(TrainConfig):
        meta = item.metadata
        if meta["flag"] is False:
            continue
        flag = meta["flag"] or "--" + item.name.replace("_", "-")
        rows.append(
            f"| `{item.name}` | `{flag}` | {shown_default(item, defaults)} | {meta['help']} |"
        )
    return "\n".join(rows)


def shown_default(item, defaults: dict) -> str:
    """The default of a field as ``--help`` states it."""
    if item.metadata["shown"] is not None:
        return item.metadata["shown"]
    value = defaults[item.name]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)
