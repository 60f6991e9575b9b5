"""Training on two CPU processes (gloo): the same weights as one process, exact resume."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file
from scipy import ndimage

from unetile import io
from unetile.train.ddp import Ranks, sampler_rng
from unetile.train.loop import (
    LAST_WEIGHTS,
    build_model,
    build_optimizer,
    build_sampler,
    compute_loss,
    learning_rate_at,
    make_config,
    prepare_arrays,
    training_mode,
)
from unetile.train.run import train

STEPS = 4


def tiny_config(out):
    return make_config(
        out=str(out),
        depth=2,
        base_channels=4,
        dropout=0.0,
        augment="none",
        max_tile=20,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        steps=STEPS,
        checkpoint_every=2,
        log_every=1,
        seed=3,
        device="cpu",
        cache_weights=False,
        w0=5.0,
        sigma=2.0,
    )


def tiny_data(config):
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(2):
        image = ndimage.gaussian_filter(rng.random((44, 40)), 2)
        images.append(image.astype(np.float32))
        labels.append(np.where(image > np.median(image), 255, 0).astype(np.uint8))
    return prepare_arrays(config, images, labels)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _rank(rank, world, ports, folder):
    """One training process: a run straight through, and one stopped at step 2 and resumed."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    runs = [("straight", False, None), ("resumed", False, 2), ("resumed", True, None)]
    for port, (name, resume, stop_after) in zip(ports, runs, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        config = tiny_config(f"{folder}/{name}")
        train(config, data=tiny_data(config), resume=resume, stop_after=stop_after, progress=False)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    ports = [free_port() for _ in range(3)]
    torch.multiprocessing.spawn(_rank, args=(2, ports, str(folder)), nprocs=2, join=True)
    return folder


def single_process_reference(folder):
    """One process stepping on both ranks' tiles at once: the same total batch of 2."""
    config = tiny_config(folder)
    data = tiny_data(config)
    model = build_model(config, data.in_channels, data.num_classes)
    training_mode(model, config)
    optimizer = build_optimizer(config, model)
    samplers = [build_sampler(config, data, torch.device("cpu"), Ranks(r, 2)) for r in range(2)]
    losses = []
    for step in range(STEPS):
        tiles = [sampler.sample(config.batch_size) for sampler in samplers]
        images, labels, weights = (torch.cat(parts) for parts in zip(*tiles, strict=True))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, step)
        loss = compute_loss(config, model(images), labels, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), losses


def test_two_processes_match_one_process_with_the_same_total_batch(two_processes, tmp_path):
    expected, losses = single_process_reference(tmp_path / "single")
    trained = load_file(str(two_processes / "straight" / LAST_WEIGHTS))
    for key, value in expected.items():
        assert torch.allclose(trained[key], value, rtol=0, atol=1e-5), key
    moved = max(float((trained[k] - v).abs().max()) for k, v in expected.items())
    initial = build_model(tiny_config(tmp_path), 1, 2).state_dict()
    assert max(float((initial[k] - expected[k]).abs().max()) for k in expected) > 1e-3
    assert moved < 1e-5
    # The logged loss is that of the whole effective batch, not rank 0's share.
    rows = (two_processes / "straight" / "log.csv").read_text().splitlines()[1:]
    logged = [float(row.split(",")[1]) for row in rows]
    assert np.allclose(logged, losses, rtol=1e-4)
    stored = io.read_json(two_processes / "straight" / io.MODEL_CONFIG)["processes"]
    assert stored == {
        "world_size": 2,
        "backend": "gloo",
        "batch_size_per_process": 1,
        "effective_batch_size": 2,
        "learning_rate": 0.05,
    }


def test_resume_across_two_processes_is_exact(two_processes):
    straight = load_file(str(two_processes / "straight" / LAST_WEIGHTS))
    resumed = load_file(str(two_processes / "resumed" / LAST_WEIGHTS))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    log = (two_processes / "resumed" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"]
    from safetensors import safe_open

    with safe_open(str(two_processes / "resumed" / "checkpoint.safetensors"), "pt") as handle:
        state = json.loads(handle.metadata()["state"])
    assert len(state["ranks"]) == 2
    assert state["ranks"][0]["sampler"] != state["ranks"][1]["sampler"]


def test_a_checkpoint_of_two_processes_refuses_one(two_processes):
    config = tiny_config(two_processes / "straight")
    with pytest.raises(io.InputError, match=r"2 training process\(es\).*--nproc_per_node 2"):
        train(config, data=tiny_data(config), resume=True, progress=False)


def test_each_rank_draws_from_its_own_seed_and_one_process_keeps_the_plain_seed():
    first = sampler_rng(3, Ranks(0, 2)).random(4)
    second = sampler_rng(3, Ranks(1, 2)).random(4)
    assert not np.allclose(first, second)
    assert np.array_equal(sampler_rng(3, Ranks()).random(4), np.random.default_rng(3).random(4))
