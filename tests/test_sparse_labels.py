"""Sparse annotations: an ignore value in the labels (loss, weight map, scores)."""

import math

import numpy as np
import pytest

from unetile.cli import main
from unetile.data.dataset import IGNORE, TileSampler, labels_to_classes
from unetile.data.weights import weight_map
from unetile.evaluate.metrics import score
from unetile.train.loop import make_config, prepare_arrays

pytestmark = pytest.mark.fast

U = 7  # the ignore value of these hand-made labels


def test_unknown_pixels_weigh_zero_and_distances_pass_through_them():
    # Cell 1 | background | unknown | background | cell 2: the gap is 3 px wide,
    # its middle pixel unknown. d1 + d2 = 1 + 3 - 1 = 3 at both background pixels.
    instances = np.array([[1, 1, 0, 0, 0, 2, 2]])
    unknown = np.array([[0, 0, 0, 1, 0, 0, 0]], bool)
    weights = weight_map(instances, class_weights=None, unknown=unknown)
    border = 10 * math.exp(-9 / 50)
    np.testing.assert_allclose(weights[0], [1, 1, 1 + border, 0, 1 + border, 1, 1], rtol=1e-6)
    # Class balance over the 6 annotated pixels: 2 background, 4 cell -> 6/4 and 6/8.
    balanced = weight_map(instances, unknown=unknown)
    np.testing.assert_allclose(
        balanced[0], [0.75, 0.75, 1.5 + border, 0, 1.5 + border, 0.75, 0.75], rtol=1e-6
    )
    with pytest.raises(ValueError, match="cannot be cells"):
        weight_map(instances, unknown=instances > 0)


def test_unknown_pixels_do_not_split_a_cell_into_two():
    # Membrane map: a cell crossed by one unknown pixel, then membrane.
    label = np.array([[255, 255, U, 255, 255, 0, 0, 0]], np.uint8)
    classes, instances = labels_to_classes(label, "membrane", ignore_value=U)
    np.testing.assert_array_equal(classes[0], [1, 1, IGNORE, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(instances[0], [1, 1, 0, 1, 1, 0, 0, 0])
    # One cell: no border term anywhere.
    weights = weight_map(instances, class_weights=None, unknown=classes == IGNORE)
    np.testing.assert_allclose(weights[0], [1, 1, 0, 1, 1, 1, 1, 1])
    # Read as membrane instead, the unknown pixel would be a 1-px gap between two
    # cells: pixel 5 would get d1 + d2 = 1 + 4 - 1 = 4, a border term of 10 exp(-16/50).
    as_membrane = labels_to_classes(np.where(label == U, 0, label), "membrane")[1]
    assert weight_map(as_membrane, class_weights=None)[0, 5] == pytest.approx(
        1 + 10 * math.exp(-16 / 50), rel=1e-6
    )


def test_unknown_pixels_are_no_border_in_instance_and_class_labels():
    touching = np.array([[1, 1, U, U], [1, 1, 2, 2]])
    classes, instances = labels_to_classes(touching, "instances", ignore_value=U)
    # Cells 1 and 2 touch: a background line between them; cell 1 meets the unknown: none.
    np.testing.assert_array_equal(classes, [[1, 1, IGNORE, IGNORE], [1, 0, 0, 1]])
    np.testing.assert_array_equal(instances, [[1, 1, 0, 0], [1, 0, 0, 2]])
    # Classes: two regions of class 2 joined only through the unknown are one cell.
    label = np.array([[2, U, 2, 0, 1]])
    classes, instances = labels_to_classes(label, "classes", num_classes=3, ignore_value=U)
    np.testing.assert_array_equal(classes[0], [2, IGNORE, 2, 0, 1])
    assert instances[0, 0] == instances[0, 2] != instances[0, 4] and instances[0, 1] == 0
    with pytest.raises(ValueError, match="equals the cell value"):
        labels_to_classes(label, "membrane", cell_value=U, ignore_value=U)


def test_ignored_pixels_reach_the_loss_as_ignore_with_weight_zero():
    rng = np.random.default_rng(0)
    label = np.where(np.arange(40)[None, :] % 10 < 8, 255, 0).repeat(40, 0).astype(np.uint8)
    label[:, 20:] = U  # the right half is not annotated
    config = make_config(depth=2, base_channels=2, tile=(24,), ignore_value=U, w0=10.0)
    data = prepare_arrays(config, [rng.normal(size=(40, 40))], [label])
    item = data.train[0]
    assert np.all(item.classes[:, 20:] == IGNORE) and np.all(item.weights[:, 20:] == 0)
    assert np.all(item.classes[:, :20] >= 0) and np.all(item.weights[:, :20] > 0)
    sampler = TileSampler(
        data.train, (28, 28), (12, 12), data.normalization, None, np.random.default_rng(1)
    )
    _, labels, weights = sampler.tiles_at([(0, (20, 26))])
    assert bool((labels[0] == IGNORE).eq(weights[0] == 0).all())
    assert int((labels[0] == IGNORE).sum()) == 12 * 12


def test_ignored_pixels_are_not_scored():
    truth = np.zeros((4, 4), np.uint8)
    truth[:, :2] = 255
    truth[3, :] = U
    prediction = (truth == 255).astype(np.uint8) * 255
    prediction[3, :] = [0, 255, 255, 0]  # wrong only where nothing is annotated
    result = score(prediction, truth, ["pixel_error", "iou", "rand_error"], ignore_value=U)
    assert result == {"pixel_error": 0.0, "iou": 1.0, "iou_background": 1.0, "rand_error": 0.0}
    prediction[0, 3] = 255  # one wrong pixel of the 12 annotated ones
    result = score(prediction, truth, ["pixel_error", "iou"], ignore_value=U)
    assert result["pixel_error"] == pytest.approx(1 / 12)
    assert result["iou"] == pytest.approx(6 / 7)  # 6 cell pixels, 1 false
    # Unmasked, the row of unknown pixels would count (and U is no binary value).
    with pytest.raises(ValueError, match="warping error needs a complete annotation"):
        score(prediction, truth, ["warping_error"], ignore_value=U)


def test_evaluate_cli_ignores_the_value(tmp_path, capsys):
    from unetile import io

    truth = np.zeros((6, 6), np.uint8)
    truth[:, :3] = 255
    truth[:2, :] = U
    prediction = np.where(truth == 255, 255, 0).astype(np.uint8)
    prediction[0, :] = 255
    io.write_image(tmp_path / "gt.tif", truth)
    io.write_image(tmp_path / "pred.tif", prediction)
    report = tmp_path / "scores.json"
    code = main(
        ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif")]
        + ["--ignore-value", str(U), "--json", str(report)]
    )
    assert code == 0
    mean = io.read_json(report)["mean"]
    assert mean["pixel_error"] == 0.0 and "warping_error" not in mean


def test_validation_scores_only_the_annotated_pixels():
    import torch

    from unetile.data.dataset import LabeledImage
    from unetile.network.model import UNet
    from unetile.train.loop import validate

    model = UNet(depth=2, base_channels=2, dropout=0.0)
    with torch.no_grad():
        model.classifier.bias[1] = 100.0  # "cell" everywhere
    classes = np.full((44, 44), IGNORE, np.int64)
    classes[:, :22] = 1
    classes[:, 0] = 0  # 44 membrane pixels among the 968 annotated ones
    item = LabeledImage("v", np.zeros((1, 44, 44), np.float32), classes, classes.clip(0), None)
    config = make_config(depth=2, base_channels=2, metrics="pixel_error", keep_best="pixel_error")
    sparse = make_config(**{**config.to_dict(), "ignore_value": U})
    values = validate(model, [item], sparse, None, (28, 28), torch.device("cpu"))
    assert values["pixel_error"] == pytest.approx(44 / 968)
    # Annotated as membrane instead, the right half counts.
    complete = LabeledImage("v", item.image, classes.clip(0), classes.clip(0), None)
    values = validate(model, [complete], config, None, (28, 28), torch.device("cpu"))
    assert values["pixel_error"] == pytest.approx((44 + 44 * 22) / 44**2)
