"""Training on several processes: ``torch.distributed`` with DistributedDataParallel.

Launched by ``torchrun --nproc_per_node N -m unetile train ...`` (or any
launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``), every process runs the same loop on its own tiles:

- rank ``r`` of ``N`` draws its tiles from ``numpy.random.default_rng([seed, r])``
  and its drop-out from ``torch.manual_seed(seed + r)``; a single process
  keeps ``default_rng(seed)`` and ``manual_seed(seed)``;
- the effective batch is ``N * batch_size`` tiles, at the learning rate as
  given (it is not scaled with ``N``);
- with the paper's loss each rank's loss is scaled by its share of the
  annotated pixels of all ranks, so the averaged gradient is the gradient of
  the mean over the whole effective batch, as one process with those tiles
  would compute it (``dice_ce`` averages the ranks' losses instead);
- only rank 0 writes the run folder; a checkpoint holds every rank's sampler
  and torch generator states, so ``--resume`` with the same ``N`` continues
  exactly.

Batch norm: on GPUs the layers become ``SyncBatchNorm`` (statistics over the
effective batch); on CPUs each rank normalises by its own tiles, so a batch
norm model trained on several CPU processes differs from one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import io


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder."""
        return self.rank == 0

    def describe(self, batch_size: int, learning_rate: float) -> dict:
        """What ``config.json`` and the summary record of the processes."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "batch_size_per_process": batch_size,
            "effective_batch_size": batch_size * self.world_size,
            "learning_rate": learning_rate,
        }


def ranks_from_environment() -> Ranks:
    """The ranks torchrun (or another launcher) set in the environment, else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise io.InputError(
                f"WORLD_SIZE is {world_size} but {name} is not set; launch with "
                "torchrun --nproc_per_node N -m unetile train ..."
            )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return Ranks(rank, world_size, local_rank)


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per process (``cuda:<local rank>``) when training on CUDA."""
    if ranks.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def start(ranks: Ranks, device: torch.device) -> Ranks:
    """Join the process group: NCCL on GPUs, gloo on CPUs. Returns ``ranks`` with the backend."""
    if not ranks.distributed:
        return ranks
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, backend)


def stop(ranks: Ranks) -> None:
    """Leave the process group."""
    import torch.distributed as dist

    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def sampler_rng(seed: int, ranks: Ranks) -> np.random.Generator:
    """The tile sampler's generator of this rank (a single process: ``default_rng(seed)``)."""
    if not ranks.distributed:
        return np.random.default_rng(seed)
    return np.random.default_rng([seed, ranks.rank])


def torch_seed(seed: int, ranks: Ranks) -> int:
    """Seed of torch's global generator (drop-out) on this rank."""
    return seed + ranks.rank


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The model as DistributedDataParallel (batch norm synchronised on GPUs)."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _sum(ranks: Ranks, values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values


def scale_loss(ranks: Ranks, loss: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """This rank's mean loss weighted by its share of the annotated pixels of all ranks.

    DistributedDataParallel averages the ranks' gradients; with this weight
    the average is the gradient of the mean over all ranks' annotated pixels.
    """
    if not ranks.distributed:
        return loss
    count = annotated.to(torch.float64).reshape(1)
    total = _sum(ranks, count)
    share = (count * ranks.world_size / total.clamp(min=1)).to(loss.dtype)
    return loss * share[0]


def agree(ranks: Ranks, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on any rank becomes true on all, so all ranks stop at one step."""
    if not ranks.distributed:
        return flags
    values = _sum(ranks, torch.tensor([float(f) for f in flags], dtype=torch.float64))
    return tuple(bool(v > 0) for v in values)


def mean_over_ranks(ranks: Ranks, value: torch.Tensor) -> torch.Tensor:
    """Sum of a per-rank scaled loss over the ranks, divided by their number."""
    if not ranks.distributed:
        return value
    return _sum(ranks, value.detach().to(torch.float64).reshape(1))[0] / ranks.world_size


def gather_states(ranks: Ranks, state: dict) -> list[dict]:
    """Every rank's ``state`` (JSON-able), in rank order; on all ranks."""
    if not ranks.distributed:
        return [state]
    import torch.distributed as dist

    states: list = [None] * ranks.world_size
    dist.all_gather_object(states, state)
    return states


def generator_state(sampler) -> dict:
    """This rank's random state: the sampler's generator and torch's global generator."""
    return {"sampler": sampler.state(), "torch": torch.get_rng_state().tolist()}


def restore_generators(ranks: Ranks, state: dict, sampler, path) -> None:
    """Set this rank's generators from a checkpoint's ``state`` (written by rank 0)."""
    stored = state.get("ranks")
    count = len(stored) if stored else 1
    if count != ranks.world_size:
        raise io.InputError(
            f"{path}: was written by {count} training process(es); resume with the same "
            f"number (torchrun --nproc_per_node {count}), not {ranks.world_size}"
        )
    if stored:
        mine = stored[ranks.rank]
        sampler.set_state(mine["sampler"])
        torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
    else:
        sampler.set_state(state["sampler"])
