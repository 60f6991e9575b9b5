"""Exported models (ONNX, TorchScript, bioimage.io) give unetile's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetile.cli import main
from unetile.network.model import UNet, is_valid_input_size, output_size
from unetile.network.normalization import Normalization
from unetile.predict import card, export, predict

NORMALIZATION = {"mean": [100.0], "std": [50.0]}


def tiny_model(depth=4, in_channels=1, num_classes=2, dims=2, seed=0):
    model = UNet(
        in_channels=in_channels,
        num_classes=num_classes,
        depth=depth,
        base_channels=2,
        dropout=0.0,
        dims=dims,
    )
    model.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.classifier.bias[-1] += 0.5  # probabilities away from 1/K everywhere
    return model.eval()


def config_of(model, normalization=NORMALIZATION):
    return {
        "model": model.config.to_dict(),
        "normalization": normalization,
        "classes": {"num_classes": model.config.num_classes, "foreground": 1},
    }


def random_image(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 200).astype(np.float32)


def mirrored(image, margin):
    """``(C, *S)`` mirrored by ``margin`` on every spatial side, with a batch axis."""
    return np.pad(image, ((0, 0),) + ((margin, margin),) * (image.ndim - 1), "reflect")[None]


def test_geometry_of_the_paper_network():
    # 572 -> 388: 388 = 24 * 16 + 4, so 4 extra px; 92 + 4 = 96 px of margin.
    geometry = export.export_geometry(5)
    assert geometry == export.ExportGeometry(margin=96, multiple=16, min_output=16, extra=4)
    assert geometry.min_input == 208
    assert "input = output + 2 * 96" in geometry.rule()


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_every_declared_size_reaches_a_valid_unet_size(depth):
    geometry = export.export_geometry(depth)
    network_margin = geometry.margin - geometry.extra
    # Declared inputs are then multiples of 2**(depth-1): a tiler's blocks stay aligned.
    assert (2 * geometry.margin) % geometry.multiple == 0
    for output in range(geometry.min_output, geometry.min_output + 5 * geometry.multiple):
        if output % geometry.multiple:
            continue
        # The wrapper drops `extra` input pixels and feeds the rest to the U-Net.
        unet_input = output + 2 * geometry.margin - geometry.extra
        assert is_valid_input_size(unet_input, depth)
        assert output_size(unet_input, depth) == output + geometry.extra
        assert unet_input - 2 * network_margin == output + geometry.extra


@settings(max_examples=8, deadline=None)
@given(
    depth=st.integers(2, 4),
    blocks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    seed=st.integers(0, 3),
)
def test_wrapped_network_equals_unetile_for_any_valid_size(depth, blocks, seed):
    model = tiny_model(depth=depth, seed=seed)
    geometry = export.export_geometry(depth)
    shape = tuple(b * 2 * geometry.multiple for b in blocks)
    image = random_image(shape, seed)
    expected = predict(model, image, normalization=NORMALIZATION, progress=False, device="cpu")
    padded = mirrored(Normalization.of(NORMALIZATION).apply(image[None]), geometry.margin)
    with torch.no_grad():
        got = export.ExportedUNet(model)(torch.from_numpy(padded)).numpy()[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_wrapped_3d_network_equals_unetile():
    model = tiny_model(depth=2, dims=3)
    geometry = export.export_geometry(2)
    image = random_image((6, 8, 10))
    expected = predict(model, image, normalization=NORMALIZATION, progress=False, device="cpu")
    padded = mirrored(Normalization.of(NORMALIZATION).apply(image[None]), geometry.margin)
    with torch.no_grad():
        got = export.ExportedUNet(model)(torch.from_numpy(padded)).numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_border_surrounds_the_probabilities_with_the_halo():
    model = tiny_model(depth=3)
    margin = export.export_geometry(3).margin
    batch = torch.randn(2, 1, 2 * margin + 8, 2 * margin + 12)
    with torch.no_grad():
        inner = export.ExportedUNet(model)(batch)
        framed = export.ExportedUNet(model, border=True)(batch)
    assert framed.shape == (2, 2, 2 * margin + 8, 2 * margin + 12)
    assert torch.equal(framed[..., margin:-margin, margin:-margin], inner)
    assert framed[..., :margin, :].abs().max() == 0
    np.testing.assert_allclose(inner.sum(dim=1).numpy(), 1.0, atol=1e-6)


def network_input(model, image):
    margin = export.export_geometry(model.config.depth).margin
    return mirrored(Normalization.of(NORMALIZATION).apply(image[None]), margin)


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_onnx_and_torchscript_run_at_other_sizes_than_traced(tmp_path, export_format):
    # depth 4 has extra = 4 px: the crops must follow the input size, not the trace's.
    model = tiny_model(depth=4)
    path = tmp_path / f"model.{export_format}"
    export.export(model, config_of(model), path, export_format)
    runner = export.run_onnx if export_format == "onnx" else export.run_torchscript
    for shape in [(48, 64), (112, 40)]:
        image = random_image(shape, seed=shape[0])
        expected = predict(model, image, normalization=NORMALIZATION, progress=False, device="cpu")
        got = runner(path, network_input(model, image))
        assert got.shape == (1, 2, *shape)
        np.testing.assert_allclose(got[0], expected, atol=1e-5)
    batch = np.concatenate([network_input(model, random_image((48, 48), s)) for s in (1, 2)])
    assert runner(path, batch).shape == (2, 2, 48, 48)


def test_instance_norm_model_equals_unetile_on_one_tile(tmp_path):
    # Instance norm depends on the tile: the check compares the same window.
    model = UNet(depth=3, base_channels=2, dropout=0.0, norm="instance")
    model.reset_parameters(torch.Generator().manual_seed(0))
    model.eval()
    export.export(model, config_of(model), tmp_path / "model.onnx", "onnx")
    differences = export.check_export(
        model, config_of(model), tmp_path / "model.onnx", "onnx", random_image((60, 70))
    )
    assert differences["onnx"] < 1e-5
    assert not export.tile_exact(model)


def test_onnx_metadata_states_the_size_rule_and_normalisation(tmp_path):
    import onnx

    model = tiny_model(depth=4)
    export.write_onnx(model, config_of(model), tmp_path / "model.onnx")
    properties = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert properties["valid_size_rule"].startswith("input = output + 2 * 48 pixels")
    assert json.loads(properties["normalization"]) == NORMALIZATION
    assert json.loads(properties["unetile"])["geometry"]["multiple"] == 8


def test_torchscript_carries_the_metadata(tmp_path):
    model = tiny_model(depth=3)
    export.write_torchscript(model, config_of(model), tmp_path / "model.pt")
    extra = {"unetile.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    info = json.loads(extra["unetile.json"])
    assert info["geometry"] == {
        "margin": 20,
        "multiple": 4,
        "min_output": 4,
        "extra": 0,
        "min_input": 44,
    }
    assert info["normalization"] == NORMALIZATION


# --------------------------------------------------------------------------
# The bioimage.io package: one package (two input channels, three classes).
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model = tiny_model(depth=3, in_channels=2, num_classes=3)
    normalization = {"mean": [100.0, 90.0], "std": [50.0, 40.0]}
    config = {**config_of(model, normalization), "pixel_size_um": [0.5, 0.25]}
    image = random_image((2, 90, 100))
    path = tmp_path_factory.mktemp("package") / "model.zip"
    export.export(
        model, config, path, "bioimageio", image, name="tiny test model", authors=("A. Tester",)
    )
    return model, config, image, path


def test_package_validates_and_states_the_tiling(package, tmp_path):
    model, config, _, path = package
    descr = export.load_package(path)
    assert descr.validation_summary.status == "valid-format"
    inputs, outputs = descr.inputs[0], descr.outputs[0]
    space = [a for a in inputs.axes if a.type == "space"]
    assert [a.id for a in space] == ["y", "x"]
    assert (space[0].size.min, space[0].size.step) == (44, 4)
    assert [a.halo for a in outputs.axes if a.type == "space"] == [20, 20]
    assert [(a.unit, a.scale) for a in space] == [("micrometer", 0.5), ("micrometer", 0.25)]
    assert inputs.pad.mode == "reflect"
    kwargs = inputs.preprocessing[1].kwargs
    assert (kwargs.mean, kwargs.std) == ([100.0, 90.0], [50.0, 40.0])
    assert set(descr.weights.model_dump(exclude_none=True)) == {"torchscript", "onnx"}
    names = set(zipfile.ZipFile(path).namelist())
    assert {"rdf.yaml", "cover.png", "README.md", "test_input.npy", "test_output.npy"} <= names
    # unetile's own run files, attached: the package loads as the run it came from.
    assert {"config.json", "model.safetensors"} <= names
    with zipfile.ZipFile(path) as archive:
        archive.extract("config.json", tmp_path)
        archive.extract("model.safetensors", tmp_path)
    loaded, stored = card.load_model(tmp_path)
    assert stored["pixel_size_um"] == [0.5, 0.25] and stored["classes"] == config["classes"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bioimageio_core_tiling_equals_unetile(package):
    model, config, image, path = package
    differences = export.check_export(model, config, path, "bioimageio", image)
    assert set(differences) == {"bioimageio/torchscript", "bioimageio/onnx"}
    assert max(differences.values()) < 1e-5


def test_bioimageio_core_reproduces_the_test_output(package):
    from bioimageio.core import test_model

    _, _, _, path = package
    with export._quiet_bioimageio():
        summary = test_model(str(path), weight_format="onnx", devices=["cpu"])
    assert summary.status == "passed", summary.format()


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def save_run(run_dir, depth=3):
    model = tiny_model(depth=depth)
    card.save_model(run_dir, model, config_of(model))
    return model


def test_cli_export_with_check(tmp_path, capsys):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "test.tif", random_image((70, 60)))
    out = tmp_path / "exports" / "model.onnx"

    status = main(
        ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out), "--check"]
        + ["--image", str(tmp_path / "test.tif")]
    )

    assert status == 0
    printed = capsys.readouterr().out
    difference = float(printed.split("max |probability difference| ")[1].split()[0])
    assert difference <= 1e-5
    assert f"wrote {out} (onnx)" in printed
    assert out.is_file()


def test_cli_check_failure_leaves_no_file(tmp_path, capsys, monkeypatch):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "test.tif", random_image((70, 60)))
    out = tmp_path / "model.pt"
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference can pass

    status = main(
        ["export", str(tmp_path / "run"), "--format", "torchscript", "--out", str(out)]
        + ["--check", "--image", str(tmp_path / "test.tif")]
    )

    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"unetile export: error: {out}: the export differs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "test.tif"]  # no temporary left


def test_cli_package_needs_an_image(tmp_path, capsys):
    save_run(tmp_path / "run")
    status = main(
        [
            "export",
            str(tmp_path / "run"),
            "--format",
            "bioimageio",
            "--out",
            str(tmp_path / "m.zip"),
        ]
    )
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert "config.json: names no training or validation images" in error
    assert "--image" in error


def test_cli_bad_package_name_is_one_line(tmp_path, capsys):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "test.tif", random_image((70, 60)))
    out = tmp_path / "m.zip"
    status = main(
        ["export", str(tmp_path / "run"), "--format", "bioimageio", "--out", str(out)]
        + ["--image", str(tmp_path / "test.tif"), "--name", "abc"]
    )
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"unetile export: error: {out}: bioimage.io refuses name (")
    assert not out.exists()


def test_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    save_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    status = main(
        ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    )
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "unetile export: error: export needs the package 'onnx': pip install \"unetile[export]\""
    )


def test_training_and_prediction_do_not_import_the_export_libraries():
    # A fresh interpreter is the point: what importing unetile pulls in.
    code = (
        "import sys, unetile.cli, unetile.train, unetile.predict, unetile.predict.export\n"
        "from unetile.cli import build_parser; build_parser()\n"
        "loaded = [m for m in ('onnx', 'onnxruntime', 'bioimageio') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
