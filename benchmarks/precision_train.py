"""Training in bf16 against fp32 at an equal wall-clock budget, on ISBI 2012.

Trains a preset (default ``cpu-fast``) on images 00-24 of the ISBI 2012
training set for ``--minutes`` with ``precision = "none"`` (fp32, the paper's
arithmetic) and ``"bf16"`` (autocast; the weights, the optimizer state and the
loss stay fp32), in turns for each seed (A B, then B A for the next, so that a
drift of the shared machine falls on both), and scores both on images 25-29
with the challenge's errors (pixel, Rand, warping at their best thresholds)
and the foreground IoU at 0.5; both predict in fp32, so the score says what
the training arithmetic did. bf16 is only timed where the CPU computes it
natively (AVX-512 BF16 or AMX); elsewhere torch emulates it, slower than fp32.

Writes benchmarks/precision_train.json beside this script.

    python benchmarks/precision_train.py                  # 5 minutes each, seeds 0 and 1
    python benchmarks/precision_train.py --minutes 1 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from isbi2012 import DEFAULT_DATA, VALIDATION, link_split, read_split
from isbi2012 import TRAIN as TRAIN_STEMS
from machine import machine_info

from unetile.evaluate.metrics import iou, score
from unetile.precision import bf16_unsupported_reason
from unetile.predict import card
from unetile.predict.engine import predict, resolve_device
from unetile.train.config import make_config
from unetile.train.run import train

HERE = Path(__file__).resolve().parent
ERRORS = ["pixel_error", "rand_error", "warping_error"]


def run(data: Path, preset: str, precision: str, minutes: float, seed: int, work: Path) -> dict:
    link_split(data, TRAIN_STEMS, work / "train")
    config = make_config(
        preset,
        images=str(work / "train" / "images"),
        labels=str(work / "train" / "labels"),
        out=str(work / "run"),
        label_mode="membrane",
        cell_value=255,
        max_minutes=minutes,
        seed=seed,
        precision=precision,
    )
    started = time.perf_counter()
    summary = train(config, progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    model, saved = card.load_model(work / "run")
    images, cells = read_split(data, VALIDATION)
    foreground = saved["classes"]["foreground"]
    probabilities = [predict(model, image, progress=False)[foreground] for image in images]
    scores = [score(p, truth, ERRORS) for p, truth in zip(probabilities, cells, strict=True)]
    mean = {key: float(np.mean([s[key] for s in scores])) for key in ERRORS}
    mean["iou@0.5"] = float(
        np.mean([iou(p > 0.5, t) for p, t in zip(probabilities, cells, strict=True)])
    )
    return {
        "precision": precision,
        "seed": seed,
        "steps": summary["step"],
        "steps_per_second": summary["steps_per_second"],
        "training_seconds": summary["seconds"],
        "wall_seconds": wall,
        "scores": mean,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=HERE / "precision_train.json")
    args = parser.parse_args()
    native = bf16_unsupported_reason(resolve_device("cpu")) is None
    runs = []
    for number, seed in enumerate(args.seeds):
        order = ["none", "bf16"] if number % 2 == 0 else ["bf16", "none"]
        for precision in order:
            with tempfile.TemporaryDirectory(prefix="unetile-precision-") as work:
                result = run(args.data, args.preset, precision, args.minutes, seed, Path(work))
            runs.append(result)
            print(json.dumps(result), flush=True)
    summary = {}
    for precision in ("none", "bf16"):
        mine = [r for r in runs if r["precision"] == precision]
        summary[precision] = {
            "steps_per_second": statistics.mean(r["steps_per_second"] for r in mine),
            **{k: statistics.mean(r["scores"][k] for r in mine) for k in mine[0]["scores"]},
        }
    ratio = summary["bf16"]["steps_per_second"] / summary["none"]["steps_per_second"]
    print(f"bf16 trains {ratio:.2f}x the steps of fp32 per second (native bf16: {native})")
    for key in ("pixel_error", "rand_error", "warping_error", "iou@0.5"):
        print(f"{key}: fp32 {summary['none'][key]:.4f}  bf16 {summary['bf16'][key]:.4f}")
    record = {
        "command": "python benchmarks/precision_train.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "bf16_native": native,
        "preset": args.preset,
        "minutes": args.minutes,
        "runs": runs,
        "mean": summary,
        "bf16_steps_per_second_over_fp32": ratio,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
