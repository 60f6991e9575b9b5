"""Prediction on a Dask LocalCluster against one process: throughput, memory, scheduler cost.

Each job runs in its own subprocess, so that its peak resident memory is its own:

1. ``single``: :func:`unetile.predict.predict_to_files` in one process with
   one torch thread (the reference), labels and instances written to zarr.
2. ``cluster``: :func:`unetile.predict.regions.predict_regions` on a
   ``LocalCluster`` of 1 and of 2 worker processes with one thread each,
   the same outputs. Reported: the wall time of the prediction (cluster
   start-up apart), the output megapixels per second, every worker's peak
   resident memory (``ru_maxrss``, torch included) and its resident memory
   before the run, the task durations the scheduler recorded
   (``get_task_stream``), and the scheduler's overhead per task: wall time
   times workers minus the time inside the tasks, per task; plus the
   round-trip of 500 empty tasks, the floor of that overhead.

The input (random uint8) is a zarr store that every process reads by path;
the same small network (depth 3, base 4, ``valid``) and tile are used in
every job, and the cluster's labels are checked byte for byte against the
single process's.

3. A simulation (arithmetic, no run) of a large volume: tile count, bytes
   read and written per tile, bytes through the scheduler per task, tasks,
   and the number of workers at which the scheduler, handling one task at a
   time, would become the bottleneck: ``workers >= seconds per task /
   scheduler seconds per task``. It uses the single process's seconds per
   voxel on the 3D stack and the round trip of an empty task measured above.

Writes benchmarks/distributed.json beside this script.

Quick run:  python benchmarks/distributed.py --size 1024 --stack 16 256 256
Full run:   python benchmarks/distributed.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

# This script's own name shadows dask's `distributed` package: look here last.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(_HERE)]
sys.path.append(_HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import in_subprocess as run_script_child  # noqa: E402
from machine import machine_info  # noqa: E402

from unetile.network.model import UNet, size_multiple  # noqa: E402
from unetile.network.tiling import Tiling, tile_step  # noqa: E402
from unetile.predict.files import predict_to_files  # noqa: E402
from unetile.predict.instances import InstanceOptions  # noqa: E402
from unetile.predict.postprocessing import PostProcessing  # noqa: E402
from unetile.predict.regions import Plan, model_payload, predict_regions, region_grid  # noqa: E402

HERE = Path(__file__).resolve().parent
NORMALIZATION = {"mean": [127.5], "std": [64.0]}
DEPTH, BASE = 3, 4


def make_model(dims: int) -> UNet:
    model = UNet(depth=DEPTH, base_channels=BASE, dropout=0.0, dims=dims)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model.eval()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_input(path: Path, shape: tuple[int, ...], chunk: int) -> None:
    import zarr

    array = zarr.open_array(
        store=str(path), mode="w", shape=shape, chunks=(chunk,) * len(shape), dtype=np.uint8
    )
    rng = np.random.default_rng(0)
    for start in range(0, shape[0], chunk):
        stop = min(start + chunk, shape[0])
        array[start:stop] = rng.integers(0, 256, (stop - start, *shape[1:]), dtype=np.uint8)


def outputs(folder: Path) -> dict:
    return {"labels": folder / "labels.zarr", "instances": folder / "instances.zarr"}


# --------------------------------------------------------------------------
# Jobs, each in a child process
# --------------------------------------------------------------------------


def job_single(spec: dict) -> dict:
    torch.set_num_threads(1)
    model = make_model(len(spec["shape"]))
    import zarr

    image = zarr.open_array(spec["input"], mode="r")
    before = resident_bytes()
    start = time.perf_counter()
    predict_to_files(
        model,
        image,
        **outputs(Path(spec["out"])),
        tile_shape=spec["tile"],
        normalization=NORMALIZATION,
        progress=False,
    )
    return {
        "seconds": time.perf_counter() - start,
        "resident_before_bytes": before,
        "peak_resident_bytes": peak_resident_bytes(),
    }


def _worker_memory() -> dict:
    return {"peak": peak_resident_bytes(), "now": resident_bytes()}


def _noop(value):
    return value


def job_cluster(spec: dict) -> dict:
    import distributed

    model = make_model(len(spec["shape"]))
    begun = time.perf_counter()
    with (
        distributed.LocalCluster(
            n_workers=spec["workers"], threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # Workers import torch and unetile before the clock starts, as a long run would.
        client.run(lambda: __import__("unetile.predict.regions"))
        started_seconds = time.perf_counter() - begun
        idle = client.run(_worker_memory)
        start = time.perf_counter()
        with distributed.get_task_stream(client) as stream:
            predict_regions(
                model,
                spec["input"],
                **outputs(Path(spec["out"])),
                tile_shape=spec["tile"],
                normalization=NORMALIZATION,
                progress=False,
                client=client,
                region_tiles=spec.get("region_tiles", 1),
            )
        seconds = time.perf_counter() - start
        memory = client.run(_worker_memory)
        empty = 500
        tick = time.perf_counter()
        client.gather(client.map(_noop, range(empty), pure=False))
        empty_seconds = (time.perf_counter() - tick) / empty
    tasks = [entry for entry in stream.data if entry["key"].split("-")[0] != "_noop"]
    inside = sum(
        sum(
            part["stop"] - part["start"]
            for part in entry["startstops"]
            if part["action"] == "compute"
        )
        for entry in tasks
    )
    by_kind: dict[str, list[float]] = {}
    for entry in tasks:
        kind = entry["key"].rsplit("-", 1)[0]
        compute = [p["stop"] - p["start"] for p in entry["startstops"] if p["action"] == "compute"]
        by_kind.setdefault(kind, []).append(sum(compute))
    return {
        "seconds": seconds,
        "cluster_start_seconds": started_seconds,
        "tasks": len(tasks),
        "task_seconds": {
            k: {"count": len(v), "mean": float(np.mean(v))} for k, v in by_kind.items()
        },
        "overhead_seconds_per_task": (seconds * spec["workers"] - inside) / len(tasks),
        "empty_task_seconds": empty_seconds,
        "workers": [
            {"resident_before_bytes": idle[a]["now"], "peak_resident_bytes": memory[a]["peak"]}
            for a in sorted(memory)
        ],
    }


def run_child(spec: dict) -> dict:
    return {"single": job_single, "cluster": job_cluster}[spec["job"]](spec)


def in_subprocess(spec: dict) -> dict:
    return run_script_child(__file__, spec)


# --------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------


def same_labels(first: Path, second: Path) -> bool:
    import zarr

    return all(
        np.array_equal(
            zarr.open_array(str(first / name), mode="r")[:],
            zarr.open_array(str(second / name), mode="r")[:],
        )
        for name in ("labels.zarr", "instances.zarr")
    )


def compare(shape: tuple[int, ...], tile_side: int, workers: list[int], scratch: Path) -> dict:
    """The single process and clusters of ``workers`` on one random image of ``shape``."""
    model = make_model(len(shape))
    tile = [Tiling.of(model).at_least(tile_side)] * len(shape)
    if len(shape) == 3:
        tile[0] = min(tile[0], Tiling.of(model).at_least(shape[0]))
    source = scratch / f"input_{len(shape)}d.zarr"
    write_input(source, shape, 256 if len(shape) == 2 else 64)
    pixels = math.prod(shape)
    common = {"shape": list(shape), "tile": tile, "input": str(source)}
    single = in_subprocess({"job": "single", **common, "out": str(scratch / "single")})
    entry = {"shape": list(shape), "tile": tile, "single": single, "clusters": []}
    if "failed" not in single:
        single["output_megapixels_per_second"] = pixels / single["seconds"] / 1e6
        print(f"{shape}: single process {single['seconds']:.1f} s")
    for count in workers:
        out = scratch / f"cluster{count}"
        result = in_subprocess({"job": "cluster", **common, "workers": count, "out": str(out)})
        if "failed" not in result:
            result["output_megapixels_per_second"] = pixels / result["seconds"] / 1e6
            result["identical_to_single_process"] = same_labels(scratch / "single", out)
            if "failed" not in single:
                result["speed_over_single_process"] = single["seconds"] / result["seconds"]
            print(
                f"{shape}: {count} worker(s) {result['seconds']:.1f} s, overhead "
                f"{1e3 * result['overhead_seconds_per_task']:.1f} ms/task, identical "
                f"{result['identical_to_single_process']}"
            )
        entry["clusters"].append(result)
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return entry


def task_bytes(model: UNet, shape, tile) -> dict:
    """Pickled sizes: a region (each task's own argument) and what goes once per worker."""
    alignment = size_multiple(model.config.depth)
    steps = tuple(tile_step(t, alignment) for t in tile)
    region = region_grid(shape, tile, steps, alignment)[0]
    plan = Plan(
        work="/scratch/.cells_labels.zarr.unetile-work",
        spatial=tuple(shape),
        tile_shape=tuple(tile),
        steps=steps,
        tiling=Tiling.of(model),
        kinds=("labels", "instances"),
        post=PostProcessing(instances=InstanceOptions()),
        by_region=False,
        batch_size=1,
        tta=False,
        device=None,
        normalization=None,
        num_classes=2,
    )
    return {
        "region_per_task": len(pickle.dumps(region)),
        "plan_once_per_worker": len(pickle.dumps(plan)),
        "model_once_per_worker": len(model_payload(model)["weights"]),
    }


def simulate(volume, tile: int, margin: int, seconds_per_voxel: float, overhead: float) -> list:
    """Rows of the large-volume arithmetic for a few region sizes and worker speeds."""
    rows = []
    tiles = math.prod(math.ceil(v / tile) for v in volume)
    for region_tiles in (1, 2, 4):
        regions = tiles / region_tiles**3
        # Three passes for instances: predict, join, final ids; the last two are short.
        tasks = 3 * regions
        voxels = (tile * region_tiles) ** 3
        read_bytes = (tile * region_tiles + 2 * margin) ** 3  # uint8 input windows
        written = voxels * (1 + 8 + 4)  # labels, provisional ids, final ids
        for speedup in (1, 10, 100):
            seconds_per_task = voxels * seconds_per_voxel / speedup
            rows.append(
                {
                    "region_tiles": region_tiles,
                    "worker_speed": speedup,
                    "tasks": tasks,
                    "seconds_per_region": seconds_per_task,
                    "bytes_read_per_region": read_bytes,
                    "bytes_written_per_region": written,
                    "scheduler_hours": tasks * overhead / 3600,
                    "workers_at_which_scheduler_saturates": seconds_per_task / overhead,
                    "compute_hours_one_worker": regions * seconds_per_task / 3600,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="2D image side (px)")
    parser.add_argument("--tile", type=int, default=1024, help="2D output tile (px, at least)")
    parser.add_argument("--stack", type=int, nargs=3, default=[32, 512, 512], help="3D stack")
    parser.add_argument("--tile-3d", type=int, default=96, help="3D output tile (at least)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--volume", type=int, nargs=3, default=[5000, 100_000, 100_000], help="simulated (z y x)"
    )
    parser.add_argument("--output", type=Path, default=HERE / "distributed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    started = time.perf_counter()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "network": {"depth": DEPTH, "base_channels": BASE, "padding": "valid"},
    }
    with tempfile.TemporaryDirectory(prefix="unetile-distributed-") as scratch:
        scratch = Path(scratch)
        report["image_2d"] = compare(
            (args.size, args.size), args.tile, args.workers, scratch / "2d"
        )
        report["stack_3d"] = compare(tuple(args.stack), args.tile_3d, args.workers, scratch / "3d")

    stack = report["stack_3d"]
    model = make_model(3)
    if "failed" not in stack["single"] and stack["clusters"]:
        seconds_per_voxel = stack["single"]["seconds"] / math.prod(stack["shape"])
        # The scheduler's own cost per task: the round trip of an empty task.
        overhead = max(c["empty_task_seconds"] for c in stack["clusters"] if "failed" not in c)
        tile = stack["tile"][-1]
        report["simulation"] = {
            "volume": args.volume,
            "tile": tile,
            "context_margin": model.context_margin,
            "seconds_per_voxel_one_thread": seconds_per_voxel,
            "scheduler_seconds_per_task": overhead,
            "pickled_bytes": task_bytes(model, stack["shape"], stack["tile"]),
            "rows": simulate(args.volume, tile, model.context_margin, seconds_per_voxel, overhead),
        }
        for row in report["simulation"]["rows"]:
            print(
                f"K={row['region_tiles']} speed x{row['worker_speed']}: {row['tasks']:.3g} tasks, "
                f"{row['seconds_per_region']:.3g} s/region, scheduler saturates at "
                f"{row['workers_at_which_scheduler_saturates']:.3g} workers"
            )
    report["seconds"] = time.perf_counter() - started
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
