"""Time each metric of unetile.evaluate.metrics on ISBI-like 512x512 and 2048x2048 inputs.

Reference in the same run: scikit-image's adapted_rand_error and
variation_of_information on the same label images (the ratio printed is the
reference time over ours), with a check that the Rand scores agree where the
definitions coincide. Target: warping error of a 512x512 ISBI-like image under
2 s on this CPU.

    python benchmarks/metrics.py                      # 512 and 2048, ISBI labels
    python benchmarks/metrics.py --sizes 256 --repeats 1   # quick

Ground truth: ISBI 2012 training labels (a mosaic of them for sizes above 512);
without the data, ``unetile.data.synthetic.em_like``. Prediction: the ground truth
plus smoothed Gaussian noise, thresholded at 0.5 (boundary jitter, a few splits
and mergers), as a binary map, and the smoothed map itself as probabilities.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine_info
from scipy import ndimage

from unetile import io
from unetile.evaluate import metrics

ISBI_LABELS = Path("/work/shared/data/isbi2012/train/labels")


def ground_truth(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Binary cell map (True = cell) of size x size pixels, and where it came from."""
    if ISBI_LABELS.is_dir():
        paths = io.list_images(ISBI_LABELS)
        tiles_per_side = -(-size // 512)
        order = rng.permutation(len(paths))
        rows = []
        for row in range(tiles_per_side):
            tiles = []
            for column in range(tiles_per_side):
                path = paths[order[(row * tiles_per_side + column) % len(paths)]]
                tiles.append(io.read_image(path) > 127)
            rows.append(np.concatenate(tiles, axis=1))
        mosaic = np.concatenate(rows, axis=0)[:size, :size]
        return mosaic, f"ISBI 2012 train labels ({tiles_per_side}x{tiles_per_side} mosaic)"
    from unetile.data.synthetic import em_like

    return em_like((size, size), rng=rng).membrane > 127, "unetile.data.synthetic.em_like"


def perturbed(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Probability-like map: the truth plus Gaussian noise (sd 0.6), smoothed by sigma 1.5 px."""
    noisy = ndimage.gaussian_filter(truth + rng.normal(0, 0.6, truth.shape), 1.5)
    return np.clip((noisy - noisy.min()) / (noisy.max() - noisy.min()), 0, 1)


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def singletons(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    relabelled = prediction.copy()
    holes = (prediction == 0) & (truth > 0)
    relabelled[holes] = prediction.max() + 1 + np.arange(np.count_nonzero(holes))
    return relabelled


def run_size(size: int, repeats: int, rng: np.random.Generator) -> dict:
    from skimage.metrics import adapted_rand_error, variation_of_information

    truth, source = ground_truth(size, rng)
    probabilities = perturbed(truth.astype(float), rng)
    prediction = probabilities > 0.5
    structure = ndimage.generate_binary_structure(2, 1)
    true_labels, true_count = ndimage.label(truth, structure)
    predicted_labels, predicted_count = ndimage.label(prediction, structure)
    ours = {
        "connected_components (both images)": lambda: (
            ndimage.label(truth, structure),
            ndimage.label(prediction, structure),
        ),
        "pixel_error": lambda: metrics.pixel_error(prediction, truth),
        "rand_scores": lambda: metrics.rand_scores(predicted_labels, true_labels),
        "info_score": lambda: metrics.info_score(predicted_labels, true_labels),
        "warping_error": lambda: metrics.warping_error(prediction, truth),
        "iou": lambda: metrics.iou(prediction, truth),
        "dice": lambda: metrics.dice(prediction, truth),
        "seg_score": lambda: metrics.seg_score(predicted_labels, true_labels),
        "match_objects (10 IoU thresholds)": lambda: metrics.match_objects(
            predicted_labels, true_labels
        ),
        "score (binary, default metrics)": lambda: metrics.score(prediction, truth),
        "score (probabilities, 10 thresholds)": lambda: metrics.score(probabilities, truth),
    }
    reference = {
        "skimage adapted_rand_error": lambda: adapted_rand_error(true_labels, predicted_labels),
        "skimage variation_of_information": lambda: variation_of_information(
            true_labels, predicted_labels, ignore_labels=(0,)
        ),
    }
    timings = {name: best_time(function, repeats) for name, function in ours.items()}
    reference_timings = {name: best_time(function, repeats) for name, function in reference.items()}
    v_rand = metrics.rand_scores(predicted_labels, true_labels)[0]
    skimage_error = adapted_rand_error(true_labels, singletons(predicted_labels, true_labels))[0]
    warping = metrics.warping_error(prediction, truth)
    return {
        "size": size,
        "ground_truth": source,
        "true_objects": int(true_count),
        "predicted_objects": int(predicted_count),
        "values": {
            "pixel_error": metrics.pixel_error(prediction, truth),
            "rand_error": 1 - v_rand,
            "rand_error_skimage_singletons": float(skimage_error),
            "rand_error_skimage_as_is": float(adapted_rand_error(true_labels, predicted_labels)[0]),
            "info_error": 1 - metrics.info_score(predicted_labels, true_labels),
            "warping_error": warping.error,
            "splits": warping.splits,
            "mergers": warping.mergers,
        },
        "seconds": timings,
        "reference_seconds": reference_timings,
        "speedup_rand_vs_skimage": reference_timings["skimage adapted_rand_error"]
        / timings["rand_scores"],
        "speedup_info_vs_skimage": reference_timings["skimage variation_of_information"]
        / timings["info_score"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 2048], help="image sides (px)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings per metric (best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mosaic and the noise")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_suffix(".json"), help="result JSON"
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    results = []
    for size in args.sizes:
        result = run_size(size, args.repeats, rng)
        results.append(result)
        print(
            f"{size}x{size} ({result['ground_truth']}): {result['true_objects']} true, "
            f"{result['predicted_objects']} predicted objects"
        )
        for name, seconds in {**result["seconds"], **result["reference_seconds"]}.items():
            print(f"  {name:40s} {seconds * 1000:9.1f} ms")
        print(
            f"  speed-up over skimage: Rand x{result['speedup_rand_vs_skimage']:.1f}, "
            f"VI x{result['speedup_info_vs_skimage']:.1f}"
        )
        values = result["values"]
        print(
            "  rand_error {rand_error:.6f} (skimage: with singletons "
            "{rand_error_skimage_singletons:.6f}, as is {rand_error_skimage_as_is:.6f}); "
            "warping_error {warping_error:.6f}, "
            "{splits} splits, {mergers} mergers".format(**values)
        )
    target = {
        "warping_error_512_seconds": next(
            (r["seconds"]["warping_error"] for r in results if r["size"] == 512), None
        ),
        "limit_seconds": 2.0,
    }
    if target["warping_error_512_seconds"] is not None:
        target["met"] = target["warping_error_512_seconds"] < target["limit_seconds"]
        print(
            f"target: warping error 512x512 in {target['warping_error_512_seconds']:.3f} s "
            f"(< 2 s: {'met' if target['met'] else 'NOT met'})"
        )

    io.write_json(
        args.out,
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info(),
            "target": target,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
