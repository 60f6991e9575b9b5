"""``unetile demo``: train, predict and evaluate on synthetic cells, no data needed."""

from __future__ import annotations

import argparse

from ..numbers import real_option, whole_option

DEMO_STEPS = 600  # unetile.demo.DEMO_STEPS, without importing torch for --help


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole method on synthetic touching cells in a few minutes",
        description=(
            "Generate synthetic images of touching cells, train two small U-Nets for the "
            "same number of steps (with and without the paper's border weight, w0 = 10 and "
            "w0 = 0), predict a large test image with overlap-tile, score both with the paper's "
            "connected components and with the instance options each model carries (picked in "
            "training; the figure and the table name them), and write figures: "
            "figure3_weight_map.png (the paper's figure 3), prediction_overlay.png, "
            "input.png, curves.png and metrics.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument(
        "--steps",
        type=whole_option(1, 10**7),
        default=DEMO_STEPS,
        help="training steps of each network",
    )
    parser.add_argument(
        "--minutes",
        type=real_option(0, 10**5, open_minimum=True),
        default=None,
        help="also stop training when both runs together have taken this long (default: no limit)",
    )
    parser.add_argument(
        "--size",
        type=whole_option(64, 65536),
        default=2048,
        help="height and width of the test image (pixels)",
    )
    parser.add_argument(
        "--seed", type=whole_option(0, 2**32 - 1), default=0, help="seed of data and training"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo
    from ..io import InputError

    if args.minutes is not None and args.minutes <= 0:
        raise InputError(f"--minutes must be > 0, got {args.minutes}")
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.size < 64:
        raise InputError(f"--size must be >= 64 pixels, got {args.size}")
    report = run_demo(
        args.out,
        steps=args.steps,
        minutes=args.minutes,
        test_size=args.size,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"demo written to {args.out}/ in {report['seconds_total']:.0f} s")
    from ..demo import describe_instances

    for name in ("weighted", "unweighted"):
        carried = describe_instances(report[name]["watershed"]["options"])
        print(f"{name}: the model's instance options: {carried}")
    print(f"{'':34}{'F1@0.5':>8}{'SEG':>8}{'cells':>8}{'merged pairs':>14}")
    for name in ("weighted", "unweighted"):
        for pipeline, said in (("components", "components"), ("watershed", "model's")):
            result = report[name][pipeline]
            merged = f"{result['touching_pairs_merged']}/{result['touching_pairs']}"
            label = f"{name} (w0={int(report[name]['w0'])}), {said}"
            print(
                f"{label:34}{result['f1@0.5']:8.3f}"
                f"{result['seg']:8.3f}{result['cells_predicted']:8d}{merged:>14}"
            )
    return 0
