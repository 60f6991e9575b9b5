"""Screenshots of the napari plugin, step by step, for docs/guide/napari.md.

Run under a display server, e.g. on a machine without a screen:

    xvfb-run -a .venv/bin/python docs/screenshots.py [--out docs/images] [--steps 300]

It opens the sample cells, trains a small model (a minute on 2 cores),
then drives the real widgets: Segment, a correction of the instances layer,
Fine-tune (with its loss curve), Segment again and Evaluate, saving
``napari_*.png`` (palette PNGs, a few hundred KB at most) into ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = (1500, 900)


def wait(condition, timeout: float = 600.0) -> None:
    """Let Qt run (the workers report through its event loop) until ``condition()``."""
    from qtpy.QtWidgets import QApplication

    began = time.perf_counter()
    while not condition():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - began > timeout:
            raise TimeoutError("the widget did not finish")
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.01)


def save(viewer, path: Path) -> None:
    """The whole window, as a 256-colour PNG."""
    from PIL import Image

    wait(lambda: True)
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(np.asarray(pixels)[..., :3])
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "images"))
    parser.add_argument("--steps", type=int, default=300, help="steps of the base model")
    parser.add_argument("--work", default=None, help="folder for the runs (default: temporary)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="unetile_napari_"))
    base = train_base(work / "cells_model", args.steps)

    import napari

    from unetile.napari._sample import touching_cells

    viewer = napari.Viewer(show=False, title="unetile in napari")
    viewer.window.resize(*SIZE)
    for data, meta, kind in touching_cells():
        getattr(viewer, f"add_{kind}")(data, **meta)
    wait(lambda: True)
    viewer.reset_view()
    segment = show_segment(viewer, base, out / "napari_segment.png")
    correct(viewer, out / "napari_correct.png")
    tune_dock = fine_tune(viewer, segment, out / "napari_finetune.png")
    evaluate(viewer, tune_dock, out / "napari_evaluate.png")
    viewer.close()


def train_base(base: Path, steps: int) -> Path:
    """A small model of other cells than those shown, as a user's earlier run would be."""
    from unetile.napari import _logic
    from unetile.train.config import make_config
    from unetile.train.loop import prepare_arrays
    from unetile.train.run import train

    image, truth = _logic.synthetic_cells(384, seed=7)
    config = make_config(
        "cpu-fast",
        out=str(base),
        label_mode="instances",
        depth=3,
        base_channels=8,
        tile=(124,),
        steps=steps,
        compile=False,
        validate_every=10**6,
        checkpoint_every=10**6,
    )
    print(f"training {base} ({steps} steps)")
    train(config, progress=False, data=prepare_arrays(config, [image], [truth]))
    return base


def show_segment(viewer, base: Path, path: Path):
    """1. Segment with the run folder."""
    from unetile.napari._widgets import SegmentWidget

    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment", area="right")
    segment.model_dir.value = base
    segment.image.value = "cells"
    segment.run_button.clicked.emit()
    wait(lambda: "cells instances" in viewer.layers and segment.run_button.enabled)
    viewer.layers["cells probabilities"].visible = False
    save(viewer, path)
    return segment


def correct(viewer, path: Path) -> None:
    """2. Correct: the user merges nothing by hand here; we mimic a brush stroke that adds
    the true cells the model missed and removes its false ones."""
    instances = viewer.layers["cells instances"]
    corrected = instances.data.copy()
    true_cells = viewer.layers["cells truth"].data
    changed = 0
    for cell in np.unique(true_cells[true_cells > 0]):
        inside = true_cells == cell
        if (corrected[inside] > 0).mean() < 0.5 and changed < 3:
            corrected[inside] = corrected.max() + 1
            changed += 1
    instances.data = corrected
    instances.mode = "paint"
    instances.selected_label = int(corrected.max()) + 1
    viewer.layers.selection.active = instances
    save(viewer, path)


def fine_tune(viewer, segment, path: Path):
    """3. Fine-tune on the corrected layer, into a new run folder (its loss curve drawn as
    it trains); it segments again."""
    from unetile.napari._widgets import FineTuneWidget

    tune = FineTuneWidget(viewer)
    tune_dock = viewer.window.add_dock_widget(tune, name="Fine-tune", area="right")
    tune.image.value, tune.labels.value = "cells", "cells instances"
    tune.steps.value = 60
    tune.minutes.value = 1.0
    tune.trainer.start.clicked.emit()
    wait(lambda: "cells corrected" in viewer.layers)
    wait(lambda: tune.trainer.start.enabled and segment.run_button.enabled and not segment.queue)
    viewer.layers["cells corrected"].visible = False
    save(viewer, path)
    return tune_dock


def evaluate(viewer, tune_dock, path: Path) -> None:
    """4. Evaluate the new instances against the sample's truth."""
    from unetile.napari._widgets import EvaluateWidget

    viewer.window.remove_dock_widget(tune_dock)
    widget = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Evaluate", area="right")
    widget.labels.value, widget.truth.value = "cells instances", "cells truth"
    widget.run_button.clicked.emit()
    viewer.layers["cells truth"].visible = False
    save(viewer, path)


if __name__ == "__main__":
    main()
