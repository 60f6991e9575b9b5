"""The train floor: the options (:mod:`.config`), ``--preset auto`` (:mod:`.auto`,
:mod:`.race`), the loop (:mod:`.loop`), loss, checkpoints, torchrun (:mod:`.ddp`) and the
objects fitted from the labels (:mod:`.instance_fit`). Writes a run folder that the
predict floor reads."""

from .config import TrainConfig, make_config
from .run import train

__all__ = ["TrainConfig", "make_config", "train"]


def __getattr__(name: str):
    from .._moved import forward

    return forward("train", "loop", name)
