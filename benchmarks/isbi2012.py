"""ISBI 2012 at an equal wall-clock budget: unetile against MONAI's BasicUNet.

Trains unetile (a named preset) and a peer, MONAI's ``BasicUNet`` with its
usual recipe (cross-entropy, Adam 1e-3, random 256x256 crops with flips and
90-degree rotations, batch 4), each for the same wall-clock budget, one after
the other on the same machine, on images 00-24 of the ISBI 2012 training set,
and scores both on images 25-29 (the benchmark split of the data's README):

* pixel, Rand and warping error from :mod:`unetile.evaluate.metrics` at the best of
  the thresholds 0.0, ..., 0.9 (as the challenge scored), per image and mean;
* ``skimage.metrics.adapted_rand_error`` and the variation of information
  between the 4-connected cell components at the model's decision threshold
  (0.5, the argmax, as other tools report them; a calibrated model's own
  threshold, as ``unetile predict`` draws its labels), and for scale the
  same error of the ground truth with its membranes dilated by 1 and 2 px;
  and both again at the thresholds 0.3, 0.4, 0.5 and 0.6 with the share of
  pixels drawn as membrane, since a
  component score hangs on how thick the membranes come out; and of the
  cells grown by 1, 2 and 5 px over the membranes (``predict --grow``);
* steps, steps/s, training FLOP/s as a fraction of the measured fp32 matmul
  peak, and the share of step time spent outside the network (unetile).

Writes ``isbi2012.json`` and ``isbi2012.png`` beside this script.

    python benchmarks/isbi2012.py                    # 12 minutes each
    python benchmarks/isbi2012.py --minutes 2        # a quick look
    python benchmarks/isbi2012.py --keep runs/isbi   # keep the model and probability maps

Needs MONAI (``pip install monai``), a benchmark-only extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, matmul_peak_gflops

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.evaluate.metrics import score
from unetile.network.model import forward_flops
from unetile.network.tiling import Tiling
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.predict.instances import instances_from_probabilities
from unetile.train.loop import make_config
from unetile.train.run import train

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "isbi2012"
TRAIN = [f"{index:02d}" for index in range(25)]
VALIDATION = [f"{index:02d}" for index in range(25, 30)]
CHALLENGE_METRICS = ["pixel_error", "rand_error", "info_error", "warping_error"]


def read_split(data: Path, stems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([io.read_image(data / "train" / "images" / f"{s}.png") for s in stems])
    labels = np.stack([io.read_image(data / "train" / "labels" / f"{s}.png") for s in stems])
    return images, labels == 255


def link_split(data: Path, stems: list[str], folder: Path) -> None:
    """The trainer reads folders: link the split's files, never copy the data."""
    data = data.resolve()  # a relative link would point inside the folder
    for kind in ("images", "labels"):
        (folder / kind).mkdir(parents=True)
        for stem in stems:
            (folder / kind / f"{stem}.png").symlink_to(data / "train" / kind / f"{stem}.png")


# ---------------------------------------------------------------------------
# unetile


def run_unetile(data: Path, preset: str, minutes: float, seed: int, work: Path, options: dict):
    link_split(data, TRAIN, work / "train")
    config = make_config(
        preset,
        **options,
        images=str(work / "train" / "images"),
        labels=str(work / "train" / "labels"),
        out=str(work / "unetile"),
        label_mode="membrane",
        cell_value=255,
        max_minutes=minutes,
        seed=seed,
    )
    if config.auto is not None:
        from unetile.train.auto import describe

        print(describe(config.auto), flush=True)
    started = time.perf_counter()
    summary = train(config, progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    model, saved = card.load_model(work / "unetile")
    flops_per_step = 3 * forward_flops(saved["model"], summary["input_shape"]) * config.batch_size
    return model, saved, summary, wall, flops_per_step, config


def predict_unetile(model, saved, images: np.ndarray, tta: bool, tile=None) -> np.ndarray:
    cell = saved["classes"]["foreground"]
    normalization = saved["normalization"]
    return np.stack(
        [
            predict(
                model, image, tile_shape=tile, normalization=normalization, tta=tta, progress=False
            )[cell]
            for image in images
        ]
    )


def tile_size_check(model, saved, images, cells, whole: np.ndarray, tile: int) -> dict:
    """How much the probabilities depend on the tile size.

    Not at all for the paper's network; an instance-norm network normalises
    each tile by its own statistics, so its output changes with the tile.
    """
    tiled = predict_unetile(model, saved, images, tta=False, tile=tile)
    difference = np.abs(tiled - whole)
    threshold = (saved.get("calibration") or {}).get("threshold") or 0.5
    scores = evaluate(tiled, cells, threshold)["mean"]
    return {
        "output_tile": tile,
        "max_abs_difference": float(difference.max()),
        "mean_abs_difference": float(difference.mean()),
        "pixel_error": scores["pixel_error"],
        "rand_error": scores["rand_error"],
        "skimage_adapted_rand_error": scores["skimage_adapted_rand_error"],
    }


# ---------------------------------------------------------------------------
# The peer: MONAI BasicUNet with its usual recipe.


def run_peer(images: np.ndarray, cells: np.ndarray, minutes: float, seed: int):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = torch.from_numpy(images.astype(np.float32) / 255.0)
    targets = torch.from_numpy(cells.astype(np.int64))
    crop, batch = 256, 4
    budget = minutes * 60
    steps = 0
    started = time.perf_counter()
    model.train()
    while time.perf_counter() - started < budget:
        tiles, tile_targets = [], []
        for _ in range(batch):
            index = rng.integers(len(images))
            top, left = rng.integers(0, images.shape[1] - crop + 1, size=2)
            tile = inputs[index, top : top + crop, left : left + crop]
            target = targets[index, top : top + crop, left : left + crop]
            turns = int(rng.integers(4))
            tile, target = torch.rot90(tile, turns), torch.rot90(target, turns)
            for axis in (0, 1):
                if rng.random() < 0.5:
                    tile, target = tile.flip(axis), target.flip(axis)
            tiles.append(tile)
            tile_targets.append(target)
        logits = model(torch.stack(tiles)[:, None])
        loss = torch.nn.functional.cross_entropy(logits, torch.stack(tile_targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    seconds = time.perf_counter() - started
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, 1, crop, crop)).sum().backward()
    model.zero_grad(set_to_none=True)
    return model, steps, seconds, counter.get_total_flops()


@torch.inference_mode()
def predict_peer(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    inputs = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return torch.softmax(model(inputs), dim=1)[:, 1].numpy()


# ---------------------------------------------------------------------------
# Scores


def evaluate(probabilities: np.ndarray, cells: np.ndarray, threshold: float = 0.5) -> dict:
    """The challenge's errors at their best thresholds; the component scores at ``threshold``,
    the model's own decision (0.5, the argmax, unless training calibrated another)."""
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error, variation_of_information

    per_image = []
    for probability, truth in zip(probabilities, cells, strict=True):
        result = score(probability.astype(np.float32), truth, CHALLENGE_METRICS)
        predicted_components = label(probability >= threshold, connectivity=1)
        true_components = label(truth, connectivity=1)
        result["skimage_adapted_rand_error"] = float(
            adapted_rand_error(true_components, predicted_components)[0]
        )
        result["skimage_variation_of_information"] = float(
            sum(variation_of_information(true_components, predicted_components))
        )
        per_image.append(result)
    keys = [key for key in per_image[0] if not key.endswith("_threshold")]
    mean = {key: float(np.mean([result[key] for result in per_image])) for key in keys}
    return {"mean": mean, "per_image": per_image}


def skimage_means(true_components: list, segmentations) -> dict:
    """Mean adapted Rand error and VI of label images against the true cell components."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    errors, informations = [], []
    for truth, predicted in zip(true_components, segmentations, strict=True):
        errors.append(adapted_rand_error(truth, predicted)[0])
        informations.append(sum(variation_of_information(truth, predicted)))
    return {
        "skimage_adapted_rand_error": float(np.mean(errors)),
        "skimage_variation_of_information": float(np.mean(informations)),
    }


def component_scores_by_threshold(
    probabilities: np.ndarray, cells: np.ndarray, thresholds=(0.3, 0.4, 0.5, 0.6)
) -> dict:
    """Adapted Rand error, VI and membrane share of the cell components per threshold."""
    from skimage.measure import label

    true_components = [label(truth, connectivity=1) for truth in cells]
    return {
        str(threshold): {
            **skimage_means(
                true_components,
                (label(probability > threshold, connectivity=1) for probability in probabilities),
            ),
            "membrane_fraction": float(np.mean(probabilities <= threshold)),
        }
        for threshold in thresholds
    }


def grown_cell_scores(probabilities: np.ndarray, cells: np.ndarray, grows=(1, 2, 5)) -> dict:
    """Adapted Rand error and VI of the cells grown over the membranes.

    As ``unetile predict --instances --grow PX`` writes them: the components at
    0.5, each grown by up to PX pixels into the membrane, never into another cell.
    """
    from skimage.measure import label

    true_components = [label(truth, connectivity=1) for truth in cells]
    return {
        str(grow): skimage_means(
            true_components,
            (
                instances_from_probabilities(np.stack([1 - probability, probability]), grow=grow)
                for probability in probabilities
            ),
        )
        for grow in grows
    }


def print_component_rows(title: str, key: str, results: dict, unit: str = "") -> None:
    """One line per setting of ``results[tool][key]``: unetile's scores, then the peer's."""
    print(title)
    for setting in results["unetile"][key]:
        row = f"  {setting}{unit}:"
        for tool in ("unetile", "peer"):
            if tool not in results:
                continue
            scores = results[tool][key][setting]
            row += " |" if tool == "peer" else ""
            row += f" {tool} adapted Rand {scores['skimage_adapted_rand_error']:.4f}"
            row += f" VI {scores['skimage_variation_of_information']:.3f}"
            if "membrane_fraction" in scores:
                row += f" membrane {scores['membrane_fraction']:.3f}"
        print(row)


def thickness_sensitivity(cells: np.ndarray, pixels=(1, 2)) -> dict:
    """Adapted Rand error of the ground truth itself with its membranes dilated.

    Cell pixels predicted as membrane join one large "membrane" segment, so
    membranes only a pixel too thick already cost a large adapted Rand error.
    """
    from scipy import ndimage
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error

    result = {}
    for width in pixels:
        errors = [
            adapted_rand_error(
                label(truth, connectivity=1),
                label(~ndimage.binary_dilation(~truth, iterations=width), connectivity=1),
            )[0]
            for truth in cells
        ]
        result[f"membranes_dilated_{width}px"] = float(np.mean(errors))
    return result


HEADLINE = [
    "pixel_error",
    "rand_error",
    "warping_error",
    "info_error",
    "skimage_adapted_rand_error",
    "skimage_variation_of_information",
]


def figure(image, truth, ours, peer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [
        ("validation slice 25", image, "gray"),
        ("ground truth (white: cell)", truth, "gray"),
        ("unetile: cell probability", ours, "gray"),
        ("MONAI BasicUNet: cell probability", peer, "gray"),
    ]
    for axis, (title, data, cmap) in zip(axes, panels, strict=True):
        axis.imshow(data, cmap=cmap, vmin=0, vmax=data.max() if data.dtype == np.uint8 else 1)
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    with io.atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISBI 2012 folder")
    parser.add_argument("--minutes", type=float, default=12.0, help="budget of each training")
    parser.add_argument("--preset", default="cpu-fast", help="unetile preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="train unetile only")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training option of the preset (JSON value), e.g. --set base_channels=16",
    )
    parser.add_argument("--out", type=Path, default=HERE / "isbi2012.json")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help=(
            "keep unetile's training folder (run, weight-map cache, links to the data) and "
            "probabilities.npz (unetile with and without TTA, the peer, the truth) in DIR"
        ),
    )
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep.exists():
        if not args.keep.is_dir() or any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} exists and is not an empty folder: name a new one")

    keep_freed_memory()  # as the command line does; both trainings share the process
    peak = matmul_peak_gflops()
    train_images, train_cells = read_split(args.data, TRAIN)
    val_images, val_cells = read_split(args.data, VALIDATION)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(matmul_peak_gflops=round(peak, 1)),
        "minutes": args.minutes,
        "split": {"train": "00-24", "validation": "25-29"},
        # skimage_adapted_rand_error of the truth against itself, thickened.
        "truth_thickness_sensitivity": thickness_sensitivity(val_cells),
        "truth_membrane_fraction": float(np.mean(~val_cells)),
    }

    with contextlib.ExitStack() as stack:
        folder = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model, saved, summary, wall, flops_per_step, config = run_unetile(
            args.data, args.preset, args.minutes, args.seed, folder, parse_options(args.set)
        )
    # A calibrated model draws its labels at its own threshold (unetile predict does).
    threshold = (saved.get("calibration") or {}).get("threshold") or 0.5
    started = time.perf_counter()
    ours = predict_unetile(model, saved, val_images, tta=False)
    predict_seconds = (time.perf_counter() - started) / len(val_images)
    ours_tta = predict_unetile(model, saved, val_images, tta=True)
    train_gflops = summary["step"] * flops_per_step / summary["seconds"] / 1e9
    results["unetile"] = {
        "preset": args.preset,
        "training": config.to_dict(),
        "steps": summary["step"],
        "steps_per_second": summary["steps_per_second"],
        "wall_seconds": round(wall, 1),
        "input_shape": summary["input_shape"],
        "train_gflops_per_second": round(train_gflops, 1),
        "fraction_of_matmul_peak": round(train_gflops / peak, 3),
        "data_fraction": round(summary["data_fraction"], 3),
        "seconds_per_512_slice": round(predict_seconds, 2),
        "decision_threshold": threshold,
        "calibration": saved.get("calibration"),
        "scores": evaluate(ours, val_cells, threshold),
        "scores_tta": evaluate(ours_tta, val_cells, threshold),
        "component_scores_by_threshold": component_scores_by_threshold(ours, val_cells),
        "grown_cell_scores": grown_cell_scores(ours, val_cells),
        # Against the whole 512 x 512 slice in one tile (the automatic tile here).
        "tile_size_check": tile_size_check(
            model, saved, val_images, val_cells, ours, Tiling.of(model).at_least(128)
        ),
    }
    print(f"matmul peak {peak:.0f} GFLOP/s")
    thick = results["truth_thickness_sensitivity"]
    print(
        "adapted Rand error of the truth with membranes 1 / 2 px thicker: "
        f"{thick['membranes_dilated_1px']:.3f} / {thick['membranes_dilated_2px']:.3f}"
    )
    print(
        f"unetile ({args.preset}): {summary['step']} steps in {summary['seconds']:.0f} s, "
        f"{train_gflops:.0f} GFLOP/s = {train_gflops / peak:.0%} of peak, "
        f"{summary['data_fraction']:.1%} of step time outside the network"
    )
    check = results["unetile"]["tile_size_check"]
    print(
        f"{check['output_tile']}-px output tiles against one tile per slice: max abs "
        f"difference {check['max_abs_difference']:.2g}, pixel error {check['pixel_error']:.4f}"
    )
    peer = None
    if not args.skip_peer:
        peer_model, steps, seconds, peer_flops = run_peer(
            train_images, train_cells, args.minutes, args.seed
        )
        peer = predict_peer(peer_model, val_images)
        peer_gflops = steps * peer_flops / seconds / 1e9
        results["peer"] = {
            "model": "monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)",
            "recipe": "cross-entropy, Adam 1e-3, random 256x256 crops, flips, rot90, batch 4",
            "steps": steps,
            "steps_per_second": steps / seconds,
            "train_gflops_per_second": round(peer_gflops, 1),
            "fraction_of_matmul_peak": round(peer_gflops / peak, 3),
            "scores": evaluate(peer, val_cells),
            "component_scores_by_threshold": component_scores_by_threshold(peer, val_cells),
            "grown_cell_scores": grown_cell_scores(peer, val_cells),
        }
        results["ratio_unetile_to_peer"] = {
            key: results["unetile"]["scores"]["mean"][key] / results["peer"]["scores"]["mean"][key]
            for key in HEADLINE
            if results["peer"]["scores"]["mean"][key] > 0
        }
    print(f"{'metric (mean of 25-29)':34}{'unetile':>10}{'+TTA':>10}{'peer':>10}{'ratio':>8}")
    for key in HEADLINE:
        row = f"{key:34}{results['unetile']['scores']['mean'][key]:10.4f}"
        row += f"{results['unetile']['scores_tta']['mean'][key]:10.4f}"
        if peer is not None:
            row += f"{results['peer']['scores']['mean'][key]:10.4f}"
            row += f"{results['ratio_unetile_to_peer'].get(key, float('nan')):8.2f}"
        print(row)
    truth_share = results["truth_membrane_fraction"]
    print_component_rows(
        f"cell components by threshold (truth: {truth_share:.3f} membrane)",
        "component_scores_by_threshold",
        results,
    )
    print_component_rows(
        "cells grown over the membranes (predict --instances --grow PX)",
        "grown_cell_scores",
        results,
        unit=" px",
    )
    io.write_json(args.out, results)
    if args.keep:
        maps = {"unetile": ours, "unetile_tta": ours_tta, "truth": val_cells}
        if peer is not None:
            maps["peer"] = peer
        np.savez_compressed(args.keep / "probabilities.npz", **maps)
    figure(
        val_images[0],
        val_cells[0].astype(np.uint8) * 255,
        ours[0],
        peer[0] if peer is not None else np.zeros_like(ours[0]),
        args.out.with_suffix(".png"),
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
