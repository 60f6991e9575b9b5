"""The calibrated threshold against the argmax (0.5), on ISBI 2012 images no run has seen.

Each arm trains the ``cpu-fast`` preset (compile off) without validation
images, with ``--holdout 0.2``, so that training holds out its own validation
and calibrates the foreground threshold for ``keep_best`` (the Rand error)
on it:

- "25 images": ISBI 2012 train 00-24 (the benchmark split of the data's
  README); 5 whole images are held out (02, 07, 12, 17, 22).
- "1 image": ISBI 2012 train 00 alone; a strip of 103 px of it is held out.

Every kept model is then scored on train 25-29 (the fixed validation block of
the README, unseen here) at 0.5 (the reference, in the same run) and at the
calibrated threshold: pixel error and Rand error (foreground-restricted). The
best threshold on those test images themselves (an oracle no user has) is
printed for comparison.

Prints a table and the ratio of the calibrated Rand error to that at 0.5;
writes ``calibration.json`` beside this script with the command line.

    python benchmarks/calibration.py                      # ~8 minutes on 2 shared cores
    python benchmarks/calibration.py --steps 20           # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.evaluate.calibration import calibrate_threshold
from unetile.evaluate.metrics import score
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train

DATA = Path("/work/shared/data/isbi2012")
METRICS = ["pixel_error", "rand_error"]
ARMS = {"25 images": range(25), "1 image": range(1)}
TEST = range(25, 30)


def read_pairs(data: Path, indices):
    names = [f"{index:02d}.png" for index in indices]
    images = [io.read_image(data / "train" / "images" / name) for name in names]
    labels = [io.read_image(data / "train" / "labels" / name) for name in names]
    return images, labels


def test_scores(run_dir: Path, images, labels, threshold: float) -> dict:
    """Mean scores at 0.5 and at ``threshold`` on the test images, and the oracle threshold."""
    model, _ = card.load_model(run_dir)
    cells = [predict(model, image, progress=False)[1] for image in images]
    truths = [label == 255 for label in labels]
    scores = {}
    for name, at in (("at_0.5", 0.5), ("calibrated", threshold)):
        pairs = zip(cells, truths, strict=True)
        values = [score(cell, truth, METRICS, thresholds=(at,)) for cell, truth in pairs]
        scores[name] = {metric: float(np.mean([v[metric] for v in values])) for metric in METRICS}
    oracle = calibrate_threshold(cells, truths, "rand_error")
    scores["oracle"] = {"threshold": oracle["threshold"], "rand_error": oracle["value"]}
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="ISBI 2012 folder")
    parser.add_argument("--steps", type=int, default=250, help="training steps of each arm")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args(argv)
    keep_freed_memory()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "preset": "cpu-fast (compile off)",
        "test_images": "ISBI 2012 train 25-29",
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    began = time.perf_counter()
    test_images, test_labels = read_pairs(args.data, TEST)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="unetile-calibration-") as scratch:
        for name, indices in ARMS.items():
            out = Path(scratch) / name.replace(" ", "_")
            config = make_config(
                "cpu-fast",
                out=str(out),
                steps=args.steps,
                compile=False,
                seed=args.seed,
                holdout=args.holdout,
                validate_every=max(1, args.steps // 2),
                checkpoint_every=args.steps,
                metrics=("rand_error", "pixel_error"),
            )
            images, labels = read_pairs(args.data, indices)
            data = prepare_arrays(config, images, labels)
            summary = train(config, progress=False, data=data)
            calibration = summary["calibration"]
            row = {
                "holdout": data.holdout,
                "steps": summary["step"],
                "seconds": round(summary["seconds"], 1),
                "calibration": {k: v for k, v in calibration.items() if k != "sweep"},
            }
            row.update(test_scores(out, test_images, test_labels, calibration["threshold"]))
            row["rand_error_calibrated_vs_0.5"] = row["calibrated"]["rand_error"] / max(
                row["at_0.5"]["rand_error"], 1e-12
            )
            rows[name] = row
            print(f"{name}: {json.dumps(row)}")
    result["arms"] = rows
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(
        f"\n{'arm':10s} {'threshold':>9s} {'val Rand 0.5':>12s} {'val Rand cal':>12s} "
        f"{'test Rand 0.5':>13s} {'test Rand cal':>13s} {'ratio':>6s} {'oracle':>12s}"
    )
    for name, row in rows.items():
        calibration = row["calibration"]
        print(
            f"{name:10s} {calibration['threshold']:9.2f} {calibration['at_0.5']:12.4f} "
            f"{calibration['value']:12.4f} {row['at_0.5']['rand_error']:13.4f} "
            f"{row['calibrated']['rand_error']:13.4f} {row['rand_error_calibrated_vs_0.5']:5.2f}x "
            f"{row['oracle']['rand_error']:.4f}@{row['oracle']['threshold']:.2f}"
        )
    print(f"wall time {result['wall_seconds']:.0f} s")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
