"""The plugin's state in one viewer, and what it does to the viewer's layers: no Qt.

A :class:`Session` holds the current model, its post-processing options,
each segmented image's probabilities and the fine-tuning set; it works on
any napari ``ViewerModel`` (a test's, or a window's ``viewer``). Its long
steps are generators (``*_work``) that a widget runs in a worker thread and
a test iterates; their results come back through ``show`` / ``adopt``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from . import _logic
from ._logic import LoadedModel, PostOptions, Segmentation

#: ``layer.metadata`` key of what the plugin knows about a layer it made.
KEY = "unetile"
#: Kinds of the layers Segment writes; a corrected layer is kept out of their way.
OUTPUT_KINDS = ("probabilities", "labels", "instances")
CORRECTED = "corrected"

_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session(viewer) -> Session:
    """The one session of ``viewer`` (the widgets of a viewer share it)."""
    if viewer not in _sessions:
        _sessions[viewer] = Session(viewer)
    return _sessions[viewer]


def layer_name(image_name: str, kind: str) -> str:
    return f"{image_name} {kind}"


def info(layer) -> dict:
    """The plugin's metadata of a layer (empty for a layer it did not make)."""
    return dict(layer.metadata.get(KEY) or {})


@dataclass
class Session:
    viewer: object
    model: LoadedModel | None = None
    post: PostOptions | None = None
    probabilities: dict = field(default_factory=dict)  # image layer name -> (K, *S)
    pairs: list = field(default_factory=list)  # (image layer, labels layer) to fine-tune on
    history: list = field(default_factory=list)  # run folders (or packages) loaded, oldest first
    segment_widget: object = None  # the Qt Segment widget of this viewer, if one was made

    def __hash__(self):
        return id(self)

    # --- model -----------------------------------------------------------------

    def load(self, source: str | Path) -> LoadedModel:
        """Load a run folder or a bioimage.io package of ``unetile export`` as the current
        model; its carried post-processing becomes current."""
        self.model = LoadedModel.load(source)
        self.post = self.model.post_options()
        self.history.append(self.model.source)
        return self.model

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise io.InputError(
                "no model: choose a run folder or a .zip package in Segment and load it first"
            )
        return self.model

    # --- segment ---------------------------------------------------------------

    def image_layer(self, name: str):
        if name not in self.viewer.layers:
            raise io.InputError(f"no layer {name!r}: open an image first")
        layer = self.viewer.layers[name]
        if layer.__class__.__name__ != "Image":
            raise io.InputError(f"layer {name!r} is not an image layer")
        return layer

    def segment_work(self, image_name: str, **options) -> Iterator[tuple[int, int]]:
        """Worker body: predict the image layer; yields ``(tiles done, tiles)``, returns
        ``(image name, probabilities)`` for :meth:`show`."""
        model = self.require_model()
        layer = self.image_layer(image_name)
        data = _logic.model_input(
            layer.data,
            model,
            rgb=bool(getattr(layer, "rgb", False)),
            multiscale=bool(getattr(layer, "multiscale", False)),
        )
        probabilities = yield from _logic.segment(model, data, **options)
        return image_name, probabilities

    def show(self, image_name: str, probabilities: np.ndarray) -> Segmentation:
        """Keep the probabilities, draw labels and instances with the current options, and put
        all three into the viewer (replacing this image's earlier outputs, never a corrected
        layer)."""
        model = self.require_model()
        self.probabilities[image_name] = probabilities
        result = _logic.post_process(probabilities, model, self.post)
        self._put(image_name, result, with_probabilities=True)
        return result

    def set_post(self, **changes) -> dict:
        """Change the post-processing and re-apply it to every segmented image, without the
        network; returns ``{image name: Segmentation}``."""
        model = self.require_model()
        post = (self.post or model.post_options()).replace(**changes)
        results = {
            name: _logic.post_process(p, model, post) for name, p in self.probabilities.items()
        }
        self.post = post  # only once every image took it
        for name, result in results.items():
            self._put(name, result, with_probabilities=False)
        return results

    def _put(self, image_name: str, result: Segmentation, with_probabilities: bool) -> None:
        model = self.model
        meta = {"image": image_name, "run": str(model.source)}
        layers = self.viewer.layers
        scale = layers[image_name].scale[-result.labels.ndim :] if image_name in layers else None
        outputs = []
        if with_probabilities:
            outputs.append(("probabilities", result.foreground(model)))
        outputs.append(("labels", result.labels))
        if result.instances is not None:
            outputs.append(("instances", result.instances))
        for kind, data in outputs:
            name = layer_name(image_name, kind)
            if name in layers and info(layers[name]).get("kind") == kind:
                layers[name].data = data
                layers[name].metadata[KEY] = {**meta, "kind": kind}
                continue
            options = dict(name=name, metadata={KEY: {**meta, "kind": kind}})
            if scale is not None:
                options["scale"] = scale
            if kind == "probabilities":
                self.viewer.add_image(
                    data, colormap="magma", blending="additive", opacity=0.6, **options
                )
            else:
                self.viewer.add_labels(data, opacity=0.5, visible=kind == "instances", **options)
        instances = layer_name(image_name, "instances")
        if instances in layers:
            layers.selection.active = layers[instances]

    # --- fine-tune -------------------------------------------------------------

    def add_pair(self, image_name: str, labels_name: str) -> list:
        """Add an image layer and its (corrected) labels layer to the fine-tuning set."""
        image = self.image_layer(image_name)
        if labels_name not in self.viewer.layers:
            raise io.InputError(f"no layer {labels_name!r}: choose a labels layer")
        labels = self.viewer.layers[labels_name]
        if labels.__class__.__name__ != "Labels":
            raise io.InputError(f"layer {labels_name!r} is not a labels layer")
        self.pairs = [(i, x) for i, x in self.pairs if x is not labels and i is not image]
        self.pairs.append((image, labels))
        return self.pairs

    def training_arrays(self, model: LoadedModel | None = None):
        """Images (laid out as ``model`` reads them) and label arrays of the set; the label mode
        its layers say (a class map from Segment's labels layer, else instances)."""
        if not self.pairs:
            raise io.InputError("no training pairs: choose an image and its corrected labels")
        images, labels, modes = [], [], set()
        for image, layer in self.pairs:
            data = image.data[0] if getattr(image, "multiscale", False) else image.data
            if model is not None:
                data = _logic.model_input(data, model, rgb=bool(getattr(image, "rgb", False)))
            elif getattr(image, "rgb", False):
                data = np.moveaxis(np.asarray(data), -1, 0)
            truth = np.asarray(layer.data)
            spatial = np.shape(data)[-truth.ndim :]
            if tuple(spatial) != truth.shape:
                raise io.InputError(
                    f"labels layer {layer.name!r} has shape {truth.shape}, image layer "
                    f"{image.name!r} {tuple(spatial)}: give the labels of that image"
                )
            images.append(np.asarray(data))
            labels.append(truth)
            modes.add("classes" if info(layer).get("kind") == "labels" else "instances")
        if len(modes) > 1:
            raise io.InputError(
                "the set mixes class maps (a labels layer) and instance labels: give one kind"
            )
        return images, labels, modes.pop()

    def fine_tune_work(
        self,
        steps: int | None = 200,
        minutes: float | None = None,
        out: str | Path | None = None,
        stop: threading.Event | None = None,
        **options,
    ):
        """Worker body: fine-tune the current model on the set into a new run folder beside
        it (beside its package); yields :class:`~unetile.napari._logic.TrainProgress`, returns
        the summary. ``stop`` set (the Stop button) ends it after the current step."""
        model = self.require_model()  # held here: a package's unpacked folder lives on
        images, labels, mode = self.training_arrays(model)
        return (
            yield from _logic.fine_tune(
                model.run_dir,
                images,
                labels,
                out=out if out is not None else _logic.next_run_folder(model.source),
                stop=stop,
                steps=steps,
                minutes=minutes,
                label_mode=mode,
                **options,
            )
        )

    def train_work(
        self,
        out: str | Path,
        preset: str = "cpu-fast",
        steps: int | None = None,
        minutes: float | None = None,
        stop: threading.Event | None = None,
        **options,
    ):
        """Worker body: train a new model from ``preset`` on the set; returns the summary."""
        images, labels, mode = self.training_arrays()
        return (
            yield from _logic.train_new(
                out,
                images,
                labels,
                preset=preset,
                stop=stop,
                steps=steps,
                minutes=minutes,
                label_mode=mode,
                **options,
            )
        )

    def adopt(self, summary: dict) -> LoadedModel:
        """After training: the new run becomes the current model; the set's Segment outputs
        become ``NAME corrected`` layers so that re-segmenting keeps them."""
        for image, layer in self.pairs:
            meta = info(layer)
            if meta.get("kind") in OUTPUT_KINDS:
                name = layer_name(image.name, CORRECTED)
                index = 2
                while name in self.viewer.layers:
                    name = layer_name(image.name, f"{CORRECTED} {index}")
                    index += 1
                layer.name = name
                layer.metadata[KEY] = {**meta, "kind": CORRECTED}
        return self.load(summary["run_dir"])  # with the post-processing it carries

    def images_to_resegment(self) -> list[str]:
        """The images of the set, then the others segmented before, by layer name."""
        names = [image.name for image, _ in self.pairs if image.name in self.viewer.layers]
        names += [n for n in self.probabilities if n not in names and n in self.viewer.layers]
        return names

    # --- evaluate --------------------------------------------------------------

    def evaluate(self, labels_name: str, truth_name: str) -> list[tuple[str, float]]:
        layers = self.viewer.layers
        for name in (labels_name, truth_name):
            if name not in layers:
                raise io.InputError(f"no layer {name!r}: choose a labels layer")
        if labels_name == truth_name:
            raise io.InputError("the labels and the ground truth are one layer: choose two")
        return _logic.evaluate(layers[labels_name].data, layers[truth_name].data)
