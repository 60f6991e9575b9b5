"""unetile: the U-Net of Ronneberger et al. (2015) for biomedical image segmentation."""

import os

# On Apple GPUs (MPS) let the operations Metal lacks run on the CPU instead of
# failing. torch reads this once, when it is imported, so it is set here,
# before any unetile module imports torch; a user's own value is kept.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

__version__ = "0.1.0"

from . import _moved  # noqa: E402 - after the environment variable above

_moved.install()
