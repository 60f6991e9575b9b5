"""Command line: ``unetile {demo,train,predict,evaluate,export}``.

Argument parsing only; each sub-command lives in its own module with
``add_parser(subparsers)`` and ``run(args) -> int`` and calls the package's
functions. A user's mistake (:class:`unetile.io.InputError`, a bad option, a file-system
error such as a full disk or a read-only folder) is printed as one line,
``unetile COMMAND: error: ...``, and exits with status 2, never as a traceback;
warnings and notes are one line each too. The command owns its
process, so it lets malloc keep freed memory (:mod:`unetile.allocator`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .. import __version__
from ..allocator import keep_freed_memory
from ..io import InputError, describe_os_error

COMMANDS = ("demo", "train", "predict", "evaluate", "export")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _warning_printer(name: str):
    def show(message, category, filename, lineno, file=None, line=None):
        # One line naming the command, never a source line of unetile.
        print(f"{name}: warning: {_one_line(message)}", file=sys.stderr)

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    args = parser.parse_args(argv)  # a bad option: one line and SystemExit(2)
    keep_freed_memory()
    name = f"unetile {args.command}"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _warning_printer(name)
        try:
            return int(args.run(args) or 0)
        except (InputError, ValueError) as error:
            # ValueError: the package's functions check their arguments, which here are the user's.
            print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        except OSError as error:
            print(f"{name}: error: {_one_line(describe_os_error(error))}", file=sys.stderr)
        except MemoryError:
            print(
                f"{name}: error: out of memory; lower --tile, --batch-size or --memory-budget",
                file=sys.stderr,
            )
        except KeyboardInterrupt:
            print(f"{name}: interrupted; no partial output was left", file=sys.stderr)
            return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
