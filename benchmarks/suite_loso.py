"""The object rules checked leave-one-set-out on the benchmark suite.

Each rule of :mod:`unetile.train.instance_fit` has a constant or a choice: the
size floor's share of the 5th-percentile object (0.3), filling holes, and a
watershed for touching instance labels. For every set the suite trained a
``cpu-fast`` model on, this script predicts the test images once, then
scores object F1 at IoU 0.5 under each value of each rule. Leave one set
out: the value with the best mean F1 on the other sets is the one that set
would have been given; its F1 there is compared with the shipped value's.
Writes ``suite_loso.json`` beside this script.

    python benchmarks/suite_loso.py [--arm cpu-fast] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from suite import PIXELS_ONLY, SETS, model_input, pairs, truth_objects

from unetile import io
from unetile.evaluate.metrics import match_objects
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.predict.instances import InstanceOptions, extract_instances
from unetile.train.instance_fit import MIN_SIZE_SHARE

HERE = Path(__file__).resolve().parent
SHARES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5)


def variants(carried: InstanceOptions, size_p5: float) -> dict[str, dict[str, InstanceOptions]]:
    """Per rule, its values as options (the carried options otherwise)."""
    method = {"components": dataclasses.replace(carried, method="components")}
    method["watershed"] = dataclasses.replace(carried, method="watershed")
    return {
        "min_size_share": {
            f"{share:g}": dataclasses.replace(carried, min_size=int(share * size_p5))
            for share in SHARES
        },
        "fill_holes": {
            str(value): dataclasses.replace(carried, fill_holes=value) for value in (True, False)
        },
        "method": method,
    }


def set_scores(run: Path, root: Path) -> dict[str, dict[str, float]]:
    model, config = card.load_model(run)
    carried = InstanceOptions.from_dict(config["instances"])
    size_p5 = (config.get("instances_fit") or {}).get("size_p5", 0.0)
    grid = variants(carried, size_p5)
    f1 = {rule: {value: [] for value in values} for rule, values in grid.items()}
    for image_path, label_path in pairs(root, "test"):
        image = model_input(image_path, model.config.in_channels)
        probabilities = predict(model, image, progress=False)
        truth = truth_objects(np.asarray(io.read_image(label_path)), label_path.suffix == ".tif")
        for rule, values in grid.items():
            for value, options in values.items():
                objects = extract_instances(probabilities, options)
                f1[rule][value].append(match_objects(objects, truth[1], (0.5,))[0].f1)
    return {rule: {v: float(np.mean(s)) for v, s in values.items()} for rule, values in f1.items()}


def leave_one_out(scores: dict, rule: str, shipped: str) -> dict:
    sets = sorted(scores)
    rows = {}
    for left in sets:
        others = [s for s in sets if s != left]
        values = scores[left][rule]
        chosen = max(values, key=lambda v: np.mean([scores[s][rule][v] for s in others]))
        rows[left] = {
            "chosen_on_others": chosen,
            "f1_chosen": values[chosen],
            "f1_shipped": values[shipped],
            "f1_best_here": max(values.values()),
        }
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", default="cpu-fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=HERE / "suite_data")
    parser.add_argument("--work", type=Path, default=HERE / "suite_runs")
    args = parser.parse_args(argv)
    scores = {}
    for name in SETS:
        run = args.work / name / args.arm / str(args.seed) / "run"
        if name in PIXELS_ONLY or not (run / "model.safetensors").is_file():
            continue
        scores[name] = set_scores(run, args.data / name)
        print(name, json.dumps(scores[name]), flush=True)
    shipped = {"min_size_share": f"{MIN_SIZE_SHARE:g}", "fill_holes": "True"}
    loso = {rule: leave_one_out(scores, rule, value) for rule, value in shipped.items()}
    for rule, rows in loso.items():
        print(f"\n{rule} (shipped {shipped[rule]}): set, chosen on the others, F1 chosen / shipped")
        for name, row in rows.items():
            print(
                f"  {name}: {row['chosen_on_others']}, {row['f1_chosen']:.3f} / "
                f"{row['f1_shipped']:.3f} (best here {row['f1_best_here']:.3f})"
            )
    record = {
        "command": " ".join(["python", *sys.argv]),
        "arm": args.arm,
        "scores": scores,
        "leave_one_set_out": loso,
    }
    (HERE / "suite_loso.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
