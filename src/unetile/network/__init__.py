"""The network floor: the U-Net (:mod:`.model`), its tile geometry (:mod:`.tiling`) and the
input normalisation (:mod:`.normalization`). Imports nothing above the base modules."""

from .model import UNet, UNetConfig
from .normalization import Normalization
from .tiling import Tiling

__all__ = ["Normalization", "Tiling", "UNet", "UNetConfig"]
