"""The sample-data contribution: the demo's synthetic touching cells, with their truth."""

from __future__ import annotations

from ._logic import synthetic_cells


def touching_cells():
    """An image of synthetic touching cells and its exact instance labels (napari layer data)."""
    image, instances = synthetic_cells(384, seed=2000)
    return [
        (image, {"name": "cells"}, "image"),
        (instances, {"name": "cells truth", "opacity": 0.5, "visible": False}, "labels"),
    ]
