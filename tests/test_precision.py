"""Reduced precision: bf16 only where the hardware has it, and then close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from unetile import precision
from unetile.cli import main
from unetile.network.model import UNet
from unetile.predict import card
from unetile.predict.engine import PredictOptions, predict

pytestmark = pytest.mark.fast


def small_model(seed=0):
    torch.manual_seed(seed)
    model = UNet(depth=3, base_channels=4, dropout=0.0)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_features", lambda: {"avx2": True, "avx": True})


def with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_features", lambda: {"avx2": True, "avx512_bf16": True})


def test_bf16_is_refused_where_the_cpu_lacks_it_naming_what_is_missing(monkeypatch):
    without_bf16(monkeypatch)
    reason = precision.bf16_unsupported_reason(torch.device("cpu"))
    assert "AVX-512 BF16 and AMX" in reason and "avx2" in reason
    with pytest.raises(ValueError, match="precision bf16: this CPU lacks .* use fp32"):
        precision.check_precision("bf16", torch.device("cpu"))
    assert precision.check_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision bf16"):
        PredictOptions(precision="bf16").resolve(small_model(), (20, 20))


def test_cli_refuses_bf16_with_one_line_and_status_2(monkeypatch, tmp_path, capsys):
    without_bf16(monkeypatch)
    image = tmp_path / "slice.tif"
    tifffile.imwrite(image, np.zeros((20, 20), dtype=np.uint8))
    model = small_model()
    card.save_model(
        tmp_path / "model", model, {"model": model.config.to_dict(), "normalization": None}
    )
    out = tmp_path / "out"
    arguments = [str(tmp_path / "model"), str(image), "--out", str(out), "--no-progress"]
    code = main(["predict", *arguments, "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--precision bf16" in err[0] and "lacks AVX-512 BF16" in err[0]
    assert not (tmp_path / "out").exists()


def test_bf16_prediction_runs_and_stays_close_to_fp32(monkeypatch):
    with_bf16(monkeypatch)  # emulated here: slow but the same arithmetic as native bf16
    model = small_model(seed=3)
    image = np.random.default_rng(3).random((40, 40), dtype=np.float32)
    full = predict(model, image, progress=False)
    half = predict(model, image, precision="bf16", progress=False)
    difference = np.abs(full - half)
    # bf16 keeps 8 bits of mantissa: differences of a few 1e-3, not zero, never large.
    assert 0 < difference.max() < 0.05
    assert np.allclose(half.sum(0), 1.0, atol=1e-5) and half.dtype == np.float32
    assert (full.argmax(0) == half.argmax(0)).mean() > 0.97


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_it_is_native_and_says_so(monkeypatch, tmp_path, capsys, native):
    (with_bf16 if native else without_bf16)(monkeypatch)
    assert precision.resolve_precision("auto", torch.device("cpu")) == (
        "bf16" if native else "fp32"
    )
    image = tmp_path / "slice.tif"
    tifffile.imwrite(image, np.random.default_rng(1).random((40, 40), dtype=np.float32))
    model = small_model(seed=1)
    card.save_model(
        tmp_path / "model", model, {"model": model.config.to_dict(), "normalization": None}
    )
    arguments = [str(tmp_path / "model"), str(image), "--no-progress", "--save-probabilities"]
    assert main(["predict", *arguments, "--out", str(tmp_path / "auto")]) == 0
    said = capsys.readouterr().out
    assert ("precision bf16" in said) == native
    assert (
        main(["predict", *arguments, "--out", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    )
    auto = tifffile.imread(tmp_path / "auto" / "slice_probabilities.tif")
    full = tifffile.imread(tmp_path / "fp32" / "slice_probabilities.tif")
    if native:
        assert 0 < np.abs(auto - full).max() < 0.05
    else:
        np.testing.assert_array_equal(auto, full)
