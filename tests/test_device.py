"""Device selection: CUDA, Apple GPUs (MPS) and the CPU (no GPU is needed to test it)."""

import os

import pytest
import torch

import unetile
from unetile.cli import main
from unetile.predict.engine import resolve_device

pytestmark = pytest.mark.fast


def machine(monkeypatch, cuda: bool, mps: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"), (True, False, "cuda")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    machine(monkeypatch, cuda, mps)
    assert resolve_device("auto") == resolve_device(None) == torch.device(expected)


def test_mps_is_taken_when_present_and_refused_when_absent(monkeypatch):
    machine(monkeypatch, cuda=False, mps=True)
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "0")
    with pytest.warns(UserWarning, match="PYTORCH_ENABLE_MPS_FALLBACK is not 1"):
        resolve_device("mps")
    machine(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match="torch sees no Apple GPU"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="use 'cpu', 'cuda' or 'mps'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_package_enables_the_cpu_fallback_before_torch_runs():
    assert unetile.__name__ == "unetile"
    assert os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


@pytest.mark.parametrize("command", ["train", "predict"])
def test_cli_without_an_apple_gpu_says_so_in_one_line(monkeypatch, tmp_path, capsys, command):
    machine(monkeypatch, cuda=False, mps=False)
    if command == "train":
        data = tmp_path / "data"
        data.mkdir()
        argv = ["train", "--images", str(data), "--labels", str(data)]
        argv += ["--out", str(tmp_path / "run"), "--device", "mps"]
    else:
        argv = ["predict", str(tmp_path / "run"), str(tmp_path), "--out", str(tmp_path / "o")]
        argv += ["--device", "mps"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"unetile {command}: error: --device: device 'mps' asked for")
    assert "\n" not in error
