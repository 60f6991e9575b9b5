"""``unetile plan``: what ``--preset auto`` chooses for a data set, as a ``--config`` TOML file.

Planning is a step of its own, as in nnU-Net: ``unetile plan IMAGES LABELS >
plan.toml`` measures the data and times this device, and writes every choice
with its reason; ``unetile train IMAGES LABELS --config plan.toml --out RUN``
then trains exactly that plan (read it, edit it, or start torchrun with it).
The TOML goes to stdout, a one-line note to stderr.
"""

from __future__ import annotations

import argparse
import sys

from .. import io
from .train import plan_toml

DESCRIPTION = """\
Measure the training images and labels (up to 50 pairs, evenly spaced) and
time a few training steps on this device, then print what '--preset auto'
would choose (depth, width, tile, weight map, normalisation, augmentation,
budget, steps, validation) as a --config TOML file on stdout, each choice with
its reason as a comment. Train it with

  unetile train IMAGES LABELS --config plan.toml --out RUN

which keeps every value in the file: it reads the data again for its record
but times nothing, and since the file fixes the weight map, no race of it
against cpu-fast's is run (give --preset auto to 'unetile train' for that).
Options given here (the labels' meaning, the budget, a --config of values to
keep) are kept as given and written to the file too.
"""

EXAMPLE = """\
example (instance labels, a 30-minute budget):
  unetile plan train/images train/labels --label-mode instances --max-minutes 30 > plan.toml
  unetile train train/images train/labels --config plan.toml --out runs/mine
"""

#: TrainConfig fields ``unetile plan`` takes as flags besides the label options:
#: what the plan reads (validation folders, the budget, the device it times).
PLAN_FIELDS = ("val_images", "val_labels", "max_minutes", "device")
#: Options never written to the plan: the data and the run it is trained on, and its record.


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dataclasses import fields

    from ..train.config import LABELS, TrainConfig, field_defaults
    from .train import add_field

    parser = subparsers.add_parser(
        "plan",
        help="print what --preset auto chooses for a data set, as a --config TOML file",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", metavar="IMAGES", help="folder of training images")
    parser.add_argument("labels", metavar="LABELS", help="folder of training labels")
    data = parser.add_argument_group("data and budget")
    defaults = field_defaults()
    for item in fields(TrainConfig):
        if item.metadata["group"] == LABELS or item.name in PLAN_FIELDS:
            add_field(data, item, defaults)
    data.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file of training options to keep as given (e.g. sigma = 3.0); the plan "
        "chooses the rest; the command line overrides it (default: none)",
    )
    parser.set_defaults(run=run_command)
    return parser


def plan_options(args: argparse.Namespace) -> dict:
    """The options the plan keeps as given: the --config file's, then the command line's."""
    from ..train.config import read_toml
    from .train import options_from_args

    given = {} if args.config is None else read_toml(args.config)
    if given.get("preset", "auto") != "auto":
        raise io.InputError(
            f"{args.config}: preset {given['preset']!r}; 'unetile plan' plans --preset auto: "
            "remove the preset line"
        )
    if "auto" in given:
        raise io.InputError(
            f"{args.config}: holds a stored plan ('auto'), which unetile writes; remove it"
        )
    given.pop("preset", None)
    given.update(options_from_args(args))
    return given


def run_command(args: argparse.Namespace) -> int:
    from ..train.config import make_config

    given = plan_options(args)
    try:
        config = make_config("auto", **given)
    except io.InputError:
        raise  # a data file named in one line
    except (TypeError, ValueError) as error:
        where = f"{args.config} or the command line" if args.config else "command line"
        raise io.InputError(f"bad plan option ({where}): {error}") from None
    sys.stdout.write(plan_toml(config, given))
    sys.stdout.flush()
    record = config.auto
    print(
        f"unetile plan: planned in {record['seconds']:.1f} s ({record['fingerprint_images']} "
        f"image(s) read, {record['device']}); train it with: unetile train {args.images} "
        f"{args.labels} --config plan.toml --out RUN",
        file=sys.stderr,
    )
    return 0
