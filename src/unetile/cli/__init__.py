"""Command line: ``unetile {demo,train,predict,evaluate,export}``.

Argument parsing only; each sub-command lives in its own module with
``add_parser(subparsers)`` and ``run(args) -> int`` and calls the package's
functions. A user's mistake (:class:`unetile.io.InputError`) is printed as one
line and exits with status 2, never as a traceback. The command owns its
process, so it lets malloc keep freed memory (:mod:`unetile.allocator`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..allocator import keep_freed_memory
from ..io import InputError

COMMANDS = ("demo", "train", "predict", "evaluate", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetile",
        description="U-Net (Ronneberger et al. 2015) for biomedical image segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"unetile {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}":
                continue  # sub-command not built into this version
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return int(args.run(args) or 0)
    except InputError as error:
        print(f"unetile {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unetile {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
