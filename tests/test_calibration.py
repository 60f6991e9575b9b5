import json

import numpy as np
import pytest
import torch
from test_holdout import write_pairs

from unetile import io
from unetile.cli import main
from unetile.evaluate.calibration import THRESHOLDS, calibrate_threshold
from unetile.network.model import UNet, UNetConfig
from unetile.predict import card, predict
from unetile.predict.files import predict_to_files
from unetile.predict.instances import InstanceOptions
from unetile.predict.postprocessing import PostProcessing, labels_from_probabilities
from unetile.train.loop import make_config
from unetile.train.run import train


def test_the_sweep_picks_the_threshold_of_the_best_mean_over_images():
    truth = np.zeros((16, 16), bool)
    truth[:, :6] = True
    # Cells at 0.42 over a 0.22 background: right for 0.22 <= t < 0.42 (p > t) ...
    first = np.where(truth, 0.42, 0.22)
    # ... and at 0.62 over 0.32: right for 0.32 <= t < 0.62. Together: 0.35 and 0.40.
    second = np.where(truth, 0.62, 0.32)
    result = calibrate_threshold([first, second], [truth, truth], "pixel_error")
    assert result["threshold"] == 0.4  # of the two perfect ones, the nearer to 0.5
    assert result["value"] == 0.0
    # At 0.5 the first image loses its cells (6 of 16 columns), the second is right.
    assert result["at_0.5"] == pytest.approx(6 / 16 / 2)
    assert result["images"] == 2 and result["metric"] == "pixel_error"
    assert result["sweep"]["0.3"] == pytest.approx(10 / 16 / 2)  # the second image: all cells
    assert len(result["sweep"]) == len(THRESHOLDS) == 19
    # A score is maximised: IoU is 1 where the pixel error is 0.
    assert calibrate_threshold([first, second], [truth, truth], "iou")["threshold"] == 0.4
    # A map that says nothing keeps the argmax.
    flat = calibrate_threshold([np.full((16, 16), 0.7)], [truth], "rand_error")
    assert flat["threshold"] == 0.5 and flat["value"] == flat["at_0.5"]
    with pytest.raises(ValueError, match="must include 0.5"):
        calibrate_threshold([first], [truth], "iou", thresholds=(0.2, 0.3))


def test_labels_from_probabilities_thresholds_the_foreground_of_two_classes():
    cell = np.array([[0.9, 0.5, 0.36, 0.34, 0.1]])
    probabilities = np.stack([1 - cell, cell])
    assert labels_from_probabilities(probabilities).tolist() == [[1, 0, 0, 0, 0]]
    assert labels_from_probabilities(probabilities, 0.35).tolist() == [[1, 1, 1, 0, 0]]
    assert labels_from_probabilities(probabilities, 0.35, foreground=0).tolist() == [
        [1, 0, 0, 0, 0]  # class 0 where 1 - cell > 0.35
    ]
    with pytest.raises(ValueError, match="two classes; got 3"):
        labels_from_probabilities(np.full((3, 1, 2), 1 / 3), 0.3)


@pytest.fixture
def random_model():
    model = UNet.from_config(UNetConfig(depth=2, base_channels=2, dropout=0.0))
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model.eval()


def test_predict_to_files_draws_labels_and_instances_at_the_models_threshold(
    tmp_path, random_model
):
    image = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    cell = predict(random_model, image, tile_shape=20, progress=False)[1]
    threshold = float(np.quantile(cell, 0.3))  # far from 0.5 for an untrained network
    assert np.mean(cell > threshold) != pytest.approx(np.mean(cell > 0.5), abs=0.05)

    def written(name, **options):
        paths = predict_to_files(
            random_model,
            image,
            labels=tmp_path / f"{name}_labels.tif",
            instances=tmp_path / f"{name}_instances.tif",
            tile_shape=20,
            progress=False,
            **options,
        )
        return io.read_image(paths["labels"]), io.read_image(paths["instances"])

    labels, _ = written("plain")
    np.testing.assert_array_equal(labels, cell > 0.5)  # no calibration: the argmax
    random_model.threshold = threshold
    labels, instances = written("calibrated")
    np.testing.assert_array_equal(labels, cell > threshold)
    np.testing.assert_array_equal(instances > 0, cell > threshold)
    labels, _ = written("overridden", threshold=0.5)
    np.testing.assert_array_equal(labels, cell > 0.5)
    # Instances that need whole objects (read region by region) follow the threshold too.
    watershed = InstanceOptions(method="watershed", seed_threshold=0.99, fill_holes=False)
    paths = predict_to_files(
        random_model,
        image,
        instances=tmp_path / "w_instances.tif",
        instance_options=watershed,
        tile_shape=20,
        progress=False,
    )
    np.testing.assert_array_equal(io.read_image(paths["instances"]) > 0, cell > threshold)
    with pytest.raises(ValueError, match="must be below 1"):
        PostProcessing(threshold=1.0)


def test_training_calibrates_and_predict_and_evaluate_use_it(tmp_path, capsys):
    images, labels = write_pairs(tmp_path / "data", 4)
    config = make_config(
        images=str(images),
        labels=str(labels),
        out=str(tmp_path / "run"),
        depth=2,
        base_channels=4,
        tile=(20,),
        steps=6,
        validate_every=3,
        optimizer="adam",
        learning_rate=0.01,
        augment="none",
        dropout=0.0,
        threads=1,
        holdout=0.25,
        keep_best="rand_error",
    )
    summary = train(config, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    calibration = saved["calibration"]
    assert saved["holdout"]["images"] == ["02"]
    assert saved["instances"]["threshold"] == calibration["threshold"]  # cells as the labels
    assert summary["calibration"] == calibration and calibration["images"] == 1
    assert calibration["threshold"] in THRESHOLDS and calibration["metric"] == "rand_error"
    # Scored as validation scores the kept model: at 0.5 it is the best validation value.
    assert calibration["at_0.5"] == pytest.approx(summary["best_value"], abs=1e-9)
    assert calibration["value"] <= calibration["at_0.5"]
    model, _ = card.load_model(tmp_path / "run")
    assert model.threshold == calibration["threshold"]
    held_out = images / "02.png"
    out = tmp_path / "predicted"
    argv = ["predict", str(tmp_path / "run"), str(held_out), "--out", str(out), "--no-progress"]
    assert main([*argv, "--save-probabilities"]) == 0
    assert f"calibrated threshold {calibration['threshold']:g}" in capsys.readouterr().out
    cell = io.read_image(out / "02_probabilities.tif")[1]
    np.testing.assert_array_equal(io.read_image(out / "02_labels.tif"), cell > model.threshold)
    # evaluate: the labels carry the threshold; probabilities at the model's threshold agree.
    truth = labels / "02.png"
    scored = {}
    for name, extra in (
        ("labels", [str(out / "02_labels.tif"), str(truth)]),
        ("model", [str(out / "02_probabilities.tif"), str(truth), "--probabilities"]),
    ):
        extra += ["--metrics", "rand_error", "--json", str(tmp_path / f"{name}.json")]
        if name == "model":
            extra += ["--model", str(tmp_path / "run")]
        assert main(["evaluate", *extra]) == 0
        scored[name] = json.loads((tmp_path / f"{name}.json").read_text())["mean"]
    assert scored["labels"]["rand_error"] == pytest.approx(scored["model"]["rand_error"])
    assert scored["model"]["rand_error"] == pytest.approx(calibration["value"], abs=1e-6)
    assert scored["model"]["rand_error_threshold"] == calibration["threshold"]
    # --threshold overrides the calibration.
    assert main([*argv, "--threshold", "0.5", "--out", str(tmp_path / "at_half")]) == 0
    at_half = io.read_image(tmp_path / "at_half" / "02_labels.tif")
    np.testing.assert_array_equal(at_half, cell > 0.5)
    capsys.readouterr()
    assert main(["evaluate", str(out), str(labels / "02.png"), "--threshold", "0.3"]) == 2
    assert "add --probabilities" in capsys.readouterr().err
