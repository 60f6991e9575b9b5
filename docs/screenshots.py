"""Screenshots of the napari plugin, step by step, for docs/guide/napari.md.

Run under a display server, e.g. on a machine without a screen:

    xvfb-run -a .venv/bin/python docs/screenshots.py [--out docs/images] [--steps 300]

It opens the sample cells, trains a small model (a minute on 2 cores),
then drives the real widgets: Segment, a correction of the instances layer,
Fine-tune, Segment again and Evaluate, saving ``napari_*.png`` (palette PNGs,
a few hundred KB at most) into ``--out``.
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

    import napari

    from unetile.napari import _logic
    from unetile.napari._sample import touching_cells
    from unetile.napari._widgets import EvaluateWidget, FineTuneWidget, SegmentWidget
    from unetile.train.config import make_config
    from unetile.train.loop import prepare_arrays
    from unetile.train.run import train

    # A small model of other cells than those shown, as a user's earlier run would be.
    image, truth = _logic.synthetic_cells(384, seed=7)
    base = work / "cells_model"
    config = make_config(
        "cpu-fast",
        out=str(base),
        label_mode="instances",
        depth=3,
        base_channels=8,
        tile=(124,),
        steps=args.steps,
        compile=False,
        validate_every=10**6,
        checkpoint_every=10**6,
    )
    print(f"training {base} ({args.steps} steps)")
    train(config, progress=False, data=prepare_arrays(config, [image], [truth]))

    viewer = napari.Viewer(show=False, title="unetile in napari")
    viewer.window.resize(*SIZE)
    for data, meta, kind in touching_cells():
        getattr(viewer, f"add_{kind}")(data, **meta)
    wait(lambda: True)
    viewer.reset_view()

    # 1. Segment.
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment", area="right")
    segment.model_dir.value = base
    segment.image.value = "cells"
    segment.run_button.clicked.emit()
    wait(lambda: "cells instances" in viewer.layers and segment.run_button.enabled)
    viewer.layers["cells probabilities"].visible = False
    save(viewer, out / "napari_segment.png")

    # 2. Correct: the user merges nothing by hand here; we mimic a brush stroke that adds
    # the true cells the model missed and removes its false ones.
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
    save(viewer, out / "napari_correct.png")

    # 3. Fine-tune on the corrected layer, into a new run folder; it segments again.
    tune = FineTuneWidget(viewer)
    tune_dock = viewer.window.add_dock_widget(tune, name="Fine-tune", area="right")
    tune.image.value, tune.labels.value = "cells", "cells instances"
    tune.steps.value = 60
    tune.minutes.value = 1.0
    tune.trainer.start.clicked.emit()
    wait(lambda: "cells corrected" in viewer.layers)
    wait(lambda: tune.trainer.start.enabled and segment.run_button.enabled and not segment.queue)
    viewer.layers["cells corrected"].visible = False
    save(viewer, out / "napari_finetune.png")

    # 4. Evaluate the new instances against the sample's truth.
    viewer.window.remove_dock_widget(tune_dock)
    evaluate = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(evaluate, name="Evaluate", area="right")
    evaluate.labels.value, evaluate.truth.value = "cells instances", "cells truth"
    evaluate.run_button.clicked.emit()
    viewer.layers["cells truth"].visible = False
    save(viewer, out / "napari_evaluate.png")
    viewer.close()


if __name__ == "__main__":
    main()
