"""Benchmark: instance extraction on synthetic touching cells, network pipelines and a floor.

Trains small U-Nets (the demo's network in 2D, a depth-3 one in 3D) once per
configuration, the paper's two classes or the three-class target (background,
interior, border between touching cells), each with the paper's border weight
(w0 = 10, sigma = 5 px) and without it (w0 = 0), all for the same number of
steps. Each network's probabilities are turned into instances by

- ``components``: the paper's connected components of the class map;
- ``watershed``: seeded by probability cores (:mod:`unetile.predict.instances`);
- ``distance``: seeded by maxima of the distance to the background;

with their parameters (seed threshold, h, min size) picked on a validation
image, then scored on test images at three densities (the share of cells
that touch another: 0.3, 0.6, 0.9; the training images have 0.7) and in 3D.
The floor is scikit-image's classic pipeline on the raw image, no network:
Otsu threshold, distance transform, markers at least ``min_distance`` px
apart, watershed (``min_distance`` picked on the same validation image).

Scores: F1 at IoU 0.5, mean average precision over IoU 0.5-0.95
(TP / (TP + FP + FN), as StarDist reports it), SEG, touching pairs merged,
true cells split, and the post-processing time per megapixel.

Full run (the demo's 600 steps per 2D network; about 10 minutes on 2 cores):
    flock /tmp/unetile-heavy.lock python benchmarks/instances.py
Quick check:
    python benchmarks/instances.py --steps 5 --steps-3d 5 --size 256 --out /tmp/i.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_info
from scipy import ndimage

from unetile.data.synthetic import cells_like
from unetile.data.weights import touching_borders
from unetile.demo import DEMO_STEPS, DEMO_TRAINING, merged_touching_pairs
from unetile.evaluate.metrics import match_objects, seg_score
from unetile.io import write_json
from unetile.predict.engine import predict
from unetile.predict.instances import (
    InstanceOptions,
    candidate_options,
    extract_instances,
    tune_options,
)
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train

DENSITIES = {"low": 0.3, "medium": 0.6, "high": 0.9}
CONFIGURATIONS = (
    ("two-class", 10.0),
    ("two-class", 0.0),
    ("three-class", 10.0),
    ("three-class", 0.0),
)
TRAINING_TOUCHING = 0.7


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def spheres_like(shape, num_cells, touching_fraction, rng):
    """3D cells: balls of radius 7-10 px, a share of them in touching pairs, blurred and noisy."""
    rng = np.random.default_rng(rng)
    radii = rng.uniform(7.0, 10.0, num_cells)
    centres = np.zeros((num_cells, 3))
    placed = 0
    touching = 2 * round(touching_fraction * num_cells / 2)
    extent = np.array(shape, dtype=float) - 1
    for cell in range(num_cells):
        for _ in range(500):
            partner = cell % 2 == 1 and cell < touching
            if partner:
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                distance = rng.uniform(0.6, 0.8) * (radii[cell] + radii[cell - 1])
                candidate = centres[cell - 1] + distance * direction
            else:
                candidate = rng.uniform(0, 1, 3) * extent
            if np.any(candidate < 0) or np.any(candidate > extent):
                continue
            others = [o for o in range(placed) if not (partner and o == cell - 1)]
            gaps = np.linalg.norm(centres[others] - candidate, axis=1) - radii[others]
            if np.all(gaps > radii[cell] + 3):
                centres[cell] = candidate
                placed += 1
                break
        else:
            raise ValueError(f"no room for {num_cells} balls in {shape}")
    grid = np.indices(shape, dtype=np.float32)
    best = np.full(shape, np.inf, np.float32)
    instances = np.zeros(shape, np.int32)
    for cell in range(num_cells):
        rho = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centres[cell], strict=True)))
        rho /= radii[cell]
        claim = (rho < 1) & (rho < best)
        best[claim] = rho[claim]
        instances[claim] = cell + 1
    image = np.where(instances > 0, 0.7 - 0.25 * np.minimum(best, 1) ** 2, 0.15)
    image[touching_borders(instances)] *= 0.6
    image = ndimage.gaussian_filter(image, 1.0) + 0.03 * rng.standard_normal(shape)
    return np.clip(image, 0, 1).astype(np.float32), instances


def dataset_2d(size, seed):
    train_set = [
        cells_like((size, size), touching_fraction=TRAINING_TOUCHING, rng=seed + i)
        for i in range(8)
    ]
    validation = cells_like((2 * size, 2 * size), touching_fraction=0.6, rng=seed + 100)
    tests = {
        name: cells_like((4 * size, 4 * size), touching_fraction=share, rng=seed + 200 + i)
        for i, (name, share) in enumerate(DENSITIES.items())
    }
    return (
        [(s.image, s.instances) for s in train_set],
        (validation.image, validation.instances),
        {name: (s.image, s.instances) for name, s in tests.items()},
    )


def dataset_3d(seed):
    train_set = [spheres_like((40, 64, 64), 14, TRAINING_TOUCHING, seed + i) for i in range(4)]
    validation = spheres_like((40, 64, 64), 14, 0.6, seed + 100)
    test = spheres_like((48, 96, 96), 36, 0.6, seed + 200)
    return train_set, validation, {"medium": test}


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def split_cells(predicted, truth, share=0.2) -> int:
    """True cells that two or more predicted objects each cover by at least ``share`` of it."""
    inside = (truth > 0) & (predicted > 0)
    pairs, counts = np.unique(
        np.stack([truth[inside], predicted[inside]]), axis=1, return_counts=True
    )
    sizes = np.bincount(truth.ravel())
    large = counts >= share * sizes[pairs[0]]
    cells, pieces = np.unique(pairs[0][large], return_counts=True)
    return int(np.count_nonzero(pieces >= 2))


def object_scores(predicted, truth) -> dict:
    matches = match_objects(predicted, truth)
    precision = [m.true_positives / max(1, m.true_positives + m.false_positives + m.false_negatives)
                 for m in matches]  # fmt: skip
    pairs, merged = merged_touching_pairs(predicted, truth)
    return {
        "f1@0.5": round(matches[0].f1, 4),
        "mean_ap": round(float(np.mean(precision)), 4),
        "seg": round(seg_score(predicted, truth), 4),
        "touching_pairs": pairs,
        "merged_pairs": merged,
        "split_cells": split_cells(predicted, truth),
        "cells_true": int(truth.max()),
        "cells_predicted": int(len(np.unique(predicted)) - 1),
    }


def timed(function, *arguments):
    start = time.perf_counter()
    result = function(*arguments)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


def classic_floor(image, min_distance: int) -> np.ndarray:
    """scikit-image's classic pipeline: Otsu, distance transform, separated maxima, watershed."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    foreground = image > threshold_otsu(image)
    distance = ndimage.distance_transform_edt(foreground)
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground)


def best_of(candidates, evaluate):
    """The candidate with the best (F1@0.5, SEG) on the validation image."""
    scored = [(evaluate(c), c) for c in candidates]
    return max(scored, key=lambda pair: (pair[0]["f1@0.5"], pair[0]["seg"]))[1]


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train_network(train_set, validation, target, w0, steps, dims, folder, seed):
    options = dict(DEMO_TRAINING) if dims == 2 else dict(
        label_mode="instances", depth=3, base_channels=8, tile=(36,), optimizer="adam",
        learning_rate=2e-3, schedule="cosine", keep_best="f1", metrics=("f1", "seg"),
        validate_every=100, checkpoint_every=100, log_every=10,
    )  # fmt: skip
    options.update(
        target=target,
        w0=w0,
        steps=steps,
        dims=dims,
        seed=seed,
        out=str(folder),
        cache_weights=False,
    )
    config = make_config(**options)
    data = prepare_arrays(
        config,
        [i for i, _ in train_set],
        [t for _, t in train_set],
        [validation[0]],
        [validation[1]],
    )
    summary = train(config, progress=False, data=data)
    from unetile.predict import card

    model, saved = card.load_model(folder)
    return model, saved, summary


def evaluate_network(model, saved, validation, tests, tile):
    def probabilities_of(image):
        return predict(model, image, normalization=saved["normalization"], progress=False,
                       tile_shape=tile)  # fmt: skip

    # Each method at its best on the validation image, as training picks the model's.
    validation_probabilities = [probabilities_of(validation[0])]
    carried = InstanceOptions.from_dict(saved["instances"])
    chosen = {
        method: tune_options(
            validation_probabilities,
            [validation[1]],
            candidate_options([validation[1]], carried, [method]),
        )[0]
        for method in ("components", "watershed", "distance")
    }
    results = {}
    for density, (image, truth) in tests.items():
        probabilities, predict_seconds = timed(probabilities_of, image)
        megapixels = truth.size / 1e6
        results[density] = {"predict_seconds_per_megapixel": round(predict_seconds / megapixels, 3)}
        for method, options in chosen.items():
            instances, seconds = timed(extract_instances, probabilities, options)
            results[density][method] = {
                **object_scores(instances, truth),
                "seconds_per_megapixel": round(seconds / megapixels, 3),
            }
    return {
        "carried": carried.to_dict(),
        "options": {m: o.to_dict() for m, o in chosen.items()},
        "scores": results,
    }


def evaluate_floor(validation, tests):
    distances = (3, 5, 8, 12, 16)
    chosen = best_of(
        distances, lambda d: object_scores(classic_floor(validation[0], d), validation[1])
    )
    scores = {}
    for density, (image, truth) in tests.items():
        instances, seconds = timed(classic_floor, image, chosen)
        scores[density] = {
            **object_scores(instances, truth),
            "seconds_per_megapixel": round(seconds / (truth.size / 1e6), 3),
        }
    return {"min_distance": chosen, "scores": scores}


def run(dims, configurations, steps, size, seed, folder) -> dict:
    if dims == 2:
        train_set, validation, tests = dataset_2d(size, seed)
        tile = None
    else:
        train_set, validation, tests = dataset_3d(seed)
        tile = 36
    results = {"floor": evaluate_floor(validation, tests) if dims == 2 else None}
    for target, w0 in configurations:
        name = f"{target}_w0_{w0:g}"
        started = time.perf_counter()
        model, saved, summary = train_network(
            train_set, validation, target, w0, steps, dims, folder / f"{dims}d_{name}", seed
        )
        results[name] = {
            "target": target,
            "w0": w0,
            "training_steps": summary["step"],
            "training_seconds": round(summary["seconds"], 1),
            **evaluate_network(model, saved, validation, tests, tile),
        }
        print(f"{dims}D {name}: {time.perf_counter() - started:.0f} s", flush=True)
        for density, row in results[name]["scores"].items():
            summary_line = ", ".join(
                f"{method} F1 {row[method]['f1@0.5']:.3f} SEG {row[method]['seg']:.3f} "
                f"merged {row[method]['merged_pairs']}/{row[method]['touching_pairs']}"
                for method in ("components", "watershed", "distance")
            )
            print(f"    {density}: {summary_line}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=DEMO_STEPS, help="training steps of each 2D network"
    )
    parser.add_argument(
        "--steps-3d", type=int, default=200, help="training steps of each 3D network"
    )
    parser.add_argument("--size", type=int, default=256, help="training image side (px); "
                        "validation 2x, test images 4x")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unetile-instances-") as scratch:
        scratch = Path(scratch)
        results_2d = run(2, CONFIGURATIONS, args.steps, args.size, args.seed, scratch)
        results_3d = run(3, CONFIGURATIONS[:3], args.steps_3d, args.size, args.seed, scratch)
    write_json(
        args.out,
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(),
            "seconds_total": round(time.perf_counter() - started, 1),
            "densities": DENSITIES,
            "2d": results_2d,
            "3d": results_3d,
        },
    )
    print(f"wrote {args.out} in {math.ceil(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
