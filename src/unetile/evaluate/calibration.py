"""Calibration: the foreground threshold that scores best on the validation images.

A two-class network draws a pixel as foreground where its probability is
above 0.5 (the argmax). The metric a user keeps the model for (``keep_best``:
the Rand error, IoU, F1...) is often better at another threshold, for
example when the weight map makes the network draw membranes thick. After
training, :func:`calibrate_threshold` sweeps :data:`THRESHOLDS` on the
validation probabilities of the kept model and picks the threshold of the
best mean; training stores it in ``config.json`` (``"calibration"``), and
``predict`` draws labels (and instances) with it.

The rule is the metrics' (:func:`unetile.evaluate.metrics.score_per_threshold`):
foreground where ``probability > threshold``; at 0.5 that is the argmax of
two classes. Networks of more than two classes are not calibrated: their
labels stay the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..numbers import check_threshold  # noqa: F401 - importable from here as before

#: The thresholds swept: 0.05, 0.10, ..., 0.95.
THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(1, 20))
#: The network's own decision (the argmax of two classes), reported for comparison.
ARGMAX = 0.5


def lower_is_better(metric: str) -> bool:
    """Errors are minimised, every other metric maximised (as ``keep_best`` is)."""
    return metric.endswith("_error")


def calibrate_threshold(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    metric: str,
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    ignore_value: int | None = None,
) -> dict:
    """The threshold with the best mean ``metric`` over images.

    Parameters
    ----------
    probabilities : sequence of ndarray
        Foreground probability of each validation image, in [0, 1].
    truths : sequence of ndarray
        Their ground truth, as :func:`unetile.evaluate.metrics.score` reads it (a
        binary cell map or instance labels), same shapes.
    metric : str
        A name of :data:`unetile.evaluate.metrics.METRICS`; ``*_error`` metrics are
        minimised, the others maximised.
    thresholds : sequence of float
        Candidates in (0, 1); must include 0.5 (:data:`ARGMAX`) for ``at_0.5``.
    ignore_value : int or None
        Ground-truth value of unannotated pixels, not scored.

    Returns
    -------
    dict
        ``threshold`` (the best; among equal means the one nearest 0.5, so an
        uninformative sweep keeps the argmax), ``metric``, ``value`` (its mean
        there), ``at_0.5`` (the mean at 0.5), ``images`` (how many) and
        ``sweep`` (``{threshold: mean}``).

    Examples
    --------
    >>> truth = np.zeros((8, 8), bool); truth[:, :3] = True
    >>> probability = np.where(truth, 0.4, 0.1)   # cells drawn too faint for 0.5
    >>> calibrate_threshold([probability], [truth], "pixel_error")["threshold"]
    0.35
    """
    from .metrics import score_per_threshold

    thresholds = tuple(float(t) for t in thresholds)
    if ARGMAX not in thresholds:
        raise ValueError(f"thresholds must include {ARGMAX}, the argmax, got {thresholds}")
    if not probabilities or len(probabilities) != len(truths):
        raise ValueError(
            f"give one truth per probability map, at least one: got {len(probabilities)} maps "
            f"and {len(truths)} truths"
        )
    totals = dict.fromkeys(thresholds, 0.0)
    for probability, truth in zip(probabilities, truths, strict=True):
        sweep = score_per_threshold(
            probability, truth, [metric], thresholds=thresholds, ignore_value=ignore_value
        )
        for threshold in thresholds:
            totals[threshold] += float(sweep[threshold][metric])
    means = {threshold: total / len(probabilities) for threshold, total in totals.items()}
    sign = 1.0 if lower_is_better(metric) else -1.0
    best = min(thresholds, key=lambda t: (sign * means[t], abs(t - ARGMAX)))
    return {
        "threshold": best,
        "metric": metric,
        "value": means[best],
        "at_0.5": means[ARGMAX],
        "images": len(probabilities),
        "sweep": {f"{threshold:g}": value for threshold, value in means.items()},
    }
