"""Evidence for moving off a default: paired scores on held-out units, and their noise.

A threshold or a post-processing picked as the best mean over a few
validation images is often the best by chance, and loses on new images.
:func:`beyond_noise` accepts a change only when its paired gain over the
default is larger than twice the standard error of the per-unit differences.
The units are the held-out images, or, with fewer than ``MIN_UNITS`` images,
blocks of them (:func:`scoring_units`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Fewest scoring units (images, or blocks of them) for a noise estimate.
MIN_UNITS = 4
#: Smallest side (px) of a block of a held-out image used as a scoring unit.
MIN_BLOCK = 64


def scoring_units(probabilities, truths) -> list[tuple[np.ndarray, np.ndarray]]:
    """Units whose scores are compared pairwise: the images, or blocks of them when
    there are fewer than ``MIN_UNITS`` images (each axis halved while its blocks stay
    at least ``MIN_BLOCK`` px). Blocks without any object are left out: the object and
    overlap metrics have nothing to score there."""
    pairs = list(zip(probabilities, truths, strict=True))
    if len(pairs) >= MIN_UNITS:
        return pairs
    units = []
    for probability, truth in pairs:
        halves = [
            (0, s // 2, s) if s // 2 >= MIN_BLOCK else (0, s) for s in np.asarray(truth).shape
        ]
        for corner in np.ndindex(*(len(h) - 1 for h in halves)):
            box = tuple(slice(h[i], h[i + 1]) for h, i in zip(halves, corner, strict=True))
            block = np.asarray(truth)[box]
            if np.any(block > 0):
                units.append((np.asarray(probability)[(..., *box)], block))
    return units


def beyond_noise(candidate: Sequence[float], baseline: Sequence[float]) -> bool:
    """Whether ``candidate`` beats ``baseline`` by more than twice the standard error
    of their paired differences (per unit, higher is better); never with under 2 units."""
    differences = np.asarray(candidate, float) - np.asarray(baseline, float)
    if differences.size < 2:
        return False
    noise = 2.0 * differences.std(ddof=1) / math.sqrt(differences.size)
    return bool(differences.mean() > max(noise, 1e-9))
