"""Benchmark: unetile.data.weights.weight_map against the obvious method, in the same run.

The obvious method runs one distance transform per cell over the whole image,
O(cells x pixels), keeping a running nearest and second-nearest distance (the
memory-light form; stacking all transforms and sorting would need cells x
pixels floats). ``weight_map`` restricts each cell's transform to its bounding
box grown by the distance at which the border term falls below ``tolerance``.
Both use the paper's w0 = 10, sigma = 5 px and balanced class weights on
``unetile.data.synthetic.em_like`` images (hundreds of cells touching across thin
membranes, the normal case).

Also times the synthetic generators on a 1024x1024 image.

Quick run:  python benchmarks/weight_map.py --sizes 256 --cells 20 50
Full run:   nice -n 5 python benchmarks/weight_map.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from machine import machine_info
from scipy import ndimage

from unetile.data.synthetic import cells_like, em_like
from unetile.data.weights import DEFAULT_TOLERANCE, class_balance, weight_map
from unetile.io import write_json

GENERATORS = {"em_like": em_like, "cells_like": cells_like}


def obvious_weight_map(instances: np.ndarray, w0: float, sigma: float, cells: np.ndarray):
    """The paper's weight map with one full-image distance transform per cell in ``cells``."""
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for cell in cells:
        distance = ndimage.distance_transform_edt(instances != cell)
        np.minimum(second, np.maximum(nearest, distance), out=second)
        np.minimum(nearest, distance, out=nearest)
    classes = (instances > 0).astype(np.intp)
    weights = class_balance(classes, 2)[classes]
    background = instances == 0
    gap = nearest[background] + second[background] - 1.0
    weights[background] += w0 * np.exp(-(gap**2) / (2 * sigma**2))
    return weights.astype(np.float32)


def best_time(function, repeats: int) -> tuple[float, object]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="image side, px")
    parser.add_argument("--cells", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--generator", choices=sorted(GENERATORS), default="em_like")
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=5.0, help="px")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast method; best")
    parser.add_argument(
        "--reference-cells",
        type=int,
        default=None,
        help="time the obvious method on this many cells only and extrapolate linearly "
        "(default: all cells, measured fully)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_suffix(".json"), help="JSON file"
    )
    args = parser.parse_args()

    generate = GENERATORS[args.generator]
    results = []
    for size in args.sizes:
        for num_cells in args.cells:
            start = time.perf_counter()
            instances = generate((size, size), num_cells=num_cells, rng=args.seed).instances
            generate_seconds = time.perf_counter() - start
            cells = np.unique(instances)
            cells = cells[cells != 0]

            fast_seconds, fast = best_time(
                lambda instances=instances: weight_map(
                    instances, w0=args.w0, sigma=args.sigma, tolerance=args.tolerance
                ),
                args.repeats,
            )
            timed = cells if args.reference_cells is None else cells[: args.reference_cells]
            start = time.perf_counter()
            reference = obvious_weight_map(instances, args.w0, args.sigma, timed)
            obvious_seconds = time.perf_counter() - start
            extrapolated = len(timed) < len(cells)
            if extrapolated:
                obvious_seconds *= len(cells) / len(timed)
                difference = None
            else:
                difference = float(np.max(np.abs(fast - reference)))
            row = {
                "shape": [size, size],
                "cells_requested": num_cells,
                "cells": int(len(cells)),
                "generate_seconds": round(generate_seconds, 4),
                "fast_seconds": round(fast_seconds, 4),
                "obvious_seconds": round(obvious_seconds, 3),
                "obvious_extrapolated": extrapolated,
                "obvious_cells_timed": int(len(timed)),
                "speedup": round(obvious_seconds / fast_seconds, 1),
                "max_abs_difference": difference,
            }
            results.append(row)
            print(
                f"{size}x{size} {len(cells):5d} cells: fast {fast_seconds:8.3f} s, "
                f"obvious {obvious_seconds:9.2f} s{' (extrapolated)' if extrapolated else ''}, "
                f"speed-up {row['speedup']:7.1f}x, max |difference| {difference}",
                flush=True,
            )

    synthetic_seconds = {}
    for name, generator in GENERATORS.items():
        synthetic_seconds[name], _ = best_time(lambda g=generator: g((1024, 1024), rng=0), 3)
        print(f"{name} 1024x1024: {synthetic_seconds[name]:.3f} s")

    write_json(
        args.output,
        {
            "benchmark": "weight_map: bounded-box transforms vs one full transform per cell",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(
                scipy=scipy.__version__,
                note="2 cores shared with other jobs; times are wall-clock",
            ),
            "parameters": {
                "generator": args.generator,
                "w0": args.w0,
                "sigma_px": args.sigma,
                "tolerance": args.tolerance,
                "class_weights": "balanced",
                "seed": args.seed,
                "fast_repeats_best_of": args.repeats,
            },
            "results": results,
            "synthetic_1024x1024_seconds_best_of_3": {
                name: round(seconds, 4) for name, seconds in synthetic_seconds.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
