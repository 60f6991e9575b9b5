"""``unetile export``: a trained model as ONNX, TorchScript or a bioimage.io package."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .. import io
from ..predict import card


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX, TorchScript or a bioimage.io package",
        description=(
            "Write a trained model for other tools: ONNX (onnxruntime, deepImageJ), TorchScript "
            "(PyTorch without unetile) or a bioimage.io model package (.zip; ilastik, napari, "
            "deepImageJ, QuPath, bioimageio.core). The network takes normalised images "
            "and returns class probabilities; valid sizes: input = output + 2 * margin, the "
            'output a multiple of 2**(depth-1). Needs pip install "unetile[export]".'
        ),
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="run folder of 'unetile train'"
    )
    parser.add_argument(
        "--format", choices=("onnx", "torchscript", "bioimageio"), required=True, dest="fmt"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PATH",
        help="file to write (.onnx, .pt, or .zip for bioimageio)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "run the exported file (onnxruntime, TorchScript, bioimageio.core with its own "
            "tiling) on the test image and compare with unetile's prediction; exit 2 if the "
            "probabilities differ by more than 1e-4 (the file is then not written)"
        ),
    )
    parser.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help=(
            "test image of the package and the check (default: the run's first validation "
            "or training image); a central crop of up to 256 px is used"
        ),
    )
    parser.add_argument("--name", default=None, help="bioimageio: model name (default: RUN_DIR)")
    parser.add_argument(
        "--author",
        action="append",
        metavar="NAME",
        help="bioimageio: an author (repeat for several; default 'unetile user')",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..predict import export

    run_files = [
        path
        for path in (Path(args.run_dir).iterdir() if Path(args.run_dir).is_dir() else ())
        if path.suffix in (".safetensors", ".json", ".csv")
    ]
    images = [args.image] if args.image is not None else []
    io.refuse_output_on_input(
        {"--out": args.out}, {f"a file of the run {args.run_dir}": run_files, "--image": images}
    )
    model, config = card.load_model(args.run_dir)
    image = None
    if args.fmt == "bioimageio" or args.check:
        image = _test_image(args, config, model.config.dims)
    options = {}
    if args.fmt == "bioimageio":
        options = {
            "name": args.name or f"unetile U-Net {Path(args.run_dir).resolve().name}",
            "authors": tuple(args.author or ("unetile user",)),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with _staged(args.out) as staged:
        try:
            export.export(model, config, staged, args.fmt, image, **options)
            if args.check:
                differences = export.check_export(model, config, staged, args.fmt, image)
        except export.MissingExtraError as error:
            raise io.InputError(str(error)) from None
        except ValueError as error:
            if isinstance(error, io.InputError):
                raise
            raise io.InputError(f"{args.out}: {error}") from None
        if args.check:
            worst = max(differences.values())
            blocks = "" if export.tile_exact(model) else " (one block: not a tile-exact model)"
            for runtime, difference in differences.items():
                where = blocks if runtime.startswith("bioimageio") else ""
                print(f"check: {runtime} max |probability difference| {difference:.2e}{where}")
            if not worst <= export.TOLERANCE:
                raise io.InputError(
                    f"{args.out}: the export differs from unetile's prediction by {worst:.2e} "
                    f"(> {export.TOLERANCE:.0e}); it was not written"
                )
    geometry = export.export_geometry(model.config.depth, model.config.padding)
    print(f"wrote {args.out} ({args.fmt}); valid sizes: {geometry.rule()}")
    return 0


@contextlib.contextmanager
def _staged(path: Path):
    """A temporary path beside ``path``, renamed into place only if the block succeeds
    (the temporary files of a killed export of ``path`` are removed first)."""
    io.remove_stale_parts(path)
    with io.atomic_path(path) as temporary:
        os.remove(temporary)  # the writers create the file themselves
        yield temporary


def _test_image(args, config: dict, dims: int):
    from ..data.dataset import channels_first

    path = args.image or _first_image(args.run_dir, config)
    image = io.read_image(path)
    if image.ndim == dims + 1:
        image = channels_first(image, dims, channels_last=path.suffix.lower() == ".png")
    if image.ndim not in (dims, dims + 1):
        raise io.InputError(f"{path}: image of shape {image.shape} is not {dims}D")
    print(f"test image: {path}", file=sys.stderr)
    return image


def _first_image(run_dir: Path, config: dict) -> Path:
    training = config.get("training") or {}
    for key in ("val_images", "images"):
        folder = training.get(key)
        if folder and Path(folder).is_dir():
            with contextlib.suppress(io.InputError):
                return io.list_images(folder)[0]
    raise io.InputError(
        f"{run_dir / io.MODEL_CONFIG}: names no training or validation images that exist here; "
        "give a test image with --image FILE"
    )
