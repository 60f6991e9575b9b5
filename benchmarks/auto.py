"""``--preset auto`` against ``cpu-fast`` and ``paper`` at an equal wall-clock budget.

Three kinds of data, each trained from folders as a user would:

* ``isbi``: ISBI 2012, images 00-24 to train, 25-29 to score (the data's
  README split), membrane labels; the six scores of ``benchmarks/isbi2012.py``
  (pixel, Rand, info and warping error at their best thresholds; adapted Rand
  error and variation of information of the cell components at the model's
  decision threshold).
* ``isbi-half``: the same slices at half the resolution (2 x 2 means; a
  pixel is membrane where any of its four was), 256 x 256 px: thinner
  membranes and smaller cells, the same six scores.
* ``cells``: synthetic touching cells (``unetile.data.synthetic.cells_like``,
  70 % touching), instance labels: eight 256 x 256 training images, two
  512 x 512 test images (60 % touching); pixel IoU at the decision threshold,
  F1 at IoU 0.5, SEG and merged touching pairs of the instances each model
  extracts with the options it carries.

One run (a dataset, a preset, a seed) per call writes
``benchmarks/auto_runs/DATASET_PRESET_sSEED.json``; ``--summary`` gathers them
into ``benchmarks/auto.json`` and prints the table.

    python benchmarks/auto.py --dataset isbi --preset auto --seed 0      # 12 minutes
    python benchmarks/auto.py --dataset cells --preset cpu-fast --minutes 3
    python benchmarks/auto.py --summary
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from isbi2012 import DEFAULT_DATA, TRAIN, VALIDATION, evaluate, read_split
from isbi2012 import HEADLINE as ISBI_HEADLINE
from machine import machine_info, matmul_peak_gflops

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.data.synthetic import cells_like
from unetile.demo import merged_touching_pairs
from unetile.evaluate.metrics import iou, match_objects, seg_score
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.predict.instances import InstanceOptions, extract_instances
from unetile.train.loop import make_config
from unetile.train.run import train

HERE = Path(__file__).resolve().parent
RUNS = HERE / "auto_runs"
DATASETS = ("isbi", "isbi-half", "cells")
MINUTES = {"isbi": 12.0, "isbi-half": 3.0, "cells": 3.0}
HEADLINE = {"isbi": tuple(ISBI_HEADLINE), "cells": ("iou", "f1@0.5", "seg", "merged_pairs")}
HEADLINE["isbi-half"] = HEADLINE["isbi"]


# --------------------------------------------------------------------------
# Data, written as a user's folders
# --------------------------------------------------------------------------


def halve(image: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 means of the image; a cell pixel only where all four were cell."""
    height, width = (s // 2 * 2 for s in image.shape)
    blocks = image[:height, :width].reshape(height // 2, 2, width // 2, 2)
    cell_blocks = cells[:height, :width].reshape(height // 2, 2, width // 2, 2)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8), cell_blocks.all(axis=(1, 3))


def halve_all(images, cells) -> tuple[list, list]:
    pairs = [halve(image, cell) for image, cell in zip(images, cells, strict=True)]
    return [image for image, _ in pairs], [cell for _, cell in pairs]


def write_dataset(name: str, folder: Path, data: Path) -> dict:
    """Training folders and the test set of one dataset; options for make_config."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    if name == "cells":
        for index in range(8):
            cells = cells_like((256, 256), touching_fraction=0.7, rng=index)
            image = (cells.image * 255).round().astype(np.uint8)
            io.write_image(folder / "images" / f"{index:02d}.tif", image)
            io.write_image(
                folder / "labels" / f"{index:02d}.tif", cells.instances.astype(np.uint16)
            )
        tests = [cells_like((512, 512), touching_fraction=0.6, rng=100 + i) for i in range(2)]
        test = ([t.image * 255 for t in tests], [t.instances for t in tests])
        return {"label_mode": "instances"}, test
    images, cells = read_split(data, TRAIN)
    test_images, test_cells = read_split(data, VALIDATION)
    if name == "isbi-half":
        images, cells = halve_all(images, cells)
        test_images, test_cells = halve_all(test_images, test_cells)
    for stem, image, cell in zip(TRAIN, images, cells, strict=True):
        io.write_image(folder / "images" / f"{stem}.png", np.asarray(image, np.uint8))
        io.write_image(folder / "labels" / f"{stem}.png", np.where(cell, 255, 0).astype(np.uint8))
    return {"label_mode": "membrane", "cell_value": 255}, (
        np.stack(test_images),
        np.stack(test_cells),
    )


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def decision_threshold(saved: dict) -> float:
    return (saved.get("calibration") or {}).get("threshold") or 0.5


def score_membranes(model, saved, test) -> dict:
    images, cells = test
    cell = saved["classes"]["foreground"]
    probabilities = np.stack([predict(model, image, progress=False)[cell] for image in images])
    return evaluate(probabilities, cells, decision_threshold(saved))["mean"]


def score_cells(model, saved, test) -> dict:
    threshold = decision_threshold(saved)
    options = InstanceOptions.from_dict(saved["instances"])
    if options.threshold is None and saved.get("calibration"):
        # As predict draws the instances of a calibrated model.
        options = InstanceOptions.from_dict({**options.to_dict(), "threshold": threshold})
    rows = []
    for image, truth in zip(*test, strict=True):
        probabilities = predict(model, image, progress=False)
        instances = extract_instances(probabilities, options)
        pairs, merged = merged_touching_pairs(instances, truth)
        rows.append(
            {
                "iou": iou(probabilities[1] >= threshold, truth > 0),
                "f1@0.5": match_objects(instances, truth)[0].f1,
                "seg": seg_score(instances, truth),
                "merged_pairs": merged / max(pairs, 1),
            }
        )
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


# --------------------------------------------------------------------------
# One run; the summary
# --------------------------------------------------------------------------


def run(dataset: str, preset: str, minutes: float, seed: int, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        options, test = write_dataset(dataset, folder / "train", data)
        started = time.perf_counter()
        config = make_config(
            preset,
            images=str(folder / "train" / "images"),
            labels=str(folder / "train" / "labels"),
            out=str(folder / "run"),
            max_minutes=minutes,
            seed=seed,
            **options,
        )
        plan_seconds = time.perf_counter() - started
        if config.auto is not None:
            from unetile.train.auto import describe

            print(describe(config.auto), flush=True)
        summary = train(config, progress=sys.stderr.isatty())
        model, saved = card.load_model(folder / "run")
        scoring = score_cells if dataset == "cells" else score_membranes
        scores = scoring(model, saved, test)
    return {
        "dataset": dataset,
        "preset": preset,
        "seed": seed,
        "minutes": minutes,
        "plan_seconds": round(plan_seconds, 1),
        "plan": config.auto,
        "training": config.to_dict(),
        "steps": summary["step"],
        "best_step": summary["best_step"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "calibration": saved.get("calibration"),
        "holdout": saved.get("holdout"),
        "scores": scores,
    }


def lower_is_better(key: str) -> bool:
    return key.endswith("error") or key.startswith(("skimage_variation", "merged"))


def summarize() -> dict:
    runs = [io.read_json(path) for path in sorted(RUNS.glob("*.json"))]
    table: dict = {}
    for result in runs:
        key = (result["dataset"], result["preset"])
        table.setdefault(key, []).append(result)
    print(f"{'dataset':10}{'preset':10}{'runs':>5}  scores (mean over runs; min-max)")
    rows = {}
    for (dataset, preset), results in sorted(table.items()):
        cells = {}
        for metric in HEADLINE[dataset]:
            values = [r["scores"][metric] for r in results]
            cells[metric] = {
                "mean": float(np.mean(values)),
                "min": float(np.min(values)),
                "max": float(np.max(values)),
                "runs": values,
            }
        rows[f"{dataset}/{preset}"] = {
            "runs": len(results),
            "steps": [r["steps"] for r in results],
            "scores": cells,
        }
        shown = ", ".join(f"{m} {v['mean']:.4f}" for m, v in cells.items())
        print(f"{dataset:10}{preset:10}{len(results):5}  {shown}")
    wins = {}
    for dataset in DATASETS:
        autos = table.get((dataset, "auto"), [])
        for other in ("cpu-fast", "paper"):
            references = table.get((dataset, other), [])
            if not autos or not references:
                continue
            best = {
                m: (min if lower_is_better(m) else max)(r["scores"][m] for r in references)
                for m in HEADLINE[dataset]
            }
            wins[f"{dataset}: auto vs {other}"] = [
                {
                    "seed": a["seed"],
                    "matches_or_beats_on": [
                        m
                        for m in HEADLINE[dataset]
                        if (
                            a["scores"][m] <= best[m]
                            if lower_is_better(m)
                            else a["scores"][m] >= best[m]
                        )
                    ],
                }
                for a in autos
            ]
    for name, outcome in wins.items():
        total = len(HEADLINE[name.split(":")[0]])
        shown = [f"seed {o['seed']}: {len(o['matches_or_beats_on'])}/{total}" for o in outcome]
        print(name, "matches or beats on", ", ".join(shown))
    return {"rows": rows, "auto_against_the_best_reference_run": wins}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS)
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, help="budget (default: 12 isbi, 3 the others)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISBI 2012 folder")
    parser.add_argument("--summary", action="store_true", help="gather the runs into auto.json")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/auto.py", *sys.argv[1:]])
    if args.summary:
        io.write_json(HERE / "auto.json", {"command": command, **summarize()})
        return 0
    if args.dataset is None:
        parser.error("give --dataset (or --summary)")
    keep_freed_memory()
    minutes = args.minutes or MINUTES[args.dataset]
    peak = matmul_peak_gflops()
    result = run(args.dataset, args.preset, minutes, args.seed, args.data)
    result = {
        "command": command,
        "machine": machine_info(matmul_peak_gflops=round(peak, 1)),
        "matmul_peak_after": round(matmul_peak_gflops(), 1),
        **result,
    }
    RUNS.mkdir(exist_ok=True)
    out = RUNS / f"{args.dataset}_{args.preset}_s{args.seed}.json"
    io.write_json(out, result)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["scores"].items())
    print(f"{args.dataset} {args.preset} seed {args.seed}: {result['steps']} steps; {shown}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
