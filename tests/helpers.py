"""Helpers shared by the tests (pytest puts this folder on the import path)."""

from __future__ import annotations

import numpy as np


def relabel_equal(first, second):
    """Whether two label images are equal up to a one-to-one renaming of the ids."""
    pairs = np.unique(np.stack([first.ravel(), second.ravel()]), axis=1)
    return (
        np.array_equal(first > 0, second > 0)
        and len(np.unique(pairs[0])) == pairs.shape[1]
        and len(np.unique(pairs[1])) == pairs.shape[1]
    )
