"""``unetile predict``: segment images of any size with a trained model, tile by tile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import io


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
        type=int,
        metavar="N",
        help="output tile size in pixels (default: the largest that fits the memory budget)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="B", help="tiles per forward pass"
    )
    parser.add_argument(
        "--tta", action="store_true", help="average over the 8 flips and rotations of the plane"
    )
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write the per-class probabilities"
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        help="also write instance labels (connected cells of the foreground class)",
    )
    parser.add_argument(
        "--grow",
        type=int,
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
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="memory for activations when the tile size is automatic (GiB)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data import channels_first
    from ..predict import GIB, check_tile_shape, predict_to_files

    model, config = io.load_model(args.model)
    if args.tile is not None:
        try:
            check_tile_shape(model, args.tile, model.config.dims)
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
    foreground = int(config.get("classes", {}).get("foreground", 1))
    normalization = config.get("normalization")
    if args.grow < 0:
        raise io.InputError(f"--grow must be >= 0 pixels, got {args.grow}")
    if args.grow and not args.instances:
        raise io.InputError("--grow grows the cells of --instances: add --instances")
    if args.batch_size < 1:
        raise io.InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise io.InputError(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
    budget = None if args.memory_budget is None else args.memory_budget * GIB
    paths = io.expand_inputs(args.inputs)
    suffix = ".zarr" if args.format == "zarr" else ".tif"
    failed = 0
    for path in paths:
        stem = io.image_stem(path)
        outputs = {"labels": args.out / f"{stem}_labels{suffix}"}
        if args.save_probabilities:
            outputs["probabilities"] = args.out / f"{stem}_probabilities{suffix}"
        if args.instances:
            outputs["instances"] = args.out / f"{stem}_instances{suffix}"
        try:
            image = io.read_image(path, memmap=True)
            try:
                if image.ndim == model.config.dims + 1:
                    # The same layout rule as training (PNG and RGB TIFF channels last).
                    image = channels_first(
                        image, model.config.dims, channels_last=path.suffix.lower() == ".png"
                    )
                predict_to_files(
                    model,
                    image,
                    **outputs,
                    foreground_class=foreground,
                    grow=args.grow,
                    tile_shape=args.tile,
                    batch_size=args.batch_size,
                    tta=args.tta,
                    device=args.device,
                    memory_budget=budget,
                    normalization=normalization,
                    progress=not args.no_progress,
                )
            except ValueError as error:
                if isinstance(error, io.InputError):
                    raise
                raise io.InputError(f"{path}: {error}") from None
        except io.InputError as error:
            # One bad file must not stop a long batch; report it and go on.
            print(f"unetile predict: error: {error}", file=sys.stderr)
            failed += 1
            continue
        written = ", ".join(str(p) for p in outputs.values())
        print(f"{path}: wrote {written}")
    if failed:
        print(f"unetile predict: {failed} of {len(paths)} input(s) failed", file=sys.stderr)
        return 2
    return 0
