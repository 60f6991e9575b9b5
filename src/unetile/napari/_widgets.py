"""The Qt side of the plugin: thin magicgui containers over :class:`._session.Session`.

Long steps run in napari worker threads (``create_worker``); their progress
comes back as yielded values, their faults as napari notifications with the
library's one-line messages.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

from magicgui.application import use_app
from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPalette, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from .. import io
from . import _logic
from ._session import info, session


def one_line(error: BaseException) -> str:
    """The message a user sees: the library's line for its InputError, else the error's
    first line with its type."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, io.InputError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def notify(error: BaseException) -> None:
    show_error(one_line(error))


def _layer_names(viewer, kind: str):
    def choices(_widget=None):
        return [layer.name for layer in viewer.layers if layer.__class__.__name__ == kind]

    return choices


def _refresh_on_layer_changes(viewer, container: Container) -> None:
    def refresh(event=None):
        container.reset_choices()

    viewer.layers.events.inserted.connect(refresh)
    viewer.layers.events.removed.connect(refresh)
    for layer in viewer.layers:
        layer.events.name.connect(refresh)

    def watch(event):
        event.value.events.name.connect(refresh)

    viewer.layers.events.inserted.connect(watch)


def curve_points(
    points: Sequence[tuple[int, float]], steps: int, width: float, height: float
) -> list[tuple[float, float]]:
    """``(step, loss)`` points in a ``width`` x ``height`` box (y down): steps from 0 to
    ``steps`` across, the losses' range (a little padded) from bottom to top."""
    if not points:
        return []
    losses = [loss for _, loss in points]
    low, high = min(losses), max(losses)
    pad = (high - low) * 0.05 or max(abs(high) * 0.05, 1e-6)
    low, high = low - pad, high + pad
    last = max(steps, max(step for step, _ in points), 1)
    return [
        (width * step / last, height * (1.0 - (loss - low) / (high - low))) for step, loss in points
    ]


class LossPlot(QWidget):
    """The training loss against steps: a polyline drawn with QPainter (no plotting library),
    the largest and smallest loss at the left, the last at the right."""

    MARGIN = 4
    LINE = QColor(255, 160, 40)  # orange: seen on napari's dark and light themes

    def __init__(self, parent=None):
        super().__init__(parent)
        self.points: list[tuple[int, float]] = []
        self.steps = 1
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("training loss (log.csv rows) against steps")

    def clear(self, steps: int = 1) -> None:
        self.points, self.steps = [], max(int(steps), 1)
        self.update()

    def add(self, points: Sequence[tuple[int, float]], steps: int | None = None) -> None:
        """Append ``(step, loss)`` points (later steps only, finite losses) and redraw."""
        if steps is not None:
            self.steps = max(int(steps), 1)
        for step, loss in points:
            if math.isfinite(loss) and (not self.points or step > self.points[-1][0]):
                self.points.append((int(step), float(loss)))
        self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().color(QPalette.ColorRole.WindowText)
        box = QRectF(self.rect()).adjusted(self.MARGIN, self.MARGIN, -self.MARGIN, -self.MARGIN)
        faint = QPen(text)
        faint.setWidthF(0.5)
        painter.setPen(faint)
        painter.drawRect(box)
        if not self.points:
            painter.drawText(box, Qt.AlignmentFlag.AlignCenter, "loss: none yet")
            return
        drawn = curve_points(self.points, self.steps, box.width(), box.height())
        line = QPolygonF([QPointF(box.left() + x, box.top() + y) for x, y in drawn])
        pen = QPen(self.LINE)
        pen.setWidthF(2.0)
        painter.setPen(pen)
        painter.drawPolyline(line)
        painter.setPen(text)
        losses = [loss for _, loss in self.points]
        step, loss = self.points[-1]
        inner = box.adjusted(3, 1, -3, -1)
        align = Qt.AlignmentFlag
        painter.drawText(inner, align.AlignLeft | align.AlignTop, f"{max(losses):.3g}")
        painter.drawText(inner, align.AlignLeft | align.AlignBottom, f"{min(losses):.3g}")
        painter.drawText(inner, align.AlignRight | align.AlignTop, f"step {step}: {loss:.3g}")


class _Trainer:
    """The Stop button, progress bar, loss readout and loss curve of a training worker."""

    def __init__(self, container: Container, start_text: str):
        self.container = container
        self.start = PushButton(text=start_text)
        self.stop = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="steps")
        self.loss = Label(value="", label="loss")
        self.plot = LossPlot()
        self.stopping = threading.Event()
        self.worker = None
        self.losses: list[float] = []
        self.stop.changed.connect(self._stop)

    @property
    def widgets(self):
        return [self.start, self.stop, self.progress, self.loss]

    def attach(self) -> None:
        """Put the loss curve at the end of the container (a plain Qt widget)."""
        self.container.native.layout().addWidget(self.plot)

    def _stop(self, *_):
        self.stopping.set()
        self.loss.value = f"{self.loss.value}  (stopping after this step)"

    def run(self, work, on_done) -> None:
        """Run the generator function ``work(stop)`` in a worker thread; ``stop`` is the
        Event the Stop button sets (training ends after its current step)."""
        self.stopping.clear()
        self.losses = []
        self.plot.clear()
        self.worker = create_worker(work, self.stopping, _start_thread=False)
        self.worker.yielded.connect(self._show)
        self.worker.returned.connect(on_done)
        self.worker.errored.connect(notify)
        self.worker.finished.connect(self._finished)
        self.start.enabled, self.stop.enabled = False, True
        self.loss.value = "preparing the data..."
        self.worker.start()

    def _show(self, progress: _logic.TrainProgress) -> None:
        self.progress.max = progress.steps
        self.progress.value = progress.step
        self.losses.append(progress.loss)
        self.plot.add(progress.points or [(progress.step, progress.loss)], progress.steps)
        recent = " ".join(f"{x:.3f}" for x in self.losses[-4:])
        self.loss.value = f"step {progress.step}/{progress.steps}: {recent}"

    def _finished(self) -> None:
        self.start.enabled, self.stop.enabled = True, False


class SegmentWidget(Container):
    """Pick a model and an image layer, predict in a worker thread, adjust the post-processing."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.session.segment_widget = self
        self.worker = None
        self.queue: list[str] = []
        self._quiet = False
        self.model_dir = FileEdit(mode="d", label="model (run folder or .zip)")
        self.choose_zip = PushButton(text="Choose a bioimage.io package (.zip)", label="")
        self.model_info = Label(value="no model loaded", label="")
        self._file_dialog = use_app().get_obj("show_file_dialog")
        self.image = ComboBox(label="image", choices=_layer_names(napari_viewer, "Image"))
        self.run_button = PushButton(text="Segment")
        self.cancel = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="tiles")
        self.threshold = FloatSpinBox(value=0.5, min=0.01, max=0.99, step=0.05, label="threshold")
        self.method = ComboBox(value="components", choices=_logic.METHODS, label="method")
        self.min_size = SpinBox(value=0, min=0, max=10**7, label="min size (px)")
        self.opening = SpinBox(value=0, min=0, max=100, label="opening (px)")
        self.fill_holes = CheckBox(value=False, text="fill holes")
        self.extend(
            [
                self.model_dir,
                self.choose_zip,
                self.model_info,
                self.image,
                self.run_button,
                self.cancel,
                self.progress,
                Label(value="post-processing (re-applied, no network)"),
                self.threshold,
                self.method,
                self.min_size,
                self.opening,
                self.fill_holes,
            ]
        )
        self.model_dir.changed.connect(self._load)
        self.choose_zip.changed.connect(self._choose_zip)
        self.run_button.changed.connect(self._segment_clicked)
        self.cancel.changed.connect(self._cancel)
        for widget in (self.threshold, self.method, self.min_size, self.opening, self.fill_holes):
            widget.changed.connect(self._post_changed)
        _refresh_on_layer_changes(napari_viewer, self)

    # --- model ---

    def _choose_zip(self, *_):
        """The file dialog for a package (the folder button of ``model_dir`` picks folders)."""
        current = str(self.model_dir.value)
        start = str(Path(current).parent) if current and current != "." else None
        chosen = self._file_dialog(
            FileDialogMode.EXISTING_FILE,
            caption="Choose a bioimage.io package of 'unetile export'",
            start_path=start,
            filter="*.zip",
        )
        if chosen:
            self.model_dir.value = chosen

    def _load(self, *_):
        path = str(self.model_dir.value)
        if self._quiet or not path or path == ".":
            return
        try:
            model = self.session.load(path)
        except Exception as error:  # any fault is a notification, never a traceback
            notify(error)
            self.model_info.value = "no model loaded"
            return
        self.show_model(model)

    def show_model(self, model: _logic.LoadedModel) -> None:
        post = self.session.post
        self._quiet = True
        try:
            if Path(str(self.model_dir.value)) != model.source:
                self.model_dir.value = model.source
            self.threshold.enabled = post.threshold is not None
            if post.threshold is not None:
                self.threshold.value = post.threshold
            self.method.value = post.method
            self.min_size.value = post.min_size
            self.opening.value = post.opening
            self.fill_holes.value = post.fill_holes
        finally:
            self._quiet = False
        channels = model.model.config.in_channels
        self.model_info.value = (
            f"{model.name}: {model.num_classes} classes, {channels} channel(s), "
            f"{model.model.config.dims}D" + (" (bioimage.io package)" if model.is_package else "")
        )

    # --- segment ---

    def _segment_clicked(self, *_):
        if self.image.value is None:
            show_error("no image layer: open an image first")
            return
        self.segment([self.image.value])

    def segment(self, names: list[str]) -> None:
        """Segment these image layers one after another."""
        self.queue = list(names)
        self._next()

    def _next(self, *_):
        if not self.queue:
            return
        name = self.queue.pop(0)
        try:
            self.session.require_model()
        except io.InputError as error:
            notify(error)
            return
        self.worker = create_worker(self.session.segment_work, name, _start_thread=False)
        self.worker.yielded.connect(self._progress)
        self.worker.returned.connect(self._show)
        self.worker.errored.connect(notify)
        self.worker.finished.connect(self._finished)
        self.run_button.enabled, self.cancel.enabled = False, True
        self.worker.start()

    def _progress(self, value):
        done, total = value
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _show(self, result):
        name, probabilities = result
        try:
            self.session.show(name, probabilities)
        except io.InputError as error:
            notify(error)

    def _finished(self):
        self.run_button.enabled, self.cancel.enabled = True, False
        self._next()

    def _cancel(self, *_):
        self.queue = []
        if self.worker is not None:
            self.worker.quit()
            show_info("segmentation cancelled; the layers are unchanged")

    # --- post-processing ---

    def _post_changed(self, *_):
        if self._quiet or self.session.model is None:
            return
        changes = dict(
            method=self.method.value,
            min_size=int(self.min_size.value),
            opening=int(self.opening.value),
            fill_holes=bool(self.fill_holes.value),
        )
        if self.session.post is not None and self.session.post.threshold is not None:
            changes["threshold"] = float(self.threshold.value)
        try:
            self.session.set_post(**changes)
        except io.InputError as error:
            notify(error)


def _segment_widget(viewer) -> SegmentWidget | None:
    """The viewer's Segment widget: the one made last, else a new one docked in its window."""
    widget = session(viewer).segment_widget
    if widget is None and getattr(viewer, "window", None) is not None:
        _, widget = viewer.window.add_plugin_dock_widget("unetile", "Segment")
    return widget


class _PairsMixin:
    """Image + labels layer choices and the fine-tuning set they fill."""

    def _pair_widgets(self, viewer):
        self.image = ComboBox(label="image", choices=_layer_names(viewer, "Image"))
        self.labels = ComboBox(label="labels", choices=_layer_names(viewer, "Labels"))
        self.add = PushButton(text="Add pair to the set")
        self.pairs_info = Label(value="set: (the pair above)", label="")
        self.add.changed.connect(self._add_pair)
        self.image.changed.connect(self._suggest_labels)
        return [self.image, self.labels, self.add, self.pairs_info]

    def _suggest_labels(self, *_):
        """The image's instances (or its corrected labels) as the labels to train on."""
        for kind in ("corrected", "instances"):
            for layer in self.viewer.layers:
                meta = info(layer)
                if meta.get("image") == self.image.value and meta.get("kind") == kind:
                    self.labels.value = layer.name
                    return

    def _add_pair(self, *_):
        try:
            self.session.add_pair(self.image.value, self.labels.value)
        except io.InputError as error:
            notify(error)
        self.show_pairs()

    def show_pairs(self):
        pairs = self.session.pairs
        self.pairs_info.value = "set: " + (
            ", ".join(f"{i.name} + {x.name}" for i, x in pairs) if pairs else "(the pair above)"
        )

    def _with_current_pair(self) -> bool:
        """Make sure the set holds at least the pair chosen above."""
        if self.session.pairs:
            return True
        if self.image.value is None or self.labels.value is None:
            show_error("no training pair: choose an image layer and its labels layer")
            return False
        try:
            self.session.add_pair(self.image.value, self.labels.value)
        except io.InputError as error:
            notify(error)
            return False
        self.show_pairs()
        return True


class FineTuneWidget(_PairsMixin, Container):
    """Train from the current model on corrected labels into a new run folder; re-segment."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.steps = SpinBox(value=200, min=1, max=10**6, label="steps")
        self.minutes = FloatSpinBox(value=2.0, min=0.0, max=10**4, step=0.5, label="minutes")
        self.trainer = _Trainer(self, "Fine-tune")
        self.result = Label(value="", label="")
        self.extend([*self._pair_widgets(napari_viewer), self.steps, self.minutes])
        self.extend([*self.trainer.widgets, self.result])
        self.trainer.attach()
        self.trainer.start.changed.connect(self._start)
        _refresh_on_layer_changes(napari_viewer, self)
        self._suggest_labels()

    def _start(self, *_):
        try:
            self.session.require_model()
        except io.InputError as error:
            notify(error)
            return
        if not self._with_current_pair():
            return
        minutes = float(self.minutes.value) or None

        def work(stop):
            return (
                yield from self.session.fine_tune_work(
                    steps=int(self.steps.value), minutes=minutes, stop=stop
                )
            )

        self.trainer.run(work, self._done)

    def _done(self, summary: dict):
        try:
            model = self.session.adopt(summary)
        except io.InputError as error:
            notify(error)
            return
        self.result.value = f"saved {model.run_dir}"
        show_info(f"fine-tuned model saved in {model.run_dir}; segmenting again")
        self.show_pairs()
        self.reset_choices()
        self._suggest_labels()  # the corrected layer, renamed
        segment = _segment_widget(self.viewer)
        if segment is not None:
            segment.show_model(model)
            segment.segment(self.session.images_to_resegment())


class TrainWidget(_PairsMixin, Container):
    """Train a new model from a preset on image/labels layer pairs."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.preset = ComboBox(value="cpu-fast", choices=_logic.PRESETS, label="preset")
        self.out = FileEdit(mode="d", label="new run folder")
        self.steps = SpinBox(value=1000, min=1, max=10**7, label="steps")
        self.minutes = FloatSpinBox(value=5.0, min=0.0, max=10**4, step=0.5, label="minutes")
        self.trainer = _Trainer(self, "Train")
        self.result = Label(value="", label="")
        self.extend([*self._pair_widgets(napari_viewer), self.preset, self.out])
        self.extend([self.steps, self.minutes, *self.trainer.widgets, self.result])
        self.trainer.attach()
        self.trainer.start.changed.connect(self._start)
        _refresh_on_layer_changes(napari_viewer, self)

    def _start(self, *_):
        out = str(self.out.value)
        if not out or out == ".":
            show_error("no run folder: choose where the new model goes")
            return
        if not self._with_current_pair():
            return
        minutes = float(self.minutes.value) or None

        def work(stop):
            return (
                yield from self.session.train_work(
                    out,
                    preset=self.preset.value,
                    steps=int(self.steps.value),
                    minutes=minutes,
                    stop=stop,
                )
            )

        self.trainer.run(work, self._done)

    def _done(self, summary: dict):
        try:
            model = self.session.load(summary["run_dir"])
        except io.InputError as error:
            notify(error)
            return
        self.result.value = f"saved {model.run_dir}"
        show_info(f"model saved in {model.run_dir}; it is the current model of Segment")
        segment = _segment_widget(self.viewer)
        if segment is not None:
            segment.show_model(model)


class EvaluateWidget(Container):
    """Score a labels layer against a ground-truth labels layer: a small table."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session(napari_viewer)
        self.labels = ComboBox(label="labels", choices=_layer_names(napari_viewer, "Labels"))
        self.truth = ComboBox(label="ground truth", choices=_layer_names(napari_viewer, "Labels"))
        self.run_button = PushButton(text="Evaluate")
        self.table = Table(value={"metric": [], "value": []})
        self.table.native.setMinimumHeight(300)
        self.extend([self.labels, self.truth, self.run_button, self.table])
        self.run_button.changed.connect(self.evaluate)
        _refresh_on_layer_changes(napari_viewer, self)

    def evaluate(self, *_):
        try:
            rows = self.session.evaluate(self.labels.value, self.truth.value)
        except io.InputError as error:
            notify(error)
            return
        self.table.value = {
            "metric": [name for name, _ in rows],
            "value": [f"{value:.4g}" for _, value in rows],
        }
        return rows
