"""Elastic deformation: unetile.data.augment (torch grid_sample) against elasticdeform (C).

Both deform the same tiles (image bicubic, labels and weights nearest
neighbour, mirrored borders) with a random 3x3 control grid of 10 px standard
deviation, once alone and once with a random rotation. elasticdeform works on
one tile at a time on the CPU, so a batch is a loop; unetile.data.augment does the
whole batch in one call, on the tensors' device. Prints the ratio
elasticdeform time / torch time (> 1: torch faster) and writes
benchmarks/augment.json.

Quick run:  python benchmarks/augment.py --sizes 128 --batches 1 --repeats 2
Full run:   nice -n 5 python benchmarks/augment.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

import elasticdeform
import numpy as np
import torch
from machine import machine_info

from unetile.data.augment import AugmentParams, augment_batch

CONFIGURATIONS = {
    "elastic": AugmentParams(rotation=False, flip=False, shift=0.0, gray=False),
    "elastic+rotation": AugmentParams(flip=False, shift=0.0, gray=False),
}


def make_batch(batch: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.random((batch, 1, size, size), dtype=np.float32)
    labels = (rng.random((batch, size, size)) < 0.5).astype(np.int64)
    weights = rng.random((batch, size, size), dtype=np.float32) * 10.0
    return images, labels, weights


def run_elasticdeform(images, labels, weights, rotate: bool):
    rng = np.random.default_rng(0)
    outputs = []
    for index in range(images.shape[0]):
        displacement = rng.normal(0.0, 10.0, size=(2, 3, 3))
        angle = float(rng.uniform(0.0, 360.0)) if rotate else None
        outputs.append(
            elasticdeform.deform_grid(
                [images[index, 0], labels[index], weights[index]],
                displacement,
                order=[3, 0, 0],
                mode="mirror",
                rotate=angle,
            )
        )
    return outputs


def run_torch(images, labels, weights, params, device):
    result = augment_batch(images, labels, weights, np.random.default_rng(0), params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocations, first-call dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[572, 1024], help="tile sizes (px)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = []
    for size in args.sizes:
        for batch in args.batches:
            images, labels, weights = make_batch(batch, size, seed=size + batch)
            tensors = [torch.from_numpy(array).to(device) for array in (images, labels, weights)]
            for name, params in CONFIGURATIONS.items():
                rotate = params.rotation
                reference = median_seconds(
                    partial(run_elasticdeform, images, labels, weights, rotate=rotate),
                    args.repeats,
                )
                candidate = median_seconds(
                    partial(run_torch, *tensors, params=params, device=device), args.repeats
                )
                ratio = reference / candidate
                results.append(
                    {
                        "augmentation": name,
                        "size": size,
                        "batch": batch,
                        "elasticdeform_seconds": reference,
                        "torch_seconds": candidate,
                        "ratio_elasticdeform_over_torch": ratio,
                    }
                )
                print(
                    f"{name:17s} {size:5d}px batch {batch}: elasticdeform {reference * 1e3:8.1f} ms"
                    f"  torch ({device.type}) {candidate * 1e3:8.1f} ms  ratio {ratio:5.2f}"
                )

    record = {
        "benchmark": "elastic deformation of image (bicubic) + labels + weights (nearest)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(device=str(device), elasticdeform=version("elasticdeform")),
        "results": results,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
