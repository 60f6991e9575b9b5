"""Where prediction time goes at width 16, and a folder of small slices against MONAI.

Everything is measured against the fp32 matmul peak (4096 x 4096
``torch.matmul``, best of several; this shared machine's rate drifts, so the
peak is taken just before and just after each part and the larger is used)
or a reference taken in the same run:

1. Profile (``torch.profiler``) of one forward pass of a width-16 network
   (the ``cpu-fast`` width) on one input tile of ``--tile-sizes`` (1564: the
   automatic tile of a large image; 700: the tile of a 512 x 512 slice),
   channels-last as unetile runs it: the share of the time in the
   convolutions (up-convolutions included), crop-and-concatenate, ReLU and max pooling,
   the convolutions' own rate over the peak (the ceiling of the whole pass if
   every memory-bound operation were free), and the end-to-end
   ``unetile.predict`` of one tile over the bare forward pass (per-tile
   overhead: reading, mirroring, normalising, soft-max, stitching).
2. Variants of the same forward pass, as a fraction of the peak: contiguous
   against channels-last memory layout, ``torch.jit.freeze`` (oneDNN
   convolution + ReLU fusion), one thread against all, and a batch of 4 tiles.
3. A folder of ``--slices`` 512 x 512 slices, width 16, seconds per slice
   after one warm-up slice (the set-up of a long run is paid once), best of
   ``--rounds`` in which the methods take turns: the
   ``unetile predict`` on the folder
   of TIFFs, in process (reading, labels written as TIFFs), unetile file by
   file as ``unetile predict`` ran before (``predict_to_files`` per slice),
   unetile with the tiles of several slices in one pass (``predict_images``,
   batch 1 and ``--batch``), one whole-image forward pass per slice (the
   network alone), MONAI's ``sliding_window_inference`` of a
   ``same``-padded network of equal width (512 x 512 window, as its users run
   it) and unetile's own prediction of that ``same`` network. A ``valid``
   network reads 700 x 700 pixels for a 512 x 512 output: more FLOPs per
   slice than a ``same`` one (``flops_per_slice``); each rate over the peak
   says how much of a gap in time is arithmetic.

Writes benchmarks/predict_speed.json beside this script.

    python benchmarks/predict_speed.py
    python benchmarks/predict_speed.py --slices 4 --tile-sizes 700   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import io as io_module
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, matmul_peak_gflops

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.network.model import UNet, forward_flops, input_size_for_output
from unetile.predict import card
from unetile.predict.engine import predict, predict_images
from unetile.predict.files import predict_to_files

HERE = Path(__file__).resolve().parent
NORMALIZATION = {"mean": [127.5], "std": [64.0]}
WIDTH = 16
CATEGORIES = {
    # aten::_convolution holds the up-convolutions' own time (mkldnn transposed convolution).
    "convolutions": (
        "aten::mkldnn_convolution",
        "aten::_convolution",
        "aten::thnn_conv2d",
        "aten::conv_transpose2d",
    ),
    "crop-and-concatenate": ("aten::cat", "aten::slice", "aten::narrow", "aten::as_strided"),
    "relu": ("aten::relu_", "aten::clamp_min_", "aten::relu"),
    "max pooling": ("aten::max_pool2d", "aten::max_pool2d_with_indices"),
}


def make_model(padding: str = "valid") -> UNet:
    model = UNet(base_channels=WIDTH, padding=padding)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model.eval()


def best_seconds(function, repeats: int) -> float:
    """Best wall time of ``function()`` over ``repeats`` calls after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def channels_last(tensor_or_model):
    return tensor_or_model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------
# 1. Profile of one tile
# --------------------------------------------------------------------------


def category_of(name: str) -> str:
    for category, names in CATEGORIES.items():
        if name in names:
            return category
    return "other"


def profile_tile(side: int, repeats: int, peak: float) -> dict:
    """Shares of one channels-last forward pass by kind of operation, and the rates."""
    from torch.profiler import ProfilerActivity, profile

    model = channels_last(make_model())
    inputs = channels_last(
        torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(0))
    )
    flops = forward_flops(model.config, (side, side))
    with torch.inference_mode():
        forward_seconds = best_seconds(lambda: model(inputs), repeats)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model(inputs)
    seconds = {name: 0.0 for name in [*CATEGORIES, "other"]}
    for event in profiler.key_averages():
        seconds[category_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    conv_seconds = seconds["convolutions"]
    image = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    output = model.output_shape((side, side))
    crop = image[: output[0], : output[1]]  # one tile exactly: reads its margins mirrored

    def end_to_end():
        predict(model, crop, tile_shape=output, normalization=NORMALIZATION, progress=False)

    end_to_end_seconds = best_seconds(end_to_end, repeats)
    return {
        "input_side": side,
        "flops": flops,
        "forward_seconds": forward_seconds,
        "forward_fraction_of_peak": flops / forward_seconds / 1e9 / peak,
        "profiled_seconds_by_kind": seconds,
        "share_by_kind": {name: value / total for name, value in seconds.items()},
        "convolutions_fraction_of_peak": flops / conv_seconds / 1e9 / peak,
        "end_to_end_seconds": end_to_end_seconds,
        "end_to_end_over_forward": end_to_end_seconds / forward_seconds,
        "end_to_end_fraction_of_peak": flops / end_to_end_seconds / 1e9 / peak,
        "top_operations": [
            {"name": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6}
            for e in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        ],
    }


# --------------------------------------------------------------------------
# 2. Variants of the forward pass
# --------------------------------------------------------------------------


def variants(side: int, repeats: int, peak: float) -> dict:
    """Fraction of the peak of the same forward pass, computed in several ways."""
    model = make_model()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 1, side, side, generator=generator)
    flops = forward_flops(model.config, (side, side))
    results = {}
    with torch.inference_mode():
        reference = channels_last(model)(channels_last(inputs))
        results["channels_last"] = best_seconds(lambda: model(channels_last(inputs)), repeats)
        model.to(memory_format=torch.contiguous_format)
        results["contiguous"] = best_seconds(lambda: model(inputs), repeats)
        channels_last(model)
        frozen = torch.jit.freeze(torch.jit.trace(model, channels_last(inputs)))
        results["jit_freeze"] = best_seconds(lambda: frozen(channels_last(inputs)), repeats)
        difference = (frozen(channels_last(inputs)) - reference).abs().max().item()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        results["one_thread"] = best_seconds(lambda: model(channels_last(inputs)), repeats)
        torch.set_num_threads(threads)
        batch = channels_last(inputs.repeat(4, 1, 1, 1))
        results["batch_of_4_per_tile"] = best_seconds(lambda: model(batch), repeats) / 4
    return {
        "input_side": side,
        "seconds": results,
        "fraction_of_peak": {name: flops / s / 1e9 / peak for name, s in results.items()},
        "over_channels_last": {name: s / results["channels_last"] for name, s in results.items()},
        "jit_freeze_max_difference": difference,
    }


# --------------------------------------------------------------------------
# 3. A folder of 512 x 512 slices
# --------------------------------------------------------------------------


def per_slice(methods: dict, slices: list[np.ndarray], rounds: int) -> dict:
    """Per method: seconds of its first (cold) slice, and its best seconds per slice over
    ``rounds`` runs of the other slices, the methods taking turns (this machine drifts)."""
    runs = {}
    for name, run in methods.items():
        start = time.perf_counter()
        run(slices[:1])
        runs[name] = {"first_slice_seconds": time.perf_counter() - start, "round_seconds": []}
    for _ in range(rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            run(slices[1:])
            runs[name]["round_seconds"].append(time.perf_counter() - start)
    for run in runs.values():
        run["seconds_per_slice"] = min(run["round_seconds"]) / (len(slices) - 1)
    return runs


def cli_method(model: UNet, slices: list[np.ndarray], scratch: Path):
    """``unetile predict RUN FOLDER`` in this process, as a method of :func:`per_slice`."""
    from unetile.cli import main

    config = {"model": model.config.to_dict(), "normalization": NORMALIZATION}
    card.save_model(scratch / "run", model, config)
    folders = {1: scratch / "first", len(slices) - 1: scratch / "slices"}
    for number, image in enumerate(slices):
        folder = folders[1 if number == 0 else len(slices) - 1]
        folder.mkdir(exist_ok=True)
        io.write_tiled_tiff(folder / f"{number:03d}.tif", image)

    def run(images):
        arguments = [str(scratch / "run"), str(folders[len(images)]), "--out", str(scratch / "out")]
        with contextlib.redirect_stdout(io_module.StringIO()):
            if main(["predict", *arguments, "--no-progress", "--device", "cpu"]) != 0:
                raise RuntimeError("unetile predict failed")

    return run


def monai_method(model: UNet):
    """MONAI's sliding window over each slice (512 x 512 window, Gaussian blending)."""
    from monai.inferers import sliding_window_inference

    def run(images):
        with torch.inference_mode():
            for image in images:
                values = (image.astype(np.float32) - 127.5) / 64.0
                scores = sliding_window_inference(
                    torch.from_numpy(values)[None, None],
                    roi_size=(512, 512),
                    sw_batch_size=1,
                    predictor=lambda x: model(channels_last(x)),
                    overlap=0.25,
                    mode="gaussian",
                    progress=False,
                )
                torch.softmax(scores, 1)[0].argmax(0)

    return run


def folder(count: int, batch: int, rounds: int, peak: float) -> dict:
    slices = [
        np.random.default_rng(seed).integers(0, 256, (512, 512), dtype=np.uint8)
        for seed in range(count + 1)
    ]
    valid, same = make_model(), make_model("same")
    side = input_size_for_output(512, valid.config.depth)
    flops = {
        "valid": forward_flops(valid.config, (side, side)),
        "same": forward_flops(same.config, (512, 512)),
    }
    whole = channels_last(make_model())

    def file_by_file(images):
        for number, image in enumerate(images):
            path = Path(scratch) / f"{number}_labels.tif"
            predict_to_files(valid, image, labels=path, normalization=NORMALIZATION, progress=False)

    def batched(model, size):
        def run(images):
            for probabilities in predict_images(
                model, images, batch_size=size, normalization=NORMALIZATION, progress=False
            ):
                probabilities.argmax(0)

        return run

    def whole_image(images):
        margin = whole.context_margin
        with torch.inference_mode():
            for image in images:
                padded = np.pad(image, ((margin, side - 512 - margin),) * 2, mode="reflect")
                values = (padded.astype(np.float32) - 127.5) / 64.0
                scores = whole(channels_last(torch.from_numpy(values)[None, None]))
                torch.softmax(scores, 1)[0, :, :512, :512].argmax(0)

    with tempfile.TemporaryDirectory(prefix="unetile-bench-") as scratch:
        methods = {
            "unetile_cli": cli_method(valid, slices, Path(scratch)),
            "unetile_file_by_file": file_by_file,
            "unetile_predict_images_batch_1": batched(valid, 1),
            f"unetile_predict_images_batch_{batch}": batched(valid, batch),
            "whole_image_forward": whole_image,
            "unetile_same_predict_images": batched(same, 1),
        }
        try:
            methods["monai_same"] = monai_method(channels_last(make_model("same")))
        except ImportError as error:
            monai_missing = f"MONAI cannot be imported ({error}); pip install monai"
        else:
            monai_missing = None
        runs = per_slice(methods, slices, rounds)
    reference = runs["monai_same"]["seconds_per_slice"] if monai_missing is None else None
    for name, run in runs.items():
        kind = "same" if "same" in name else "valid"
        run["network"] = kind
        run["fraction_of_peak"] = flops[kind] / run["seconds_per_slice"] / 1e9 / peak
        if reference:
            run["time_over_monai"] = run["seconds_per_slice"] / reference
    if monai_missing:
        runs["monai_same"] = {"skipped": monai_missing}
    return {
        "slices": count,
        "rounds": rounds,
        "slice_shape": [512, 512],
        "flops_per_slice": flops,
        "valid_over_same_flops": flops["valid"] / flops["same"],
        "runs": runs,
    }


def over_peak(result: dict, peak: float) -> None:
    """Divide, in place, every ``*fraction_of_peak`` rate (GFLOP/s) in ``result`` by ``peak``."""
    for key, value in result.items():
        if isinstance(value, dict):
            if key.endswith("fraction_of_peak"):
                result[key] = {name: rate / peak for name, rate in value.items()}
            else:
                over_peak(value, peak)
        elif key.endswith("fraction_of_peak"):
            result[key] = value / peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[1564, 700])
    parser.add_argument("--slices", type=int, default=8, help="timed 512 x 512 slices")
    parser.add_argument("--batch", type=int, default=4, help="tiles per pass across slices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="turns of the folder methods")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "predict_speed.json")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    started = time.perf_counter()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(keep_freed_memory=True),
    }
    peaks = []

    def bracketed(part, *arguments) -> dict:
        """``part(*arguments, peak=1)`` (rates in GFLOP/s) over the larger peak around it."""
        before = matmul_peak_gflops(args.peak_repeats)
        result = part(*arguments, 1.0)
        after = matmul_peak_gflops(args.peak_repeats)
        peaks.extend([before, after])
        over_peak(result, max(before, after))
        return {"peak_gflops": max(before, after), **result}

    report["profile"] = []
    for side in args.tile_sizes:
        result = bracketed(profile_tile, side, args.repeats)
        report["profile"].append(result)
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["share_by_kind"].items())
        print(
            f"profile {side}^2 (peak {result['peak_gflops']:.0f} GFLOP/s): forward "
            f"{100 * result['forward_fraction_of_peak']:.0f}% of peak, "
            f"convolutions alone {100 * result['convolutions_fraction_of_peak']:.0f}%, end to end "
            f"{100 * result['end_to_end_fraction_of_peak']:.0f}% "
            f"({result['end_to_end_over_forward']:.2f}x the forward pass); time: {shares}"
        )
    report["variants"] = []
    for side in args.tile_sizes:
        result = bracketed(variants, side, args.repeats)
        report["variants"].append(result)
        print(
            f"variants {side}^2 (fraction of peak): "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["fraction_of_peak"].items())
        )
    report["folder"] = bracketed(folder, args.slices, args.batch, args.rounds)
    for name, run in report["folder"]["runs"].items():
        if "seconds_per_slice" in run:
            print(
                f"folder of 512^2 slices, {name}: {run['seconds_per_slice']:.3f} s per slice "
                f"(first {run['first_slice_seconds']:.2f} s), "
                f"{100 * run['fraction_of_peak']:.0f}% of peak"
                + (
                    f", {run['time_over_monai']:.2f}x MONAI's time"
                    if "time_over_monai" in run
                    else ""
                )
            )
        else:
            print(f"folder, {name}: {run}")
    report["matmul_peak_gflops"] = {"measurements": peaks, "best": max(peaks)}
    report["seconds_total"] = time.perf_counter() - started
    try:
        report["monai_version"] = version("monai")
    except PackageNotFoundError:
        report["monai_version"] = None
    io.write_json(args.output, report)
    print(f"wrote {args.output} ({report['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
