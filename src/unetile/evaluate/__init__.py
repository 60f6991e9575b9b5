"""The evaluate floor: the challenges' metrics (:mod:`.metrics`), the noise of a
comparison (:mod:`.evidence`) and the labels' threshold calibration
(:mod:`.calibration`). Works on arrays; imports nothing above the data floor."""

from .metrics import score

__all__ = ["score"]
