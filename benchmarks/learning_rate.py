"""Which learning rates the paper's network survives: SGD, momentum 0.99, He init.

The paper gives no learning rate. This trains the ``paper`` preset (64
channels, drop-out 0.5, w0 = 10 / sigma = 5, the paper's augmentation) on a
synthetic EM image (``unetile.data.synthetic.em_like``, 400 x 400, 316 -> 132 px
tiles so that a CPU runs it in minutes) at several learning rates, and records the
mean loss of every 5 steps and the step at which the loss became NaN, if it
did. The untrained network's loss is itself reported: He initialisation
leaves logits of about 20, so the first losses are large.

Writes ``learning_rate.json`` beside this script.

    python benchmarks/learning_rate.py
    python benchmarks/learning_rate.py --tile 188 --out benchmarks/learning_rate_tile188.json
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from machine import machine_info

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.data.synthetic import em_like
from unetile.network.model import output_size
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train

HERE = Path(__file__).resolve().parent


def run(rate: float, steps: int, seed: int, tile: int) -> dict:
    sample = em_like((400, 400), rng=seed)
    with tempfile.TemporaryDirectory() as folder:
        config = make_config(
            "paper",
            out=str(Path(folder) / "run"),
            tile=(output_size(tile),),  # the benchmark names input tiles
            steps=steps,
            log_every=5,
            learning_rate=rate,
            seed=seed,
        )
        data = prepare_arrays(config, [sample.image], [sample.membrane])
        try:
            train(config, progress=False, data=data)
            diverged_at = None
        except FloatingPointError as error:
            diverged_at = int(re.search(r"at step (\d+)", str(error)).group(1))
        with open(Path(folder) / "run" / "log.csv") as handle:
            losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    return {
        "learning_rate": rate,
        "diverged_at_step": diverged_at,
        "loss_every_5_steps": [round(loss, 3) for loss in losses],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-2, 1e-3, 3e-4, 1e-4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=316, help="input tile (valid: 188, 204, ...)")
    parser.add_argument("--out", type=Path, default=HERE / "learning_rate.json")
    args = parser.parse_args(argv)

    keep_freed_memory()
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "data": f"synthetic.em_like((400, 400)), {args.tile} -> {args.tile - 184} px tiles",
        "runs": [run(rate, args.steps, args.seed, args.tile) for rate in args.rates],
    }
    for entry in results["runs"]:
        outcome = entry["diverged_at_step"]
        finite = [loss for loss in entry["loss_every_5_steps"] if np.isfinite(loss)]
        print(
            f"lr {entry['learning_rate']:g}: "
            + (f"NaN at step {outcome}" if outcome else f"finite for {args.steps} steps")
            + (f", losses {finite[0]:.3g} ... {finite[-1]:.3g}" if finite else "")
        )
    io.write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
