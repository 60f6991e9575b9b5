"""``unetile train``: train a U-Net on a folder of images and a folder of labels.

Options come from three places, later ones winning: the preset (``--preset``),
the TOML file (``--config``), the command line. With ``--resume`` the options
stored in the run folder come first, so ``unetile train --out RUN --resume``
alone continues a run. The training folders are the two positional arguments
or --images and --labels (either way, or in the TOML file).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from .. import __version__, io

DESCRIPTION = """\
Train a U-Net (Ronneberger et al. 2015) on pairs of images and labels matched
by file stem (TIFF or PNG; 2D, multi-channel or 3D), from the folders IMAGES
and LABELS (or --images and --labels). The defaults are the
paper's recipe: SGD with momentum 0.99, one large tile per step (the largest
valid one up to the paper's: 572 px in, 388 px out), weighted cross-entropy
with the weight map w0 = 10, sigma = 5 px, drop-out 0.5, elastic deformations.
A tile (--tile, --max-tile) is the output tile, as in 'unetile predict'.

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
name with '_' or '-' (e.g. learning_rate = 0.0001, tile = [388, 388]) and
an [augment] table (elastic, elastic_sigma, elastic_grid, rotation, flip,
shift, gray, contrast, brightness, gamma). Command-line options override it.
The defaults shown are those of the 'paper' preset. 'unetile plan IMAGES
LABELS > plan.toml' writes what --preset auto chooses as such a file.
"""

EXAMPLE = """\
example (ISBI 2012 EM data, white = cell):
  unetile train isbi/train/images isbi/train/labels \\
      --val-images isbi/val/images --val-labels isbi/val/labels \\
      --label-mode membrane --cell-value 255 --out runs/isbi
a plan of --preset auto, read and trained:
  unetile plan isbi/train/images isbi/train/labels > plan.toml
  unetile train isbi/train/images isbi/train/labels --config plan.toml --out runs/isbi
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``unetile train``: one option per TrainConfig field (config.py), plus how to run."""
    from ..train.config import GROUPS, TrainConfig, field_defaults

    parser = subparsers.add_parser(
        "train",
        help="train a U-Net on images and labels",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in ("images", "labels"):
        parser.add_argument(
            f"{name}_folder",
            nargs="?",
            metavar=name.upper(),
            help=f"folder of training {name} (or --{name})",
        )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    defaults = field_defaults()
    for item in fields(TrainConfig):
        if item.metadata["flag"] is not False:  # written by unetile, not an option
            add_field(groups[item.metadata["group"]], item, defaults)
    run = groups["run"]
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
    run.add_argument(
        "--quiet", action="store_true", help="no progress bar and no summary (default: off)"
    )
    run.add_argument(
        "--no-holdout",
        action="store_true",
        help="hold nothing out for validation, whatever the preset or --config says",
    )
    run.add_argument(
        "--plan",
        action="store_true",
        help="with --preset auto: print the plan as a --config TOML file and stop (no "
        "training); deprecated: use 'unetile plan IMAGES LABELS > plan.toml'",
    )
    parser.set_defaults(run=run_command)
    return parser


def add_field(group, item, defaults: dict) -> None:
    """The flag of one TrainConfig field: its type, choices and help with the default."""
    from ..train.config import field_type, shown_default

    meta = item.metadata
    flag = meta["flag"] or "--" + item.name.replace("_", "-")
    text = f"{meta['help']} (default: {shown_default(item, defaults)})"
    kind = field_type(item)
    if kind is bool:
        action = argparse.BooleanOptionalAction
        group.add_argument(flag, dest=item.name, default=None, action=action, help=text)
        return
    metavar = meta["metavar"] or (None if meta["choices"] else {int: "N", float: "X"}.get(kind))
    group.add_argument(
        flag,
        dest=item.name,
        default=None,
        type=kind,
        choices=meta["choices"],
        metavar=metavar or ("VALUE" if not meta["choices"] else None),
        help=text,
    )


def options_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line (None = not given)."""
    from ..train.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    options = {
        name: value for name, value in vars(args).items() if name in names and value is not None
    }
    for name in ("images", "labels"):  # the positional folder, or the flag: one of them
        folder = getattr(args, f"{name}_folder", None)
        if folder is None:
            continue
        if options.get(name) not in (None, folder):
            raise io.InputError(
                f"{name.upper()} {folder} and --{name} {options[name]} name two folders: give one"
            )
        options[name] = folder
    return options


def resolve_options(args: argparse.Namespace) -> dict:
    """The --init run's network < stored options (on --resume) < TOML file < command line."""
    from ..train.config import init_options, note_input_max_tile, read_toml, upgrade_stored_options

    options: dict = {}
    if args.resume and args.overwrite:
        raise io.InputError("--resume continues a run and --overwrite replaces it: give one")
    if args.resume:
        if args.out is None:
            raise io.InputError("--resume needs --out, the run folder to continue")
        from ..train.loop import CHECKPOINT

        if not (Path(args.out) / CHECKPOINT).is_file():
            raise io.InputError(
                f"{args.out}: holds no checkpoint to resume; train without --resume"
            )
        stored = io.read_json(Path(args.out) / io.MODEL_CONFIG)
        options.update(upgrade_stored_options(stored.get("training", {})))
    given = {} if args.config is None else read_toml(args.config)
    if isinstance(given.get("augment"), dict) and isinstance(options.get("augment"), dict):
        given["augment"] = {**options["augment"], **given["augment"]}
    given.update(options_from_args(args))
    if getattr(args, "no_holdout", False):
        if args.holdout is not None:
            raise io.InputError(
                "--holdout holds out validation and --no-holdout does not: give one"
            )
        given["holdout"] = None  # over the preset's and the stored value
    options.update(given)
    if options.get("init") is not None and not args.resume:
        options = {**init_options(options["init"]), **options}
    if given.get("max_tile") is not None:
        note_input_max_tile(options)
    return options


def _refuse_out_on_inputs(config) -> None:
    """No run folder that is the --init run or lies in a data folder (InputError)."""
    io.refuse_output_on_input(
        {"--out": config.out},
        {"the --init run": [config.init] if config.init is not None else []},
        {
            f"the --{name.replace('_', '-')} folder": getattr(config, name)
            for name in ("images", "labels", "val_images", "val_labels")
        },
    )


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the command line, the --config file and the preset make (InputError)."""
    from ..train.config import make_config

    options = resolve_options(args)
    try:
        return make_config(**options), options
    except io.InputError:
        raise  # a data file named in one line (--preset auto reads the data)
    except (TypeError, ValueError) as error:
        where = f"{args.config} or the command line" if args.config else "command line"
        raise io.InputError(f"bad training option ({where}): {error}") from None


def print_plan(config, options: dict) -> int:
    """``--plan`` (deprecated for ``unetile plan``): the plan as a --config file, no training."""
    if config.auto is None:
        raise io.InputError("--plan shows what --preset auto chooses: add --preset auto")
    warnings.warn(
        "--plan is replaced by 'unetile plan IMAGES LABELS [options] > plan.toml', which "
        "writes the same file; --plan ends with the next release",
        FutureWarning,
        stacklevel=2,
    )

    sys.stdout.write(plan_toml(config, options))
    return 0


def run_command(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.ddp import ranks_from_environment

    config, options = config_from_args(args)
    if args.plan:
        return print_plan(config, options)
    _require_folders(config)
    _refuse_out_on_inputs(config)
    ranks = ranks_from_environment()
    speaks = ranks.writes and not args.quiet  # under torchrun, rank 0 speaks for all
    if speaks:
        _say_the_plan(config, ranks, args.resume)
    try:
        summary = train(
            config,
            resume=args.resume,
            progress=not args.quiet,
            overwrite=args.overwrite,
            notes=print if speaks else None,
        )
    except FloatingPointError as error:  # diverged: say what to change, no traceback
        print(f"unetile train: error: {error}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        if ranks.writes:
            print(
                f"unetile train: stopped at step {summary['step']} of {summary['steps']}; "
                f"checkpoint saved; continue with: unetile train --out {config.out} --resume",
                file=sys.stderr,
            )
        return 130
    if speaks:
        _say_the_summary(config, summary)
    return 0


def _require_folders(config) -> None:
    for name in ("images", "labels", "out"):
        if getattr(config, name) is None:
            flag = "--" + name.replace("_", "-")
            where = "on the command line" if name == "out" else f"as {name.upper()} or {flag}"
            raise io.InputError(f"{flag} is required ({where}, or in --config)")


def _say_the_plan(config, ranks, resume: bool) -> None:
    """What --preset auto chose, and how the processes of torchrun share the batch."""
    if config.auto is not None and not resume:
        from ..train.auto import describe

        print(describe(config.auto), flush=True)
    if ranks.distributed:
        print(
            f"training on {ranks.world_size} processes: {config.batch_size} tile(s) each, an "
            f"effective batch of {ranks.world_size * config.batch_size} tiles at learning rate "
            f"{config.learning_rate:g} (as given, not scaled with the processes)"
        )


def _say_the_summary(config, summary: dict) -> None:
    if summary["out_of_time"]:
        print(f"stopped after --max-minutes {config.max_minutes} at step {summary['step']}")
    print(f"trained {summary['step']} steps in {summary['seconds']:.1f} s", end="")
    print(f" ({summary['steps_per_second']:.2f} steps/s, ", end="")
    print(f"{100 * summary['data_fraction']:.0f}% in data); loss {summary['loss']:.4f}")
    if summary["best_step"] is not None:
        print(
            f"best {summary['best_metric']} {summary['best_value']:.4f} at step "
            f"{summary['best_step']}"
        )
    calibration = summary.get("calibration")
    if calibration is not None:
        print(
            f"calibrated threshold {calibration['threshold']:g}: {calibration['metric']} "
            f"{calibration['value']:.4f} on the validation images ({calibration['at_0.5']:.4f} "
            "at 0.5); predict uses it"
        )
    print(f"model: {Path(config.out) / io.MODEL_WEIGHTS}")


NOT_WRITTEN = ("images", "labels", "out", "preset", "auto")  # not in a plan file


def plan_toml(config, given: dict) -> str:
    """The plan of ``config`` (made by ``--preset auto``) as a ``--config`` file.

    The ``given`` options are written too (as ``config`` holds them), except
    the training folders, the run folder and the record (:data:`NOT_WRITTEN`),
    so that the file trains the same configuration on the folders named there.
    """
    from ..train.auto import as_toml

    values = config.to_dict()
    written = {name: values[name] for name in given if name not in NOT_WRITTEN}
    if "norm" in written and written["norm"] is None:
        written["norm"] = "none"  # TOML has no none; the file spells it so
    notes = (
        f"unetile plan (unetile {__version__}): what --preset auto chooses for the images in "
        f"{config.images} and the labels in {config.labels}.",
        "Train it with: unetile train IMAGES LABELS --config plan.toml --out RUN. Training "
        "keeps every value below (edit any; the command line overrides the file): it reads "
        "the data again for its record, times nothing and does not race the weight map.",
    )
    return as_toml(config.auto, written, notes)
