"""ISBI 2012 on a GPU: the paper's configuration trained to convergence.

Trains the ``paper`` preset (width 64, 572 x 572 tiles, batch 1, SGD with
momentum 0.99, drop-out, the w0 = 10 / sigma = 5 weight map) on images 00-24
and scores it on 25-29 every ``--segment-seconds`` of training with the same
metrics as ``isbi2012.py``. Reports:

* the validation curve against training time, and for each metric the
  training time at which the GPU run first reaches the CPU result of
  ``isbi2012.json`` (12 minutes of the ``cpu-fast`` preset on 2 CPU cores);
* training images (572 x 572 tiles) per second, and the training FLOP/s as a
  fraction of the GPU's measured matmul peak (TF32, as cuDNN runs fp32
  convolutions by default);
* a short throughput comparison before the run: fp32 with and without
  ``torch.backends.cudnn.benchmark``, and bf16 autocast with channels-last;
* the time to segment one 512 x 512 slice (median over the validation
  slices, after a warm-up), with and without test-time augmentation.

Writes ``isbi2012_gpu.json`` beside this script (``--out`` elsewhere).

    python benchmarks/isbi2012_gpu.py                 # 5 minutes of training
    python benchmarks/isbi2012_gpu.py --minutes 6 --segment-seconds 30 --skip-variants \\
        --set learning_rate=1e-3 --set warmup_steps=1000   # the committed run
    python benchmarks/isbi2012_gpu.py --minutes 0.2 --device cpu \\
        --set base_channels=8 --set max_tile=4        # a dry run without a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from isbi2012 import (
    DEFAULT_DATA,
    HEADLINE,
    TRAIN,
    VALIDATION,
    evaluate,
    link_split,
    parse_options,
    predict_unetile,
    read_split,
)
from machine import machine_info

from unetile import io
from unetile.network.model import forward_flops
from unetile.predict import card
from unetile.predict.engine import resolve_device
from unetile.train.loop import (
    LAST_WEIGHTS,
    build_model,
    build_optimizer,
    build_sampler,
    compute_loss,
    make_config,
    prepare_data,
)
from unetile.train.run import train

HERE = Path(__file__).resolve().parent
# Steps per throughput variant, the first WARMUP of them untimed (cuDNN's autotuning).
VARIANT_STEPS, WARMUP = 150, 30


def matmul_peaks(device: torch.device, size: int = 8192, repeats: int = 10) -> dict:
    """Median matmul rate (TFLOP/s) in fp32, TF32 and bf16 on random data."""
    if device.type != "cuda":
        return {}
    previous = torch.backends.cuda.matmul.allow_tf32
    peaks = {}
    try:
        for name, dtype, tf32 in (
            ("fp32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bf16", torch.bfloat16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            for _ in range(3):
                a @ b
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            peaks[name] = round(2 * size**3 / float(np.median(times)) / 1e12, 1)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return peaks


def throughput(config, data, folder: Path, benchmark: bool, **options) -> dict:
    """Steps/s of a short run, the first WARMUP steps (autotuning) left out."""
    torch.backends.cudnn.benchmark = benchmark
    run = make_config(**{**config.to_dict(), **options, "out": str(folder)})
    first = train(run, data=data, stop_after=WARMUP, progress=False)
    last = train(run, data=data, stop_after=VARIANT_STEPS, resume=True, progress=False)
    seconds = last["seconds"] - first["seconds"]
    return {
        "cudnn_benchmark": benchmark,
        **options,
        "steps_per_second": round((VARIANT_STEPS - WARMUP) / seconds, 2),
        "data_fraction": round(last["data_fraction"], 3),
    }


def split_step(config, data, device: torch.device, repeats: int = 60) -> dict:
    """Milliseconds of tile sampling (with augmentation) and of the network step, apart.

    Each is timed alone and synchronised, so the split holds on a GPU too, where
    the training loop's own share (``data_fraction``) also holds the wait for
    the GPU's queue.
    """
    sampler = build_sampler(config, data, device)
    model = build_model(config, data.in_channels, data.num_classes).to(device).train()
    optimizer = build_optimizer(config, model)
    images, labels, weights = sampler.sample(config.batch_size)

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def network_step():
        loss = compute_loss(config, model(images), labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timings = {}
    for name, work in (
        ("sampling", lambda: sampler.sample(config.batch_size)),
        ("network", network_step),
    ):
        for _ in range(5):
            work()
        synchronise()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        synchronise()
        timings[f"{name}_ms"] = round((time.perf_counter() - start) / repeats * 1e3, 2)
    return timings


def time_to_reach(curve: list[dict], reference: dict) -> dict:
    """Training seconds of the first evaluation at least as good as ``reference``, per metric."""
    reached = {}
    for key in HEADLINE:
        if key not in reference:
            continue
        hits = [point for point in curve if point["scores"][key] <= reference[key]]
        reached[key] = (
            {"seconds": hits[0]["train_seconds"], "step": hits[0]["step"]} if hits else None
        )
    return reached


def slice_seconds(model, saved, images: np.ndarray, tta: bool) -> float:
    """Median seconds to segment one slice, after a warm-up slice."""
    predict_unetile(model, saved, images[:1], tta=tta)
    times = []
    for image in images:
        start = time.perf_counter()
        predict_unetile(model, saved, image[None], tta=tta)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISBI 2012 folder")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time (steps only)")
    parser.add_argument("--segment-seconds", type=float, default=25.0, help="between evaluations")
    parser.add_argument("--preset", default="paper", help="unetile preset")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an option"
    )
    parser.add_argument("--cpu-result", type=Path, default=HERE / "isbi2012.json")
    parser.add_argument("--skip-variants", action="store_true", help="no throughput comparison")
    parser.add_argument("--out", type=Path, default=HERE / "isbi2012_gpu.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cpu = io.read_json(args.cpu_result) if args.cpu_result.is_file() else None
    reference = cpu["unetile"]["scores"]["mean"] if cpu else {}
    val_images, val_cells = read_split(args.data, VALIDATION)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_peak_tflops=matmul_peaks(device),
        ),
        "split": {"train": "00-24", "validation": "25-29"},
        "cpu_reference": {
            "source": args.cpu_result.name,
            "preset": cpu["unetile"]["preset"] if cpu else None,
            "minutes": cpu["minutes"] if cpu else None,
            "scores": reference,
        },
    }
    print(
        f"device {results['machine']['device']}, peaks {results['machine']['matmul_peak_tflops']}"
    )

    def write():
        io.write_json(args.out, results)

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        link_split(args.data, TRAIN, work / "train")
        config = make_config(
            args.preset,
            **parse_options(args.set),
            images=str(work / "train" / "images"),
            labels=str(work / "train" / "labels"),
            out=str(work / "run"),
            label_mode="membrane",
            cell_value=255,
            device=args.device,
            seed=args.seed,
            steps=10**7,  # the time budget ends the run; the paper's schedule is constant
            checkpoint_every=10**7,  # each segment ends with a checkpoint
        )
        data = prepare_data(config, work / "cache")

        results["split_step"] = split_step(config, data, device)
        print(f"alone: {results['split_step']}")
        write()
        if not args.skip_variants:
            variants = []
            for index, (benchmark, options) in enumerate(
                [
                    (False, {}),
                    (True, {}),
                    (True, {"precision": "bf16", "channels_last": True}),
                ]
            ):
                variant = throughput(config, data, work / f"variant{index}", benchmark, **options)
                variants.append(variant)
                print(f"throughput {variant}")
            results["throughput_variants"] = variants
            write()
            torch.backends.cudnn.benchmark = (
                variants[1]["steps_per_second"] > variants[0]["steps_per_second"]
            )
        results["cudnn_benchmark"] = torch.backends.cudnn.benchmark

        curve: list[dict] = []
        budget = 60 * args.minutes
        began = time.perf_counter()
        step, segment = 0, 50
        while True:
            try:
                summary = train(
                    config, data=data, resume=step > 0, stop_after=step + segment, progress=False
                )
            except FloatingPointError as error:  # keep the curve so far
                results["diverged"] = str(error)
                print(error)
                break
            step = summary["step"]
            model, saved = card.load_model(config.out, name=LAST_WEIGHTS)
            scores = evaluate(predict_unetile(model, saved, val_images, tta=False), val_cells)
            curve.append(
                {
                    "step": step,
                    "train_seconds": round(summary["seconds"], 2),
                    "wall_seconds": round(time.perf_counter() - began, 2),
                    "scores": scores["mean"],
                }
            )
            mean = scores["mean"]
            print(
                f"step {step:6d}  {summary['seconds']:6.0f} s  "
                + "  ".join(f"{key} {mean[key]:.4f}" for key in HEADLINE)
            )
            rate = summary["steps_per_second"]
            flops = 3 * forward_flops(saved["model"], summary["input_shape"]) * config.batch_size
            results["training"] = {
                "preset": args.preset,
                "config": config.to_dict(),
                "steps": step,
                "train_seconds": round(summary["seconds"], 1),
                "steps_per_second": round(rate, 2),
                "images_per_second": round(rate * config.batch_size, 2),
                "input_shape": summary["input_shape"],
                "train_tflops_per_second": round(rate * flops / 1e12, 2),
                "data_fraction": round(summary["data_fraction"], 3),
            }
            results["curve"] = curve
            results["time_to_cpu_result"] = time_to_reach(curve, reference)
            write()
            left = budget - summary["seconds"]
            if left < 0.2 * args.segment_seconds:  # no evaluation for a sliver of training
                break
            segment = max(10, round(rate * min(args.segment_seconds, left)))

    if not curve:
        write()
        return 1
    best = {key: min(point["scores"][key] for point in curve) for key in HEADLINE}
    results["final"] = {
        "scores": scores,
        "scores_tta": evaluate(predict_unetile(model, saved, val_images, tta=True), val_cells),
        "best_along_curve": best,
        "seconds_per_512_slice": round(slice_seconds(model, saved, val_images, tta=False), 3),
        "seconds_per_512_slice_tta": round(slice_seconds(model, saved, val_images, tta=True), 3),
    }
    write()

    training = results["training"]
    print(
        f"{training['steps']} steps in {training['train_seconds']:.0f} s: "
        f"{training['images_per_second']:.1f} images/s, "
        f"{training['train_tflops_per_second']:.1f} TFLOP/s, "
        f"{training['data_fraction']:.1%} of step time outside the network"
    )
    print(
        f"one 512 x 512 slice: {results['final']['seconds_per_512_slice']:.3f} s, "
        f"with TTA {results['final']['seconds_per_512_slice_tta']:.3f} s"
    )
    print(f"{'metric (mean of 25-29)':34}{'GPU end':>10}{'GPU best':>10}{'CPU':>10}{'reached':>10}")
    for key in HEADLINE:
        hit = results["time_to_cpu_result"].get(key)
        row = f"{key:34}{mean[key]:10.4f}{best[key]:10.4f}"
        row += f"{reference[key]:10.4f}" if key in reference else f"{'':>10}"
        row += f"{hit['seconds']:9.0f}s" if hit else f"{'never':>10}"
        print(row)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
