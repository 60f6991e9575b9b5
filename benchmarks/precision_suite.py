"""bf16 against fp32 prediction on the benchmark suite's sets: accuracy and speed.

For each unetile model the suite trained (``benchmarks/suite_runs/SET/ARM/SEED/run``),
predicts the set's test images in fp32 and in bf16 (the command line's
``--precision auto`` on a processor with native bf16), each timed in the same
run, and compares: the share of pixels whose label agrees, the largest
probability change, and foreground IoU and object F1@0.5 (the model's own
post-processing) against the truth under each precision. Writes
``precision_suite.json`` beside this script.

    python benchmarks/suite.py ...          # trains the models first
    python benchmarks/precision_suite.py [--arms cpu-fast auto] [--sets dic-hela ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from suite import SETS, model_input, pairs, truth_objects

from unetile import io
from unetile.evaluate.metrics import iou, match_objects
from unetile.precision import bf16_unsupported_reason
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.predict.instances import InstanceOptions, extract_instances, foreground_mask

HERE = Path(__file__).resolve().parent


def compare(run: Path, root: Path) -> dict:
    model, config = card.load_model(run)
    options = InstanceOptions.from_dict(config["instances"])
    seconds = {"fp32": 0.0, "bf16": 0.0}
    agree, changed, scores = [], 0.0, {"fp32": [], "bf16": []}
    for image_path, label_path in pairs(root, "test"):
        image = model_input(image_path, model.config.in_channels)
        label = np.asarray(io.read_image(label_path))
        truth_foreground, truth = truth_objects(label, label_path.suffix == ".tif")
        maps = {}
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            maps[precision] = predict(model, image, precision=precision, progress=False)
            seconds[precision] += time.perf_counter() - started
            objects = extract_instances(maps[precision], options)
            scores[precision].append(
                (
                    iou(foreground_mask(maps[precision], options), truth_foreground),
                    match_objects(objects, truth, (0.5,))[0].f1,
                )
            )
        labels = [foreground_mask(maps[p], options) for p in ("fp32", "bf16")]
        agree.append(float(np.mean(labels[0] == labels[1])))
        changed = max(changed, float(np.abs(maps["fp32"] - maps["bf16"]).max()))
    return {
        "label_agreement": float(np.mean(agree)),
        "max_probability_change": changed,
        "speed_up": seconds["fp32"] / seconds["bf16"],
        "seconds": seconds,
        **{
            f"{name}_{p}": float(np.mean([s[i] for s in scores[p]]))
            for p in scores
            for i, name in enumerate(("iou", "f1"))
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--arms", nargs="+", default=["cpu-fast", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=HERE / "suite_data")
    parser.add_argument("--work", type=Path, default=HERE / "suite_runs")
    args = parser.parse_args(argv)
    reason = bf16_unsupported_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"bf16 is not native here ({reason}); nothing to compare")
    results = {}
    for name in args.sets:
        for arm in args.arms:
            run = args.work / name / arm / str(args.seed) / "run"
            if not (run / "model.safetensors").is_file():
                continue
            results[f"{name}/{arm}"] = compare(run, args.data / name)
            print(name, arm, json.dumps(results[f"{name}/{arm}"]), flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "results": results}
    (HERE / "precision_suite.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
