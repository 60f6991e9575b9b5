"""unetile: the U-Net of Ronneberger et al. (2015) for biomedical image segmentation."""

__version__ = "0.1.0"
