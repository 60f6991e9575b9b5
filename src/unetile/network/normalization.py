"""The input normalisation a network was trained with, which travels with it.

Every channel is shifted and scaled by the mean and standard deviation of that
channel over all training pixels. Training computes it
(:meth:`Normalization.from_images`), stores it in the run's ``config.json``
(``"normalization": {"mean": [...], "std": [...]}``),
:func:`unetile.predict.card.load_model` puts it back on the model
(``model.normalization``) and :func:`unetile.predict.predict` applies it to
every tile it reads unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(image - mean) / std``; one value broadcasts to every channel.

    Parameters
    ----------
    mean, std : tuple of float
        One value, or one per channel; finite, ``std > 0``.

    Examples
    --------
    >>> Normalization((100.0,), (50.0,)).apply(np.array([[[0, 150]]], np.uint8)).tolist()
    [[[-2.0, 1.0]]]
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean = tuple(float(v) for v in np.atleast_1d(np.asarray(self.mean, dtype=np.float64)))
        std = tuple(float(v) for v in np.atleast_1d(np.asarray(self.std, dtype=np.float64)))
        if not all(math.isfinite(v) for v in mean + std):
            raise ValueError(f"normalization must be finite, got {list(mean)} and {list(std)}")
        if min(std) <= 0:
            raise ValueError(f"normalization std must be > 0, got {list(std)}")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(
                f"normalization needs as many mean as std values, got {len(mean)} and {len(std)}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def of(cls, value) -> Normalization | None:
        """A Normalization from one, a ``{"mean", "std"}`` dict or a ``(mean, std)`` pair; None
        stays None."""
        if value is None or isinstance(value, Normalization):
            return value
        if isinstance(value, dict):
            return cls(value["mean"], value["std"])
        mean, std = value
        return cls(mean, std)

    @classmethod
    def identity(cls) -> Normalization:
        """Leaves the values as they are (converted to float32)."""
        return cls((0.0,), (1.0,))

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray]) -> Normalization:
        """Per-channel mean and standard deviation over all pixels of ``(C, *S)`` images.

        Sums in float64 over the images one at a time; a constant channel gets std 1.
        """
        channels = images[0].shape[0]
        total = np.zeros(channels)
        total_squares = np.zeros(channels)
        count = 0
        for image in images:
            flat = image.reshape(channels, -1).astype(np.float64)
            total += flat.sum(axis=1)
            total_squares += (flat**2).sum(axis=1)
            count += flat.shape[1]
        mean = total / count
        std = np.sqrt(np.maximum(total_squares / count - mean**2, 0.0))
        std[std == 0] = 1.0
        return cls(tuple(mean), tuple(std))

    def to_dict(self) -> dict[str, list[float]]:
        """The ``config.json`` entry: ``{"mean": [...], "std": [...]}``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def check_channels(self, channels: int) -> Normalization:
        """Itself, or ValueError when it does not give 1 or ``channels`` values."""
        if {len(self.mean), len(self.std)} - {1, channels}:
            raise ValueError(
                f"normalization must give 1 or {channels} mean and std values, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        return self

    def broadcast(self, channels: int) -> Normalization:
        """One mean and std per channel (ValueError if it gives neither 1 nor ``channels``)."""
        self.check_channels(channels)
        return Normalization(
            tuple(np.broadcast_to(self.mean, channels)), tuple(np.broadcast_to(self.std, channels))
        )

    def apply(self, image) -> np.ndarray:
        """``(image - mean) / std`` of a ``(C, *S)`` array as a new float32 array."""
        values = np.array(image, dtype=np.float32)
        self.check_channels(values.shape[0])
        if self == Normalization.identity():
            return values
        expand = (-1,) + (1,) * (values.ndim - 1)
        values -= np.asarray(self.mean, dtype=np.float32).reshape(expand)
        values /= np.asarray(self.std, dtype=np.float32).reshape(expand)
        return values
