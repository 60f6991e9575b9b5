"""Command-line flags generated from option types: each field whose ``metadata`` holds a
:func:`unetile.numbers.flag` becomes one flag, with its help, parser and metavar."""

from __future__ import annotations

import argparse
from dataclasses import fields


def add_flags(parser, option_type, skip: tuple[str, ...] = ()) -> None:
    """One flag per flagged field of ``option_type`` (a dataclass), dest = the field name.

    Unless the field says otherwise, a flag not given is None, so that only what the
    user gave overrides the defaults (:func:`given`).
    """
    for item in fields(option_type):
        spec = item.metadata.get("flag")
        if spec is None or item.name in skip:
            continue
        spec = dict(spec)
        name = spec.pop("name") or "--" + item.name.replace("_", "-")
        kind = spec.pop("kind")
        if kind is bool:
            spec.update(action=argparse.BooleanOptionalAction, default=None)
        elif "action" not in spec:
            spec.update(type=kind, default=None)
        else:
            spec.setdefault("default", item.default)
        if spec.get("metavar") is None:
            spec.pop("metavar", None)
        parser.add_argument(name, dest=item.name, **spec)


def given(args: argparse.Namespace, option_type) -> dict:
    """The flagged fields of ``option_type`` the user gave (not None)."""
    names = {item.name for item in fields(option_type) if "flag" in item.metadata}
    return {
        name: value for name, value in vars(args).items() if name in names and value is not None
    }
