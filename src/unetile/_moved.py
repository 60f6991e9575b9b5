"""Old flat module paths (``unetile.metrics``...) kept for one release, with a warning.

The modules moved into subpackages named after the floors they belong to
(``network``, ``data``, ``evaluate``, ``predict``, ``train``); an import of an
old path gets the module from its new home and one DeprecationWarning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "model": "network.model",
    "tiling": "network.tiling",
    "normalization": "network.normalization",
    "weights": "data.weights",
    "augment": "data.augment",
    "synthetic": "data.synthetic",
    "holdout": "data.holdout",
    "metrics": "evaluate.metrics",
    "evidence": "evaluate.evidence",
    "calibration": "evaluate.calibration",
    "distributed": "predict.regions",
    "instances": "predict.instances",
    "scale": "predict.scale",
    "export": "predict.export",
    "config": "train.config",
    "auto": "train.auto",
    "race": "train.race",
    "loss": "train.loss",
    "checkpoint": "train.checkpoint",
    "parallel": "train.ddp",
    "instance_fit": "train.instance_fit",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``unetile.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "unetile" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"unetile.{MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(
            f"{spec.name} moved to {new}; the old path works until the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module is the new one, already executed


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


def forward_to(old: str, new: str, name: str):
    """``name`` of module ``old`` from module ``new``, where it moved, with a warning (an
    old module's ``__getattr__``); AttributeError for a name that never was there."""
    module = importlib.import_module(new)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    warnings.warn(
        f"{old}.{name} moved to {new}.{name}; the old path works until the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(module, name)


def forward(package: str, home: str, name: str):
    """An old name of ``unetile.<package>`` from its new module ``home`` (a package's
    ``__getattr__``)."""
    return forward_to(f"unetile.{package}", f"unetile.{package}.{home}", name)
