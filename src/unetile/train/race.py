"""``--preset auto`` checks its rules on held-out area before it spends the budget on them.

The rules of :mod:`unetile.train.auto` were written from two data sets; on unseen
EM organelles the rules' weight map (the paper's border term with class
balance, on 8 % foreground) lost to ``cpu-fast``'s on every score. So when
the rules' weight map differs from the safe baseline's (``cpu-fast``: w0 10,
sigma 2, no class balance), both race: each trains for ``RACE_SHARE`` of the
budget divided between them, both are scored on the held-out images (object
F1 at IoU 0.5 and foreground IoU, per image or block of one), and the rules
win only with a gain beyond the noise of those paired scores
(:func:`unetile.evaluate.evidence.beyond_noise`). The winner then goes on from its own
weights (``--init``) for the rest of the budget. The race's legs stay in
``OUT/race/`` and its record in ``config.json`` (``training.auto.race``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..predict import card
from .config import PRESETS, TrainConfig

#: Share of the budget the race takes (split among the candidates).
RACE_SHARE = 0.3
#: The weight-map fields the race decides.
WEIGHT_FIELDS = ("w0", "sigma", "class_weights")
#: Held-out foreground IoU or object F1 under this at the end: said as poor.
POOR = 0.5


def contenders(config: TrainConfig) -> dict[str, dict]:
    """The weight maps that race: the safe baseline, and the rules' when they differ."""
    baseline = {name: PRESETS["cpu-fast"][name] for name in WEIGHT_FIELDS}
    plan = config.auto or {}
    if any(name in plan.get("given", ()) for name in WEIGHT_FIELDS):
        return {}  # the user chose the weight map
    rules = {name: getattr(config, name) for name in WEIGHT_FIELDS}
    if rules == baseline:
        return {}
    return {"baseline": baseline, "rules": rules}


def should_race(config: TrainConfig, resume: bool) -> bool:
    plan = config.auto
    return (
        plan is not None
        and "race" not in plan
        and not resume
        and config.init is None
        and config.max_minutes is not None
        and bool(contenders(config))
    )


def race(config: TrainConfig, train, progress: bool, notes=None) -> TrainConfig:
    """Run the race; the configuration of the final run (the winner's weight map, its
    weights as ``init``, the rest of the budget, the record in ``auto["race"]``)."""
    from .loop import prepare_data

    started = time.perf_counter()
    entrants = contenders(config)
    share = RACE_SHARE * config.max_minutes / len(entrants)
    root = Path(config.out) / "race"
    scores, legs = {}, {}
    for name, weights in entrants.items():
        # A leg of a minute or two loses more to compiling than compiling gains it.
        leg = dataclasses.replace(
            config, out=str(root / name), max_minutes=share, auto=None, compile=False, **weights
        )
        if notes:
            notes(f"auto race: {name} ({_weights(weights)}) for {share:.1f} min")
        summary = train(leg, progress=progress, overwrite=True)
        if summary["interrupted"]:
            raise KeyboardInterrupt
        data = prepare_data(leg)
        scores[name] = held_out_scores(Path(leg.out), data, leg)
        legs[name] = leg.out
    baseline, rules = scores["baseline"], scores["rules"]
    moved = beyond(rules, baseline)
    winner = "rules" if moved else "baseline"
    record = {
        "minutes_each": round(share, 2),
        "units": len(baseline["combined"]),
        "scores": {n: {k: float(np.mean(v)) for k, v in s.items()} for n, s in scores.items()},
        "winner": winner,
        "weights": entrants[winner],
        "why": (
            "the rules' weight map beat the baseline beyond the noise"
            if moved
            else "the rules' weight map did not beat the baseline beyond the noise"
        ),
    }
    if notes:
        shown = ", ".join(f"{n} {record['scores'][n]['combined']:.3f}" for n in scores)
        notes(f"auto race: {shown} (held-out F1/IoU); {winner} goes on: {record['why']}")
    left = max(config.max_minutes - (time.perf_counter() - started) / 60.0, 0.1)
    return dataclasses.replace(
        config,
        init=legs[winner],
        max_minutes=left,
        auto={**config.auto, "race": record},
        **entrants[winner],
    )


def _weights(weights: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in weights.items())


def beyond(candidate: dict, baseline: dict) -> bool:
    from ..evaluate.evidence import beyond_noise

    return beyond_noise(candidate["combined"], baseline["combined"])


def held_out_scores(run_dir: Path, data, config: TrainConfig) -> dict[str, list[float]]:
    """Per held-out unit: foreground IoU, object F1 at IoU 0.5 (the model's own objects),
    and their mean (``combined``)."""
    from ..evaluate.evidence import scoring_units
    from ..evaluate.metrics import iou, match_objects
    from ..predict.engine import resolve_device
    from ..predict.instances import InstanceOptions, extract_instances, foreground_mask
    from .loop import validation_probabilities

    stored = dict(card.ModelCard.read(run_dir).entries)
    options = InstanceOptions.from_dict(stored["instances"])
    probabilities = validation_probabilities(run_dir, data, config, resolve_device(config.device))
    truths = [item.instances for item in data.validation]
    result = {"iou": [], "f1": [], "combined": []}
    for probability, truth in scoring_units(probabilities, truths):
        overlap = iou(foreground_mask(probability, options), truth > 0)
        f1 = match_objects(extract_instances(probability, options), truth, (0.5,))[0].f1
        result["iou"].append(overlap)
        result["f1"].append(f1)
        result["combined"].append((overlap + f1) / 2)
    return result


def poor_result(summary: dict) -> str | None:
    """A line when the held-out scores at the end are poor, else None."""
    validation = summary.get("validation") or {}
    low = {k: v for k, v in validation.items() if k in ("iou", "f1") and v < POOR}
    if not low:
        return None
    shown = ", ".join(f"{k} {v:.2f}" for k, v in low.items())
    return (
        f"warning: the held-out scores are poor ({shown} < {POOR}): train longer "
        "(--max-minutes), label more images, or check that labels and images match"
    )
