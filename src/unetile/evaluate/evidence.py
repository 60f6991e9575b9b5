"""Evidence for moving off a default: paired scores on held-out units, and their noise.

A threshold or a post-processing picked as the best mean over a few
validation images is often the best by chance, and loses on new images.
:func:`beyond_noise` accepts a change only when its paired gain over the
default is larger than twice the standard error of the per-unit differences.
The units are blocks of the held-out images (:func:`scoring_units`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Smallest side (px) of a block of a held-out image used as a scoring unit.
MIN_BLOCK = 64


def scoring_units(probabilities, truths, min_block: int = MIN_BLOCK) -> list:
    """Units whose scores are compared pairwise: blocks of the images, each axis cut into
    as many equal parts as leave them at least ``min_block`` px (objects cut at a block's
    edge are cut alike in truth and prediction). Blocks without any object are left out:
    the object and overlap metrics have nothing to score there."""
    units = []
    for probability, truth in zip(probabilities, truths, strict=True):
        truth = np.asarray(truth)
        cuts = [np.linspace(0, s, max(1, s // min_block) + 1).astype(int) for s in truth.shape]
        for corner in np.ndindex(*(len(c) - 1 for c in cuts)):
            box = tuple(slice(c[i], c[i + 1]) for c, i in zip(cuts, corner, strict=True))
            block = truth[box]
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


def f1_of_counts(counts: np.ndarray) -> float:
    """Object F1 of summed (true positives, false positives, false negatives)."""
    tp, fp, fn = np.asarray(counts, float).reshape(-1, 3).sum(axis=0)
    return float(2 * tp / max(2 * tp + fp + fn, 1.0))


def counts_beyond_noise(
    candidate: np.ndarray, baseline: np.ndarray, draws: int = 2000, seed: int = 0
) -> bool:
    """Whether ``candidate``'s object F1 beats ``baseline``'s beyond the noise: in 97.5 %
    of bootstrap resamplings of the units (paired), the candidate's F1 over the resampled
    units is higher. ``candidate`` and ``baseline`` hold per-unit (TP, FP, FN) rows."""
    candidate, baseline = np.asarray(candidate, float), np.asarray(baseline, float)
    if len(candidate) < 2:
        return False
    picks = np.random.default_rng(seed).integers(0, len(candidate), (draws, len(candidate)))

    def f1(counts):
        tp, fp, fn = (counts[picks][..., k].sum(axis=1) for k in range(3))
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1.0)

    return bool(np.quantile(f1(candidate) - f1(baseline), 0.025) > 0)
