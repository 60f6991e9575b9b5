"""bf16 against fp32 prediction on ISBI 2012: the accuracy cost, and the speed-up where native.

Trains a small model (``--preset``, ``--minutes`` of CPU; or takes ``--model``,
a run folder of ``unetile train``), predicts the five validation slices
(train/images 25-29) in fp32 and in bf16 (``unetile predict --precision
bf16``) and reports, against fp32 as the reference of the same run: the
fraction of pixels whose label agrees, the largest change of a probability,
and the pixel and Rand errors of both against the ground truth (binary maps at
0.5, ``unetile.evaluate.metrics.score``). Where the CPU has no native bf16 (no
AVX-512 BF16, no AMX) oneDNN emulates it: the numbers are the same as native
bf16's, the time is not, so no speed-up is reported (``"speed_up": null``)
and the emulated time is recorded as such. The matmul peak of the run is
recorded for the times.

Writes benchmarks/precision.json beside this script.

    python benchmarks/precision.py                 # trains for 1.5 minutes first
    python benchmarks/precision.py --model runs/isbi
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, matmul_peak_gflops

from unetile import io, precision
from unetile.evaluate.metrics import score
from unetile.predict import card
from unetile.predict.engine import predict
from unetile.train.config import make_config
from unetile.train.run import train

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "isbi2012"
TRAIN = [f"{index:02d}" for index in range(25)]
VALIDATION = [f"{index:02d}" for index in range(25, 30)]


def link_split(data: Path, folder: Path) -> None:
    """The trainer reads folders: link the training split's files, never copy the data."""
    for kind in ("images", "labels"):
        (folder / kind).mkdir(parents=True)
        for stem in TRAIN:
            (folder / kind / f"{stem}.png").symlink_to(data / "train" / kind / f"{stem}.png")


def train_model(data: Path, preset: str, minutes: float, seed: int, work: Path) -> Path:
    link_split(data.resolve(), work / "train")
    config = make_config(
        preset,
        images=str(work / "train" / "images"),
        labels=str(work / "train" / "labels"),
        out=str(work / "run"),
        label_mode="membrane",
        cell_value=255,
        max_minutes=minutes,
        seed=seed,
    )
    train(config, progress=sys.stderr.isatty())
    return work / "run"


def predict_all(model, saved, images, precision_name: str) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    probabilities = np.stack(
        [
            predict(
                model,
                image,
                normalization=saved["normalization"],
                precision=precision_name,
                device="cpu",
                progress=False,
            )
            for image in images
        ]
    )
    return probabilities, time.perf_counter() - start


def errors(cell_probability: np.ndarray, cells: np.ndarray) -> dict:
    per_image = [
        score(probability > 0.5, truth, ["pixel_error", "rand_error"])
        for probability, truth in zip(cell_probability, cells, strict=True)
    ]
    return {key: float(np.mean([result[key] for result in per_image])) for key in per_image[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, help="run folder to use instead of training one")
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "precision.json")
    args = parser.parse_args()
    started = time.perf_counter()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
    }
    native = precision.bf16_unsupported_reason(torch.device("cpu"))
    report["bf16_native"] = native is None
    report["bf16_missing"] = native
    with tempfile.TemporaryDirectory(prefix="unetile-precision-") as work:
        run = args.model or train_model(args.data, args.preset, args.minutes, args.seed, Path(work))
        model, saved = card.load_model(run)
        report["model"] = {"run": str(args.model) if args.model else None, **saved["model"]}
    cell = saved["classes"]["foreground"]
    images = np.stack(
        [io.read_image(args.data / "train" / "images" / f"{s}.png") for s in VALIDATION]
    )
    cells = np.stack(
        [io.read_image(args.data / "train" / "labels" / f"{s}.png") == 255 for s in VALIDATION]
    )
    peak = matmul_peak_gflops()
    full, full_seconds = predict_all(model, saved, images, "fp32")
    if native is not None:
        # Emulated bf16: the same rounding as native bf16, not its speed.
        precision.bf16_unsupported_reason = lambda device: None
    half, half_seconds = predict_all(model, saved, images, "bf16")
    agreement = float((full.argmax(1) == half.argmax(1)).mean())
    report.update(
        matmul_peak_gflops=peak,
        validation=VALIDATION,
        fp32={"seconds": full_seconds, **errors(full[:, cell], cells)},
        bf16={
            "seconds": half_seconds,
            "emulated": native is not None,
            **errors(half[:, cell], cells),
        },
        label_agreement=agreement,
        max_probability_change=float(np.abs(full - half).max()),
        speed_up=None if native is not None else full_seconds / half_seconds,
    )
    for name in ("pixel_error", "rand_error"):
        report[f"{name}_change"] = report["bf16"][name] - report["fp32"][name]
    report["seconds_total"] = time.perf_counter() - started
    print(
        f"bf16 against fp32 on {len(VALIDATION)} ISBI 2012 validation slices: labels agree on "
        f"{100 * agreement:.3f}% of pixels, largest probability change "
        f"{report['max_probability_change']:.4f}; pixel error {report['fp32']['pixel_error']:.4f}"
        f" -> {report['bf16']['pixel_error']:.4f}, Rand error {report['fp32']['rand_error']:.4f}"
        f" -> {report['bf16']['rand_error']:.4f}; "
        + (
            f"speed-up {report['speed_up']:.2f}x"
            if native is None
            else f"speed-up not measurable here ({native}; emulated bf16 took "
            f"{half_seconds / full_seconds:.1f}x the fp32 time)"
        )
    )
    io.write_json(args.output, report)
    print(f"wrote {args.output} ({report['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
