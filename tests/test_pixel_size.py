"""Physical pixel size: read from TIFF metadata, stored by training, checked by prediction."""

import numpy as np
import pytest
import tifffile
import torch

from unetile import io
from unetile.cli import main
from unetile.network.model import UNet
from unetile.predict import card, predict
from unetile.predict.scale import relative_difference, resample, scaled_shape
from unetile.train.loop import make_config, prepare_arrays, run_config, training_pixel_size

pytestmark = pytest.mark.fast


def test_pixel_size_is_read_from_ome_imagej_and_centimetre_tiffs(tmp_path):
    stack = np.zeros((2, 8, 8), np.uint8)
    ome = tmp_path / "ome.tif"
    tifffile.imwrite(
        ome,
        stack,
        ome=True,
        metadata={
            "axes": "ZYX",
            **{f"PhysicalSize{a}": v for a, v in zip("XYZ", (4.0, 5.0, 50.0), strict=True)},
            **{f"PhysicalSize{a}Unit": "nm" for a in "XYZ"},
        },
    )
    assert io.read_pixel_size(ome, dims=3) == pytest.approx((0.05, 0.005, 0.004))
    assert io.read_pixel_size(ome) == pytest.approx((0.005, 0.004))
    imagej = tmp_path / "imagej.tif"
    metadata = {"spacing": 0.5, "unit": "\\u00B5m", "axes": "ZYX"}
    tifffile.imwrite(imagej, stack, imagej=True, resolution=(20, 25), metadata=metadata)
    assert io.read_pixel_size(imagej, dims=3) == pytest.approx((0.5, 0.04, 0.05))
    centimetre = tmp_path / "cm.tif"
    tifffile.imwrite(centimetre, stack[0], resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    assert io.read_pixel_size(centimetre) == pytest.approx((0.5, 0.5))
    # Dots per inch are a printing setting; a bare TIFF or a PNG states nothing.
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, stack[0], resolution=(300, 300), resolutionunit="INCH")
    io.write_image(tmp_path / "plain.tif", stack[0])
    io.write_image(tmp_path / "plain.png", stack[0])
    assert io.read_pixel_size(tmp_path / "plain.tif") is None
    assert io.read_pixel_size(tmp_path / "plain.png") is None
    assert io.read_pixel_size(inch) is None
    assert io.read_pixel_size(imagej, dims=2) == pytest.approx((0.04, 0.05))


def write_imagej(path, array, size):
    tifffile.imwrite(
        path, array, imagej=True, resolution=(1 / size, 1 / size), metadata={"unit": "um"}
    )


def test_training_stores_the_images_pixel_size_and_refuses_a_mix(tmp_path):
    labels = np.full((16, 16), 255, np.uint8)
    for name in ("labels", "images"):
        (tmp_path / name).mkdir()
        write_imagej(tmp_path / name / "a.tif", labels, 0.01)
    config = make_config(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"))
    assert training_pixel_size(config) == pytest.approx((0.01, 0.01))
    write_imagej(tmp_path / "images" / "b.tif", labels, 0.012)
    with pytest.raises(
        io.InputError, match=r"b.tif: pixel size 0.012 x 0.012 µm differs from a.tif"
    ):
        training_pixel_size(config)
    stated = make_config(images=config.images, labels=config.labels, pixel_size="0.02")
    assert training_pixel_size(stated) == (0.02, 0.02)
    assert make_config(pixel_size=[0.1, 0.02, 0.02], dims=3).pixel_size == (0.1, 0.02, 0.02)
    with pytest.raises(ValueError, match="pixel size needs 1 or 2 positive values"):
        make_config(pixel_size=(0.1, 0.0))


def test_resampling_keeps_the_extent_labels_stay_labels():
    assert scaled_shape((100, 61), (0.008, 0.006), (0.004, 0.004)) == (200, 92)
    assert relative_difference((5.0, 5.0), (4.0, 4.0)) == pytest.approx(0.25)
    labels = np.array([[0, 0, 7, 7], [0, 0, 7, 7]], np.uint32)
    np.testing.assert_array_equal(
        resample(labels, (4, 8), labels=True), np.repeat(np.repeat(labels, 2, 0), 2, 1)
    )
    assert resample(labels, (4, 8), labels=True).dtype == np.uint32
    image = np.stack([np.linspace(0, 1, 16).reshape(4, 4)] * 2)
    assert resample(image, (8, 8)).shape == (2, 8, 8)


@pytest.fixture
def run_at_10nm(tmp_path):
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2, dropout=0.0)
    config = {
        "model": model.config.to_dict(),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "classes": {"foreground": 1},
        "pixel_size_um": [0.01, 0.01],
    }
    card.save_model(tmp_path / "run", model, config)
    return tmp_path / "run", model.eval()


def predict_command(tmp_path, *extra):
    return [
        "predict",
        str(tmp_path / "run"),
        str(tmp_path / "in.tif"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--save-probabilities",
        *extra,
    ]


def test_prediction_warns_when_the_pixel_size_differs_by_more_than_20_percent(
    tmp_path, run_at_10nm, capsys
):
    image = np.random.default_rng(0).random((30, 26), dtype=np.float32)
    write_imagej(tmp_path / "in.tif", image, 0.0115)  # 15 %: no warning
    assert main(predict_command(tmp_path)) == 0
    assert "warning" not in capsys.readouterr().err
    write_imagej(tmp_path / "in.tif", image, 0.02)
    assert main(predict_command(tmp_path)) == 0
    assert capsys.readouterr().err.strip() == (
        f"unetile predict: warning: {tmp_path / 'in.tif'}: pixel size 0.02 x 0.02 µm differs "
        f"from the model's 0.01 x 0.01 µm by 100% (more than 20%): structures look smaller "
        f"than in training; add --rescale"
    )
    # A stated pixel size overrides the file's.
    assert main(predict_command(tmp_path, "--pixel-size", "0.01")) == 0
    assert "warning" not in capsys.readouterr().err


def test_rescale_predicts_at_the_models_pixel_size_and_returns_the_inputs_shape(
    tmp_path, run_at_10nm, capsys
):
    run, model = run_at_10nm
    image = np.random.default_rng(1).random((30, 26), dtype=np.float32)
    write_imagej(tmp_path / "in.tif", image, 0.02)
    assert main(predict_command(tmp_path, "--rescale")) == 0
    probabilities = tifffile.imread(tmp_path / "out" / "in_probabilities.tif")
    labels = tifffile.imread(tmp_path / "out" / "in_labels.tif")
    assert probabilities.shape == (2, 30, 26) and labels.shape == (30, 26)
    # The same as resampling by hand: twice the pixels, predicted, and back.
    scaled = predict(model, resample(image, (60, 52)), normalization={"mean": [0.5], "std": [0.25]})
    np.testing.assert_allclose(probabilities, resample(scaled, (30, 26)), atol=1e-5)
    np.testing.assert_array_equal(
        labels, resample(scaled.argmax(0).astype(np.uint8), (30, 26), labels=True)
    )
    # Without a pixel size there is nothing to rescale from: one line, status 2.
    io.write_image(tmp_path / "in.tif", image)
    capsys.readouterr()
    assert main(predict_command(tmp_path, "--rescale")) == 2
    assert (
        "states no pixel size to --rescale from; give it with --pixel-size"
        in capsys.readouterr().err
    )


def test_rescale_needs_a_model_with_a_pixel_size(tmp_path, capsys):
    model = UNet(base_channels=2, depth=2, dropout=0.0)
    card.save_model(
        tmp_path / "run", model, {"model": model.config.to_dict(), "normalization": None}
    )
    io.write_image(tmp_path / "in.tif", np.zeros((20, 20), np.float32))
    assert main(predict_command(tmp_path, "--rescale", "--pixel-size", "0.01")) == 2
    assert "the model has no pixel size to --rescale to" in capsys.readouterr().err


def test_prepare_arrays_takes_the_stated_pixel_size():
    config = make_config(depth=2, base_channels=2, tile=(28,), pixel_size=0.005)
    label = np.full((40, 40), 255, np.uint8)
    label[::10] = 0
    data = prepare_arrays(config, [label.astype(np.float32)], [label])
    assert data.pixel_size == (0.005, 0.005)
    assert run_config(config, data)["pixel_size_um"] == [0.005, 0.005]
