"""Instance post-processing fitted to the data: from the training labels, then held-out area.

A model carries how its objects are extracted (``config.json``
``"instances"``, :class:`unetile.predict.instances.InstanceOptions`). The paper's
connected components with no minimum size turn every speck of a noisy
probability map into an object; on two unseen EM sets of organelles that
gave 2.5 to 8 times too many objects. The training labels say what objects
look like, so :func:`fit_from_labels` reads there:

* **size**: objects under ``MIN_SIZE_SHARE`` of the 5th percentile of the
  true objects' sizes (objects cut by the image border left out when there
  are enough others) are dropped; well below the smallest real objects;
* **holes**: filled when fewer than ``HOLE_SHARE`` of the true objects have one;
* **touching**: measured (objects of instance labels within 2 px of
  another), but the default stays the paper's connected components: a
  watershed from probability cores lost on two of three real sets after
  minutes of training, so scored images decide (below);
* **membrane maps** (cells enclosed by thin membranes, as ISBI 2012: most of
  the background lies within 2 px of a cell): the cells are the paper's
  connected components of the class map, with the same size floor.

Training then scores other choices around that default (:func:`tune`: the
seeded watersheds, other minimum sizes, a morphological opening sized by the
objects) by object F1 on held-out images (validation images or
``--holdout``), or, with none, on a few training images, and moves off the
default only for a gain beyond the noise of its paired per-block differences
(:func:`~.evidence.counts_beyond_noise`), so that a choice made on a few images is not a
choice made on noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..evaluate.evidence import MIN_BLOCK, counts_beyond_noise, f1_of_counts, scoring_units
from ..predict.instances import InstanceOptions, extract_instances

#: The size floor, as a share of the true objects' 5th-percentile size: chosen
#: leave-one-set-out on the benchmark suite (0.8 won on every set left out;
#: benchmarks/suite_loso.json).
MIN_SIZE_SHARE = 0.8
#: Below this share of true objects with a hole, predicted holes are filled.
HOLE_SHARE = 0.05
#: At least this share of objects near another: separate them with a watershed.
TOUCHING_SHARE = 0.1
#: Background within this distance (px) of a cell, for a share of at least
#: MEMBRANE_SHARE of the background pixels: a membrane map (ISBI 2012: 0.53;
#: objects on a background in the suite's sets: 0.02-0.11).
MEMBRANE_DISTANCE = 2.0
MEMBRANE_SHARE = 0.3
#: Binary masks with this many times more face-connected than fully connected
#: pieces link their objects through corners (thin vessels): full connectivity.
CORNER_LINKED = 1.2
#: Objects that must remain once border-cut ones are left out to measure sizes on them.
ENOUGH_OBJECTS = 20


def measure_objects(instances: Sequence[np.ndarray]) -> dict:
    """Sizes, holes, touching and membranes of true objects (0 = background)."""
    sizes, interior, holes, touching, objects = [], [], 0, 0, 0
    near_background, background = 0, 0
    for labels in instances:
        labels = np.asarray(labels)
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        if ids.size == 0:
            continue
        objects += ids.size
        sizes.append(counts)
        cut = np.unique(_border(labels))
        interior.append(counts[~np.isin(ids, cut)])
        holes += _objects_with_holes(labels)
        touching += _touching_objects(labels)
        gaps = ndimage.distance_transform_edt(labels == 0)
        near_background += int(np.count_nonzero((gaps > 0) & (gaps <= MEMBRANE_DISTANCE)))
        background += int(np.count_nonzero(gaps > 0))
    all_sizes = np.concatenate(sizes) if sizes else np.zeros(0)
    inner = np.concatenate(interior) if interior else np.zeros(0)
    measured = inner if inner.size >= ENOUGH_OBJECTS else all_sizes
    dims = np.asarray(instances[0]).ndim if len(instances) else 2
    median = float(np.median(measured)) if measured.size else 0.0
    return {
        "objects": int(objects),
        "size_p5": float(np.percentile(measured, 5)) if measured.size else 0.0,
        "size_median": median,
        "diameter": _diameter(median, dims),
        "hole_share": holes / max(objects, 1),
        "touching_share": touching / max(objects, 1),
        "membrane_share": near_background / max(background, 1),
    }


def is_membrane_map(cells: np.ndarray) -> bool:
    """Whether a binary map's background is mostly thin membranes between its cells."""
    gaps = ndimage.distance_transform_edt(~np.asarray(cells, bool))
    background = np.count_nonzero(gaps > 0)
    near = np.count_nonzero((gaps > 0) & (gaps <= MEMBRANE_DISTANCE))
    return background > 0 and near / background >= MEMBRANE_SHARE


def _mask_objects(instances: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """The objects of binary masks and their connectivity: full where corners link many
    face-connected pieces (``CORNER_LINKED``), else faces (as training reads them)."""
    masks = [np.asarray(labels) > 0 for labels in instances]
    full = [ndimage.label(m, structure=np.ones((3,) * m.ndim, bool)) for m in masks]
    faces = sum(int(np.asarray(labels).max()) for labels in instances)
    corners = sum(count for _, count in full)
    if faces > CORNER_LINKED * max(corners, 1):
        return [labels for labels, _ in full], masks[0].ndim
    return list(instances), 1


def _border(labels: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.take(labels, i, axis=a).ravel() for a in range(labels.ndim) for i in (0, -1)]
    )


def _objects_with_holes(labels: np.ndarray) -> int:
    count = 0
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == index
        count += bool(np.count_nonzero(ndimage.binary_fill_holes(own)) > np.count_nonzero(own))
    return count


def _touching_objects(labels: np.ndarray) -> int:
    """Objects with another object within 2 px (a 5 px window)."""
    size = 5
    highest = ndimage.maximum_filter(labels, size=size)
    others = np.where(labels == 0, np.iinfo(labels.dtype).max, labels)
    lowest = ndimage.minimum_filter(others, size=size)
    near = (labels > 0) & ((highest != labels) | (lowest != labels))
    return int(np.unique(labels[near]).size)


def _diameter(area: float, dims: int) -> float:
    if dims == 2:
        return 2.0 * math.sqrt(area / math.pi)
    return 2.0 * (3.0 * area / (4.0 * math.pi)) ** (1 / 3)


def fit_from_labels(
    instances: Sequence[np.ndarray], base: InstanceOptions, label_mode: str
) -> tuple[InstanceOptions, dict]:
    """The options a model carries when nothing held out says otherwise, and why.

    Parameters
    ----------
    instances : sequence of ndarray
        The training images' true objects (0 = background).
    base : InstanceOptions
        The classes (foreground, seed) and the threshold to keep.
    label_mode : {"membrane", "instances", "classes"}
        Only instance labels can show touching objects.

    Returns
    -------
    options : InstanceOptions
    record : dict
        The measurements (:func:`measure_objects`) and a ``"why"`` line.
    """
    connectivity = 1
    if label_mode == "membrane":
        instances, connectivity = _mask_objects(instances)
    measured = measure_objects(instances)
    if measured["objects"] == 0:
        return base, {**measured, "why": "no objects in the labels: the defaults"}
    min_size = int(MIN_SIZE_SHARE * measured["size_p5"])
    fill = measured["hole_share"] < HOLE_SHARE
    reasons = [
        f"min size {min_size} px ({MIN_SIZE_SHARE:g} x the 5th-percentile object, "
        f"{measured['size_p5']:.0f} px)",
        f"holes {'filled' if fill else 'kept'} ({100 * measured['hole_share']:.0f} % of "
        "objects have one)",
    ]
    if connectivity > 1:
        reasons.append("objects linked through corners: full connectivity")
    membranes = measured["membrane_share"] >= MEMBRANE_SHARE
    touching = label_mode == "instances" and measured["touching_share"] >= TOUCHING_SHARE
    if membranes:
        method = {"method": "components"}
        reasons.insert(0, "membrane map: the cells are the components of the class map")
    elif len(base.foreground_classes) > 1:
        method = {"method": "watershed", "seed_threshold": base.seed_threshold}
        reasons.insert(0, "three classes: a watershed from the interiors' cores")
    else:
        # The paper's components: a watershed from cores (0.9) lost F1 0.20 and 0.58 on
        # DSB 2018 and DIC HeLa after minutes of training, and won 0.04 on PhC PSC.
        method = {"method": "components"}
        reasons.insert(
            0,
            f"connected components ({100 * measured['touching_share']:.0f} % of the objects "
            f"touch another{'; scored images decide on a watershed' if touching else ''})",
        )
    options = dataclasses.replace(
        base, min_size=min_size, fill_holes=fill, connectivity=connectivity, **method
    )
    return options, {**{k: round(v, 4) for k, v in measured.items()}, "why": "; ".join(reasons)}


# --------------------------------------------------------------------------
# Held-out evidence
# --------------------------------------------------------------------------


def method_candidates(default: InstanceOptions, diameter: float) -> list[InstanceOptions]:
    """The extraction methods tried first, at the default's size floor and opening."""
    radius = max(diameter / 2.0, 1.0)
    methods = [{"method": "components"}]
    methods += [{"method": "watershed", "seed_threshold": t} for t in (0.5, 0.8, 0.9)]
    methods += [{"method": "distance", "h": float(max(1, round(f * radius)))} for f in (0.15, 0.3)]
    # Frozen options hash by value: dict.fromkeys keeps the first of equal ones, in order.
    return list(dict.fromkeys([default] + [dataclasses.replace(default, **m) for m in methods]))


def refinements(chosen: InstanceOptions, default: InstanceOptions, diameter: float) -> list:
    """Other size floors and openings (sized by the objects) around the chosen method."""
    floor, radius = default.min_size, max(diameter / 2.0, 1.0)
    grid = [dataclasses.replace(chosen, min_size=m) for m in (floor // 2, 2 * floor)]
    grid += [dataclasses.replace(chosen, opening=o) for o in (1, max(2, round(0.2 * radius)))]
    return list(dict.fromkeys(grid))


def tune(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    default: InstanceOptions,
    diameter: float,
) -> tuple[InstanceOptions, dict]:
    """The best options by object F1 at IoU 0.5 on scored images, if they beat ``default``
    beyond the noise (:func:`unetile.evaluate.evidence.counts_beyond_noise`); else ``default``.

    A coordinate search: the method first (:func:`method_candidates`), then the size
    floor and the opening around it (:func:`refinements`); ties keep the earlier. The
    images are cut into blocks of at least four times the objects' diameter, the units
    of a paired bootstrap of the F1 over all their objects. Returns the options and a
    record: both candidates' F1 and mean SEG, the number of units, whether it moved.
    """
    from ..evaluate.metrics import match_objects, seg_score

    units = scoring_units(probabilities, truths, max(2 * MIN_BLOCK, int(4 * diameter)))

    def scores(options):
        counts, seg = [], []
        for probability, truth in units:
            objects = extract_instances(probability, options)
            match = match_objects(objects, truth, (0.5,))[0]
            counts.append((match.true_positives, match.false_positives, match.false_negatives))
            seg.append(seg_score(objects, truth))
        return np.asarray(counts, float), float(np.mean(seg))

    def key(result):
        return f1_of_counts(result[0]), result[1]

    base = scores(default)
    best, best_scores = default, base
    for stage in (lambda: method_candidates(default, diameter)[1:], None):
        grid = stage() if stage else refinements(best, default, diameter)
        for options in grid:
            result = scores(options)
            if key(result) > key(best_scores):
                best, best_scores = options, result
    moved = best != default and counts_beyond_noise(best_scores[0], base[0])
    record = {
        "units": len(units),
        "default": {"f1@0.5": key(base)[0], "seg": base[1]},
        "best": {
            "options": best.to_dict(),
            "f1@0.5": key(best_scores)[0],
            "seg": best_scores[1],
        },
        "moved": moved,
    }
    return (best if moved else default), record
