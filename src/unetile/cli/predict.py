"""``unetile predict``: segment images of any size with a trained model, tile by tile."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .. import io
from ..numbers import real_option, whole_option
from ..predict import card
from ..predict.instances import METHODS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained model (overlap-tile, any image size)",
        description=(
            "Segment TIFF/PNG images tile by tile (the paper's overlap-tile strategy) and "
            "write, for each input NAME, NAME_labels (class map), and on request "
            "NAME_probabilities (per-class probabilities) and NAME_instances (one id per cell)."
        ),
    )
    parser.add_argument(
        "model", type=Path, metavar="MODEL_DIR", help="run folder of 'unetile train'"
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="TIFF/PNG files, folders of them, or zarr stores (NAME.zarr, read lazily)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--tile",
        type=whole_option(1, 65536),
        metavar="N",
        help="output tile size in pixels (default: the largest that fits the memory budget)",
    )
    parser.add_argument(
        "--batch-size",
        type=whole_option(1, 4096),
        default=1,
        metavar="B",
        help="tiles per forward pass",
    )
    parser.add_argument(
        "--tta", action="store_true", help="average over the 8 flips and rotations of the plane"
    )
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write the per-class probabilities"
    )
    parser.add_argument(
        "--threshold",
        type=real_option(0, 1, open_minimum=True),
        metavar="P",
        help=(
            "two-class models: labels and instances are foreground where its probability "
            "is above P, 0 < P < 1 (default: the threshold calibrated in training, "
            "config.json 'calibration', else the argmax, i.e. 0.5)"
        ),
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        help=(
            "also write instance labels (one id per cell), extracted as the model's "
            "config.json says (its 'instances' entry, written by training) unless the "
            "options below say otherwise; models without one: the paper's connected components"
        ),
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        help=(
            "with --instances: 'components' (the paper: connected components of the class "
            "map), 'watershed' (seeded by probability cores) or 'distance' (seeded by "
            "maxima of the distance to the background)"
        ),
    )
    parser.add_argument(
        "--seed-threshold",
        type=real_option(0, 1, open_minimum=True),
        metavar="P",
        help="watershed: probability of the seed class that makes a core (0 < P <= 1)",
    )
    parser.add_argument(
        "--h",
        type=real_option(0, None, open_minimum=True),
        metavar="PX",
        help="distance: height (px) a distance maximum must have to seed a cell",
    )
    parser.add_argument(
        "--min-size",
        type=whole_option(0),
        metavar="PX",
        help="remove cells of fewer pixels (0: keep all)",
    )
    parser.add_argument(
        "--opening",
        type=whole_option(0, 1000),
        metavar="PX",
        help="open each cell with a disk of radius PX before splitting: removes specks and "
        "ragged edges, cuts thin bridges (0: none)",
    )
    parser.add_argument(
        "--fill-holes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fill the background holes inside each cell",
    )
    parser.add_argument(
        "--max-extent",
        type=whole_option(1),
        metavar="PX",
        help=(
            "largest extent of a group of touching cells that the tiled watershed accepts "
            "(its margin; default 512 in 2D, 64 in 3D); larger groups stop with an error"
        ),
    )
    parser.add_argument(
        "--grow",
        type=whole_option(0, 10000),
        default=0,
        metavar="PX",
        help=(
            "with --instances: grow each cell up to PX pixels into the background, never "
            "into another cell (EM membranes: cells that meet at the membranes)"
        ),
    )
    parser.add_argument(
        "--format",
        choices=("tif", "zarr"),
        default="tif",
        help="output format: tiled BigTIFF or zarr store (default tif)",
    )
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="'cpu', 'cuda', 'cuda:N' or 'mps' (Apple GPU) (default: cuda if available, "
        "else mps, else cpu)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="arithmetic of the network: bf16 only where the processor computes it natively "
        "(CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else fp32; 'auto' (default) takes "
        "bf16 where it is native, fp32 elsewhere",
    )
    parser.add_argument(
        "--memory-budget",
        type=real_option(0, 10**6, open_minimum=True),
        metavar="GB",
        help="memory for activations when the tile size is automatic (GiB)",
    )
    parser.add_argument(
        "--pixel-size",
        metavar="UM",
        help="micrometres per pixel of the inputs, one value or one per axis (z,y,x); "
        "overrides their TIFF metadata (default: read from it)",
    )
    parser.add_argument(
        "--rescale",
        action="store_true",
        help="resample each input to the model's pixel size (linear), predict, and resample "
        "the outputs back to the input's size (probabilities linear, labels nearest); "
        "holds the image in memory",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster = parser.add_argument_group(
        "beyond one process (dask.distributed: pip install 'unetile[distributed]')"
    )
    cluster.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="predict on a local Dask cluster of N single-thread worker processes",
    )
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="predict on a running Dask cluster (e.g. tcp://10.0.0.1:8786); inputs and --out "
        "must be on a file system every worker sees",
    )
    cluster.add_argument(
        "--resume",
        action="store_true",
        help="continue a prediction that was stopped: regions already written are kept "
        "(works with or without a cluster)",
    )
    cluster.add_argument(
        "--region-tiles",
        type=int,
        default=1,
        metavar="K",
        help="tiles per task along each axis, K**dims tiles a task (default 1)",
    )
    parser.set_defaults(run=run)


INSTANCE_FLAGS = {
    "method": "--method",
    "seed_threshold": "--seed-threshold",
    "h": "--h",
    "min_size": "--min-size",
    "opening": "--opening",
    "fill_holes": "--fill-holes",
    "max_extent": "--max-extent",
}


def instance_options(args: argparse.Namespace, config: dict):
    """The model's stored instance options, overridden by the command line."""
    from ..predict.instances import InstanceOptions

    given = {name: getattr(args, name) for name in INSTANCE_FLAGS}
    given = {name: value for name, value in given.items() if value is not None}
    if given and not args.instances:
        flag = INSTANCE_FLAGS[next(iter(given))]
        raise io.InputError(f"{flag} sets how --instances are extracted: add --instances")
    stored = dict(config.get("instances") or {})
    if not stored:
        classes = config.get("classes", {})
        stored["foreground_classes"] = classes.get(
            "foreground_classes", [int(classes.get("foreground", 1))]
        )
    if getattr(args, "threshold", None) is not None:
        given["threshold"] = args.threshold  # the cells follow the labels
    try:
        return InstanceOptions.from_dict({**stored, **given})
    except ValueError as error:
        raise io.InputError(f"instance options: {error}") from None


def _threshold(args: argparse.Namespace, model, config: dict) -> float | None:
    """``--threshold``, else the model's calibrated one (said in one line), else None."""
    from ..evaluate.calibration import check_threshold

    if args.threshold is not None:
        if model.config.num_classes != 2:
            raise io.InputError(
                f"--threshold decides between two classes; {args.model} has "
                f"{model.config.num_classes}: its labels are the argmax"
            )
        try:
            return check_threshold(args.threshold, "--threshold")
        except ValueError as error:
            raise io.InputError(str(error)) from None
    if model.threshold is not None:
        calibration = config["calibration"]
        print(
            f"labels at the calibrated threshold {model.threshold:g} (best "
            f"{calibration.get('metric', 'metric')} on the validation images; --threshold "
            "overrides)"
        )
    return model.threshold


def _stated_pixel_size(text: str | None, dims: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    from ..predict.scale import check_pixel_size

    try:
        values = [float(part) for part in text.replace("x", ",").split(",") if part.strip()]
        return check_pixel_size(values, dims, "--pixel-size")
    except ValueError as error:
        raise io.InputError(f"--pixel-size {text!r}: {error}") from None


MAX_RESCALE = 64  # --rescale beyond this is a wrong pixel size, not a real image


def _needs_rescaling(args, path: Path, pixel_size, model_pixel_size) -> bool:
    """Whether to resample ``path``; warns when its pixel size is far from the model's."""
    from ..predict.scale import SAME, TOLERANCE, describe, relative_difference

    if pixel_size is None or model_pixel_size is None:
        if args.rescale:
            raise io.InputError(
                f"{path}: states no pixel size to --rescale from; give it with --pixel-size"
            )
        return False
    difference = relative_difference(pixel_size, model_pixel_size)
    if args.rescale:
        factor = max(max(a / b, b / a) for a, b in zip(pixel_size, model_pixel_size, strict=True))
        if factor > MAX_RESCALE:
            raise io.InputError(
                f"{path}: pixel size {describe(pixel_size)} is {factor:.4g}x the model's "
                f"{describe(model_pixel_size)}; --rescale resamples by at most {MAX_RESCALE}x: "
                "check the pixel sizes (--pixel-size, the file's metadata, the model's "
                "config.json)"
            )
        return difference > SAME
    if difference > TOLERANCE:
        looks = "smaller" if pixel_size[-1] > model_pixel_size[-1] else "larger"
        print(
            f"unetile predict: warning: {path}: pixel size {describe(pixel_size)} differs from "
            f"the model's {describe(model_pixel_size)} by {100 * difference:.0f}% (more than "
            f"{100 * TOLERANCE:.0f}%): structures look {looks} than in training; add --rescale",
            file=sys.stderr,
        )
    return False


def run(args: argparse.Namespace) -> int:
    import functools

    import numpy as np

    from ..data.dataset import channels_first, fit_channels
    from ..network.tiling import Tiling
    from ..precision import resolve_precision
    from ..predict.engine import (
        GIB,
        PredictOptions,
        predict_images_to_files,
        predict_to_files,
        resolve_device,
    )
    from ..predict.scale import predict_rescaled_to_files

    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise io.InputError(f"--device: {error}") from None
    try:
        precision = resolve_precision(args.precision, device)
    except ValueError as error:
        raise io.InputError(f"--{error}") from None
    if args.precision == "auto" and precision == "bf16":
        print(
            f"precision bf16: the {device.type.upper()} computes it natively (1.7x faster on "
            "a CPU with AVX-512 BF16; labels agreed with fp32 on 99.99 % of pixels); "
            "--precision fp32 for the paper's arithmetic"
        )
    model, config = card.load_model(args.model)
    if args.tile is not None:
        try:
            Tiling.of(model).check(args.tile)
        except ValueError as error:
            raise io.InputError(f"--tile: {error}") from None
        # Runs of `unetile train` store their tile; other model folders get no warning.
        trained = max((config.get("tile") or {}).get("output_shape") or [0])
        if model.config.norm == "instance" and args.tile < trained:
            # Instance norm normalises each tile by itself: small tiles change the result.
            print(
                f"unetile predict: warning: {args.model} uses instance norm, whose output "
                f"depends on the tile; --tile {args.tile} is smaller than its training tile "
                f"({trained} px): leave --tile out to use the largest tile that fits",
                file=sys.stderr,
            )
    options = instance_options(args, config)
    if args.grow < 0:
        raise io.InputError(f"--grow must be >= 0 pixels, got {args.grow}")
    if args.grow and not args.instances:
        raise io.InputError("--grow grows the cells of --instances: add --instances")
    if args.batch_size < 1:
        raise io.InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise io.InputError(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
    threshold = _threshold(args, model, config)
    # The model brings its normalisation (config.json), which prediction applies.
    how = PredictOptions(
        threshold=threshold,
        tile_shape=args.tile,
        batch_size=args.batch_size,
        tta=args.tta,
        device=device,
        memory_budget=None if args.memory_budget is None else args.memory_budget * GIB,
        progress=not args.no_progress,
        precision=precision,
    )
    model_pixel_size = config.get("pixel_size_um")
    stated_pixel_size = _stated_pixel_size(args.pixel_size, model.config.dims)
    if args.rescale and model_pixel_size is None:
        raise io.InputError(
            f"{args.model / io.MODEL_CONFIG}: the model has no pixel size to --rescale to; "
            f"train it with --pixel-size (or on TIFFs that state theirs)"
        )
    paths = io.expand_inputs(args.inputs)
    suffix = ".zarr" if args.format == "zarr" else ".tif"
    jobs = planned_outputs(paths, args.out, suffix, args.save_probabilities, args.instances)
    if args.out.exists() and not args.out.is_dir():
        raise io.InputError(f"{args.out}: exists and is not a folder; give a folder as --out")
    owner = OutputOwner(args.out, args.model)
    owner.check(jobs)
    by_regions = args.workers is not None or args.scheduler is not None or args.resume
    if args.workers is not None and args.scheduler is not None:
        raise io.InputError("give --workers (a local cluster) or --scheduler, not both")
    if args.workers is not None and args.workers < 1:
        raise io.InputError(f"--workers must be >= 1, got {args.workers}")
    if args.region_tiles < 1:
        raise io.InputError(f"--region-tiles must be >= 1, got {args.region_tiles}")
    if by_regions and model.config.padding != "valid":
        raise io.InputError(
            f"{args.model}: --workers, --scheduler and --resume need a 'valid' model; "
            "a 'same' model's blended tiles depend on their neighbours"
        )
    if by_regions:
        if args.rescale:
            raise io.InputError(
                "--rescale holds the image in memory and cannot run region by region; "
                "leave out --workers, --scheduler and --resume, or --rescale"
            )
        options = dict(options=how, instance_options=options, grow=args.grow)
        return _predict_by_regions(args, model, jobs, options, owner)

    def prepare(path: Path):
        """The image to predict, and the rescaling prediction when it needs one (else None)."""
        image = io.read_image(path, memmap=True)
        if image.ndim == model.config.dims + 1:
            # The same layout rule as training (PNG and RGB TIFF channels last).
            image = channels_first(
                image, model.config.dims, channels_last=path.suffix.lower() == ".png"
            )
        if image.ndim == model.config.dims + 1 or model.config.in_channels > 1:
            image = fit_channels(image, model.config.dims, model.config.in_channels)
        pixel_size = stated_pixel_size or io.read_pixel_size(path, model.config.dims)
        if not _needs_rescaling(args, path, pixel_size, model_pixel_size):
            return image, None
        rescaled = functools.partial(
            predict_rescaled_to_files, pixel_size=pixel_size, model_pixel_size=model_pixel_size
        )
        return np.asarray(image), rescaled

    def predict_alone(image, rescaled, outputs: dict) -> None:
        predict = rescaled or predict_to_files
        predict(model, image, options=how, **outputs, instance_options=options, grow=args.grow)
        owner.record(outputs)
        _remove_stale_work(outputs)

    def predict_together(images, outputs):
        finished = predict_images_to_files(
            model, images, outputs, how, instance_options=options, grow=args.grow
        )
        for number in finished:
            owner.record(outputs[number])
            _remove_stale_work(outputs[number])
            yield number

    return _each_input_together(jobs, prepare, predict_together, predict_alone)


GROUP_INPUTS = 16  # inputs predicted together: one set-up, tiles batched across them
GROUP_PIXELS = 2**26  # ... up to this many pixels in all, which they may hold in memory


def _each_input_together(jobs, prepare, predict_together, predict_alone) -> int:
    """Every input, consecutive ones predicted together; a bad one is reported, the rest go on.

    ``prepare(path)`` gives ``(image, rescaled)``; inputs without a rescaling
    prediction are grouped (:data:`GROUP_INPUTS`, :data:`GROUP_PIXELS`) and
    ``predict_together(images, outputs)`` yields the number of each finished
    one. When a group fails, its unfinished inputs run one by one through
    ``predict_alone(image, rescaled, outputs)``, so that the bad one is named
    and the others are written. Returns the exit status: 2 if any input failed.
    """
    group, failed = [], []

    def predict_group() -> None:
        finished = 0
        try:
            images, outputs = [g[2] for g in group], [g[1] for g in group]
            for number in predict_together(images, outputs):
                _report_written(*group[number][:2])
                finished = number + 1
        except ValueError:
            # A bad input stops the shared forward passes: the rest go one at a time.
            for path, outputs, image in group[finished:]:
                if _reported(path, failed, predict_alone, image, None, outputs):
                    _report_written(path, outputs)
        group.clear()

    for path, outputs in jobs:
        prepared = _reported(path, failed, prepare, path)
        if prepared is None:
            continue
        image, rescaled = prepared
        if rescaled is not None:
            predict_group()  # outputs in input order
            if _reported(path, failed, predict_alone, image, rescaled, outputs):
                _report_written(path, outputs)
            continue
        group.append((path, outputs, image))
        if len(group) >= GROUP_INPUTS or sum(g[2].size for g in group) >= GROUP_PIXELS:
            predict_group()
    predict_group()
    return _exit_status(failed, jobs)


def _reported(path: Path, failed: list, function, *arguments):
    """``function(*arguments)``, or None with the error printed as one line naming ``path``
    (and ``path`` added to ``failed``); True when ``function`` returns None."""
    try:
        try:
            result = function(*arguments)
        except ValueError as error:
            if isinstance(error, io.InputError):
                raise
            raise io.InputError(f"{path}: {error}") from None
    except io.InputError as error:
        # One bad file must not stop a long batch; report it and go on.
        print(f"unetile predict: error: {error}", file=sys.stderr)
        failed.append(path)
        return None
    return True if result is None else result


def _report_written(path: Path, outputs: dict) -> None:
    print(f"{path}: wrote {', '.join(str(p) for p in outputs.values())}")


def _each_input(jobs: list[tuple[Path, dict[str, Path]]], predict_one) -> int:
    """``predict_one(path, outputs)`` for every input; a bad one is reported and the rest go on.

    Returns the exit status: 2 if any input failed.
    """
    failed = []
    for path, outputs in jobs:
        if _reported(path, failed, predict_one, path, outputs):
            _report_written(path, outputs)
    return _exit_status(failed, jobs)


def _exit_status(failed: list, jobs: list) -> int:
    if failed:
        print(f"unetile predict: {len(failed)} of {len(jobs)} input(s) failed", file=sys.stderr)
        return 2
    return 0


def _remove_stale_work(outputs: dict) -> None:
    """The work folder of an interrupted region run (--workers, --resume) of these outputs,
    removed with one warning once a plain prediction has written them: it is obsolete."""
    import shutil
    import warnings

    from ..predict.regions import work_folder

    work = work_folder(outputs["labels"])
    if not work.is_dir():
        return
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    shutil.rmtree(work, ignore_errors=True)
    warnings.warn(
        f"{work}: removed the work folder of an interrupted region run ({size / 2**20:.1f} MiB); "
        "its outputs are written now",
        stacklevel=2,
    )


OWNER_RECORD = ".unetile-outputs.json"


class OutputOwner:
    """Which model wrote the outputs in an --out folder (``.unetile-outputs.json``).

    A folder holds the outputs of one model: a prediction with another model
    (other weights) is refused while any output recorded for the first one is
    still there, so that a folder never mixes the labels of two models.
    """

    def __init__(self, out: Path, model_dir: Path):
        import hashlib

        self.path = out / OWNER_RECORD
        self.model_dir = model_dir
        digest = hashlib.sha256()
        with open(model_dir / io.MODEL_WEIGHTS, "rb") as weights:
            for block in iter(lambda: weights.read(2**24), b""):
                digest.update(block)
        self.sha256 = digest.hexdigest()
        self.outputs: list[str] = []

    def _found(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            found = io.read_json(self.path)
        except io.InputError:
            return None  # unreadable: as if absent, rewritten by the next output
        return found if isinstance(found, dict) else None

    def check(self, jobs) -> None:
        """InputError when --out holds outputs that another model wrote."""
        found = self._found()
        if found is None:
            return
        if found.get("weights_sha256") == self.sha256:
            self.outputs = [name for name in found.get("outputs", []) if isinstance(name, str)]
            return
        left = [
            name
            for name in found.get("outputs", [])
            if isinstance(name, str) and (self.path.parent / name).exists()
        ]
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise io.InputError(
                f"{self.path.parent}: holds the outputs of another model "
                f"({found.get('model', 'unknown')}: {left[0]}{more}, recorded in "
                f"{OWNER_RECORD}); predict into another --out, or delete those outputs first"
            )

    def record(self, outputs: dict) -> None:
        """Add the written ``outputs`` to the record."""
        names = [Path(path).name for path in outputs.values()]
        self.outputs += [name for name in names if name not in self.outputs]
        io.write_json(
            self.path,
            {
                "model": str(self.model_dir.resolve()),
                "weights_sha256": self.sha256,
                "outputs": self.outputs,
            },
        )


def planned_outputs(
    paths: list[Path], out: Path, suffix: str, probabilities: bool, instances: bool
) -> list[tuple[Path, dict[str, Path]]]:
    """Each input with its output paths; InputError before any work if two would collide.

    Two inputs of the same stem (``a/x.png``, ``b/x.tif``) would write the
    same outputs, and an output may not replace one of the inputs.
    """
    jobs = []
    writers: dict[Path, Path] = {}
    inputs = {path.resolve(): path for path in paths}
    for path in paths:
        stem = io.image_stem(path)
        outputs = {"labels": out / f"{stem}_labels{suffix}"}
        if probabilities:
            outputs["probabilities"] = out / f"{stem}_probabilities{suffix}"
        if instances:
            outputs["instances"] = out / f"{stem}_instances{suffix}"
        for output in outputs.values():
            key = output.resolve()
            if key in writers and writers[key] != path:
                raise io.InputError(
                    f"{path}: would write {output} as {writers[key]} does (same file stem); "
                    "rename one of them or predict them into different --out folders"
                )
            if key in inputs:
                raise io.InputError(
                    f"{inputs[key]}: is an input and would be overwritten by the output of "
                    f"{path}; give another --out"
                )
            writers[key] = path
        jobs.append((path, outputs))
    return jobs


def _predict_by_regions(args, model, jobs, options, owner: OutputOwner) -> int:
    """Every input region by region: on a Dask cluster, or here one region after another."""
    from ..predict.regions import dask_client, predict_regions

    with contextlib.ExitStack() as stack:
        client = None
        if args.workers is not None or args.scheduler is not None:
            client = stack.enter_context(dask_client(args.workers, args.scheduler))

        def predict_one(path: Path, outputs: dict) -> None:
            try:
                # Each worker opens the image itself, by path, and resolves the device.
                predict_regions(
                    model,
                    path,
                    **outputs,
                    device=args.device,
                    client=client,
                    resume=args.resume,
                    region_tiles=args.region_tiles,
                    **options,
                )
                owner.record(outputs)
            except KeyboardInterrupt:
                print(
                    f"unetile predict: {path}: the regions done so far are kept; add --resume "
                    "to the same command to continue",
                    file=sys.stderr,
                )
                raise

        return _each_input(jobs, predict_one)
