"""The predict floor: overlap-tile prediction (:mod:`.engine`), objects
(:mod:`.instances`), files and regions on Dask (:mod:`.regions`), rescaling
(:mod:`.scale`) and exports (:mod:`.export`)."""

from .card import ModelCard
from .engine import (
    PredictOptions,
    iter_image_predictions,
    iter_predictions,
    predict,
    predict_images,
)
from .files import predict_images_to_files, predict_to_files
from .instances import InstanceOptions
from .postprocessing import PostProcessing, labels_from_probabilities

__all__ = [
    "InstanceOptions",
    "ModelCard",
    "PostProcessing",
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
    # The names of the old ``unetile.predict`` module, now in these modules.
    from .._moved import forward

    for home in ("engine", "files", "postprocessing", "instances"):
        try:
            return forward("predict", home, name)
        except AttributeError:
            continue
    raise AttributeError(f"module 'unetile.predict' has no attribute {name!r}")
