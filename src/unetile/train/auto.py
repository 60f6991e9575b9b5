"""``--preset auto``: a fingerprint of the training data chooses the configuration.

nnU-Net's lasting lesson, applied to the paper's network: measure the data
and the device first, then fill in what the user left open by written
rules. Each rule below rests on a measurement in ``benchmarks/`` (README,
"Presets"):

* **Border term.** Where the background is mostly narrow gaps between cells
  (membranes, as in ISBI 2012), the paper's sigma = 5 weighs every gap and
  the network draws them too thick: sigma = 2 and no class balance won on
  ISBI. Where cells lie on a background and only some touch, the paper's
  sigma = 5, w0 = 10 and class balance separate them (benchmarks/instances.py).
  Without any narrow gap the border term has nothing to stress: w0 = 0.
* **Tile and depth.** The largest valid output tile up to the paper's 388
  that does not exceed the images (a tile larger than the image mostly reads
  its mirror); the paper's depth 5 unless its context (92 px a side) is more
  than half the smallest image, then the deepest that fits.
* **Width.** The widest of 16, 32, 64 base channels that still takes
  ``MIN_STEPS`` steps in the time budget, measured on this device with a few
  steps before training: on ISBI at a CPU budget, 16 channels and ~2,000
  steps beat 32 channels and ~600 (benchmarks/isbi2012_tuning).
* **Normalisation.** Instance norm, as ``cpu-fast``: it cut the Rand error
  of a short ISBI run from 0.16 to 0.07. Its per-tile statistics make
  prediction depend on the tile a little; batch norm frozen on whole images
  (``--freeze-batch-norm``) is tile-exact but lost on ISBI at 600 steps (Rand
  error 0.19 against 0.06, benchmarks/isbi2012_tuning/bn_freeze_600.json).
* **Intensity.** When the training images' brightness or contrast differ by
  more than ``INTENSITY_SPREAD`` (coefficient of variation of the per-image
  means or standard deviations), wider gray-value augmentation.
* **Validation.** A held-out share of the training images when none is
  given, to keep the best model and calibrate the threshold.

:func:`fingerprint` measures, :func:`choose` applies the rules, :func:`plan`
does both and times the device; :func:`describe` prints the plan and
:func:`as_toml` writes it as a ``--config`` file (``unetile plan``). This
module reads no configuration: :mod:`unetile.config` builds on it
(``make_config("auto", ...)`` calls :func:`plan` with the defaults to plan from).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data.weights import nearest_two_distances

#: Gaps up to this width (px, d1 + d2 of the weight map) are "narrow": the paper's
#: border term (sigma = 5) still weighs them more than 1 + w0 / e^2.
NARROW_GAP = 10.0
#: A background that is mostly narrow gaps is a membrane map.
MEMBRANE_SHARE = 0.5
#: Cells within this gap of another count as touching.
TOUCH_GAP = 3.0
#: Share of touching cells below which the border term is switched off.
MIN_TOUCHING = 0.02
#: Fewest training steps a width must reach in the budget.
MIN_STEPS = 1500
WIDTHS = (16, 32, 64)
#: Coefficient of variation of per-image intensity beyond which gray augmentation widens.
INTENSITY_SPREAD = 0.15
#: Budget when none is given (minutes).
DEFAULT_MINUTES = 15.0
HOLDOUT = 0.1
INSTANCE_METRICS = ("pixel_error", "iou", "seg", "f1")
#: The largest output tile the rules choose: the paper's (572 input).
PAPER_TILE = 388
#: Fields the plan decides; a field given explicitly is left as given.
CHOSEN = (
    "depth",
    "base_channels",
    "tile",
    "w0",
    "sigma",
    "class_weights",
    "norm",
    "augment",
    "max_minutes",
    "steps",
    "holdout",
    "metrics",
    "keep_best",
)


@dataclass(frozen=True)
class Fingerprint:
    """What the rules read from the training data (lengths in pixels)."""

    images: int
    channels: int
    median_shape: tuple[int, ...]
    smallest_side: int
    intensity_mean_spread: float  # coefficient of variation of per-image means
    intensity_std_spread: float  # of per-image standard deviations
    foreground_share: float  # of labelled pixels
    cells: int
    cell_diameter: float  # median equivalent diameter
    narrow_gap_share: float  # background pixels in gaps up to NARROW_GAP wide
    median_gap: float | None  # median d1 + d2 over background pixels in narrow gaps
    touching_share: float  # cells within TOUCH_GAP of another cell

    def to_dict(self) -> dict:
        values = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}


def fingerprint(images, instances, classes=None, foreground: int = 1) -> Fingerprint:
    """Measure images ``(C, *S)`` and their cell instances ``S`` (0 = background).

    ``classes`` (per-pixel class ids, -1 or any negative value unknown) gives
    the labelled area; without it every pixel is labelled. Gaps are measured
    as the weight map sees them: d1 + d2, the distances from a background
    pixel to its nearest and second-nearest cell.
    """
    means = [float(np.mean(image)) for image in images]
    stds = [float(np.std(image)) for image in images]
    shapes = np.array([instance.shape for instance in instances])
    foreground_pixels = labelled_pixels = 0
    diameters, gap_widths, background_pixels = [], [], 0
    cells = touching = 0
    for index, cells_map in enumerate(instances):
        labelled = np.ones(cells_map.shape, bool) if classes is None else classes[index] >= 0
        if classes is None:
            foreground_pixels += int(np.count_nonzero(cells_map))
        else:
            foreground_pixels += int(np.count_nonzero(classes[index] == foreground))
        labelled_pixels += int(np.count_nonzero(labelled))
        ids, sizes = np.unique(cells_map[cells_map > 0], return_counts=True)
        if ids.size == 0:
            continue
        dims = cells_map.ndim
        diameters.extend(_equivalent_diameter(sizes, dims))
        nearest, second = nearest_two_distances(cells_map, max_distance=4 * NARROW_GAP)
        background = (cells_map == 0) & labelled
        widths = (nearest + second)[background]
        background_pixels += int(background.sum())
        gap_widths.append(widths[widths <= NARROW_GAP])
        cells += ids.size
        touching += _touching_cells(cells_map, second)
    gaps = np.concatenate(gap_widths) if gap_widths else np.zeros(0)
    return Fingerprint(
        images=len(instances),
        channels=int(images[0].shape[0]),
        median_shape=tuple(int(s) for s in np.median(shapes, axis=0)),
        smallest_side=int(shapes.min()),
        intensity_mean_spread=_spread(means),
        intensity_std_spread=_spread(stds),
        foreground_share=foreground_pixels / max(labelled_pixels, 1),
        cells=cells,
        cell_diameter=float(np.median(diameters)) if diameters else 0.0,
        narrow_gap_share=gaps.size / max(background_pixels, 1),
        median_gap=float(np.median(gaps)) if gaps.size else None,
        touching_share=touching / max(cells, 1),
    )


def _equivalent_diameter(sizes: np.ndarray, dims: int) -> list[float]:
    if dims == 2:
        return list(2.0 * np.sqrt(sizes / math.pi))
    return list(2.0 * np.cbrt(3.0 * sizes / (4.0 * math.pi)))


def _touching_cells(cells_map: np.ndarray, second: np.ndarray) -> int:
    """Cells with a pixel whose second-nearest cell lies within TOUCH_GAP."""
    near_other = (cells_map > 0) & (second <= TOUCH_GAP)
    return int(np.unique(cells_map[near_other]).size)


def _spread(values: list[float]) -> float:
    mean = float(np.mean(values))
    return float(np.std(values) / abs(mean)) if mean else 0.0


@dataclass(frozen=True)
class Choice:
    """One decided option: its value and the reason, in a line."""

    value: object
    why: str


def membranes_of(print_: Fingerprint) -> bool:
    """Whether the labels are a membrane map: a background mostly of narrow gaps."""
    return print_.narrow_gap_share >= MEMBRANE_SHARE


def choose(print_: Fingerprint, dims: int = 2) -> dict[str, Choice]:
    """The rules (module docstring): options from a fingerprint, the width left to timing."""
    membranes = membranes_of(print_)
    share = f"{100 * print_.narrow_gap_share:.0f} % of the background"
    if membranes:
        weights = {
            "w0": Choice(10.0, f"{share} is gaps <= {NARROW_GAP:g} px: a membrane map"),
            "sigma": Choice(2.0, "narrow border term: stress the narrowest membranes only"),
            "class_weights": Choice("none", "class balance draws membranes too thick"),
        }
    elif print_.touching_share >= MIN_TOUCHING:
        weights = {
            "w0": Choice(10.0, f"{100 * print_.touching_share:.0f} % of cells touch another"),
            "sigma": Choice(5.0, f"the paper's border term for the gaps between them ({share})"),
            "class_weights": Choice(
                "none",
                "no class balance: on sparse objects it weighs every foreground pixel up and "
                "the network paints specks (unseen EM organelles, 8 % foreground)",
            ),
        }
    else:
        weights = {
            "w0": Choice(0.0, f"only {100 * print_.touching_share:.1f} % of cells touch"),
            "sigma": Choice(5.0, "(unused without a border term)"),
            "class_weights": Choice("none", "no class balance (as for touching cells)"),
        }
    from ..network.tiling import Tiling

    depth = next(
        (d for d in (5, 4, 3) if 2 * Tiling(depth=d, dims=dims).margin <= print_.smallest_side), 2
    )
    tiling = Tiling(depth=depth, dims=dims)
    side = min(print_.median_shape)
    tile = max(tiling.smallest, tiling.at_most(min(side, PAPER_TILE)))
    choices = {
        "depth": Choice(
            depth,
            f"the deepest (<= 5) whose context ({tiling.margin} px a side) is at most half the "
            f"smallest image side ({print_.smallest_side} px); more would read mostly mirror",
        ),
        "tile": Choice(
            (tile,) * dims, f"largest valid output tile <= min({side} px image, {PAPER_TILE})"
        ),
        **weights,
        "norm": Choice("instance", "the fastest start in minutes of training (ISBI tuning)"),
    }
    spread = max(print_.intensity_mean_spread, print_.intensity_std_spread)
    if spread > INTENSITY_SPREAD:
        from ..data.augment import AugmentParams

        choices["augment"] = Choice(
            asdict(AugmentParams(contrast=(0.67, 1.5), brightness=(-0.2, 0.2), gamma=(0.67, 1.5))),
            f"image intensities differ by {100 * spread:.0f} % (> {100 * INTENSITY_SPREAD:.0f} %): "
            "wider gray-value augmentation",
        )
    return choices


def seconds_per_step(config, in_channels: int, num_classes: int, device, steps: int = 3) -> float:
    """Best time of a training step (forward, backward, Adam) of ``config``'s network."""
    from ..network.model import UNet

    model = UNet(
        in_channels=in_channels,
        num_classes=num_classes,
        depth=config["depth"],
        base_channels=config["base_channels"],
        norm=None if config["norm"] == "none" else config["norm"],  # as given
        dims=config["dims"],
        dropout=0.0,
    ).to(device)
    tile = config["tile"]
    from ..network.tiling import Tiling

    shape = Tiling(depth=config["depth"], dims=config["dims"]).input_shape(tile)
    images = torch.randn((1, in_channels, *shape), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    best = math.inf
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = model(images).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms up
            best = min(best, time.perf_counter() - started)
    return best


def choose_width(seconds_16: float, minutes: float, flops: dict[int, float]) -> Choice:
    """The widest base width that still takes MIN_STEPS steps in the budget.

    A step's time is taken to grow with its FLOPs from the measured width 16
    (wider networks use the hardware better, so this errs towards narrow).
    """
    budget = 60.0 * minutes
    steps = {w: budget / (seconds_16 * flops[w] / flops[16]) for w in WIDTHS}
    fits = [w for w in WIDTHS if steps[w] >= MIN_STEPS]
    width = max(fits) if fits else WIDTHS[0]
    listed = ", ".join(f"{w}: ~{steps[w]:,.0f}" for w in WIDTHS)
    return Choice(
        width,
        f"steps in {minutes:g} min measured at {seconds_16:.3f} s/step for 16 ({listed}); "
        f"widest with >= {MIN_STEPS}",
    )


def width_flops(config: dict, in_channels: int, num_classes: int) -> dict[int, float]:
    """FLOPs of one forward pass of the training tile at each of :data:`WIDTHS`."""
    from ..network.model import forward_flops
    from ..network.tiling import Tiling

    input_shape = Tiling(depth=config["depth"], dims=config["dims"]).input_shape(config["tile"])
    network = {"depth": config["depth"], "dims": config["dims"]}
    network.update(in_channels=in_channels, num_classes=num_classes)
    return {w: forward_flops({**network, "base_channels": w}, input_shape) for w in WIDTHS}


def choose_steps(seconds_16: float, values: dict, flops: dict[int, float]) -> Choice:
    """Steps for the progress bar and the schedule: the expected count with room to spare.

    The time budget ends the run; a step count 3 times what the measured
    (uncompiled, possibly contended) speed allows never ends it first.
    """
    width = values["base_channels"]
    expected = 60.0 * values["max_minutes"] / (seconds_16 * flops[width] / flops[16])
    steps = max(100, int(math.ceil(3 * expected / 100.0)) * 100)
    return Choice(steps, f"~{expected:,.0f} expected in the budget; the budget ends the run")


#: Images read for the fingerprint at most (evenly spaced over the sorted folder).
FINGERPRINT_IMAGES = 50


def plan(options: dict, device: torch.device | str | None = None, *, defaults: dict) -> dict:
    """Fingerprint the training data of ``options``, time the device, choose.

    ``options`` are the TrainConfig fields the user gave (folders, label
    mode...); those among :data:`CHOSEN` are kept as given. ``defaults`` are
    every field's value without them: TrainConfig's defaults under the auto
    preset (:func:`unetile.config.auto_defaults`; this module reads no
    configuration of its own, :mod:`unetile.config` builds on it). Returns
    the plan as it is stored in ``config.json`` (``training.auto``):
    ``fingerprint``, ``choices`` (field -> value), ``reasons`` (field ->
    why), ``given`` (fields the user set), ``device`` and ``seconds``.
    """
    from ..data.dataset import load_labeled_images
    from ..predict.engine import resolve_device

    started = time.perf_counter()
    merged = {**defaults, **options}
    labelled, num_classes = load_labeled_images(
        merged["images"],
        merged["labels"],
        dims=merged["dims"],
        label_mode=merged["label_mode"],
        num_classes=merged["num_classes"],
        cell_value=merged["cell_value"],
        target=merged["target"],
        with_weights=False,
        ignore_value=merged["ignore_value"],
        limit=FINGERPRINT_IMAGES,
    )
    measured = fingerprint(
        [item.image for item in labelled],
        [item.instances for item in labelled],
        [item.classes for item in labelled],
        foreground=merged["foreground"],
    )
    choices = choose(measured, merged["dims"])
    given = sorted(name for name in CHOSEN if options.get(name) is not None)
    if "holdout" in options and options["holdout"] is None:  # --no-holdout: given as none
        given = sorted([*given, "holdout"])
    minutes = options.get("max_minutes") or DEFAULT_MINUTES
    choices["max_minutes"] = Choice(
        minutes, "as given" if options.get("max_minutes") else "the default budget of auto"
    )
    if merged.get("val_images") is None:
        choices["holdout"] = Choice(HOLDOUT, "no validation images given: hold some out")
    if merged["label_mode"] == "instances" or not membranes_of(measured):
        # Objects, not membranes: keep and calibrate for SEG (a Rand error calibration chose
        # 0.95 on touching cells and cut their IoU from 0.94 to 0.86, benchmarks/auto_runs).
        kept = options.get("keep_best")
        metrics = INSTANCE_METRICS + ((kept,) if kept and kept not in INSTANCE_METRICS else ())
        choices["metrics"] = Choice(metrics, "instance labels: objects are scored")
        choices["keep_best"] = Choice("seg", "kept model and threshold by SEG (cell overlap)")
    values = {name: choice.value for name, choice in choices.items()}
    values.update({name: options[name] for name in given if name in options})
    device = resolve_device(merged["device"]) if device is None else torch.device(device)
    if "base_channels" not in given or "steps" not in options:
        in_channels = labelled[0].image.shape[0]
        sized = {**merged, **values, "tile": tuple(values["tile"])}
        seconds = seconds_per_step({**sized, "base_channels": 16}, in_channels, num_classes, device)
        flops = width_flops(sized, in_channels, num_classes)
        if "base_channels" not in given:
            choices["base_channels"] = choose_width(seconds, values["max_minutes"], flops)
            values["base_channels"] = choices["base_channels"].value
        if "steps" not in options:
            choices["steps"] = choose_steps(seconds, values, flops)
            values["steps"] = choices["steps"].value
    return {
        "fingerprint": measured.to_dict(),
        "fingerprint_images": len(labelled),
        "choices": {name: _plain(value) for name, value in values.items()},
        "reasons": {name: ("as given" if name in given else choices[name].why) for name in values},
        "given": given,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def measurements(record: dict) -> str:
    """What the plan measured, in a line: images, sizes, cells, gaps, intensities."""
    data = record["fingerprint"]
    shape = " x ".join(map(str, data["median_shape"]))
    gap = "none" if data["median_gap"] is None else f"{data['median_gap']:.1f} px"
    percent = {key: f"{100 * data[key]:.0f} %" for key in data if key.endswith(("share", "spread"))}
    return (
        f"measured {data['images']} image(s) ({record['fingerprint_images']} read) on "
        f"{record['device']} in {record['seconds']:.1f} s: median {shape} px; {data['cells']} "
        f"cells, median diameter {data['cell_diameter']:.1f} px, {percent['touching_share']} "
        f"touching; foreground {percent['foreground_share']}; narrow gaps "
        f"{percent['narrow_gap_share']} of the background (median {gap}); "
        f"intensity spread {percent['intensity_mean_spread']} (means), "
        f"{percent['intensity_std_spread']} (contrast)"
    )


def describe(record: dict) -> str:
    """The plan as printed before the first step: what was measured, chosen and why."""
    lines = [f"auto: {measurements(record)}"]
    for name, value in record["choices"].items():
        shown = "wider" if isinstance(value, dict) else value
        lines.append(f"  {name} = {shown}: {record['reasons'][name]}")
    return "\n".join(lines)


def as_toml(record: dict, given: dict | None = None, notes: tuple[str, ...] = ()) -> str:
    """The plan as a ``--config`` file that trains it: ``preset = "auto"``, the ``given``
    options (the user's, ``# given``), then each choice with its reason as a comment.

    ``given`` maps option names to plain values (as ``TrainConfig.to_dict``
    writes them) and wins over the plan's value of a choice; a value of None
    (no TOML spelling) becomes a comment. ``notes`` and what was measured
    open the file as comments.
    """
    given = dict(given or {})
    reasons = {name: "given" for name in given} | record["reasons"]
    values = {name: value for name, value in given.items() if name not in record["choices"]}
    values.update({name: given.get(name, value) for name, value in record["choices"].items()})
    said = (*notes, "M" + measurements(record)[1:])
    lines = [f"# {line}" for note in said for line in _wrapped(note)]
    lines.append('preset = "auto"')
    tables = []
    for name, value in values.items():
        if isinstance(value, dict):
            tables.append((name, value))
        elif value is None:  # TOML has no none: a comment, and the flag that says it
            flag = " (train with --no-holdout)" if name == "holdout" else ""
            lines.append(f"# {name}: none, {reasons[name]}{flag}")
        else:
            lines.append(f"{name} = {toml_value(value)}  # {reasons[name]}")
    for name, table in tables:
        lines.append(f"[{name}]  # {reasons[name]}")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _wrapped(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, 86, break_on_hyphens=False, break_long_words=False) or [""]


def toml_value(value) -> str:
    """``value`` (bool, number, string or a list of them) in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # its escapes are TOML's too
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"no TOML spelling for {value!r}")
