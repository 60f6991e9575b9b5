"""The predict floor: overlap-tile prediction (:mod:`.engine`), objects
(:mod:`.instances`), files and regions on Dask (:mod:`.regions`), rescaling
(:mod:`.scale`) and exports (:mod:`.export`)."""

from .engine import (
    PredictOptions,
    iter_image_predictions,
    iter_predictions,
    labels_from_probabilities,
    predict,
    predict_images,
    predict_images_to_files,
    predict_to_files,
)
from .instances import InstanceOptions

__all__ = [
    "InstanceOptions",
    "PredictOptions",
    "iter_image_predictions",
    "iter_predictions",
    "labels_from_probabilities",
    "predict",
    "predict_images",
    "predict_images_to_files",
    "predict_to_files",
]


def __getattr__(name: str):
    from .._moved import forward

    return forward("predict", "engine", name)
