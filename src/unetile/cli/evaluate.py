"""``unetile evaluate``: score predictions against ground truth with the challenge metrics."""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import numpy as np

from .. import io
from ..numbers import real_option, whole_option

# Suffixes that 'unetile predict' appends to an input's stem.
PREDICTION_SUFFIXES = ("_labels", "_probabilities", "_instances")

INTERPRETATION = """\
how the files are read:
  GT        a two-valued map (the larger value is cell, e.g. 255 in the ISBI 2012
            labels; --cell-value says otherwise) or instance labels (an integer
            image with more than two values; 0 = background, each value one cell).
  PRED      without --probabilities: the same kinds as GT (a binary map such as
            'unetile predict' NAME_labels, or instance labels); a floating-point
            file is refused.
            with --probabilities: the probability of the cell class, scaled by
            its type: uint8 0-255 -> /255, uint16 0-65535 -> /65535, float as it
            is (must lie in [0, 1]). A (classes, H, W) file such as
            NAME_probabilities is read at channel --cell-class. Each metric is
            reported at its best threshold of 0.0, 0.1, ..., 0.9 (cell where
            probability > threshold), per image; the mean row takes the best
            threshold of the mean over images, as the ISBI 2012 script does.
            With --threshold P, or --model RUN_DIR (the threshold calibrated
            in training, config.json 'calibration'), at that threshold only.
            NAME_labels of 'unetile predict' are already drawn at the model's
            calibrated threshold.

PRED and GT are files or folders; files are paired by stem (07.png with 07.tif),
ignoring a trailing _labels, _probabilities or _instances of a prediction.

metrics (lower is better for *_error): pixel_error, rand_error (1 - foreground-
restricted V_rand), info_error (1 - V_info), warping_error (with splits, mergers;
2D only), iou (cell class; also iou_background), dice, seg (cell tracking
challenge), f1 / precision / recall (object matching, mean over IoU 0.5..0.95,
and at each threshold as f1@0.5 ...).
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against ground truth (ISBI 2012 and cell tracking metrics)",
        description=(
            "Compare predicted segmentations with ground truth by the metrics of the ISBI 2012 "
            "EM challenge (pixel, Rand, warping error) and of the cell tracking challenge (IoU, "
            "SEG); print a table per image and the mean, optionally write JSON and CSV."
        ),
        epilog=INTERPRETATION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # In this order: the order of --help.
    _add_files_and_metrics(parser)
    _add_truth_options(parser)
    _add_scoring_options(parser)
    parser.set_defaults(run=run)


def _add_files_and_metrics(parser: argparse.ArgumentParser) -> None:
    from ..evaluate.metrics import DEFAULT_METRICS, METRICS

    parser.add_argument("prediction", type=Path, metavar="PRED", help="prediction file or folder")
    parser.add_argument("ground_truth", type=Path, metavar="GT", help="ground-truth file or folder")
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=None,
        metavar="NAME",
        help=f"metrics to compute (default: {' '.join(DEFAULT_METRICS)}, without "
        f"warping_error for 3D images or with --ignore-value; choices: "
        f"{' '.join(METRICS)})",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="write the table as CSV")


def _add_truth_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cell-value",
        type=real_option(),
        metavar="V",
        help="value of the cell class in two-valued maps (default: the larger value)",
    )
    parser.add_argument(
        "--ignore-value",
        type=real_option(),
        metavar="V",
        help="ground-truth value of unannotated pixels: they are not scored (sparse "
        "annotations; the warping error is then refused) (default: none)",
    )
    parser.add_argument(
        "--truth-mode",
        choices=("auto", "binary", "instances"),
        default="auto",
        help="how GT is read: 'binary' (two values, or --cell-value = cell and every other "
        "value background), 'instances' (0 = background, one id per cell), or 'auto': two "
        "values binary, more values instances, refused when all but two values are a few "
        "stray pixels (default auto)",
    )


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="PRED holds probabilities of the cell class (see below); best threshold per metric",
    )
    parser.add_argument(
        "--threshold",
        type=real_option(0, 1),
        metavar="P",
        help="with --probabilities: score at this threshold only (cell where probability > P), "
        "not at the best of the sweep",
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="RUN_DIR",
        help="with --probabilities: score at the threshold calibrated in training for the model "
        "of this run folder (its config.json 'calibration'; 0.5 without one)",
    )
    parser.add_argument(
        "--cell-class",
        type=whole_option(0, 65535),
        default=1,
        metavar="K",
        help="channel of the cell class in a (classes, H, W) probability file (default 1)",
    )
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=(4, 8),
        default=4,
        help="pixel connectivity of cells in 2D (default 4, as in ISBI 2012; 3D: 6 or 26)",
    )


def _prediction_key(path: Path, truth_stems: set[str]) -> str:
    stem = io.image_stem(path)
    if stem in truth_stems:
        return stem
    for suffix in PREDICTION_SUFFIXES:
        if stem.endswith(suffix) and stem[: -len(suffix)] in truth_stems:
            return stem[: -len(suffix)]
    return stem


def _preference(path: Path, key: str, probabilities: bool, objects: bool = False) -> int:
    """Rank of a prediction among several for one image: lower is chosen."""
    suffix = io.image_stem(path)[len(key) :]
    order = ["", "_probabilities", "_labels", "_instances"]
    if not probabilities:
        order = ["", "_labels", "_instances", "_probabilities"]
        if objects:
            order = ["", "_instances", "_labels", "_probabilities"]
    return order.index(suffix) if suffix in order else len(order)


def pair_files(
    predictions: list[Path], truths: list[Path], probabilities: bool = False, objects=False
) -> list[tuple[Path, Path]]:
    """Pair prediction and ground-truth files by stem; InputError naming an unpaired file.

    A folder written by ``unetile predict`` may hold NAME_labels,
    NAME_probabilities and NAME_instances for one image: the probabilities are
    scored with ``--probabilities``, the labels otherwise (then the instances),
    and for ``objects`` (object data) the instances first.
    """
    if len(predictions) == 1 and len(truths) == 1:
        return [(predictions[0], truths[0])]
    by_stem: dict[str, Path] = {}
    for truth in truths:
        stem = io.image_stem(truth)
        if stem in by_stem:
            raise io.InputError(f"{truth}: two ground-truth files share the stem {stem!r}")
        by_stem[stem] = truth
    candidates: dict[str, list[Path]] = {}
    for prediction in predictions:
        key = _prediction_key(prediction, set(by_stem))
        if key not in by_stem:
            raise io.InputError(
                f"{prediction}: prediction has no ground truth with the stem {key!r} "
                f"in {truths[0].parent}"
            )
        candidates.setdefault(key, []).append(prediction)
    pairs = []
    for key, found in candidates.items():
        ranks = {path: _preference(path, key, probabilities, objects) for path in found}
        ranked = sorted(found, key=ranks.__getitem__)
        if len(ranked) > 1 and ranks[ranked[0]] == ranks[ranked[1]]:
            raise io.InputError(
                f"{ranked[1]}: a second prediction for {by_stem[key].name} ({ranked[0].name})"
            )
        pairs.append((ranked[0], by_stem[key]))
    missing = [truth for stem, truth in by_stem.items() if stem not in candidates]
    if missing:
        raise io.InputError(f"{missing[0]}: ground truth has no prediction with the same stem")
    return pairs


STRAY_SHARE = 0.01
"""Auto mode: a map whose values beyond its two commonest cover less than this share is refused."""


def read_truth(path: Path, mode: str, cell_value=None, ignore_value=None) -> np.ndarray:
    """Read a ground-truth file as ``mode`` says; InputError when it does not look like one.

    ``auto`` never guesses silently: a map with two values is binary, one with
    more values is instance labels (said once on stderr), unless all but two
    values are stray pixels (under 1 %), which is refused as ambiguous.
    """
    import warnings

    from ..data.dataset import describe_values

    truth = np.asarray(io.read_labels(path))
    annotated = truth if ignore_value is None else truth[truth != ignore_value]
    values, counts = np.unique(annotated, return_counts=True)
    if mode == "binary" or (mode == "auto" and values.size <= 2):
        if values.size <= 2:
            return truth
        if cell_value is None:
            raise io.InputError(
                f"{path}: holds {describe_values(values)}, not two; give --cell-value to say "
                "which is cell (every other value is then background)"
            )
        background = values[values != cell_value][0]
        keep = (truth == cell_value) | (
            truth == ignore_value if ignore_value is not None else False
        )
        return np.where(keep, truth, background).astype(truth.dtype)
    if truth.dtype.kind not in "uib":
        raise io.InputError(
            f"{path}: holds {truth.dtype} values; instance labels are integers (0 = background)"
        )
    if mode == "auto":
        share = 1.0 - np.sort(counts)[-2:].sum() / counts.sum()
        if share < STRAY_SHARE:
            raise io.InputError(
                f"{path}: holds {describe_values(values)}, all but two of them on "
                f"{100 * share:.2g}% of the pixels: a binary map with stray values or instance "
                "labels? say which with --truth-mode binary (and --cell-value) or --truth-mode "
                "instances"
            )
        warnings.warn(
            "ground truth with more than two values is read as instance labels "
            "(0 = background); --truth-mode binary reads it otherwise",
            stacklevel=2,
        )
    return truth


def read_prediction(path: Path, probabilities: bool, cell_class: int, shape) -> np.ndarray:
    """Read a prediction file as the metrics expect it; InputError naming the file."""
    array = np.asarray(io.read_labels(path) if not probabilities else io.read_image(path))
    if not probabilities:
        if np.issubdtype(array.dtype, np.floating):
            raise io.InputError(
                f"{path}: holds floating-point values; pass --probabilities to score it as "
                "probabilities of the cell class, or give a binary or label image"
            )
        return array
    if array.ndim == len(shape) + 1 and tuple(array.shape[1:]) == tuple(shape):
        if not 0 <= cell_class < array.shape[0]:
            raise io.InputError(
                f"{path}: --cell-class {cell_class} is not among its {array.shape[0]} channels"
            )
        array = array[cell_class]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise io.InputError(
                f"{path}: probabilities must be finite and lie in [0, 1]; found values in "
                f"[{np.nanmin(array)}, {np.nanmax(array)}]"
                + (" and NaN" if np.isnan(array).any() else "")
            )
        return array.astype(np.float64, copy=False)
    raise io.InputError(
        f"{path}: --probabilities needs uint8, uint16 or float pixels, got {array.dtype}"
    )


def _format(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.6f}" if abs(value) < 1 else f"{value:.4g}"


def _table(rows: list[tuple[str, dict]], keys: list[str]) -> str:
    name_width = max(len(name) for name, _ in rows)
    widths = [max(len(key), 8) for key in keys]
    lines = [
        "  ".join(
            [" " * name_width] + [key.rjust(width) for key, width in zip(keys, widths, strict=True)]
        )
    ]
    for name, values in rows:
        cells = [_format(values[key]).rjust(width) for key, width in zip(keys, widths, strict=True)]
        lines.append("  ".join([name.ljust(name_width), *cells]))
    return "\n".join(lines)


def fixed_threshold(args: argparse.Namespace) -> float | None:
    """The one threshold probabilities are scored at: --threshold, the --model's calibrated
    one (0.5 without calibration), or None for the sweep."""
    if args.threshold is None and args.model is None:
        return None
    if not args.probabilities:
        flag = "--threshold" if args.threshold is not None else "--model"
        raise io.InputError(
            f"{flag} thresholds probabilities: add --probabilities (labels written by 'unetile "
            "predict' are already drawn at the model's calibrated threshold)"
        )
    if args.threshold is not None and args.model is not None:
        raise io.InputError("give --threshold or --model (its calibrated threshold), not both")
    if args.threshold is not None:
        if args.threshold >= 1:
            raise io.InputError(f"--threshold must be below 1, got {args.threshold}")
        return args.threshold
    from ..predict.card import ModelCard

    threshold = ModelCard.read(args.model).post.threshold  # checked as prediction reads it
    return 0.5 if threshold is None else threshold  # 0.5: the argmax of a two-class model


def _object_data(truth: np.ndarray) -> bool:
    """Instance labels, or a binary map that is not a membrane map (objects on a background)."""
    from ..train.instance_fit import is_membrane_map

    values = np.unique(truth)
    if values.size > 2:
        return True
    return values.size == 2 and not is_membrane_map(truth == values[-1])


def run(args: argparse.Namespace) -> int:
    from ..evaluate.metrics import OBJECT_METRICS

    threshold = fixed_threshold(args)
    pairs, objects = _pairs_to_score(args)
    options = dict(
        metrics=OBJECT_METRICS if objects else args.metrics,
        cell_value=args.cell_value,
        connectivity=1 if args.connectivity == 4 else 2,
        ignore_value=args.ignore_value,
    )
    results, sweeps = _score_pairs(pairs, args, threshold, options)
    mean = _mean_of_sweeps(sweeps) if args.probabilities else _mean_of_images(results)
    keys = list(mean)
    rows = [(io.image_stem(truth), values) for _, truth, values in results] + [("mean", mean)]
    print(_table(rows, keys))
    if args.json:
        _write_json(args.json, options["metrics"], bool(args.probabilities), results, mean)
    if args.csv:
        _write_csv(args.csv, keys, results, mean)
    return 0


def _pairs_to_score(args: argparse.Namespace) -> tuple[list[tuple[Path, Path]], bool]:
    """The (prediction, truth) files, and whether the truth holds objects on a background."""
    predictions = io.expand_inputs([args.prediction])
    truths = io.expand_inputs([args.ground_truth])
    model = [Path(args.model) / io.MODEL_CONFIG] if args.model is not None else []
    io.refuse_output_on_input(
        {"--json": args.json, "--csv": args.csv},
        {"a prediction": predictions, "a ground-truth file": truths, "--model": model},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scoring loop says how the truth is read
        first = read_truth(truths[0], args.truth_mode, args.cell_value, args.ignore_value)
    objects = args.metrics is None and _object_data(first)
    if objects:
        print(
            f"{truths[0]}: objects on a background, so objects are scored (predicted / true, "
            "splits, merges, F1, SEG) with the pixels; --metrics chooses others"
        )
    pairs = pair_files(predictions, truths, args.probabilities, objects and not args.probabilities)
    return pairs, objects


def _score_pairs(pairs, args: argparse.Namespace, threshold, options: dict):
    """(prediction, truth, scores) per pair, and each pair's sweep over thresholds (if any)."""
    from ..evaluate.metrics import best_scores, score, score_per_threshold

    results = []
    sweeps = []
    for prediction_path, truth_path in pairs:
        truth = read_truth(truth_path, args.truth_mode, args.cell_value, args.ignore_value)
        prediction = read_prediction(
            prediction_path, args.probabilities, args.cell_class, truth.shape
        )
        try:
            if args.probabilities:
                thresholds = None if threshold is None else (threshold,)
                sweep = score_per_threshold(prediction, truth, thresholds=thresholds, **options)
                sweeps.append(sweep)
                values = best_scores(sweep)
            else:
                values = score(prediction, truth, **options)
        except ValueError as error:
            raise io.InputError(f"{prediction_path} vs {truth_path}: {error}") from None
        results.append((prediction_path, truth_path, values))
    return results, sweeps


def _mean_of_sweeps(sweeps: list[dict]) -> dict:
    """The challenge picks one threshold for the whole set: the best of the mean."""
    from ..evaluate.metrics import best_scores

    thresholds = list(sweeps[0])
    mean_sweep = {
        threshold: {
            key: float(np.mean([sweep[threshold][key] for sweep in sweeps]))
            for key in sweeps[0][threshold]
        }
        for threshold in thresholds
    }
    return best_scores(mean_sweep)


def _mean_of_images(results: list[tuple]) -> dict:
    keys = list(results[0][2])
    return {key: float(np.mean([values[key] for *_, values in results])) for key in keys}


def _write_json(path: Path, metrics, probabilities: bool, results: list[tuple], mean: dict):
    from ..evaluate.metrics import DEFAULT_METRICS

    io.write_json(
        path,
        {
            "metrics": list(metrics or [m for m in DEFAULT_METRICS if m in mean]),
            "probabilities": probabilities,
            "images": [
                {"prediction": str(prediction), "ground_truth": str(truth), **values}
                for prediction, truth, values in results
            ],
            "mean": mean,
        },
    )


def _write_csv(path: Path, keys: list[str], results: list[tuple], mean: dict) -> None:
    with io.atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prediction", "ground_truth", *keys])
        for prediction, truth, values in results:
            writer.writerow([prediction, truth, *(values[key] for key in keys)])
        writer.writerow(["mean", "", *(mean[key] for key in keys)])
