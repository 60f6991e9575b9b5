"""``unetile demo``: train, predict and evaluate on synthetic cells, no data needed."""

from __future__ import annotations

import argparse

from ..numbers import real_option, whole_option


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole method on synthetic touching cells in a few minutes",
        description=(
            "Generate synthetic images of touching cells, train two small U-Nets for the "
            "same time (with and without the paper's border weight, w0 = 10 and w0 = 0), "
            "predict a large test image with overlap-tile, score both and write figures: "
            "figure3_weight_map.png (the paper's figure 3), prediction_overlay.png, "
            "input.png, curves.png and metrics.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument(
        "--minutes",
        type=real_option(0, 10**5, open_minimum=True),
        default=2.0,
        help="training time of both runs together",
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

    if args.minutes <= 0:
        raise InputError(f"--minutes must be > 0, got {args.minutes}")
    if args.size < 64:
        raise InputError(f"--size must be >= 64 pixels, got {args.size}")
    report = run_demo(
        args.out, minutes=args.minutes, test_size=args.size, seed=args.seed, progress=not args.quiet
    )
    print(f"demo written to {args.out}/ in {report['seconds_total']:.0f} s")
    print(f"{'':20}{'F1@0.5':>8}{'SEG':>8}{'cells':>8}{'merged pairs':>14}")
    for name in ("weighted", "unweighted"):
        result = report[name]
        merged = f"{result['touching_pairs_merged']}/{result['touching_pairs']}"
        print(
            f"{name + ' (w0=' + str(int(result['w0'])) + ')':20}{result['f1@0.5']:8.3f}"
            f"{result['seg']:8.3f}{result['cells_predicted']:8d}{merged:>14}"
        )
    return 0
