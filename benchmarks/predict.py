"""Overlap-tile prediction on the CPU: throughput, efficiency, references, peak memory.

Three parts, each job in its own subprocess so that its peak resident memory
(``resource.getrusage(...).ru_maxrss`` of the child) is its own:

1. Throughput, end to end (reading, mirroring, normalising, tiling, the
   network, stitching, argmax, writing a tiled BigTIFF of labels) over a
   ``--size`` image for base widths 16, 32 and 64 at the automatic tile
   size, in output megapixels per second and as GFLOP/s (analytic FLOPs of
   the tiles actually run, ``model.forward_flops``) over the fp32 matmul peak
   (4096 x 4096 ``torch.matmul``, best of several) measured just before.
   The tile-margin overhead (FLOPs run / FLOPs of the large-tile limit for
   the same output) is reported separately.
2. References at ``--compare-size``: the same model on the whole image in one
   forward pass (where it fits in memory), MONAI's ``sliding_window_inference``
   for a ``same``-padding model of equal width (Gaussian blending, overlap
   0.25, the same input tile), and unetile's own blended prediction of that
   ``same`` model with the same settings: time and peak memory.
3. Peak resident memory while predicting ``--memory-sizes`` images (base 16,
   random uint8 input in a zarr store, labels written to a tiled BigTIFF),
   and once with a memory-mapped TIFF input (``--memmap-size``).

The throughput and reference jobs set :func:`unetile.allocator.keep_freed_memory`,
as ``unetile predict`` does (without it each large activation is faulted in
afresh: width 16 ran at 43 % of the peak, with it 77 %). The memory jobs run
with glibc's defaults, which return freed memory; the largest is repeated
with the command line's setting, which keeps the process's peak.

Writes benchmarks/predict.json beside this script.

Quick run:  python benchmarks/predict.py --size 512 --widths 16 --compare-size 256 \
    --compare-widths 16 --memory-sizes 512 1024 --memmap-size 512
Full run:   nice -n 5 python benchmarks/predict.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from machine import in_subprocess as run_script_child
from machine import machine_info, matmul_peak_gflops

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.network.model import (
    UNet,
    forward_flops,
    input_size_for_output,
    output_size,
    size_multiple,
)
from unetile.network.tiling import tile_grid
from unetile.predict.engine import activation_bytes_per_pixel, auto_tile_shape
from unetile.predict.files import predict_to_files

NORMALIZATION = {"mean": [127.5], "std": [64.0]}
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# Measurements made inside a child process
# --------------------------------------------------------------------------


def resident_bytes() -> int:
    """Current resident memory of this process (bytes)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def make_model(width: int, padding: str = "valid") -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=width, padding=padding)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model.eval()


def random_image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def large_tile_flops_per_pixel(model: UNet) -> float:
    """FLOPs per output pixel in the limit of very large tiles (no margin overhead)."""
    depth = model.config.depth
    side = input_size_for_output(16384, depth)
    return forward_flops(model.config, (side, side)) / output_size(side, depth) ** 2


def tiled_flops(model: UNet, image_shape, tile_shape) -> int:
    margin = model.context_margin
    tiles = tile_grid(image_shape, tile_shape, alignment=size_multiple(model.config.depth))
    return len(tiles) * forward_flops(model.config, [t + 2 * margin for t in tile_shape])


def job_tiled(spec: dict, scratch: Path) -> dict:
    """unetile.predict_to_files, end to end, labels to a tiled BigTIFF."""
    model = make_model(spec["width"], spec.get("padding", "valid"))
    if "input_zarr" in spec:
        image = io.open_zarr(spec["input_zarr"])
    elif "input_tif" in spec:
        image = io.read_image(spec["input_tif"], memmap=True)
    else:
        image = random_image(spec["size"])
    tile = spec.get("tile") or auto_tile_shape(model, image.shape, "cpu")
    tile = tuple(tile) if not isinstance(tile, int) else (tile, tile)
    before = resident_bytes()
    start = time.perf_counter()
    predict_to_files(
        model,
        image,
        labels=scratch / "labels.tif",
        tile_shape=tile,
        normalization=NORMALIZATION,
        progress=False,
        **({"overlap": spec["overlap"]} if "overlap" in spec else {}),
    )
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "tile_shape": list(tile),
        "input_tile_shape": [t + 2 * model.context_margin for t in tile],
        "output_megapixels_per_second": image.shape[0] * image.shape[1] / seconds / 1e6,
        "resident_before_bytes": before,
        "peak_resident_bytes": peak_resident_bytes(),
    }
    if model.config.padding == "valid":
        flops = tiled_flops(model, image.shape, tile)
        useful = image.shape[0] * image.shape[1] * large_tile_flops_per_pixel(model)
        result.update(
            tiles=len(tile_grid(image.shape, tile, alignment=size_multiple(model.config.depth))),
            flops=flops,
            gflops_per_second=flops / seconds / 1e9,
            margin_overhead=flops / useful,
            large_tile_mflop_per_output_pixel=large_tile_flops_per_pixel(model) / 1e6,
        )
    return result


def normalised_tensor(image: np.ndarray) -> torch.Tensor:
    values = (image.astype(np.float32) - NORMALIZATION["mean"][0]) / NORMALIZATION["std"][0]
    return torch.from_numpy(values)[None, None]


def job_whole(spec: dict, scratch: Path) -> dict:
    """One forward pass of the whole mirror-padded image (channels_last), argmax, TIFF."""
    model = make_model(spec["width"]).to(memory_format=torch.channels_last)
    image = random_image(spec["size"])
    before = resident_bytes()
    start = time.perf_counter()
    margin, size = model.context_margin, spec["size"]
    after = input_size_for_output(size, model.config.depth) - size - margin
    padded = np.pad(image, ((margin, after), (margin, after)), mode="reflect")
    with torch.inference_mode():
        inputs = normalised_tensor(padded).contiguous(memory_format=torch.channels_last)
        probabilities = torch.softmax(model(inputs), dim=1)[0, :, :size, :size]
        labels = probabilities.argmax(0).to(torch.uint8).numpy()
    io.write_tiled_tiff(scratch / "labels.tif", labels)
    seconds = time.perf_counter() - start
    flops = forward_flops(model.config, inputs.shape[2:])
    return {
        "seconds": seconds,
        "input_shape": list(inputs.shape[2:]),
        "output_megapixels_per_second": size * size / seconds / 1e6,
        "flops": flops,
        "gflops_per_second": flops / seconds / 1e9,
        "resident_before_bytes": before,
        "peak_resident_bytes": peak_resident_bytes(),
    }


def job_monai(spec: dict, scratch: Path) -> dict:
    """MONAI sliding_window_inference of a same-padding model, Gaussian blending."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as error:
        return {"skipped": f"MONAI cannot be imported ({error}); pip install monai"}
    model = make_model(spec["width"], "same").to(memory_format=torch.channels_last)
    image = random_image(spec["size"])
    roi = (spec["tile"], spec["tile"])

    def predictor(batch):
        return model(batch.contiguous(memory_format=torch.channels_last))

    before = resident_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            normalised_tensor(image),
            roi_size=roi,
            sw_batch_size=1,
            predictor=predictor,
            overlap=spec["overlap"],
            mode="gaussian",
            progress=False,
        )
        labels = torch.softmax(logits, dim=1)[0].argmax(0).to(torch.uint8).numpy()
    io.write_tiled_tiff(scratch / "labels.tif", labels)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "roi_size": list(roi),
        "overlap": spec["overlap"],
        "monai_version": version("monai"),
        "output_megapixels_per_second": image.size / seconds / 1e6,
        "resident_before_bytes": before,
        "peak_resident_bytes": peak_resident_bytes(),
    }


JOBS = {"tiled": job_tiled, "whole": job_whole, "monai": job_monai}


def run_child(spec: dict) -> dict:
    if spec.get("keep_freed_memory", True):
        keep_freed_memory()  # as the command line does
    with tempfile.TemporaryDirectory(prefix="unetile-bench-") as scratch:
        return JOBS[spec["job"]](spec, Path(scratch))


# --------------------------------------------------------------------------
# The parent: peak, jobs in subprocesses, JSON
# --------------------------------------------------------------------------


def in_subprocess(spec: dict) -> dict:
    return run_script_child(__file__, spec)


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="throughput image side (px)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--compare-size", type=int, default=1024, help="reference image side")
    parser.add_argument("--compare-widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--memmap-size", type=int, default=8192, help="0: skip")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "predict.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    started = time.perf_counter()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(
            keep_freed_memory="throughput and reference jobs; memory jobs as marked"
        ),
        "throughput": [],
        "references": [],
        "memory": [],
    }
    peaks = []

    def peak_now() -> float:
        peaks.append(matmul_peak_gflops(args.peak_repeats))
        return peaks[-1]

    print(f"fp32 matmul peak: {peak_now():.1f} GFLOP/s")

    for width in args.widths:
        peak = peak_now()
        result = in_subprocess({"job": "tiled", "width": width, "size": args.size})
        if "failed" not in result:
            result["peak_gflops_measured_before"] = peak
            result["fraction_of_peak"] = result["gflops_per_second"] / peak
            print(
                f"width {width:3d}, {args.size}^2, tile {result['tile_shape']}: "
                f"{result['output_megapixels_per_second']:.3f} MP/s, "
                f"{result['gflops_per_second']:.1f} GFLOP/s = "
                f"{100 * result['fraction_of_peak']:.0f}% of {peak:.0f} GFLOP/s peak, "
                f"margin overhead {result['margin_overhead']:.3f}x"
            )
        else:
            print(f"width {width}: failed: {result['failed']}")
        report["throughput"].append(result)

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for width in args.compare_widths:
        size = args.compare_size
        model = make_model(width)
        tile = auto_tile_shape(model, (size, size), "cpu")
        entry = {"width": width, "size": size}
        entry["unetile_valid"] = in_subprocess({"job": "tiled", "width": width, "size": size})
        padded = input_size_for_output(size, model.config.depth) ** 2
        needed = padded * activation_bytes_per_pixel(model)
        if needed < available / 2:
            entry["whole_image_valid"] = in_subprocess(
                {"job": "whole", "width": width, "size": size}
            )
        else:
            entry["whole_image_valid"] = {
                "skipped": f"needs about {gib(needed)} of activations, {gib(available)} available"
            }
        # Same input tile for both blended runs: the valid model's input tile, rounded
        # down to the pooling multiple (same-padded models need multiples of 16).
        roi = max(tile) + 2 * model.context_margin
        roi = max(size_multiple(5), roi // size_multiple(5) * size_multiple(5))
        roi = min(roi, -(-size // 16) * 16)
        entry["monai_same"] = in_subprocess(
            {"job": "monai", "width": width, "size": size, "tile": roi, "overlap": 0.25}
        )
        entry["unetile_same"] = in_subprocess(
            {
                "job": "tiled",
                "width": width,
                "size": size,
                "padding": "same",
                "tile": roi,
                "overlap": 0.25,
            }
        )
        base = entry["unetile_valid"]
        for name in ("whole_image_valid", "monai_same", "unetile_same"):
            other = entry[name]
            if "seconds" in other and "seconds" in base:
                other["time_over_unetile_valid"] = other["seconds"] / base["seconds"]
                other["peak_memory_over_unetile_valid"] = (
                    other["peak_resident_bytes"] / base["peak_resident_bytes"]
                )
        print(
            f"width {width:3d}, {size}^2: "
            + ", ".join(
                f"{name} {entry[name]['seconds']:.1f} s / {gib(entry[name]['peak_resident_bytes'])}"
                if "seconds" in entry[name]
                else f"{name} {entry[name].get('skipped') or entry[name].get('failed')}"
                for name in ("unetile_valid", "whole_image_valid", "monai_same", "unetile_same")
            )
        )
        report["references"].append(entry)

    with tempfile.TemporaryDirectory(prefix="unetile-bench-input-") as inputs:
        import tifffile
        import zarr

        for size in args.memory_sizes:
            path = Path(inputs) / f"input_{size}.zarr"
            store = zarr.open_array(
                store=str(path), mode="w", shape=(size, size), chunks=(1024, 1024), dtype=np.uint8
            )
            rng = np.random.default_rng(size)
            for top in range(0, size, 1024):
                rows = min(1024, size - top)
                store[top : top + rows] = rng.integers(0, 256, (rows, size), dtype=np.uint8)
            kept = [False, True] if size == max(args.memory_sizes) else [False]
            for keep in kept:
                spec = {"job": "tiled", "width": 16, "size": size, "input_zarr": str(path)}
                result = in_subprocess({**spec, "keep_freed_memory": keep})
                result["input"] = "zarr"
                report["memory"].append(result)
                print(
                    f"memory, width 16, {size}^2 from zarr"
                    + (", keep_freed_memory as the command line" if keep else "")
                    + f": peak {gib(result.get('peak_resident_bytes', 0))}"
                    f" in {result.get('seconds', float('nan')):.0f} s"
                )
            shutil.rmtree(path)
        if args.memmap_size:
            size = args.memmap_size
            path = Path(inputs) / f"input_{size}.tif"
            mapped = tifffile.memmap(path, shape=(size, size), dtype=np.uint8)
            rng = np.random.default_rng(size)
            for top in range(0, size, 1024):
                rows = min(1024, size - top)
                mapped[top : top + rows] = rng.integers(0, 256, (rows, size), dtype=np.uint8)
            mapped.flush()
            del mapped
            result = in_subprocess(
                {
                    "job": "tiled",
                    "width": 16,
                    "size": size,
                    "input_tif": str(path),
                    "keep_freed_memory": False,
                }
            )
            result["input"] = "memory-mapped TIFF"
            report["memory"].append(result)
            print(
                f"memory, width 16, {size}^2 from a memory-mapped TIFF: peak "
                f"{gib(result.get('peak_resident_bytes', 0))}"
            )

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
