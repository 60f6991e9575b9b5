"""What turns a model's probabilities into labels and objects: one object, kept with the model.

Training writes it into ``config.json`` (the foreground class, the threshold
calibrated on held-out images, the instance options fitted from the labels);
prediction reads it and the user may change any part (``with_``). A threshold
applies to the labels and the cells alike, so both are drawn from one
foreground.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..numbers import check_threshold, flag, real_option, whole_option
from .instances import InstanceOptions, check_grow, extract_instances, foreground_mask, grow_cells


def class_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.uint16


def labels_from_probabilities(
    probabilities: np.ndarray, threshold: float | None = None, foreground: int = 1
) -> np.ndarray:
    """Class map of ``(K, *spatial)`` probabilities: the argmax over the first axis, or
    with ``threshold`` (two classes) ``foreground`` where its probability is above it.

    Parameters
    ----------
    probabilities : ndarray ``(K, *spatial)``
    threshold : float or None
        In (0, 1), for two classes only (:mod:`unetile.evaluate.calibration`
        calibrates one). At 0.5 it is the argmax.
    foreground : int
        The class whose probability is thresholded (0 or 1).

    Examples
    --------
    >>> p = np.array([[0.8, 0.6, 0.3]]); probabilities = np.concatenate([p, 1 - p])
    >>> labels_from_probabilities(probabilities).tolist()
    [0, 0, 1]
    >>> labels_from_probabilities(probabilities, threshold=0.35).tolist()
    [0, 1, 1]
    """
    probabilities = np.asarray(probabilities)
    dtype = class_dtype(probabilities.shape[0])
    if threshold is None:
        return probabilities.argmax(axis=0).astype(dtype)
    if probabilities.shape[0] != 2 or foreground not in (0, 1):
        raise ValueError(
            f"a threshold decides between two classes; got {probabilities.shape[0]} classes "
            f"and foreground class {foreground}"
        )
    cells = probabilities[foreground] > threshold
    return np.where(cells, foreground, 1 - foreground).astype(dtype)


@dataclass(frozen=True)
class PostProcessing:
    """From probabilities to labels and objects.

    Attributes
    ----------
    foreground : int
        The class a threshold applies to.
    threshold : float or None
        Two-class models: foreground where its probability is above this, in
        (0, 1); None: the argmax. The cells follow it unless ``instances``
        names its own.
    instances : InstanceOptions
        How objects are extracted (:mod:`unetile.predict.instances`).
    grow : int
        Pixels by which each object grows into the background (0: none).
    """

    foreground: int = 1
    threshold: float | None = field(
        default=None,
        metadata=flag(
            "two-class models: labels and instances are foreground where its probability is "
            "above P, 0 < P < 1 (default: the threshold calibrated in training, config.json "
            "'calibration', else the argmax, i.e. 0.5)",
            metavar="P",
            kind=real_option(0, 1, open_minimum=True),
        ),
    )
    instances: InstanceOptions = field(default_factory=InstanceOptions)
    grow: int = field(
        default=0,
        metadata=flag(
            "with --instances: grow each cell up to PX pixels into the background, never into "
            "another cell (EM membranes: cells that meet at the membranes)",
            metavar="PX",
            kind=whole_option(0, 10000),
        ),
    )

    def __post_init__(self):
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.threshold))
        object.__setattr__(self, "grow", check_grow(self.grow))
        if isinstance(self.foreground, bool) or not isinstance(self.foreground, int | np.integer):
            raise ValueError(f"foreground must be a class number, got {self.foreground!r}")

    @classmethod
    def from_card(cls, entries: dict) -> PostProcessing:
        """From a run's ``config.json`` entries: ``classes``, ``calibration``, ``instances``
        (without one, the paper's connected components of the foreground classes)."""
        classes = entries.get("classes") or {}
        foreground = int(classes.get("foreground", 1))
        threshold = (entries.get("calibration") or {}).get("threshold")
        stored = dict(entries.get("instances") or {})
        if not stored:
            stored["foreground_classes"] = classes.get("foreground_classes", [foreground])
        return cls(foreground, threshold, InstanceOptions.from_dict(stored))

    def with_(self, *, threshold: float | None = None, grow: int | None = None, **instances):
        """These options with some changed: ``threshold`` (labels and cells alike),
        ``grow`` and any :class:`InstanceOptions` field; ValueError for a bad value."""
        options = {**self.instances.to_dict(), **instances}
        if threshold is not None:
            options["threshold"] = threshold
        changes = {"instances": InstanceOptions.from_dict(options)}
        if threshold is not None:
            changes["threshold"] = threshold
        if grow is not None:
            changes["grow"] = grow
        return dataclasses.replace(self, **changes)

    @property
    def cells(self) -> InstanceOptions:
        """The instance options, with the labels' threshold where they name none."""
        if self.instances.threshold is not None or self.threshold is None:
            return self.instances
        return dataclasses.replace(self.instances, threshold=self.threshold)

    def check(self, num_classes: int, objects: bool = False) -> None:
        """ValueError when these options do not fit a network of ``num_classes``."""
        if self.threshold is not None and num_classes != 2:
            raise ValueError(
                f"a threshold decides between two classes; this model has {num_classes}: "
                "its labels are the argmax"
            )
        if objects:
            self.cells.check_classes(num_classes)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """The class map of ``(K, *spatial)`` probabilities."""
        return labels_from_probabilities(probabilities, self.threshold, self.foreground)

    def foreground_mask(self, probabilities: np.ndarray) -> np.ndarray:
        """Where the cells are (before they are split into objects)."""
        return foreground_mask(probabilities, self.cells)

    def objects(self, probabilities: np.ndarray) -> np.ndarray:
        """Instance labels (uint32) of a whole image's probabilities."""
        return grow_cells(extract_instances(probabilities, self.cells), self.grow)

    def to_dict(self) -> dict:
        return {
            "foreground": int(self.foreground),
            "threshold": self.threshold,
            "instances": self.instances.to_dict(),
            "grow": self.grow,
        }


def legacy_post(
    model,
    threshold=None,
    foreground_class: int = 1,
    instance_options=None,
    grow: int = 0,
    post: PostProcessing | None = None,
) -> PostProcessing:
    """``post``, or the post-processing of the keyword API (``predict_to_files(...,
    threshold=..., instance_options=..., grow=...)``): the given options, else what a model
    loaded by :func:`unetile.predict.card.load_model` carries for its labels. ValueError
    for both."""
    if post is not None:
        keywords = (threshold, instance_options, grow or None, foreground_class != 1 or None)
        if any(value is not None for value in keywords):
            raise ValueError(
                "give post or the keywords threshold, instance_options, grow and "
                "foreground_class, not both"
            )
        return post
    if threshold is None:
        threshold = getattr(model, "threshold", None)
    if instance_options is None:
        instance_options = InstanceOptions(foreground_classes=(int(foreground_class),))
    return PostProcessing(int(getattr(model, "foreground", 1)), threshold, instance_options, grow)
