"""``unetile train``: train a U-Net on a folder of images and a folder of labels.

Options come from three places, later ones winning: the preset (``--preset``),
the TOML file (``--config``), the command line. With ``--resume`` the options
stored in the run folder come first, so ``unetile train --out RUN --resume``
alone continues a run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .. import io

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the 'tomli' package
    import tomli as tomllib

DESCRIPTION = """\
Train a U-Net (Ronneberger et al. 2015) on pairs of images and labels matched
by file stem (TIFF or PNG; 2D, multi-channel or 3D). The defaults are the
paper's recipe: SGD with momentum 0.99, one large tile per step (the largest
valid tile up to 572 px, output 388), weighted cross-entropy with the weight
map w0 = 10, sigma = 5 px, drop-out 0.5, elastic deformations.

The run folder (--out) receives model.safetensors + config.json (the model to
use: the best on the validation images by --keep-best, or the last one without
validation images), last.safetensors, checkpoint.safetensors (to --resume),
log.csv, curves.png, summary.json and cache/ (weight maps). Ctrl-C stops after
the current step with a checkpoint; --resume continues exactly where it stopped.

On several processes: torchrun --nproc_per_node N -m unetile train ... trains
with DistributedDataParallel (gloo on CPUs, NCCL on GPUs, one GPU a process);
each process draws its own tiles, the effective batch is N x --batch-size at
--lr as given, and only rank 0 writes the run folder.

Every option can also be set in a TOML file given with --config, by its long
name with '_' or '-' (e.g. learning_rate = 0.0001, tile_shape = [572, 572]) and
an [augment] table (elastic, elastic_sigma, elastic_grid, rotation, flip,
shift, gray, contrast, brightness, gamma). Command-line options override it.
The defaults shown are those of the 'paper' preset.
"""

EXAMPLE = """\
example (ISBI 2012 EM data, white = cell):
  unetile train --images isbi/train/images --labels isbi/train/labels \\
      --val-images isbi/val/images --val-labels isbi/val/labels \\
      --label-mode membrane --cell-value 255 --out runs/isbi
"""


def _defaults() -> dict:
    from ..train import TrainConfig

    return {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..train import INIT_NORMALIZATIONS, LOSSES, OPTIMIZERS, PRECISIONS, PRESETS, SCHEDULES

    parser = subparsers.add_parser(
        "train",
        help="train a U-Net on images and labels",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = _defaults()

    def option(group, flag, name, text, **kwargs):
        default = defaults[name]
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        shown = kwargs.pop("shown", default)
        if "metavar" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = {int: "N", float: "X"}.get(kwargs.get("type"), "VALUE")
        group.add_argument(
            flag, dest=name, default=None, help=f"{text} (default: {shown})", **kwargs
        )

    def switch(group, name, flag, text):
        group.add_argument(
            f"--{flag}",
            dest=name,
            default=None,
            action=argparse.BooleanOptionalAction,
            help=f"{text} (default: {'on' if defaults[name] else 'off'})",
        )

    run = parser.add_argument_group("run")
    option(run, "--images", "images", "folder of training images", metavar="DIR", shown="required")
    option(run, "--labels", "labels", "folder of training labels", metavar="DIR", shown="required")
    option(
        run,
        "--val-images",
        "val_images",
        "folder of validation images",
        metavar="DIR",
        shown="none",
    )
    option(
        run,
        "--val-labels",
        "val_labels",
        "folder of validation labels",
        metavar="DIR",
        shown="none",
    )
    option(run, "--out", "out", "run folder to write", metavar="RUN_DIR", shown="required")
    run.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file of options; the command line overrides it (default: none)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds another run or model, replacing its files",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its stored options",
    )
    option(
        run,
        "--preset",
        "preset",
        "named configuration filling the defaults: 'paper' (the paper's recipe) "
        "or 'cpu-fast' (base 16, instance norm, w0 10, sigma 2, tiles <= 572, Adam 1e-3 cosine, "
        "torch.compile)",
        choices=tuple(PRESETS),
    )
    run.add_argument(
        "--quiet", action="store_true", help="no progress bar and no summary (default: off)"
    )

    labels = parser.add_argument_group("labels")
    option(
        labels,
        "--label-mode",
        "label_mode",
        "'membrane': binary map, --cell-value marks cells (classes 0 = membrane, 1 = cell); "
        "'instances': 0 = background, one id per cell; 'classes': pixel value = class id",
        choices=("membrane", "instances", "classes"),
    )
    option(labels, "--cell-value", "cell_value", "cell value of a membrane map", type=int)
    option(
        labels,
        "--target",
        "target",
        "with --label-mode instances: 'two-class' (the paper: background / cell, a background "
        "line where cells touch) or 'three-class' (that line is class 2, border; instances "
        "grow from the cell interiors)",
        choices=("two-class", "three-class"),
    )
    option(
        labels,
        "--num-classes",
        "num_classes",
        "classes of the network",
        type=int,
        shown="2, or the largest class id + 1",
    )
    option(
        labels,
        "--foreground",
        "foreground",
        "class scored in validation (its probability map)",
        type=int,
    )
    option(
        labels,
        "--ignore-value",
        "ignore_value",
        "label value of unannotated pixels (scribbles, points, partial labels): no loss, "
        "no weight, not scored in validation",
        type=int,
        shown="none",
    )
    option(labels, "--dims", "dims", "2 for images, 3 for stacks", type=int, choices=(2, 3))
    option(
        labels,
        "--channels",
        "channels",
        "input channels the model expects: 1 (gray; gray stored as RGB is gray) or 3 (RGB; "
        "gray images become R = G = B); predict checks images against it",
        type=int,
        shown="those of the images",
    )
    option(
        labels,
        "--pixel-size",
        "pixel_size",
        "micrometres per pixel of the training images, one value or one per axis (z,y,x); "
        "overrides their TIFF metadata; stored for predict to compare",
        shown="read from the TIFF/OME-TIFF/ImageJ metadata",
    )

    weights = parser.add_argument_group("weight map (paper: w0 = 10, sigma = 5 px)")
    option(weights, "--w0", "w0", "amplitude of the border term", type=float)
    option(weights, "--sigma", "sigma", "width (pixels) of the border term", type=float)
    option(
        weights,
        "--class-weights",
        "class_weights",
        "class balancing term",
        choices=("balanced", "none"),
    )
    switch(weights, "cache_weights", "cache-weights", "cache weight maps in RUN_DIR/cache")

    network = parser.add_argument_group("network")
    option(network, "--depth", "depth", "resolution levels", type=int)
    option(network, "--base-channels", "base_channels", "channels of the first level", type=int)
    option(
        network,
        "--padding",
        "padding",
        "'valid' (paper, exact tiling) or 'same'",
        choices=("valid", "same"),
    )
    option(
        network,
        "--norm",
        "norm",
        "normalisation after each convolution",
        choices=("none", "batch", "instance"),
        shown="none",
    )
    option(
        network, "--dropout", "dropout", "drop-out at the end of the contracting path", type=float
    )

    finetune = parser.add_argument_group("fine-tuning")
    option(
        finetune,
        "--init",
        "init",
        "start from the model of this run folder (its network options become the defaults; "
        "they must match)",
        metavar="RUN_DIR",
        shown="none: He initialisation",
    )
    option(
        finetune,
        "--init-normalization",
        "init_normalization",
        "with --init: 'recompute' the intensity normalisation on the new images, or 'keep' "
        "the init run's (same microscope and settings)",
        choices=INIT_NORMALIZATIONS,
    )
    switch(
        finetune,
        "freeze_encoder",
        "freeze-encoder",
        "with --init: train only the expansive path and the classifier",
    )

    tiles = parser.add_argument_group("tiles and augmentation")
    option(
        tiles,
        "--tile",
        "tile_shape",
        "input tile in pixels: one size or one per axis (e.g. 572 or 16,132,132)",
        shown="the largest valid tile up to --max-tile whose output fits the smallest image",
    )
    option(
        tiles,
        "--max-tile",
        "max_tile",
        "upper bound (pixels) of the automatic tile",
        type=int,
        shown="572 in 2D, 132 in 3D",
    )
    option(tiles, "--batch-size", "batch_size", "tiles per step", type=int)
    option(
        tiles,
        "--augment",
        "augment",
        "'paper': elastic (sigma 10 px, 3x3 grid), rotation, flip, shift, gray values; "
        "'none': no augmentation; fine settings in the TOML [augment] table",
        choices=("paper", "none"),
        shown="paper",
    )

    optimisation = parser.add_argument_group("optimisation")
    option(optimisation, "--optimizer", "optimizer", "optimiser", choices=OPTIMIZERS)
    option(optimisation, "--lr", "learning_rate", "learning rate", type=float)
    option(optimisation, "--momentum", "momentum", "SGD momentum (paper: 0.99)", type=float)
    option(optimisation, "--weight-decay", "weight_decay", "weight decay", type=float)
    option(
        optimisation,
        "--schedule",
        "schedule",
        "learning-rate schedule: constant, cosine (to 0) or poly (power 0.9)",
        choices=SCHEDULES,
    )
    option(optimisation, "--warmup-steps", "warmup_steps", "linear warm-up steps", type=int)
    option(
        optimisation,
        "--loss",
        "loss",
        "'ce': weighted cross-entropy (paper); 'dice_ce': plus soft Dice",
        choices=LOSSES,
    )
    option(optimisation, "--dice-weight", "dice_weight", "factor of the Dice term", type=float)
    option(
        optimisation,
        "--clip-grad-norm",
        "clip_grad_norm",
        "clip the gradient norm to this value",
        type=float,
        shown="off",
    )
    option(optimisation, "--steps", "steps", "training steps", type=int)
    option(optimisation, "--seed", "seed", "seed of every random draw", type=int)
    option(
        optimisation,
        "--max-minutes",
        "max_minutes",
        "wall-clock budget: stop after this many minutes (the schedule follows steps or time, "
        "whichever is further along)",
        type=float,
        shown="none",
    )

    engine = parser.add_argument_group("engine")
    option(
        engine,
        "--device",
        "device",
        "'auto' (CUDA, else Apple MPS, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    option(
        engine,
        "--precision",
        "precision",
        "autocast precision: none, bf16, fp16 (CUDA, with gradient scaling)",
        choices=PRECISIONS,
    )
    option(engine, "--threads", "threads", "torch CPU threads", type=int, shown="torch's default")
    switch(engine, "channels_last", "channels-last", "channels-last memory layout")
    switch(engine, "deterministic", "deterministic", "torch deterministic algorithms")
    switch(
        engine,
        "compile",
        "compile",
        "torch.compile the training step's network (slow first step; falls back if it fails)",
    )

    monitoring = parser.add_argument_group("monitoring")
    option(monitoring, "--validate-every", "validate_every", "steps between validations", type=int)
    option(
        monitoring, "--checkpoint-every", "checkpoint_every", "steps between checkpoints", type=int
    )
    option(monitoring, "--log-every", "log_every", "steps between rows of log.csv", type=int)
    option(
        monitoring,
        "--metrics",
        "metrics",
        "validation metrics, comma-separated (see unetile evaluate)",
    )
    option(
        monitoring,
        "--keep-best",
        "keep_best",
        "metric that picks model.safetensors (errors minimised, scores maximised)",
    )
    switch(monitoring, "val_tta", "val-tta", "test-time augmentation in validation")
    parser.set_defaults(run=run_command)
    return parser


def read_toml(path: str | Path) -> dict:
    """Options of a TOML file as TrainConfig field names; InputError for unknown keys."""
    from ..train import TrainConfig

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise io.InputError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise io.InputError(f"{path}: not valid TOML ({error})") from None
    known = {f.name for f in fields(TrainConfig)}
    options = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise io.InputError(f"{path}: unknown option {key!r}; see 'unetile train --help'")
        options[name] = value
    if isinstance(options.get("augment"), dict):
        from ..augment import AugmentParams

        augment_fields = {f.name for f in fields(AugmentParams)}
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


def options_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line (None = not given)."""
    from ..train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return {
        name: value for name, value in vars(args).items() if name in names and value is not None
    }


def resolve_options(args: argparse.Namespace) -> dict:
    """The --init run's network < stored options (on --resume) < TOML file < command line."""
    options: dict = {}
    if args.resume and args.overwrite:
        raise io.InputError("--resume continues a run and --overwrite replaces it: give one")
    if args.resume:
        if args.out is None:
            raise io.InputError("--resume needs --out, the run folder to continue")
        from ..train import CHECKPOINT

        if not (Path(args.out) / CHECKPOINT).is_file():
            raise io.InputError(
                f"{args.out}: holds no checkpoint to resume; train without --resume"
            )
        stored = io.read_json(Path(args.out) / io.MODEL_CONFIG)
        options.update(stored.get("training", {}))
    if args.config is not None:
        file_options = read_toml(args.config)
        if isinstance(file_options.get("augment"), dict) and isinstance(
            options.get("augment"), dict
        ):
            file_options["augment"] = {**options["augment"], **file_options["augment"]}
        options.update(file_options)
    options.update(options_from_args(args))
    if options.get("init") is not None and not args.resume:
        from ..train import init_options

        options = {**init_options(options["init"]), **options}
    return options


def run_command(args: argparse.Namespace) -> int:
    from ..train import make_config, train

    options = resolve_options(args)
    try:
        config = make_config(**options)
    except (TypeError, ValueError) as error:
        where = f"{args.config} or the command line" if args.config else "command line"
        raise io.InputError(f"bad training option ({where}): {error}") from None
    for name in ("images", "labels", "out"):
        if getattr(config, name) is None:
            flag = "--" + name.replace("_", "-")
            raise io.InputError(f"{flag} is required (on the command line or in --config)")
    from ..parallel import ranks_from_environment

    ranks = ranks_from_environment()
    speaks = ranks.writes and not args.quiet  # under torchrun, rank 0 speaks for all
    if ranks.distributed and speaks:
        print(
            f"training on {ranks.world_size} processes: {config.batch_size} tile(s) each, an "
            f"effective batch of {ranks.world_size * config.batch_size} tiles at learning rate "
            f"{config.learning_rate:g} (as given, not scaled with the processes)"
        )
    try:
        summary = train(
            config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite
        )
    except FloatingPointError as error:  # diverged: say what to change, no traceback
        print(f"unetile train: error: {error}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        if not ranks.writes:
            return 130
        print(
            f"unetile train: stopped at step {summary['step']} of {summary['steps']}; "
            f"checkpoint saved; continue with: unetile train --out {config.out} --resume",
            file=sys.stderr,
        )
        return 130
    if speaks:
        if summary["out_of_time"]:
            print(f"stopped after --max-minutes {config.max_minutes} at step {summary['step']}")
        print(f"trained {summary['step']} steps in {summary['seconds']:.1f} s", end="")
        print(f" ({summary['steps_per_second']:.2f} steps/s, ", end="")
        print(f"{100 * summary['data_fraction']:.0f}% in data); loss {summary['loss']:.4f}")
        if summary["best_step"] is not None:
            print(
                f"best {summary['best_metric']} {summary['best_value']:.4f} "
                f"at step {summary['best_step']}"
            )
        print(f"model: {Path(config.out) / io.MODEL_WEIGHTS}")
    return 0
