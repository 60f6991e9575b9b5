"""A benchmark script run on an earlier commit and on this tree, in turns, in one session.

Made for refactors that must not cost speed or memory: the earlier commit is
checked out into a temporary git worktree and its own copy of the script runs
against its own ``src`` (``PYTHONPATH``); then this tree's script runs against
this tree. ``--rounds 2`` runs them A B B A, so that a drift of the shared
machine falls on both alike. Every timing, rate and peak-memory figure the
two JSON outputs share is reported as after / before (the median over the
rounds); a figure that varies by run (a temporary path) is left out.

Writes benchmarks/before_after_<script>.json beside this script.

    python benchmarks/before_after.py --before 7d6622f predict_speed.py -- --slices 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Leaves compared: times, rates, shares of the peak and peak memory.
MEASURES = re.compile(r"(seconds|per_second|fraction_of_peak|gflops|peak_resident|per_slice)")


def flatten(value, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON value by dotted path; list items by their index."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return {prefix: float(value)} if ok else {}
    found = {}
    for key, inner in items:
        found.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return found


def run(tree: Path, script: str, arguments: list[str], output: Path) -> dict:
    """One run of ``tree``'s copy of ``script`` against ``tree``'s package."""
    environment = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(tree / "benchmarks" / script), *arguments]
    command += ["--output", str(output)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=environment, cwd=tree)
    return flatten(json.loads(output.read_text()))


def compare(befores: list[dict], afters: list[dict]) -> dict[str, dict]:
    shared = set.intersection(*(set(r) for r in befores + afters))
    rows = {}
    for key in sorted(k for k in shared if MEASURES.search(k)):
        before = statistics.median(r[key] for r in befores)
        after = statistics.median(r[key] for r in afters)
        if before > 0:
            rows[key] = {"before": before, "after": after, "after_over_before": after / before}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit to compare with")
    parser.add_argument("--rounds", type=int, default=1, help="2: A B B A")
    parser.add_argument("script", help="a script in benchmarks/, e.g. predict_speed.py")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="-- then its options")
    args = parser.parse_args()
    arguments = [a for a in args.arguments if a != "--"]
    with tempfile.TemporaryDirectory(prefix="unetile-before-") as scratch:
        old = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.before],
            check=True,
        )
        try:
            befores, afters = [], []
            order = ["before", "after"] + (["after", "before"] if args.rounds > 1 else [])
            for number, which in enumerate(order):
                tree = old if which == "before" else ROOT
                result = run(tree, args.script, arguments, Path(scratch) / f"{number}.json")
                (befores if which == "before" else afters).append(result)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False
            )
    rows = compare(befores, afters)
    for key, row in rows.items():
        print(
            f"{row['after_over_before']:7.3f}  {key}  ({row['before']:.4g} -> {row['after']:.4g})"
        )
    record = {
        "command": "python benchmarks/before_after.py " + " ".join(sys.argv[1:]),
        "before": args.before,
        "after": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "order": order,
        "rows": rows,
    }
    output = HERE / f"before_after_{Path(args.script).stem}.json"
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
