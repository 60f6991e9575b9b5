"""Benchmark: time of instance extraction against the prediction it follows, 4096 x 4096.

The prediction is the ``cpu-fast`` network (depth 5, 16 base channels, the
width the CPU preset trains) run tile by tile over a 4096 x 4096
``cells_like`` image (about 1,900 cells, 70 % of them touching). Its weights
do not change the time, so it is not trained; the post-processing runs on
probabilities shaped like a trained network's instead: the two-class target
(touching contacts as background), with a quarter of each contact line left
as cell (incomplete gaps), blurred by 1.5 px. Each extraction method is timed
on the whole image and region by region as the file writer does it.

    flock /tmp/unetile-heavy.lock python benchmarks/instances_time.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info
from scipy import ndimage

from unetile.data.synthetic import cells_like
from unetile.data.weights import touching_borders
from unetile.io import write_json
from unetile.network.model import UNet
from unetile.predict.engine import predict
from unetile.predict.instances import (
    InstanceOptions,
    default_options,
    extract_instances,
    keys_by_region,
    rank_keys,
    region_grid,
)


def trained_like_probabilities(instances: np.ndarray, seed: int) -> np.ndarray:
    """Two-class probabilities a trained network gives: gaps on 3/4 of each contact."""
    rng = np.random.default_rng(seed)
    contact = touching_borders(instances)
    kept = contact & (ndimage.gaussian_filter(rng.random(instances.shape), 4) > 0.52)
    cells = ((instances > 0) & ~(contact & ~kept)).astype(np.float32)
    foreground = ndimage.gaussian_filter(cells, 1.5)
    return np.stack([1 - foreground, foreground])


def best_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def by_regions(probabilities, options, chunk):
    spatial = probabilities.shape[1:]
    keys = np.zeros(spatial, np.uint64)
    regions = region_grid(spatial, (chunk,) * len(spatial), options.extent(len(spatial)))
    return rank_keys(keys, keys_by_region(probabilities, keys, regions, options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=372, help="output tile (px) of the writer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    sample = cells_like((args.size, args.size), touching_fraction=0.7, rng=0)
    model = UNet(depth=5, base_channels=args.base_channels, norm="instance", dropout=0.0)
    model.reset_parameters(torch.Generator().manual_seed(0))
    start = time.perf_counter()
    predict(model, sample.image, normalization=([0.3], [0.25]), progress=False)
    predict_seconds = time.perf_counter() - start
    probabilities = trained_like_probabilities(sample.instances, 0)
    methods = {
        "components": InstanceOptions(),
        "watershed": InstanceOptions(method="watershed", seed_threshold=0.9, fill_holes=True),
        "distance (default)": default_options("instances"),
    }
    rows = {}
    for name, options in methods.items():
        whole = best_seconds(lambda o=options: extract_instances(probabilities, o), args.repeats)
        regional = best_seconds(
            lambda o=options: by_regions(probabilities, o, args.chunk), args.repeats
        )
        rows[name] = {
            "options": options.to_dict(),
            "whole_seconds": round(whole, 2),
            "regions_seconds": round(regional, 2),
            "whole_share_of_prediction": round(whole / predict_seconds, 4),
            "regions_share_of_prediction": round(regional / predict_seconds, 4),
        }
        print(
            f"{name:20} whole {whole:6.2f} s ({100 * whole / predict_seconds:4.1f} %), "
            f"by regions {regional:6.2f} s ({100 * regional / predict_seconds:4.1f} %)",
            flush=True,
        )
    print(f"prediction: {predict_seconds:.1f} s for {args.size}^2")
    write_json(
        args.out,
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(),
            "image": [args.size, args.size],
            "cells": int(sample.instances.max()),
            "network": {"depth": 5, "base_channels": args.base_channels, "norm": "instance"},
            "predict_seconds": round(predict_seconds, 1),
            "methods": rows,
        },
    )


if __name__ == "__main__":
    main()
