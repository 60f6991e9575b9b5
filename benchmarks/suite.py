"""The benchmark suite: every preset and two MONAI peers on real data of many kinds.

For each set built by ``suite_data.py`` and each arm, trains for the same
wall-clock budget on the set's training images, predicts its test images and
scores them with unetile's own metrics:

* pixels: foreground IoU, Dice and pixel error of the class map;
* objects (sets with objects): F1 at IoU 0.5 (one-to-one matching), SEG and
  the predicted / true object count.

Arms:

* ``cpu-fast``, ``auto``, ...: ``unetile train --preset P --max-minutes M``
  then ``unetile predict RUN TEST --instances``, as a user would (instance
  sets with ``--label-mode instances``); its objects are its ``_instances``.
* ``monai-basic``: MONAI's ``BasicUNet``; ``monai-flex``: MONAI's
  ``FlexibleUNet`` with a ResNet-18 encoder (no pretrained weights, there is
  no internet). Each with its usual recipe: Adam 1e-3, cross-entropy, random
  256 px crops with flips and 90-degree turns, batch 4, images standardised
  by the training set's channel means and deviations; sliding-window
  prediction (256 px, overlap 0.25); objects are the 8-connected components
  of its class map.

Results go to ``suite.json`` beside this script, one entry per set, arm and
seed, written after each run, so an interrupted suite resumes where it
stopped (``--force`` reruns). ``--table`` prints the README's table from the
JSON; ``--figure`` draws one crop per set (image, truth, each arm's objects).

    python benchmarks/suite_data.py                     # the data, once
    python benchmarks/suite.py --minutes 5              # every set and arm
    python benchmarks/suite.py --sets dic-hela --arms cpu-fast --seeds 0 1 2
    python benchmarks/suite.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from unetile import io
from unetile.evaluate.metrics import dice, iou, match_objects, pixel_error, seg_score

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "suite.json"
DEFAULT_DATA = HERE / "suite_data"
DEFAULT_WORK = HERE / "suite_runs"
SETS = (
    "isbi2012",
    "dsb2018",
    "dic-hela",
    "fluo-hela",
    "fluo-hela-binary",
    "phc-psc",
    "monuseg",
    "drive",
)
#: Sets whose truth has no objects to count (vessel trees).
PIXELS_ONLY = ("drive",)
PEERS = ("monai-basic", "monai-flex")
ARMS = ("cpu-fast", "auto", *PEERS)
UNETILE = Path(sys.executable).with_name("unetile")


# ---------------------------------------------------------------------------
# Data


def pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    images = sorted((root / split / "images").iterdir())
    labels = {p.stem: p for p in (root / split / "labels").iterdir()}
    return [(image, labels[image.stem]) for image in images]


def is_instance_set(root: Path) -> bool:
    return any(p.suffix == ".tif" for p in (root / "train" / "labels").iterdir())


def truth_objects(label: np.ndarray, instances: bool) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and objects of a truth label (binary: its 4-connected components)."""
    if instances or label.dtype != np.uint8:
        return label > 0, label.astype(np.int64)
    foreground = label > 0
    return foreground, ndimage.label(foreground)[0]


# ---------------------------------------------------------------------------
# unetile, as a user runs it


def run_command(arguments: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write("$ " + shlex.join(arguments) + "\n")
        handle.flush()
        done = subprocess.run(arguments, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(arguments[:3])} failed; see {log}")


def run_unetile(preset, root, minutes, seed, work: Path) -> tuple[list[Path], dict]:
    run, out, log = work / "run", work / "predicted", work / "log.txt"
    train = [str(UNETILE), "train", "--images", str(root / "train" / "images")]
    train += ["--labels", str(root / "train" / "labels"), "--out", str(run)]
    train += ["--preset", preset, "--max-minutes", str(minutes), "--seed", str(seed)]
    train += ["--overwrite"]
    if is_instance_set(root):
        train += ["--label-mode", "instances"]
    started = time.perf_counter()
    run_command(train, log)
    trained = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's outputs: another model's
    predict = [str(UNETILE), "predict", str(run), str(root / "test" / "images")]
    predict += ["--out", str(out), "--instances", "--no-progress"]
    run_command(predict, log)
    summary = json.loads((run / "summary.json").read_text())
    saved = json.loads((run / "config.json").read_text())
    info = {
        "train_seconds": round(trained, 1),
        "steps": summary["step"],
        "base_channels": saved["model"]["base_channels"],
        "instances": saved.get("instances"),
        "race": ((saved["training"].get("auto") or {}).get("race")),
        "commands": [shlex.join(train), shlex.join(predict)],
    }
    return [out], info


def refit_arm(name: str, root: Path, work: Path, entry: dict) -> dict:
    """An earlier unetile run with this release's post-processing: fitted again
    (``unetile.train.refit_instances``), predicted again, scored again."""
    from unetile.train.loop import refit_instances

    run, out = work / "run", work / "predicted"
    refit_instances(run)
    shutil.rmtree(out, ignore_errors=True)
    predict = [str(UNETILE), "predict", str(run), str(root / "test" / "images")]
    predict += ["--out", str(out), "--instances", "--no-progress"]
    run_command(predict, work / "log.txt")
    test = pairs(root, "test")
    outputs = [unetile_outputs(out, image.stem) for image, _ in test]
    per_image = [
        score_image(
            fg,
            objects,
            np.asarray(io.read_image(label)),
            is_instance_set(root),
            name not in PIXELS_ONLY,
        )
        for (fg, objects), (_, label) in zip(outputs, test, strict=True)
    ]
    saved = json.loads((run / "config.json").read_text())
    return {
        **entry,
        **summarise(per_image),
        "per_image": per_image,
        "instances": saved.get("instances"),
        "refit": "post-processing fitted again with refit_instances, then predicted again",
        "commands": [*entry.get("commands", [])[:1], shlex.join(predict)],
    }


def unetile_outputs(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    labels = io.read_image(next(out.glob(f"{stem}_labels.*")))
    instances = io.read_image(next(out.glob(f"{stem}_instances.*")))
    return np.asarray(labels) > 0, np.asarray(instances)


# ---------------------------------------------------------------------------
# The MONAI peers, with their usual recipe


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(io.read_image(image_path), dtype=np.float32)
    image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return image, np.asarray(io.read_image(label_path))


def model_input(path: Path, channels: int) -> np.ndarray:
    """An image as a model of ``channels`` inputs reads it: channels first, gray repeated."""
    image = np.asarray(io.read_image(path), dtype=np.float32)
    image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return as_channels(image, channels)


def as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Gray stored as one channel becomes R = G = B for a colour network (as unetile does)."""
    return np.repeat(image, channels, axis=0) if image.shape[0] < channels else image


def peer_network(arm: str, channels: int):
    from monai.networks.nets import BasicUNet, FlexibleUNet

    if arm == "monai-basic":
        return BasicUNet(spatial_dims=2, in_channels=channels, out_channels=2)
    return FlexibleUNet(in_channels=channels, out_channels=2, backbone="resnet18", pretrained=False)


def run_peer(arm: str, root: Path, minutes: float, seed: int) -> tuple[object, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [read_pair(i, lab) for i, lab in pairs(root, "train")]
    channels = max(image.shape[0] for image, _ in data)
    data = [(as_channels(image, channels), label) for image, label in data]
    instances = is_instance_set(root)
    stacked = np.concatenate([image.reshape(image.shape[0], -1) for image, _ in data], axis=1)
    mean, std = stacked.mean(axis=1), stacked.std(axis=1) + 1e-6
    images = [torch.from_numpy((im - mean[:, None, None]) / std[:, None, None]) for im, _ in data]
    targets = [
        torch.from_numpy(truth_objects(lab, instances)[0].astype(np.int64)) for _, lab in data
    ]
    model = peer_network(arm, images[0].shape[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    crop, batch, steps = 256, 4, 0
    started = time.perf_counter()
    model.train()
    while time.perf_counter() - started < 60 * minutes:
        tiles, tile_targets = [], []
        for _ in range(batch):
            index = int(rng.integers(len(images)))
            tile, target = _random_crop(images[index], targets[index], crop, rng)
            tiles.append(tile)
            tile_targets.append(target)
        loss = torch.nn.functional.cross_entropy(
            model(torch.stack(tiles)), torch.stack(tile_targets)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    info = {"train_seconds": round(time.perf_counter() - started, 1), "steps": steps}
    return (model, mean, std), info


def _random_crop(image, target, crop, rng):
    height, width = target.shape
    pad = (0, max(0, crop - width), 0, max(0, crop - height))
    if any(pad):
        image = torch.nn.functional.pad(image[None], pad, mode="reflect")[0]
        target = torch.nn.functional.pad(target[None, None].float(), pad, mode="reflect")
        target = target[0, 0].long()
        height, width = target.shape
    top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
    tile = image[:, top : top + crop, left : left + crop]
    target = target[top : top + crop, left : left + crop]
    turns = int(rng.integers(4))
    tile, target = torch.rot90(tile, turns, (1, 2)), torch.rot90(target, turns, (0, 1))
    for axis in (0, 1):
        if rng.random() < 0.5:
            tile, target = tile.flip(axis + 1), target.flip(axis)
    return tile, target


@torch.inference_mode()
def peer_outputs(peer, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.inferers import sliding_window_inference

    model, mean, std = peer
    model.eval()
    image, _ = read_pair(image_path, image_path)
    image = as_channels(image, len(mean))
    image = torch.from_numpy((image - mean[:, None, None]) / std[:, None, None])[None]
    logits = sliding_window_inference(image, (256, 256), 4, model, overlap=0.25)
    foreground = (logits.argmax(dim=1)[0] == 1).numpy()
    objects, _ = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    return foreground, objects


# ---------------------------------------------------------------------------
# Scores


def score_image(foreground, objects, label, instances: bool, with_objects: bool) -> dict:
    true_foreground, true_objects = truth_objects(label, instances)
    scores = {
        "iou": iou(foreground, true_foreground),
        "dice": dice(foreground, true_foreground),
        "pixel_error": pixel_error(foreground, true_foreground),
    }
    if with_objects:
        matching = match_objects(objects, true_objects, (0.5,))[0]
        scores.update(
            f1=matching.f1,
            seg=seg_score(objects, true_objects),
            tp=matching.true_positives,
            predicted=int(len(np.unique(objects)) - 1),
            true=int(len(np.unique(true_objects)) - 1),
        )
    return scores


def summarise(per_image: list[dict]) -> dict:
    summary = {
        key: float(np.mean([s[key] for s in per_image]))
        for key in ("iou", "dice", "pixel_error", "f1", "seg")
        if key in per_image[0]
    }
    if "predicted" in per_image[0]:
        predicted = sum(s["predicted"] for s in per_image)
        true = sum(s["true"] for s in per_image)
        summary.update(predicted=predicted, true=true, count_ratio=predicted / max(true, 1))
    return summary


def run_arm(name: str, arm: str, root: Path, minutes: float, seed: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    instances = is_instance_set(root)
    with_objects = name not in PIXELS_ONLY
    test = pairs(root, "test")
    if arm in PEERS:
        peer, info = run_peer(arm, root, minutes, seed)
        outputs = [peer_outputs(peer, image) for image, _ in test]
        saved = work / "predicted"
        saved.mkdir(exist_ok=True)
        for (foreground, objects), (image, _) in zip(outputs, test, strict=True):
            io.write_image(saved / f"{image.stem}_labels.tif", foreground.astype(np.uint8))
            io.write_image(saved / f"{image.stem}_instances.tif", objects.astype(np.uint32))
    else:
        (out,), info = run_unetile(arm, root, minutes, seed, work)
        outputs = [unetile_outputs(out, image.stem) for image, _ in test]
    per_image = [
        score_image(fg, objects, np.asarray(io.read_image(label)), instances, with_objects)
        for (fg, objects), (_, label) in zip(outputs, test, strict=True)
    ]
    return {**summarise(per_image), **info, "per_image": per_image}


# ---------------------------------------------------------------------------
# Table


def load_results(path: Path = RESULTS) -> dict:
    """The runs of ``suite.json`` and of the partial files beside it (``suite.*.json``)."""
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if path == RESULTS:
        for part in sorted(HERE.glob("suite.*.json")):
            for key, entry in json.loads(part.read_text())["runs"].items():
                if "error" in entry and "error" not in results["runs"].get(key, entry):
                    continue  # two suites ran it at once; the one that finished counts
                results["runs"][key] = entry
    return results


def table(results: dict) -> str:
    """Markdown: per set and arm, the mean over seeds (and the spread where there are several)."""
    runs = results["runs"]
    lines = [
        "| set | arm | seeds | foreground IoU | pixel error | object F1@0.5 | SEG "
        "| objects predicted / true |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in SETS:
        for arm in ARMS:
            entries = [
                v for k, v in runs.items() if k.startswith(f"{name}/{arm}/") and "error" not in v
            ]
            if not entries:
                continue
            lines.append(_row(name, arm, entries))
    return "\n".join(lines)


KINDS = {
    "isbi2012": "EM membranes",
    "dsb2018": "nuclei, 3 modalities",
    "dic-hela": "DIC HeLa (paper's)",
    "fluo-hela": "fluorescent nuclei",
    "fluo-hela-binary": "same, binary masks",
    "phc-psc": "phase contrast",
    "monuseg": "H&E nuclei",
    "drive": "retinal vessels",
}
README_ARMS = ("cpu-fast", "auto", "monai-basic", "monai-flex")


def readme_table(results: dict) -> str:
    """The README's table: IoU and F1 of each arm (mean over seeds, +- their spread where
    there are several), the best in bold, and unetile's object counts against the truth."""
    runs = {k: v for k, v in results["runs"].items() if "error" not in v}
    lines = [
        "| set | kind | IoU: cpu-fast / auto / BasicUNet / FlexibleUNet "
        "| object F1@0.5: cpu-fast / auto / BasicUNet / FlexibleUNet "
        "| objects / true: cpu-fast, auto |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in SETS:
        entries = {
            a: [v for k, v in runs.items() if k.startswith(f"{name}/{a}/")] for a in README_ARMS
        }
        cells = []
        for key in ("iou", "f1"):
            means = {a: [e[key] for e in entries[a] if e.get(key) is not None] for a in README_ARMS}
            best = max((np.mean(v) for v in means.values() if v), default=None)
            shown = []
            for arm in README_ARMS:
                values = means[arm]
                if not values:
                    shown.append("-")
                    continue
                text = f"{np.mean(values):.2f}"
                if len(values) > 1:
                    text += f" ± {np.std(values):.2f}"
                shown.append(f"**{text}**" if np.isclose(np.mean(values), best) else text)
            cells.append(" / ".join(shown))
        ratios = [
            np.mean([e["count_ratio"] for e in entries[a] if "count_ratio" in e] or [np.nan])
            for a in ("cpu-fast", "auto")
        ]
        counts = "-" if np.isnan(ratios[0]) else f"{ratios[0]:.2f}, {ratios[1]:.2f}"
        lines.append(f"| {name} | {KINDS[name]} | {cells[0]} | {cells[1]} | {counts} |")
    return "\n".join(lines)


def _row(name: str, arm: str, entries: list[dict]) -> str:
    def cell(key, digits=3):
        values = [e[key] for e in entries if key in e]
        if not values:
            return "-"
        text = f"{np.mean(values):.{digits}f}"
        if len(values) > 1:
            text += f" ± {np.std(values):.{digits}f}"
        return text

    count = "-"
    if "predicted" in entries[0]:
        count = f"{np.mean([e['predicted'] for e in entries]):.0f} / {entries[0]['true']}"
    return (
        f"| {name} | {arm} | {len(entries)} | {cell('iou')} | {cell('pixel_error', 4)} "
        f"| {cell('f1')} | {cell('seg')} | {count} |"
    )


# ---------------------------------------------------------------------------
# Figure


def figure(data: Path, work: Path, path: Path, seed: int = 0, crop: int = 256) -> None:
    """One row per set: a crop of its first test image, the truth and each arm's objects."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [name for name in SETS if (data / name / "test").is_dir()]
    columns = ["image", "truth", *ARMS]
    figure_, axes = plt.subplots(
        len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows)), squeeze=False
    )
    for row, name in zip(axes, rows, strict=True):
        image_path, label_path = pairs(data / name, "test")[0]
        image = np.asarray(io.read_image(image_path), dtype=np.float32)
        box = _centre(image.shape[:2], crop)
        label = np.asarray(io.read_image(label_path))
        truth = truth_objects(label, is_instance_set(data / name))[1]
        panels = [image[box], truth[box]]
        for arm in ARMS:
            found = list(
                (work / name / arm / str(seed) / "predicted").glob(f"{image_path.stem}_instances.*")
            )
            panels.append(np.asarray(io.read_image(found[0]))[box] if found else None)
        for axis, title, panel in zip(row, columns, panels, strict=True):
            axis.set_axis_off()
            if panel is None:
                continue
            if title == "image":
                shown = panel if panel.ndim == 2 else panel[..., :3] / max(panel.max(), 1)
                axis.imshow(shown, cmap="gray")
            else:
                axis.imshow(_colour(panel), interpolation="nearest")
            axis.set_title(f"{name}: {title}" if title == "image" else title, fontsize=8)
    figure_.tight_layout()
    figure_.savefig(path, dpi=80)
    plt.close(figure_)


def _centre(shape, crop):
    return tuple(slice(max(0, (s - crop) // 2), max(0, (s - crop) // 2) + crop) for s in shape)


def _colour(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.2, 1.0, size=(int(labels.max()) + 1, 3))
    palette[0] = 0
    return palette[labels]


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--force", action="store_true", help="rerun entries already in the JSON")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    parser.add_argument("--readme", action="store_true", help="print the README's table and stop")
    parser.add_argument(
        "--part",
        help="write to suite.PART.json (a second suite running beside the first); "
        "--merge folds the parts into suite.json",
    )
    parser.add_argument("--merge", action="store_true", help="fold suite.*.json into suite.json")
    parser.add_argument(
        "--figure", action="store_true", help="draw suite.png from the runs' outputs and stop"
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="unetile arms already run: fit their post-processing again and predict again",
    )
    args = parser.parse_args(argv)
    results = load_results()
    if args.table:
        print(table(results))
        return 0
    if args.readme:
        print(readme_table(results))
        return 0
    if args.figure:
        figure(args.data, args.work, HERE / "suite.png", seed=args.seeds[0])
        return 0
    if args.merge:
        commands = list(results.pop("commands", [])) + [results.pop("command", None)]
        for part in sorted(HERE.glob("suite.*.json")):
            commands += json.loads(part.read_text()).get("commands", [])
        results["commands"] = [c for c in dict.fromkeys(commands) if c]
        RESULTS.write_text(json.dumps(results, indent=1, default=_plain) + "\n")
        for part in HERE.glob("suite.*.json"):
            part.unlink()
        return 0
    path = RESULTS if args.part is None else HERE / f"suite.{args.part}.json"
    if args.refit:
        own = load_results(path)
        for name in args.sets:
            for arm in [a for a in args.arms if a not in PEERS]:
                for seed in args.seeds:
                    key = f"{name}/{arm}/{seed}"
                    entry = load_results()["runs"].get(key)
                    if entry is None or not (args.work / key / "run" / "summary.json").is_file():
                        continue
                    if "error" in entry:  # trained, then stopped: take the run's own record
                        summary = json.loads((args.work / key / "run" / "summary.json").read_text())
                        entry = {"steps": summary["step"], "minutes": entry.get("minutes")}
                    own["runs"][key] = refit_arm(name, args.data / name, args.work / key, entry)
                    path.write_text(json.dumps(own, indent=1, default=_plain) + "\n")
                    print(key, "refit", {k: own["runs"][key].get(k) for k in ("iou", "f1")})
        return 0
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for seed in args.seeds:
        for name in args.sets:
            root = args.data / name
            if not (root / "train").is_dir():
                raise SystemExit(f"{root}: no data; run python benchmarks/suite_data.py first")
            for arm in args.arms:
                key = f"{name}/{arm}/{seed}"
                if key in load_results()["runs"] and not args.force:
                    continue
                print(f"{key}: {args.minutes:g} min", flush=True)
                try:
                    entry = run_arm(name, arm, root, args.minutes, seed, args.work / key)
                except RuntimeError as error:
                    entry = {"error": str(error)}
                entry.update(minutes=args.minutes, date=time.strftime("%Y-%m-%d %H:%M"))
                own = load_results(path)
                own["runs"][key] = entry
                own.setdefault("commands", [])
                command = shlex.join(["python", *sys.argv])
                if command not in own["commands"]:
                    own["commands"].append(command)
                path.write_text(json.dumps(own, indent=1, default=_plain) + "\n")
                shown = {k: v for k, v in entry.items() if not isinstance(v, list | dict)}
                print(json.dumps(shown, default=_plain), flush=True)
    print(table(load_results()))
    return 0


def _plain(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


if __name__ == "__main__":
    sys.exit(main())
