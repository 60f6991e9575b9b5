"""Checkpoints: everything a training run needs to continue, in one safetensors file.

Weights, the optimiser's state (its tensors flattened to named tensors, its
numbers and parameter groups as JSON), torch's random generators and the run's
own state (JSON in the file's metadata), written atomically. No pickle: a
checkpoint loads without executing code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import io
from ..predict.engine import mps_available


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON.

    Tensor entries become ``"optimizer.<param index>.<name>"``; numbers and the
    param groups stay in the JSON part.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], description: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in description["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": description["param_groups"]}


def save_checkpoint(path: str | os.PathLike, model, optimizer, state: dict) -> None:
    """Write weights, optimiser state, torch RNG and ``state`` (JSON) in one atomic file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_tensors, optimizer_json = flatten_optimizer_state(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    if mps_available():  # drop-out on an Apple GPU draws from its own generator
        tensors["rng.mps"] = torch.mps.get_rng_state()
    metadata = {"state": json.dumps({**state, "optimizer": optimizer_json})}
    io.save_safetensors(tensors, path, metadata=metadata)


def load_checkpoint(path: str | os.PathLike, model, optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer`` and torch RNG.

    Returns the JSON state (step, sampler state, best value, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise io.InputError(f"{path}: no checkpoint to resume; train without --resume first")
    try:
        tensors, metadata = io.read_safetensors(path)
        state = json.loads(metadata["state"])
    except Exception as error:  # damaged file: say which, never a traceback
        raise io.InputError(f"{path}: cannot be read as a checkpoint ({error})") from None
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise io.InputError(
            f"{path}: weights do not fit this configuration ({str(error).splitlines()[0]})"
        ) from None
    optimizer_state = unflatten_optimizer_state(tensors, state.pop("optimizer"))
    stored_keys = [set(group) - {"params"} for group in optimizer_state["param_groups"]]
    own_keys = [set(group) - {"params"} for group in optimizer.state_dict()["param_groups"]]
    if stored_keys != own_keys:
        raise io.InputError(
            f"{path}: was written by another optimiser than --optimizer "
            f"{type(optimizer).__name__.lower()}; resume with the run's own options "
            "(leave --optimizer out) or start a new run"
        )
    # load_state_dict moves the moments to the parameters' device.
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise io.InputError(f"{path}: optimiser state does not fit ({reason})") from None
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if "rng.mps" in tensors and mps_available():
        torch.mps.set_rng_state(tensors["rng.mps"])
    return state
