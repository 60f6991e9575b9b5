"""Training-step overhead: unetile.train's loop against the bare network step.

The reference is the least a training step can cost: forward, weighted
cross-entropy, backward and the optimiser update on one fixed tile already in
memory. The measured loop is :func:`unetile.train.train` on ISBI 2012 images
(or synthetic EM-like images when the data is absent), with tile sampling, the
paper's augmentation, weight maps and logging. Prints the ratio of the fastest
step times, loop / reference (1.0 = no overhead), and the share of
step time the loop spends outside the network (``data_fraction``), and writes
benchmarks/train_step.json. The reference is first measured with glibc's
malloc defaults, then with :func:`unetile.allocator.keep_freed_memory` (what
the command line sets), which the loop also runs with.

Quick run:  python benchmarks/train_step.py --base-channels 8 --max-tile 4 --steps 3
Full run:   nice -n 5 python benchmarks/train_step.py --preset cpu-fast --steps 8
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, matmul_peak_gflops

from unetile import io
from unetile.allocator import keep_freed_memory
from unetile.data.dataset import IGNORE
from unetile.network.model import forward_flops
from unetile.train.loop import build_model, build_optimizer, compute_loss, make_config, prepare_data
from unetile.train.run import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def link_images(data: Path, work: Path, count: int) -> tuple[Path, Path]:
    """Symlink the first ``count`` ISBI training pairs, or write synthetic ones."""
    images, labels = work / "images", work / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    if (data / "train" / "images").is_dir():
        for index in range(count):
            for kind, folder in (("images", images), ("labels", labels)):
                (folder / f"{index:02d}.png").symlink_to(data / "train" / kind / f"{index:02d}.png")
        return images, labels
    from unetile.data.synthetic import em_like

    for index in range(count):
        sample = em_like((512, 512), rng=index)
        io.write_image(images / f"{index:02d}.tif", (255 * sample.image).astype(np.uint8))
        io.write_image(labels / f"{index:02d}.tif", sample.membrane)
    return images, labels


def reference_step_seconds(config, data, steps: int) -> list[float]:
    """Forward + loss + backward + update on one fixed tile, per step (after a warm-up step)."""
    torch.manual_seed(config.seed)
    model = build_model(config, data.in_channels, data.num_classes)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = build_optimizer(config, model)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, data.in_channels, *data.input_shape)
    images = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    images = images.contiguous(memory_format=memory_format)
    labels = torch.from_numpy(rng.integers(0, 2, (config.batch_size, *data.output_shape)))
    labels[:, :2] = IGNORE
    weights = torch.ones(labels.shape)
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = compute_loss(config, model(images), labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return timings[1:]


KINDS = {
    "convolutions": ("convolution", "conv"),
    "normalisation": ("norm",),
    "relu": ("relu", "threshold_backward", "clamp_min"),
    "max pooling": ("max_pool",),
    "crop-and-concatenate": ("aten::cat", "aten::slice", "aten::narrow", "copy_"),
    "loss": ("softmax", "nll", "cross_entropy"),
    "optimizer": ("_foreach", "addcdiv", "lerp", "sqrt", "aten::add_", "aten::mul_"),
}


def kind_of(name: str) -> str:
    for kind, parts in KINDS.items():
        if any(part in name for part in parts):
            return kind
    return "other"


def profile_step(config, data, peak: float) -> dict:
    """Self time of the operations of two reference steps, by kind (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    reference_step_seconds(config, data, 1)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        reference_step_seconds(config, data, 1)
    seconds: dict[str, float] = {}
    top = []
    for event in profiler.key_averages():
        kind = kind_of(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
        top.append((event.self_cpu_time_total / 1e6, event.key, event.count))
    total = sum(seconds.values())
    step_flops = 3 * forward_flops(config.model_config(1, 2), data.input_shape) * config.batch_size
    # Two steps ran (a warm-up inside reference_step_seconds, then the timed one).
    convolutions = seconds.get("convolutions", 0.0) / 2
    return {
        "seconds_by_kind": seconds,
        "share_by_kind": {k: v / total for k, v in sorted(seconds.items(), key=lambda i: -i[1])},
        "convolutions_fraction_of_peak": step_flops / max(convolutions, 1e-9) / 1e9 / peak,
        "top_operations": [
            {"name": name, "calls": calls, "self_seconds": t}
            for t, name, calls in sorted(top, reverse=True)[:10]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="ISBI 2012 folder")
    parser.add_argument("--preset", default="cpu-fast", help="training preset (cpu-fast)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (8)")
    parser.add_argument("--images", type=int, default=5, help="training images (5)")
    parser.add_argument("--base-channels", type=int, help="override the preset's width")
    parser.add_argument("--max-tile", type=int, help="largest output tile (px)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch's default)")
    parser.add_argument("--profile", action="store_true", help="where a step's time goes")
    parser.add_argument(
        "--precision", default="none", help="the loop's autocast (none: fp32, as the reference)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()

    overrides = {"steps": args.steps, "log_every": 1, "threads": args.threads}
    overrides["precision"] = args.precision
    if args.base_channels:
        overrides["base_channels"] = args.base_channels
    if args.max_tile:
        overrides["max_tile"] = args.max_tile
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        images, labels = link_images(args.data, work, args.images)
        config = make_config(
            args.preset,
            images=str(images),
            labels=str(labels),
            out=str(work / "run"),
            checkpoint_every=10**6,
            **overrides,
        )
        if config.threads:
            torch.set_num_threads(config.threads)
        peak = matmul_peak_gflops()
        started = time.perf_counter()
        data = prepare_data(config, cache_dir=work / "cache")
        preparation = time.perf_counter() - started
        default_malloc_steps = reference_step_seconds(config, data, args.steps)
        kept = keep_freed_memory()
        # Other processes may share the CPU: measure the reference before and
        # after the loop and compare the fastest single steps (as timeit does).
        reference_steps = reference_step_seconds(config, data, args.steps)
        summary = train(config, progress=False, data=data)
        reference_steps += reference_step_seconds(config, data, args.steps)
        profiled = profile_step(config, data, peak) if args.profile else None
        with open(work / "run" / "log.csv") as handle:
            elapsed = [0.0] + [float(row["seconds"]) for row in csv.DictReader(handle)]
    loop_steps = np.diff(elapsed).tolist()
    reference = float(np.min(reference_steps))
    loop = float(np.min(loop_steps))
    ratio = loop / reference
    # Forward + backward is about 3 forward passes (two matmuls per layer backwards).
    step_flops = 3 * forward_flops(config.model_config(1, 2), data.input_shape) * config.batch_size
    reference_share = step_flops / reference / 1e9 / peak
    default_malloc = float(np.min(default_malloc_steps))
    default_malloc_share = step_flops / default_malloc / 1e9 / peak
    print(
        f"{args.preset}: tile {data.input_shape} -> {data.output_shape}, "
        f"base {config.base_channels}, {torch.get_num_threads()} threads"
    )
    print(
        f"reference, glibc malloc defaults: {default_malloc:.3f} s/step = "
        f"{default_malloc_share:.0%} of peak"
    )
    print(
        f"reference (network only): {reference:.3f} s/step (fastest step; "
        f"freed memory kept: {kept}, {default_malloc / reference:.2f}x faster)"
    )
    print(f"unetile.train loop:       {loop:.3f} s/step (fastest step; ratio {ratio:.3f})")
    print(
        f"network step: {step_flops / reference / 1e9:.0f} GFLOP/s = {reference_share:.0%} "
        f"of the {peak:.0f} GFLOP/s matmul peak measured in this run"
    )
    print(f"share outside the network (data_fraction): {summary['data_fraction']:.1%}")
    print(f"data preparation (read, check, weight maps): {preparation:.2f} s")
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info(),
        "data": "isbi2012" if (args.data / "train").is_dir() else "synthetic em_like",
        "preset": args.preset,
        "input_shape": list(data.input_shape),
        "output_shape": list(data.output_shape),
        "base_channels": config.base_channels,
        "steps": summary["step"],
        "reference_seconds_per_step": reference,
        "loop_seconds_per_step": loop,
        "reference_step_seconds": reference_steps,
        "loop_step_seconds": loop_steps,
        "ratio_loop_to_reference": ratio,
        "matmul_peak_gflops": peak,
        "step_gflop": step_flops / 1e9,
        "reference_fraction_of_peak": reference_share,
        "keep_freed_memory": kept,
        "default_malloc_seconds_per_step": default_malloc,
        "default_malloc_step_seconds": default_malloc_steps,
        "default_malloc_fraction_of_peak": default_malloc_share,
        "data_fraction": summary["data_fraction"],
        "preparation_seconds": preparation,
    }
    if profiled is not None:
        result["profile"] = profiled
        shares = ", ".join(f"{k} {v:.0%}" for k, v in profiled["share_by_kind"].items())
        print(f"time of a step: {shares}")
        rate = profiled["convolutions_fraction_of_peak"]
        print(f"convolutions alone (forward and backward): {rate:.0%} of peak")
    io.write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
