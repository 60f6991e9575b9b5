"""Sparse annotations: the ignore value against full labels and against unannotated = background.

1. Data with exact ground truth: synthetic touching cells,
   :func:`unetile.data.synthetic.cells_like` (70 % of the cells touch another),
   instance labels (0 = background, one id per cell).
2. Sparse labels: on every training image only the pixels inside disks are
   annotated (radius 12 px, added until they cover about 7 % of the pixels),
   the others are unknown. Two layouts (``--contact-shares``): disks centred
   at random (cell, background and the lines between touching cells in the
   proportions the disks happen to cover), and half of them centred where two
   cells touch, as an annotator who knows the border weight matters would.
3. Every arm trains the same network for the same steps on the same images
   and seed, with the demo's recipe (depth 4, 16 base channels, the paper's
   weight map w0 = 10, sigma = 5 px and class balance, Adam 2e-3 cosine):

   - ``full labels``: every pixel annotated (the reference);
   - per layout, ``--ignore-value``: unknown pixels set to the ignore value
     and ``ignore_value`` given: no loss, no weight, and the weight map treats
     them as unknown;
   - per layout, ``unknown = background``: the same annotated pixels, the
     others left at 0 (the naive alternative without an ignore value).
4. Every model predicts held-out images (overlap-tile) and is scored on their
   FULL ground truth at threshold 0.5 (the network's own decision): pixel
   error, cell IoU, F1 at IoU 0.5 and SEG of the connected components, and the
   Rand error, and the predicted cell area over the true one; mean over the
   test images. Each arm also records how its weight maps weigh the cell
   pixels against the background pixels (what the loss asks before any step).

Prints a table and each arm's F1 and pixel error against the full-label arm
of the same run; writes ``sparse_labels.json`` beside this script with the
command line.

    python benchmarks/sparse_labels.py                     # ~5 minutes on 2 idle cores
    python benchmarks/sparse_labels.py --steps 5 --train-images 1 --test-images 1 --test-size 256
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

from unetile.allocator import keep_freed_memory
from unetile.data.synthetic import cells_like
from unetile.data.weights import touching_borders
from unetile.demo import DEMO_TRAINING
from unetile.evaluate.metrics import score
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train

METRICS = ["pixel_error", "iou", "f1", "seg", "rand_error"]
#: Label value of the unannotated pixels (instance ids are 1..n, far below it).
IGNORE_VALUE = 65535
SHOWN = ["pixel_error", "iou", "f1@0.5", "seg", "rand_error", "cell_area_vs_truth"]
FULL = "full labels"


def cell_images(count: int, seed: int, size: int):
    """``count`` synthetic images of touching cells and their instance labels."""
    samples = [cells_like((size, size), touching_fraction=0.7, rng=seed + i) for i in range(count)]
    return [s.image for s in samples], [s.instances for s in samples]


def disk_annotation(
    instances: np.ndarray,
    share: float,
    radius: float,
    contact_share: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Annotated pixels: disks of ``radius`` px added until ``share`` of the pixels is covered.

    Parameters
    ----------
    instances : ndarray of int
        The image's cells (0 = background), for the contact-centred disks.
    share : float
        Fraction of the pixels to annotate, in (0, 1].
    radius : float
        Disk radius in pixels.
    contact_share : float
        Chance, in [0, 1], that a disk is centred on a pixel where two cells
        touch (as an annotator who knows the border weight matters would
        place it); the others are centred anywhere.
    rng : numpy.random.Generator
        Draws the centres.

    Returns
    -------
    ndarray of bool
        True where annotated; covers at least ``share`` of the pixels.
    """
    from skimage.draw import disk

    contacts = np.argwhere(touching_borders(instances))
    mask = np.zeros(instances.shape, dtype=bool)
    while mask.mean() < share:
        # No extra draw at contact_share 0: the centres stay those of a plain random layout.
        if contact_share > 0 and len(contacts) and rng.uniform() < contact_share:
            centre = contacts[rng.integers(len(contacts))]
        else:
            centre = rng.uniform(0, instances.shape[0]), rng.uniform(0, instances.shape[1])
        mask[disk(centre, radius, shape=instances.shape)] = True
    return mask


def layout_name(contact_share: float) -> str:
    """Short name of an annotation layout."""
    return "random disks" if contact_share == 0 else f"disks {contact_share:.0%} on contacts"


def arm_labels(labels, masks, layout: str) -> dict[str, tuple[list[np.ndarray], int | None]]:
    """The two sparse arms of one annotation layout: training labels and ignore value."""
    pairs = list(zip(labels, masks, strict=True))
    return {
        f"{layout}, --ignore-value": (
            [np.where(m, lab, IGNORE_VALUE) for lab, m in pairs],
            IGNORE_VALUE,
        ),
        f"{layout}, unknown = background": ([np.where(m, lab, 0) for lab, m in pairs], None),
    }


def annotation_summary(labels, masks, radius: float, contact_share: float) -> dict:
    """What a layout annotates: its share of the pixels, of the cells, of the contacts."""
    annotated = np.concatenate([m.ravel() for m in masks])
    cells = np.concatenate([(lab > 0).ravel() for lab in labels])
    contacts = np.concatenate([touching_borders(lab).ravel() for lab in labels])
    return {
        "kind": f"disks of radius {radius:g} px, {contact_share:.0%} centred on cell contacts",
        "annotated_share": float(annotated.mean()),
        "cell_share_of_annotated": float(cells[annotated].mean()),
        "cell_share_of_all": float(cells.mean()),
        "contact_pixels_annotated": float(annotated[contacts].mean()),
    }


def evaluate(run_dir: Path, images, truths) -> dict[str, float]:
    """Mean of each metric over the test images, the probability map at 0.5 against full truth.

    ``cell_area_vs_truth`` (predicted cell pixels / true cell pixels) tells
    whether the errors are cells drawn too large (> 1) or too small (< 1).
    """
    model, config = card.load_model(run_dir)
    totals: dict[str, float] = {}
    for image, truth in zip(images, truths, strict=True):
        probabilities = predict(model, image, normalization=config["normalization"], progress=False)
        values = score(probabilities[1], truth, METRICS, thresholds=(0.5,))
        values["cell_area_vs_truth"] = np.mean(probabilities[1] > 0.5) / np.mean(truth > 0)
        for name in SHOWN:
            totals[name] = totals.get(name, 0.0) + float(values[name])
    return {name: value / len(images) for name, value in totals.items()}


def loss_balance(data) -> dict[str, float]:
    """How the training loss weighs cells against background, from the arm's weight maps.

    ``cell_weight_vs_background``: the summed weight of the cell pixels over
    that of the background pixels (unknown pixels weigh 0);
    ``cell_pixel_weight_vs_background``: the same per pixel (mean over mean).
    """
    cell_weight = background_weight = cell_pixels = background_pixels = 0.0
    for item in data.train:
        cells, background = item.classes == 1, item.classes == 0
        cell_weight += float(item.weights[cells].sum())
        background_weight += float(item.weights[background].sum())
        cell_pixels += float(cells.sum())
        background_pixels += float(background.sum())
    return {
        "cell_weight_vs_background": cell_weight / background_weight,
        "cell_pixel_weight_vs_background": (cell_weight / cell_pixels)
        / (background_weight / background_pixels),
    }


def train_arm(recipe: dict, args, out: Path, images, labels, ignore_value) -> dict:
    """Train one arm for ``args.steps`` steps into ``out``; its steps, seconds, loss balance."""
    config = make_config(
        **recipe,
        out=str(out),
        steps=args.steps,
        seed=args.seed,
        ignore_value=ignore_value,
        checkpoint_every=max(args.steps, 1),
        validate_every=max(args.steps, 1),
    )
    data = prepare_arrays(config, images, labels)
    summary = train(config, progress=False, data=data)
    return {"steps": summary["step"], "seconds": round(summary["seconds"], 1), **loss_balance(data)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps of every arm")
    parser.add_argument("--train-images", type=int, default=4)
    parser.add_argument("--test-images", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="training image side (pixels)")
    parser.add_argument("--test-size", type=int, default=512, help="test image side (pixels)")
    parser.add_argument("--share", type=float, default=0.07, help="annotated share of pixels")
    parser.add_argument("--radius", type=float, default=12.0, help="annotation disk radius (px)")
    parser.add_argument(
        "--contact-shares",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="annotation layouts: share of the disks centred where two cells touch (0: random)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args(argv)
    keep_freed_memory()
    # No validation images: every arm keeps its last weights, scored on the test images.
    dropped = ("keep_best", "metrics", "validate_every", "checkpoint_every")
    recipe = {k: v for k, v in DEMO_TRAINING.items() if k not in dropped}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "recipe": "unetile demo's (depth 4, base 16, w0 10, sigma 5, Adam 2e-3 cosine)",
        "ignore_value": IGNORE_VALUE,
        "metrics_threshold": 0.5,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "annotation": {},
    }
    began = time.perf_counter()
    images, labels = cell_images(args.train_images, 100 * args.seed, args.size)
    test_images, test_truths = cell_images(args.test_images, 100 * args.seed + 5000, args.test_size)
    arms = {FULL: (list(labels), None)}
    for contact_share in args.contact_shares:
        # A fresh generator per layout: each layout is the same whatever the others are.
        rng = np.random.default_rng(args.seed)
        masks = [
            disk_annotation(lab, args.share, args.radius, contact_share, rng) for lab in labels
        ]
        layout = layout_name(contact_share)
        summary = annotation_summary(labels, masks, args.radius, contact_share)
        result["annotation"][layout] = summary
        print(f"{layout}: {summary}")
        arms.update(arm_labels(labels, masks, layout))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="unetile-sparse-") as scratch:
        for index, (name, (arm, ignore_value)) in enumerate(arms.items()):
            out = Path(scratch) / f"arm{index}"
            rows[name] = train_arm(recipe, args, out, images, arm, ignore_value)
            rows[name].update(evaluate(out, test_images, test_truths))
            print(f"{name}: {rows[name]}")
    reference = rows[FULL]
    for values in rows.values():
        values["f1_vs_full"] = values["f1@0.5"] / max(reference["f1@0.5"], 1e-12)
        values["pixel_error_vs_full"] = values["pixel_error"] / max(reference["pixel_error"], 1e-12)
    result["arms"] = rows
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(f"\n{'arm':48s} {'steps':>5s} {'s':>6s} " + " ".join(f"{m:>11s}" for m in SHOWN))
    for name, values in rows.items():
        cells_text = " ".join(f"{values[m]:11.4f}" for m in SHOWN)
        print(f"{name:48s} {values['steps']:5d} {values['seconds']:6.1f} {cells_text}")
    print("against full labels (F1, pixel error):")
    for name, values in rows.items():
        print(f"  {name}: {values['f1_vs_full']:.2f}x, {values['pixel_error_vs_full']:.2f}x")
    print(f"wall time {result['wall_seconds']:.0f} s")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
