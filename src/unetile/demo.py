"""``unetile demo``: the whole method on synthetic cells, in a few minutes on a laptop CPU.

It generates training images of touching cells with exact ground truth
(:mod:`unetile.synthetic`), trains two small U-Nets for the same number of
steps, one with the paper's weight map (w0 = 10, sigma = 5 px) and one
without the border term (w0 = 0), predicts a large synthetic image with
overlap-tile, scores both with two instance pipelines (the paper's connected
components of the class map, and the instance options the model carries in
its config.json, picked in training, :mod:`unetile.instances`; the figure and
the table name them), and writes figures a person
wants to look at. The comparison is the point of the demo: the border term
is what teaches the network the thin gaps that separate touching cells, so
with it touching cells come out as separate objects.

Training is sized in steps, not wall-clock time: a time budget on a shared
CPU gave fewer steps, and a different result, whenever another process ran.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import io
from .data.synthetic import cells_like, touching_pairs
from .evaluate.metrics import score
from .predict import card
from .predict.engine import predict
from .predict.instances import InstanceOptions, extract_instances
from .train.config import make_config
from .train.loop import prepare_data
from .train.run import train

#: Training steps of each demo network (measured: README, The demo).
DEMO_STEPS = 600
#: The two instance pipelines the demo scores.
PIPELINES = ("components", "watershed")

#: Options shared by both demo runs: a small network that learns in minutes on 2 cores.
DEMO_TRAINING = dict(
    label_mode="instances",
    depth=4,
    base_channels=16,
    max_tile=212,
    optimizer="adam",
    learning_rate=2e-3,
    schedule="cosine",
    channels_last=False,
    validate_every=100,
    checkpoint_every=100,
    log_every=10,
    keep_best="f1",
    metrics=("f1", "seg", "pixel_error", "rand_error"),
)

CELL_COLORS = np.array(
    [
        [0.90, 0.25, 0.20],
        [0.20, 0.60, 0.90],
        [0.95, 0.75, 0.10],
        [0.35, 0.80, 0.35],
        [0.75, 0.35, 0.85],
        [0.10, 0.80, 0.80],
        [0.95, 0.50, 0.10],
        [0.55, 0.55, 0.95],
    ],
    dtype=np.float32,
)


def write_dataset(folder: Path, count: int, shape: tuple[int, int], seed: int) -> None:
    """Write ``count`` synthetic cell images and instance labels as TIFF pairs."""
    for index in range(count):
        sample = cells_like(shape, touching_fraction=0.7, rng=seed + index)
        io.write_image(folder / "images" / f"{index:02d}.tif", sample.image)
        io.write_image(folder / "labels" / f"{index:02d}.tif", sample.instances.astype(np.uint16))


def color_instances(image: np.ndarray, instances: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB overlay of instance labels on a gray image in [0, 1]: one color per cell."""
    gray = np.clip(image, 0.0, 1.0)[..., None].repeat(3, axis=-1)
    colors = CELL_COLORS[(instances.astype(np.int64) * 7919) % len(CELL_COLORS)]
    inside = instances > 0
    overlay = gray.copy()
    overlay[inside] = (1 - alpha) * gray[inside] + alpha * colors[inside]
    from skimage.segmentation import find_boundaries

    overlay[find_boundaries(instances, mode="inner")] = (1.0, 1.0, 1.0)
    return overlay


def merged_touching_pairs(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Touching ground-truth pairs, and how many of them the prediction merged.

    A pair is merged when the predicted object covering most of each cell is
    the same object.
    """
    pairs = touching_pairs(truth)
    if not pairs:
        return 0, 0
    from scipy import ndimage

    ids = np.arange(1, int(truth.max()) + 1)
    # The predicted id covering most of each true cell (0 when the cell is missed).
    majority = ndimage.labeled_comprehension(
        predicted, truth, ids, lambda values: np.bincount(values).argmax(), np.int64, 0
    )
    owner = dict(zip(ids.tolist(), majority.tolist(), strict=True))
    merged = sum(1 for a, b in pairs if owner[a] != 0 and owner[a] == owner[b])
    return len(pairs), merged


def describe_instances(options: InstanceOptions | dict) -> str:
    """Instance options in a few words: ``connected components, threshold 0.8, min size 215 px``."""
    if isinstance(options, dict):
        options = InstanceOptions.from_dict(options)
    method = {
        "components": "connected components",
        "watershed": f"seeded watershed (seeds > {options.seed_threshold:g})",
        "distance": f"distance watershed (h = {options.h:g} px)",
    }.get(options.method, options.method)
    words = [method]
    words.append("argmax" if options.threshold is None else f"threshold {options.threshold:g}")
    if options.min_size:
        words.append(f"min size {options.min_size} px")
    if options.opening:
        words.append(f"opening {options.opening} px")
    if options.fill_holes:
        words.append("holes filled")
    if options.connectivity != 1:
        words.append(f"connectivity {options.connectivity}")
    return ", ".join(words)


def _wrap_at_commas(text: str, width: int) -> str:
    """``text`` on lines of up to ``width`` characters, broken after its commas only."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += f", {part}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return "\n".join(lines)


def _save_figure(figure, path: Path) -> None:
    with io.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def figure_weight_map(image, instances, classes, weights, path: Path) -> None:
    """The paper's figure 3: raw image, ground truth, segmentation mask, weight map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [
        ("a  raw image", image, "gray"),
        ("b  ground truth (one color per cell)", color_instances(image, instances), None),
        ("c  segmentation mask (white: cell)", classes, "gray"),
        ("d  weight map w(x) (w0 = 10, sigma = 5 px)", weights, "jet"),
    ]
    for axis, (title, data, cmap) in zip(axes, panels, strict=True):
        shown = axis.imshow(data, cmap=cmap, interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    figure.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.02)
    _save_figure(figure, path)
    plt.close(figure)


def figure_prediction(image, truth, predicted: dict, results: dict, path: Path) -> None:
    """A crop of the large test image: truth and each run's instances, both pipelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crop = (slice(0, 512), slice(0, 512))
    figure, axes = plt.subplots(2, 3, figsize=(15, 10.6))
    titles = {"weighted": "with the border weight (w0 = 10)", "unweighted": "without it (w0 = 0)"}
    # What each panel used: the paper's components, or the options each model carried.
    pipelines = {"components": "the paper's pipeline", "watershed": "the model's options"}
    for row, pipeline in enumerate(PIPELINES):
        axes[row, 0].imshow(color_instances(image[crop], truth[crop]), interpolation="nearest")
        axes[row, 0].set_title("ground truth", fontsize=10)
        for column, name in enumerate(("weighted", "unweighted"), start=1):
            result = results[name][pipeline]
            axis = axes[row, column]
            labels = predicted[name][pipeline]
            axis.imshow(color_instances(image[crop], labels[crop]), interpolation="nearest")
            axis.set_title(
                f"{titles[name]}, {pipelines[pipeline]}:\n"
                f"{_wrap_at_commas(describe_instances(result['options']), 44)}"
                f"\nF1@0.5 = {result['f1@0.5']:.3f}, "
                f"merged pairs {result['touching_pairs_merged']}/{result['touching_pairs']}",
                fontsize=10,
            )
    for axis in axes.ravel():
        axis.axis("off")
    _save_figure(figure, path)
    plt.close(figure)


def figure_input(image: np.ndarray, path: Path) -> None:
    """The whole test image, downsampled for viewing."""
    step = max(1, max(image.shape) // 1024)
    io.write_image(path, (np.clip(image[::step, ::step], 0, 1) * 255).astype(np.uint8))


def run_demo(
    out: str | os.PathLike,
    *,
    steps: int = DEMO_STEPS,
    minutes: float | None = None,
    test_size: int = 2048,
    train_images: int = 8,
    train_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the demo into ``out``; return its metrics (also written to ``metrics.json``).

    Parameters
    ----------
    out : path
        Output folder; created, and replaced if it holds an earlier demo.
    steps : int
        Training steps of each network.
    minutes : float, optional
        Also stop training once this many minutes (both runs together) are spent.
    test_size : int
        Height and width (pixels) of the synthetic test image.
    train_images, train_size : int
        Number and size (pixels) of the synthetic training images.
    seed : int
        Seed of the data generators and of training.
    progress : bool
        Show progress bars.
    """
    out = Path(out)
    if out.exists() and not (out / "metrics.json").exists() and any(out.iterdir()):
        raise io.InputError(f"{out}: exists and is not an earlier demo folder; give another --out")
    started = time.perf_counter()
    for child in ("data", "runs"):
        shutil.rmtree(out / child, ignore_errors=True)
    test = _write_demo_data(out / "data", train_images, train_size, test_size, seed)

    results: dict[str, dict] = {}
    predicted: dict[str, np.ndarray] = {}
    first_data = None
    for name, w0 in (("weighted", 10.0), ("unweighted", 0.0)):
        config = _demo_config(out, name, w0, seed=seed, steps=steps, minutes=minutes)
        data = prepare_data(config)
        first_data = first_data or data
        results[name], predicted[name] = _train_predict_and_score(
            config, data, out / "runs" / name, test, w0, progress
        )

    _write_figures(out, first_data.train[0], test, predicted, results)
    report = {
        "test_image_shape": [test_size, test_size],
        "steps": steps,
        "minutes_budget": minutes,
        "seconds_total": round(time.perf_counter() - started, 1),
        **results,
    }
    io.write_json(out / "metrics.json", report)
    return report


def _write_demo_data(data_dir: Path, train_images: int, train_size: int, test_size: int, seed):
    """Training, validation and test images on disk; returns the test sample."""
    write_dataset(data_dir / "train", train_images, (train_size, train_size), seed)
    # Twice the side, up to the test image's: the model's instance options are
    # picked on it (about 30 cells).
    val_size = min(2 * train_size, test_size)
    write_dataset(data_dir / "val", 1, (val_size, val_size), seed + 1000)
    test = cells_like((test_size, test_size), touching_fraction=0.7, rng=seed + 2000)
    io.write_image(data_dir / "test" / "image.tif", test.image)
    io.write_image(data_dir / "test" / "instances.tif", test.instances.astype(np.uint32))
    return test


def _demo_config(out: Path, name: str, w0: float, *, seed: int, steps: int, minutes):
    data_dir = out / "data"
    return make_config(
        **DEMO_TRAINING,
        w0=w0,
        seed=seed,
        steps=steps,
        max_minutes=None if minutes is None else minutes / 2,
        images=str(data_dir / "train" / "images"),
        labels=str(data_dir / "train" / "labels"),
        val_images=str(data_dir / "val" / "images"),
        val_labels=str(data_dir / "val" / "labels"),
        out=str(out / "runs" / name),
    )


def _train_predict_and_score(config, data, run_dir: Path, test, w0: float, progress: bool):
    """One run's results (training, then each pipeline's scores) and its instances by pipeline."""
    summary = train(config, progress=progress, data=data)
    model, saved = card.load_model(run_dir)
    probability = predict(model, test.image, progress=progress)
    carried = InstanceOptions.from_dict(saved["instances"])
    pipelines = {
        "components": InstanceOptions(foreground_classes=carried.foreground_classes),
        "watershed": carried,
    }
    predicted = {}
    result = {
        "w0": w0,
        "cells_true": int(len(np.unique(test.instances)) - 1),
        "training_steps": summary["step"],
        "training_seconds": round(summary["seconds"], 1),
    }
    for pipeline, options in pipelines.items():
        instances = extract_instances(probability, options)
        predicted[pipeline] = instances
        io.write_image(run_dir / f"test_instances_{pipeline}.tif", instances)
        result[pipeline] = _scores(instances, test.instances, options)
    return result, predicted


def _write_figures(out: Path, sample, test, predicted: dict, results: dict) -> None:
    """Figure 3 of a training sample, the prediction overlay, the input and the curves."""
    figure_weight_map(
        sample.image[0],
        sample.instances,
        sample.classes,
        sample.weights,
        out / "figure3_weight_map.png",
    )
    overlay = out / "prediction_overlay.png"
    figure_prediction(test.image, test.instances, predicted, results, overlay)
    figure_input(test.image, out / "input.png")
    shutil.copyfile(out / "runs" / "weighted" / "curves.png", out / "curves.png")


def _scores(instances: np.ndarray, truth: np.ndarray, options: InstanceOptions) -> dict:
    metrics = score(instances, truth, ["f1", "seg", "iou", "pixel_error", "rand_error"])
    pairs, merged = merged_touching_pairs(instances, truth)
    return {
        "options": options.to_dict(),
        "f1@0.5": metrics["f1@0.5"],
        "seg": metrics["seg"],
        "iou": metrics["iou"],
        "pixel_error": metrics["pixel_error"],
        "rand_error": metrics["rand_error"],
        "cells_predicted": int(instances.max()),
        "touching_pairs": pairs,
        "touching_pairs_merged": merged,
    }
