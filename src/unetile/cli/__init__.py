"""Command line: ``unetile {demo,plan,train,predict,evaluate,export}``.

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
import os
import re
import sys
import warnings
from pathlib import Path

from .. import __version__
from ..allocator import keep_freed_memory
from ..io import InputError, describe_os_error

COMMANDS = ("demo", "plan", "train", "predict", "evaluate", "export")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


#: Where unetile's own modules are: a warning from any other file is another package's.
PACKAGE_FOLDER = str(Path(__file__).parents[1]) + os.sep
#: Warnings of other packages that only their own users can act on.
THIRD_PARTY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class WarningPrinter:
    """``warnings.showwarning`` of a command: one line each, repeats grouped with a count.

    A warning about a file (``PATH: what``) is printed the first time; the same
    warning about other files, or the same text again, is counted and said in
    one line at the end (:meth:`flush`): 27 images with a constant alpha channel
    give two lines, not 27. Deprecation notes of other packages (torch's
    ``torch.jit.script_method``...) and "unclosed file" notes (ResourceWarning,
    which Python hides by default) are not shown unless asked for with
    ``python -W`` or ``PYTHONWARNINGS``.
    """

    def __init__(self, name: str):
        self.name = name
        # kind -> [first subject, first text, {other subjects: text}, repeats without a subject]
        self.groups: dict[tuple, list] = {}

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        if not sys.warnoptions and (
            # Python hides these by default: "unclosed file" of a library's garbage.
            issubclass(category, ResourceWarning)
            or (
                issubclass(category, THIRD_PARTY_NOISE)
                and not str(filename).startswith(PACKAGE_FOLDER)
            )
        ):
            return
        text = _one_line(message)
        subject, what = _subject(text)
        # Files differ in their numbers (a share, a value): the kind is the words.
        key = (category, re.sub(r"[0-9.]+", "#", what) if subject else text)
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = [subject, what, {}, 0]
            print(f"{self.name}: warning: {text}", file=sys.stderr)
        elif subject is None:
            group[3] += 1
        elif subject != group[0]:
            group[2].setdefault(subject, what)

    def flush(self) -> None:
        """One line for each warning that came again (for other files, or the same text)."""
        for first, what, others, repeats in self.groups.values():
            if others:
                names = [Path(other).name for other in others]
                listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                said = (
                    f": {what}"
                    if set(others.values()) == {what}
                    else f" as for {Path(first).name} ({what}; the numbers differ)"
                )
                print(
                    f"{self.name}: warning: the same for {len(names)} more file(s) "
                    f"({listed}){said}",
                    file=sys.stderr,
                )
            elif repeats:
                print(f"{self.name}: warning: {what} (said {repeats + 1} times)", file=sys.stderr)
        self.groups.clear()


def _subject(text: str) -> tuple[str | None, str]:
    """The file a warning is about (``PATH: what``) and what it says; (None, text) if none."""
    head, separator, what = text.partition(": ")
    suffix = " " not in head and re.fullmatch(r"\.[A-Za-z]\w*", Path(head).suffix)
    if separator and what and ("/" in head or os.sep in head or suffix):
        return head, what
    return None, text


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
    printer = WarningPrinter(name)
    message = None
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the printer groups repeats
        warnings.showwarning = printer
        try:
            return int(args.run(args) or 0)
        except (InputError, ValueError) as error:
            # ValueError: the package's functions check their arguments, which here are the user's.
            message = f"{name}: error: {_one_line(error)}"
        except OSError as error:
            message = f"{name}: error: {_one_line(describe_os_error(error))}"
        except MemoryError:
            message = f"{name}: error: out of memory; lower --tile, --batch-size or --memory-budget"
        except KeyboardInterrupt:
            printer.flush()
            print(f"{name}: interrupted; no partial output was left", file=sys.stderr)
            return 130
        finally:
            printer.flush()
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
