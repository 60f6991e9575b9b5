"""Fine-tuning a model trained on ISBI 2012 against training from scratch, at the same budget.

1. Source model: the ``cpu-fast`` preset trained on images 00-24 of the ISBI
   2012 training set (the benchmark split of the data's README).
2. New data: a few slices of other EM-like data, :func:`unetile.data.synthetic.em_like`
   (Voronoi cells bent like neurites, 2-3 px dark membranes, vesicles, noise;
   values in [0, 1] where ISBI's are 0-255), with exact labels.
3. On the same few training slices and for the same number of steps, each
   arm trains with the ``cpu-fast`` recipe: from scratch (He init), and from
   the source model with ``--init-normalization recompute`` (the default),
   ``keep``, and ``recompute`` with ``--freeze-encoder``. The source model
   without any fine-tuning is scored too.
4. Every model is scored on held-out em_like slices: pixel error, Rand error
   (foreground-restricted, ISBI 2012) and cell IoU at threshold 0.5 (the
   network's own decision), mean over the slices.

Prints a table and the ratio of each arm's Rand error to the scratch arm's;
writes ``finetune.json`` beside this script with the command line.

    python benchmarks/finetune.py                              # ~6 minutes on 2 cores
    python benchmarks/finetune.py --pretrain-steps 20 --steps 10 --test-images 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_info

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.data.synthetic import em_like
from unetile.evaluate.metrics import score
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train

DATA = Path("/work/shared/data/isbi2012")
METRICS = ["pixel_error", "rand_error", "iou"]
ARMS = {
    "scratch": {},
    "init, recompute normalisation": {"init_normalization": "recompute"},
    "init, keep normalisation": {"init_normalization": "keep"},
    "init, recompute, frozen encoder": {"init_normalization": "recompute", "freeze_encoder": True},
}


def isbi_training_set(data: Path, count: int):
    names = [f"{index:02d}.png" for index in range(count)]
    images = [io.read_image(data / "train" / "images" / name) for name in names]
    labels = [io.read_image(data / "train" / "labels" / name) for name in names]
    return images, labels


def em_slices(count: int, seed: int, size: int):
    samples = [em_like((size, size), rng=seed + index) for index in range(count)]
    return [s.image for s in samples], [s.membrane for s in samples]


def evaluate(run_dir: Path, images, labels) -> dict[str, float]:
    model, config = card.load_model(run_dir)
    totals = dict.fromkeys(METRICS, 0.0)
    for image, label in zip(images, labels, strict=True):
        probabilities = predict(model, image, normalization=config["normalization"], progress=False)
        values = score(probabilities[1], label, METRICS, thresholds=(0.5,))
        for name in METRICS:
            totals[name] += float(values[name])
    return {name: value / len(images) for name, value in totals.items()}


def options(args, out: Path, steps: int) -> dict:
    # cpu-fast without torch.compile: its ~30 s of compiling would dominate these short runs.
    return dict(
        out=str(out),
        steps=steps,
        compile=False,
        seed=args.seed,
        checkpoint_every=max(steps, 1),
        validate_every=max(steps, 1),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="ISBI 2012 folder")
    parser.add_argument("--source-images", type=int, default=25, help="ISBI images 00..N-1")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=80, help="steps of every fine-tuning arm")
    parser.add_argument("--train-images", type=int, default=2, help="em_like training slices")
    parser.add_argument("--test-images", type=int, default=3, help="em_like test slices")
    parser.add_argument("--size", type=int, default=512, help="em_like slice size (pixels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args(argv)
    keep_freed_memory()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "preset": "cpu-fast (compile off)",
        "metrics_threshold": 0.5,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unetile-finetune-") as scratch:
        scratch = Path(scratch)
        source = scratch / "isbi"
        images, labels = isbi_training_set(args.data, args.source_images)
        config = make_config("cpu-fast", **options(args, source, args.pretrain_steps))
        summary = train(config, progress=False, data=prepare_arrays(config, images, labels))
        result["source"] = {
            "steps": summary["step"],
            "seconds": round(summary["seconds"], 1),
            "images": f"ISBI 2012 train 00-{args.source_images - 1:02d}",
        }
        print(f"source: {summary['step']} steps on ISBI in {summary['seconds']:.0f} s")
        new_images, new_labels = em_slices(args.train_images, 1000 + args.seed, args.size)
        test_images, test_labels = em_slices(args.test_images, 2000 + args.seed, args.size)
        rows = {"source model, not fine-tuned": {"steps": 0, "seconds": 0.0}}
        rows["source model, not fine-tuned"].update(evaluate(source, test_images, test_labels))
        for name, extra in ARMS.items():
            out = scratch / name.replace(" ", "_").replace(",", "")
            arm = dict(options(args, out, args.steps), **extra)
            if extra:
                arm["init"] = str(source)
            config = make_config("cpu-fast", **arm)
            data = prepare_arrays(config, new_images, new_labels)
            summary = train(config, progress=False, data=data)
            rows[name] = {"steps": summary["step"], "seconds": round(summary["seconds"], 1)}
            rows[name].update(evaluate(out, test_images, test_labels))
            print(f"{name}: {rows[name]}")
    reference = rows["scratch"]["rand_error"]
    for values in rows.values():
        values["rand_error_vs_scratch"] = values["rand_error"] / max(reference, 1e-12)
    result["arms"] = rows
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(f"\n{'arm':36s} {'steps':>5s} {'s':>6s} " + " ".join(f"{m:>11s}" for m in METRICS))
    for name, values in rows.items():
        cells = " ".join(f"{values[m]:11.4f}" for m in METRICS)
        print(f"{name:36s} {values['steps']:5d} {values['seconds']:6.1f} {cells}")
    print("Rand error against scratch: ", end="")
    print(", ".join(f"{n}: {v['rand_error_vs_scratch']:.2f}x" for n, v in rows.items()))
    print(f"wall time {result['wall_seconds']:.0f} s")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
