"""The data floor: images and labels (:mod:`.dataset`), the paper's weight map
(:mod:`.weights`), augmentation, held-out images and synthetic data. Imports only the
network floor and the base modules."""

from .dataset import LabeledImage, TileSampler, labeled_images_from_arrays, load_labeled_images
from .weights import weight_map

__all__ = [
    "LabeledImage",
    "TileSampler",
    "labeled_images_from_arrays",
    "load_labeled_images",
    "weight_map",
]


def __getattr__(name: str):
    from .._moved import forward

    return forward("data", "dataset", name)
