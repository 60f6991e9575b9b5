"""Fine-tuning: ``train --init RUN_DIR``, its checks, frozen encoder, exact resume."""

import numpy as np
import pytest
import torch
from test_cli_train import write_dataset
from test_train import stripes_data, tiny_config

from unetile import io
from unetile.cli import main
from unetile.predict import card
from unetile.train.loop import _sha256
from unetile.train.run import train


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("source") / "run"
    train(tiny_config(run, steps=3), progress=False, data=stripes_data())
    return run


def weights_of(run):
    model, _ = card.load_model(run)
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_fine_tuning_starts_from_the_run_and_a_frozen_encoder_stays(tmp_path, source_run):
    data = stripes_data(seed=3)
    config = tiny_config(tmp_path / "tuned", init=str(source_run), freeze_encoder=True)
    train(config, progress=False, data=data)
    before, after = weights_of(source_run), weights_of(tmp_path / "tuned")
    contracting = [name for name in before if name.startswith("contracting.")]
    others = [name for name in before if not name.startswith("contracting.")]
    assert contracting and all(torch.equal(before[n], after[n]) for n in contracting)
    assert all(not torch.equal(before[n], after[n]) for n in others if n.endswith("weight"))
    saved = io.read_json(tmp_path / "tuned" / "config.json")
    assert saved["init"] == {
        "run": str(source_run),
        "weights_sha256": _sha256(source_run / "model.safetensors"),
        "normalization": "recompute",
        "freeze_encoder": True,
    }
    # Recomputed normalisation: the new images' own statistics, not the source's.
    assert saved["normalization"] == data.normalization
    assert saved["normalization"] != io.read_json(source_run / "config.json")["normalization"]


def test_kept_normalization_is_the_source_runs(tmp_path, source_run):
    config = tiny_config(tmp_path / "kept", init=str(source_run), init_normalization="keep")
    train(config, progress=False, data=stripes_data(seed=3))
    saved = io.read_json(tmp_path / "kept" / "config.json")
    assert saved["normalization"] == io.read_json(source_run / "config.json")["normalization"]


def test_a_different_network_is_refused_naming_the_field(tmp_path, source_run):
    config = tiny_config(tmp_path / "wide", init=str(source_run), base_channels=8)
    with pytest.raises(io.InputError) as error:
        train(config, progress=False, data=stripes_data())
    assert str(error.value) == (
        f"{source_run / 'config.json'}: base_channels 4 differs from this run's 8; "
        f"fine-tuning needs the same network"
    )
    assert not (tmp_path / "wide" / "model.safetensors").exists()


def test_resumed_fine_tuning_equals_an_uninterrupted_one(tmp_path, source_run):
    data = stripes_data(seed=5)
    options = dict(init=str(source_run), freeze_encoder=True, optimizer="adam")
    train(tiny_config(tmp_path / "straight", **options), progress=False, data=data)
    config = tiny_config(tmp_path / "resumed", **options)
    assert train(config, progress=False, data=data, stop_after=3)["interrupted"]
    train(config, resume=True, progress=False, data=data)
    straight, resumed = weights_of(tmp_path / "straight"), weights_of(tmp_path / "resumed")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert io.read_json(tmp_path / "resumed" / "config.json")["init"]["run"] == str(source_run)


def test_cli_takes_the_network_of_the_init_run(tmp_path, source_run, capsys):
    images, labels = write_dataset(tmp_path / "new", size=40)
    common = ["train", "--images", str(images), "--labels", str(labels), "--init", str(source_run)]
    common += ["--tile", "44", "--steps", "2", "--quiet", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "run"), "--freeze-encoder"]) == 0
    model, saved = card.load_model(tmp_path / "run")
    assert (saved["model"]["depth"], saved["model"]["base_channels"]) == (2, 4)
    assert saved["training"]["init"] == str(source_run)
    assert main([*common, "--out", str(tmp_path / "deeper"), "--depth", "3"]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (
        f"unetile train: error: {source_run / 'config.json'}: depth 2 differs from this "
        f"run's 3; fine-tuning needs the same network"
    )
    assert main([*common, "--out", str(tmp_path / "x"), "--init", str(tmp_path / "none")]) == 2
    assert "--init needs a run folder" in capsys.readouterr().err
    assert np.isfinite(io.read_json(tmp_path / "run" / "summary.json")["loss"])
