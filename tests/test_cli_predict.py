"""``unetile predict`` end to end: outputs per input, bad files reported, run continues."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from helpers import relabel_equal

from unetile import io
from unetile.cli import main
from unetile.network.model import UNet
from unetile.predict import card, predict
from unetile.predict.instances import instances_from_probabilities
from unetile.predict.outputs import OWNER_RECORD
from unetile.predict.postprocessing import labels_from_probabilities

pytestmark = pytest.mark.fast


def save_run(run_dir, padding="valid", norm=None, cell_bias=0.0):
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2, dropout=0.0, padding=padding, norm=norm)
    model.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.classifier.bias[1] += cell_bias  # to make cells of an untrained network
    config = {
        "model": model.config.to_dict(),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "classes": {"foreground": 1},
        "tile": {"input_shape": [68, 68], "output_shape": [52, 52]},
    }
    card.save_model(run_dir, model, config)
    return model.eval()


def test_folder_with_a_good_and_a_corrupt_file(tmp_path, capsys):
    model = save_run(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    image = np.random.default_rng(0).random((37, 45), dtype=np.float32)
    tifffile.imwrite(images / "07.tif", image)
    (images / "08.tif").write_bytes(b"not a tiff at all")
    out = tmp_path / "out"

    status = main(
        [
            "predict",
            str(tmp_path / "run"),
            str(images),
            "--out",
            str(out),
            "--tile",
            "10",
            "--batch-size",
            "2",
            "--save-probabilities",
            "--instances",
            "--no-progress",
        ]
    )

    assert status == 2
    error = capsys.readouterr().err
    assert "08.tif" in error and "07.tif" not in error.split("failed")[0]
    assert "1 of 2 input(s) failed" in error
    assert sorted(p.name for p in out.iterdir() if p.name != OWNER_RECORD) == [
        "07_instances.tif",
        "07_labels.tif",
        "07_probabilities.tif",
    ]
    # The normalisation of config.json is applied: same result as the API with it.
    expected = predict(
        model, image, tile_shape=10, batch_size=2, normalization=([0.5], [0.25]), progress=False
    )
    assert np.allclose(tifffile.imread(out / "07_probabilities.tif"), expected, atol=1e-6)
    assert np.array_equal(
        tifffile.imread(out / "07_labels.tif"), labels_from_probabilities(expected)
    )
    instances = tifffile.imread(out / "07_instances.tif")
    assert instances.max() == instances_from_probabilities(expected).max()


def test_zarr_format_and_a_same_padded_model(tmp_path):
    model = save_run(tmp_path / "run", padding="same")
    image = np.random.default_rng(1).random((20, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image)
    status = main(
        [
            "predict",
            str(tmp_path / "run"),
            str(tmp_path / "a.tif"),
            "--out",
            str(tmp_path / "o"),
            "--format",
            "zarr",
            "--tile",
            "16",
            "--no-progress",
        ]
    )
    assert status == 0
    labels = zarr.open_array(store=str(tmp_path / "o" / "a_labels.zarr"), mode="r")[:]
    expected = predict(model, image, tile_shape=16, normalization=([0.5], [0.25]), progress=False)
    assert np.array_equal(labels, labels_from_probabilities(expected))


@pytest.mark.parametrize("norm", [None, "instance"])
def test_small_tile_warns_only_for_instance_norm(tmp_path, capsys, norm):
    save_run(tmp_path / "run", norm=norm)
    tifffile.imwrite(tmp_path / "a.tif", np.random.default_rng(1).random((40, 40), np.float32))
    for tile in ("52", "20"):
        arguments = [str(tmp_path / "run"), str(tmp_path / "a.tif"), "--out", str(tmp_path)]
        assert main(["predict", *arguments, "--tile", tile, "--no-progress"]) == 0
        warned = "smaller than its training tile (52 px)" in capsys.readouterr().err
        assert warned == (norm == "instance" and tile == "20")


def test_invalid_tile_is_one_line_error(tmp_path, capsys):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    status = main(
        [
            "predict",
            str(tmp_path / "run"),
            str(tmp_path / "a.tif"),
            "--out",
            str(tmp_path / "o"),
            "--tile",
            "9",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--tile" in error and "use 8 or 10" in error


def test_rgb_png_is_read_channels_last_as_in_training(tmp_path, capsys):
    torch.manual_seed(0)
    model = UNet(in_channels=3, base_channels=2, depth=2, dropout=0.0)
    card.save_model(
        tmp_path / "run",
        model,
        {"model": model.config.to_dict(), "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}},
    )
    rgb = np.random.default_rng(1).integers(0, 255, (30, 26, 3), dtype=np.uint8)
    io.write_image(tmp_path / "in" / "color.png", rgb)
    out = tmp_path / "out"
    status = main(["predict", str(tmp_path / "run"), str(tmp_path / "in"), "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    expected = labels_from_probabilities(
        predict(model.eval(), np.moveaxis(rgb, -1, 0), normalization=([0.5] * 3, [0.25] * 3))
    )
    assert np.array_equal(tifffile.imread(out / "color_labels.tif"), expected)


def test_predict_restores_a_channels_last_model(tmp_path):
    from unetile.predict.engine import memory_format_of

    model = UNet(base_channels=4, depth=2).to(memory_format=torch.channels_last).train()
    predict(model, np.zeros((20, 20), np.float32), progress=False)
    assert memory_format_of(model) == torch.channels_last and model.training
    plain = UNet(base_channels=4, depth=2)
    predict(plain, np.zeros((20, 20), np.float32), progress=False)
    assert memory_format_of(plain) == torch.contiguous_format


def test_zarr_store_is_an_input_as_a_file_is(tmp_path, capsys):
    model = save_run(tmp_path / "run")
    image = np.random.default_rng(2).random((41, 53), dtype=np.float32)
    source = zarr.open_array(
        store=str(tmp_path / "in" / "big.zarr"),
        mode="w",
        shape=image.shape,
        chunks=(16, 16),
        dtype="f4",
    )
    source[:] = image
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    status = main(
        ["predict", str(tmp_path / "run"), str(tmp_path / "in" / "big.zarr"), "--out", str(out)]
    )
    assert status == 0, capsys.readouterr().err
    expected = labels_from_probabilities(predict(model, image, normalization=([0.5], [0.25])))
    assert np.array_equal(tifffile.imread(out / "big_labels.tif"), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--grow", "-1"], "in [0, 10000]"), (["--grow", "2"], "add --instances")],
)
def test_bad_grow_is_one_line_error(tmp_path, capsys, options, message):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    try:
        status = main(
            [
                "predict",
                str(tmp_path / "run"),
                str(tmp_path / "a.tif"),
                "--out",
                str(tmp_path / "o"),
            ]
            + options
        )
    except SystemExit as exit:  # refused by the option parser
        status = exit.code
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--grow" in error and message in error
    assert not (tmp_path / "o").exists()


def test_grown_instances_cover_the_gaps(tmp_path):
    model = save_run(tmp_path / "run", cell_bias=0.3)
    image = np.random.default_rng(2).random((30, 40), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image)
    status = main(
        [
            "predict",
            str(tmp_path / "run"),
            str(tmp_path / "a.tif"),
            "--out",
            str(tmp_path / "o"),
            "--instances",
            "--grow",
            "2",
            "--tile",
            "10",
            "--no-progress",
        ]
    )
    assert status == 0
    expected = predict(model, image, tile_shape=10, normalization=([0.5], [0.25]), progress=False)
    grown = tifffile.imread(tmp_path / "o" / "a_instances.tif")
    assert relabel_equal(grown, instances_from_probabilities(expected, grow=2))
    assert 0 < (instances_from_probabilities(expected) > 0).sum() < (grown > 0).sum() < grown.size


def test_instance_options_come_from_config_json_and_the_command_line_overrides_them(
    tmp_path, capsys
):
    from unetile.predict.instances import extract_instances

    model = save_run(tmp_path / "run", cell_bias=0.5)
    config = io.read_json(tmp_path / "run" / io.MODEL_CONFIG)
    config["instances"] = {"method": "distance", "h": 1.0, "min_size": 4, "fill_holes": True}
    io.write_json(tmp_path / "run" / io.MODEL_CONFIG, config)
    image = np.random.default_rng(5).random((40, 48), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image)
    expected = predict(model, image, tile_shape=12, normalization=([0.5], [0.25]), progress=False)
    for extra, options in (
        ([], dict(method="distance", h=1.0, min_size=4, fill_holes=True)),
        (["--method", "components", "--min-size", "0", "--no-fill-holes"], {}),
    ):
        out = tmp_path / f"out{len(extra)}"
        arguments = ["predict", str(tmp_path / "run"), str(tmp_path / "a.tif"), "--out", str(out)]
        status = main([*arguments, "--tile", "12", "--instances", "--no-progress", *extra])
        assert status == 0
        written = tifffile.imread(out / "a_instances.tif")
        assert relabel_equal(written, extract_instances(expected, **options))
    assert main([*arguments, "--min-size", "3"]) == 2
    assert "--min-size sets how --instances are extracted" in capsys.readouterr().err


def test_a_folder_of_slices_is_predicted_together_and_a_bad_slice_is_named(tmp_path, capsys):
    """Slices share forward passes (--batch-size 2 across files); a slice with NaN, found
    only while predicting, stops its pass: it is named, the others are all written."""
    model = save_run(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    slices = [rng.random((30, 30), dtype=np.float32) for _ in range(5)]
    slices[3][7, 9] = np.nan
    for number, image in enumerate(slices):
        tifffile.imwrite(images / f"{number:02d}.tif", image)
    out = tmp_path / "out"
    arguments = [str(tmp_path / "run"), str(images), "--out", str(out), "--no-progress"]

    status = main(["predict", *arguments, "--batch-size", "2", "--save-probabilities"])

    assert status == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert errors[0].startswith("unetile predict: error: ") and "03.tif: holds NaN" in errors[0]
    assert errors[1] == "unetile predict: 1 of 5 input(s) failed"
    written = [line.split(":")[0][-6:] for line in captured.out.splitlines()]
    assert written == ["00.tif", "01.tif", "02.tif", "04.tif"]
    assert sorted(p.name for p in out.iterdir() if p.name != OWNER_RECORD) == [
        f"{n:02d}_{kind}.tif" for n in (0, 1, 2, 4) for kind in ("labels", "probabilities")
    ]
    for number in (0, 1, 2, 4):
        alone = predict(model, slices[number], normalization=([0.5], [0.25]), progress=False)
        written = tifffile.imread(out / f"{number:02d}_probabilities.tif")
        assert np.abs(written - alone).max() < 1e-5


@pytest.mark.parametrize("output_format", ["tif", "zarr"])
def test_outputs_say_how_they_were_made(tmp_path, output_format):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "a.tif", np.random.default_rng(0).random((40, 36), np.float32))
    argv = ["predict", tmp_path / "run", tmp_path / "a.tif", "--out", tmp_path / "out"]
    argv += ["--precision", "fp32", "--tta", "--format", output_format, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    path = tmp_path / "out" / f"a_labels.{output_format}"
    if output_format == "zarr":
        stored = zarr.open_array(str(path), mode="r").attrs.asdict()
    else:
        with tifffile.TiffFile(path) as tiff:
            stored = tiff.shaped_metadata[0]
    made = stored["unetile"]
    assert made["precision"] == "fp32" and made["tta"] is True and made["batch_size"] == 1
    assert made["threshold"] is None and len(made["tile_shape"]) == 2


def test_region_runs_leave_the_device_to_each_worker(tmp_path, monkeypatch):
    import unetile.predict.regions as regions

    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 36), np.float32))
    seen = []

    def spy(model, image, options, **keywords):
        seen.append(options.device)
        return {}

    monkeypatch.setattr(regions, "predict_regions", spy)
    argv = ["predict", tmp_path / "run", tmp_path / "a.tif", "--out", tmp_path / "out"]
    assert main([str(a) for a in [*argv, "--resume", "--no-progress"]]) == 0
    assert main([str(a) for a in [*argv, "--resume", "--device", "cpu", "--no-progress"]]) == 0
    assert seen == [None, "cpu"]


def test_bad_post_processing_is_one_line_naming_its_source(tmp_path, capsys):
    save_run(tmp_path / "run")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 36), np.float32))
    argv = ["predict", tmp_path / "run", tmp_path / "a.tif", "--out", tmp_path / "out"]
    assert main([str(a) for a in [*argv, "--threshold", "1"]]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--threshold must be below 1 (no pixel would be foreground), got 1.0")
    )
    config = io.read_json(tmp_path / "run" / "config.json")
    config["instances"] = {"foreground_classes": [2]}
    io.write_json(tmp_path / "run" / "config.json", config)
    assert main([str(a) for a in [*argv, "--instances"]]) == 2
    error = capsys.readouterr().err.strip()
    assert "config.json: bad 'instances' entry (foreground class 2 is not one of the 2" in error
    assert len(error.splitlines()) == 1


def test_a_weights_file_with_a_broken_header_is_one_line(tmp_path, capsys):
    save_run(tmp_path / "run")
    header = b'{"w": {"dtype": "F32", "shape": null, "data_offsets": [0, 0]}}'
    (tmp_path / "run" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 36), np.float32))
    argv = ["predict", tmp_path / "run", tmp_path / "a.tif", "--out", tmp_path / "out"]
    assert main([str(a) for a in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert "model.safetensors: not a safetensors weights file (tensor 'w' has no shape)" in error


def test_post_and_its_keywords_are_not_both_given(tmp_path):
    from unetile.predict.files import predict_to_files
    from unetile.predict.postprocessing import PostProcessing

    model = save_run(tmp_path / "run")
    with pytest.raises(ValueError, match="give post or the keywords"):
        predict_to_files(
            model,
            np.zeros((40, 36), np.float32),
            labels=tmp_path / "l.tif",
            post=PostProcessing(),
            threshold=0.3,
        )


def test_a_segmenter_segments_arrays_and_files_with_the_post_processing_it_carries(tmp_path):
    from unetile.predict import PredictOptions
    from unetile.predict.outputs import Outputs
    from unetile.predict.segmenter import Segmenter

    save_run(tmp_path / "run", cell_bias=2.0)
    config = io.read_json(tmp_path / "run" / "config.json")
    config["calibration"] = {"threshold": 0.7}
    config["instances"] = {"method": "components", "min_size": 3, "threshold": 0.7}
    io.write_json(tmp_path / "run" / "config.json", config)
    segmenter = Segmenter.load(tmp_path / "run")
    assert segmenter.post.threshold == 0.7 and segmenter.post.instances.min_size == 3
    image = np.random.default_rng(2).random((48, 44), np.float32)
    result = segmenter.segment(image, tile_shape=20, progress=False)
    cells = result.probabilities[1] > 0.7
    np.testing.assert_array_equal(result.labels, cells)
    assert result.instances.max() > 0 and not result.instances[~cells].any()
    assert np.bincount(result.instances.ravel())[1:].min() >= 3  # the carried min_size
    looser = segmenter.with_post(threshold=0.3, min_size=0)
    assert looser.post.cells.threshold == 0.3 and segmenter.post.threshold == 0.7
    np.testing.assert_array_equal(
        looser.post.labels(result.probabilities), result.probabilities[1] > 0.3
    )
    tifffile.imwrite(tmp_path / "good.tif", image)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    said = []
    report = segmenter.segment_files(
        [tmp_path / "good.tif", tmp_path / "bad.tif"],
        Outputs(tmp_path / "out", instances=True),
        PredictOptions(tile_shape=20, progress=False),
        report=lambda path, written, reason: said.append((path.name, reason is None)),
    )
    assert [path.name for path, _ in report.written] == ["good.tif"]
    assert [path.name for path, _ in report.failed] == ["bad.tif"]
    assert sorted(said) == [("bad.tif", False), ("good.tif", True)]  # as they happen
    written = io.read_image(tmp_path / "out" / "good_labels.tif")
    np.testing.assert_array_equal(written, result.labels)
    objects = io.read_image(tmp_path / "out" / "good_instances.tif")
    np.testing.assert_array_equal(objects > 0, result.instances > 0)
