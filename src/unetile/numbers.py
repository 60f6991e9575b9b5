"""Checks of the numbers users give: whole, finite and in range, wherever they enter.

The command line, TOML files and ``config.json`` all pass through these
functions, so ``--sigma nan``, ``batch_size = 1.5`` or ``"depth": 30`` fail with
one message that names the option and the valid range.
"""

from __future__ import annotations

import math
import numbers

# Sane architecture sizes: beyond them a network does not fit any machine
# (64 * 2**9 channels at the bottom of depth 10 already is 13 GB of weights).
MAX_DEPTH = 10
MAX_BASE_CHANNELS = 1024
MAX_CHANNELS = 1024
MAX_CLASSES = 65536


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(minimum, maximum, open_minimum: bool) -> str:
    minimum = None if minimum is None else _show(minimum)
    maximum = None if maximum is None else _show(maximum)
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]" if not open_minimum else f"in ({minimum}, {maximum}]"
    if minimum is not None:
        return f"{'>' if open_minimum else '>='} {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int; ValueError naming ``name`` and the range unless it is one in range.

    Floats that are whole (``2.0`` from JSON) are accepted; ``2.5``, ``nan``,
    booleans and strings are not.
    """
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        whole = True
    if not whole:
        raise ValueError(
            f"{name} must be a whole number {_range_text(minimum, maximum, False)}".rstrip()
            + f", got {value!r}"
        )
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(
            f"{name} must be a whole number {_range_text(minimum, maximum, False)}, got {value}"
        )
    return value


def check_float(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
) -> float:
    """``value`` as a finite float in range; ValueError naming ``name`` and the range otherwise.

    ``open_minimum`` excludes the minimum itself (``> 0`` rather than ``>= 0``).
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if ok and math.isfinite(number):
        below = minimum is not None and (number <= minimum if open_minimum else number < minimum)
        above = maximum is not None and number > maximum
        ok = not (below or above)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be a finite number {_range_text(minimum, maximum, open_minimum)}".rstrip()
            + f", got {value!r}"
        )
    return number


def whole_option(minimum: int | None = None, maximum: int | None = None):
    """An argparse ``type`` for a whole number in range (the range is in the message)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = float(text) if "." in text or "e" in text.lower() else int(text)
            return check_int("value", value, minimum, maximum)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number {_range_text(minimum, maximum, False)}".rstrip()
                + f", got {text!r}"
            ) from None

    parse.__name__ = "whole number"
    return parse


def real_option(
    minimum: float | None = None, maximum: float | None = None, open_minimum: bool = False
):
    """An argparse ``type`` for a finite number in range (the range is in the message)."""
    import argparse

    def parse(text: str) -> float:
        try:
            return check_float("value", float(text), minimum, maximum, open_minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_range_text(minimum, maximum, open_minimum)}".rstrip()
                + f", got {text!r}"
            ) from None

    parse.__name__ = "number"
    return parse


def flag(help: str, *, name: str | None = None, metavar: str | None = None, kind=None, **extra):
    """The ``metadata`` of an option type's field that the command line shows as a flag:
    its help, flag (default ``--field-name``), metavar and parser (``kind``: a
    :func:`whole_option` / :func:`real_option`, ``bool`` for an on/off switch, or None
    for text); ``extra`` goes to ``argparse`` as it is (``choices``, ``action``)."""
    return {"flag": {"help": help, "name": name, "metavar": metavar, "kind": kind, **extra}}


def check_threshold(threshold, source: str = "threshold") -> float:
    """``threshold`` as a float in (0, 1); ValueError naming ``source`` otherwise."""
    value = check_float(source, threshold, 0.0, 1.0, open_minimum=True)
    if value >= 1.0:
        raise ValueError(f"{source} must be below 1 (no pixel would be foreground), got {value}")
    return value
