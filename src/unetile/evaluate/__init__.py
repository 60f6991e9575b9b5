"""The evaluate floor: the challenges' metrics (:mod:`.metrics`), the noise of a
comparison (:mod:`.evidence`) and the labels' threshold calibration
(:mod:`.calibration`). Works on arrays; imports nothing above the data floor."""

__all__ = ["score"]


def __getattr__(name: str):
    # Lazily: the metrics import scipy's optimisers, which predicting never needs.
    if name == "score":
        from .metrics import score

        return score
    raise AttributeError(f"module 'unetile.evaluate' has no attribute {name!r}")
