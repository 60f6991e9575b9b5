import json
import random

import numpy as np
import pytest
import torch

from unetile import io
from unetile.cli import main
from unetile.data.augment import AugmentParams
from unetile.data.dataset import LabeledImage, TileSampler, compute_weight_map, labels_to_classes
from unetile.data.holdout import MIN_STRIP, choose_images, evenly_spaced, split
from unetile.predict import card
from unetile.train.loop import make_config, prepare_arrays
from unetile.train.run import train


def membrane_map(shape, offset=0):
    """Bright 8-px square cells (255) on 2-px membranes (0)."""
    membrane = np.zeros(shape, np.uint8)
    for top in range(offset, shape[0], 10):
        for left in range(offset, shape[1], 10):
            membrane[top : top + 8, left : left + 8] = 255
    return membrane


def labeled(name, membrane, image=None):
    classes, instances = labels_to_classes(membrane, "membrane")
    image = membrane.astype(np.float32) if image is None else image
    return LabeledImage(name, image[np.newaxis], classes, instances, np.ones(classes.shape))


def test_whole_images_are_held_out_evenly_by_name_whatever_their_order():
    names = [f"{index:02d}" for index in range(25)]
    items = [labeled(name, membrane_map((20, 20))) for name in names]
    train_items, validation, record = split(items, 0.12)
    # round(0.12 * 25) = 3, in the middle of each third of the sorted names.
    assert evenly_spaced(25, 3) == [4, 12, 20]
    assert record == {"fraction": 0.12, "kind": "images", "images": ["04", "12", "20"], "of": 25}
    assert [item.name for item in validation] == ["04", "12", "20"]
    train_names = {item.name for item in train_items}
    assert len(train_names) == 22 and not train_names & set(record["images"])
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    assert split(shuffled, 0.12)[2] == record
    # At least one image, never more than the fraction allows.
    assert choose_images(names[:4], [True] * 4, 0.01) == ["02"]
    assert len(choose_images(names[:10], [True] * 10, 0.5)) == 5


def test_images_without_cells_are_never_held_out():
    items = [labeled(f"{index}", membrane_map((20, 20))) for index in range(6)]
    for index in (1, 4):
        items[index] = labeled(f"{index}", np.zeros((20, 20), np.uint8))
    _, validation, record = split(items, 0.34)
    assert record["images"] == ["2", "5"]  # the 2nd and 4th of 0, 2, 3, 5
    assert all(np.any(item.classes == 1) for item in validation)


def test_few_images_give_a_strip_at_the_far_end_of_the_longest_axis():
    membrane = membrane_map((48, 100))
    image = np.arange(48 * 100, dtype=np.float32).reshape(48, 100)
    train_items, validation, record = split([labeled("a", membrane, image)], 0.2)
    # ceil(0.2 * 100) = 20 px is under the 32 px minimum.
    assert MIN_STRIP == 32
    assert record["strips"] == [
        {"image": "a", "axis": 1, "start": 68, "stop": 100, "region": "[:, 68:100]"}
    ]
    (part,), (strip,) = train_items, validation
    np.testing.assert_array_equal(part.image[0], image[:, :68])
    np.testing.assert_array_equal(strip.image[0], image[:, 68:])
    np.testing.assert_array_equal(strip.classes, labels_to_classes(membrane, "membrane")[0][:, 68:])
    # A larger fraction: ceil(0.4 * 100) = 40 px.
    assert split([labeled("a", membrane)], 0.4)[2]["strips"][0]["start"] == 60
    # No cell at the far end: the near end is held out.
    membrane[:, 60:] = 0
    assert split([labeled("a", membrane)], 0.2)[2]["strips"][0]["region"] == "[:, 0:32]"
    with pytest.raises(ValueError, match="a: 60 px along its longest axis cannot give a 32 px"):
        split([labeled("a", membrane_map((40, 60)))], 0.2)  # the strip would be the larger
    assert split([labeled("a", membrane_map((40, 64)))], 0.2)[2]["strips"][0]["start"] == 32


def test_the_training_part_and_its_weight_map_never_see_the_held_out_strip(tmp_path):
    # The strip's pixels are 1000: one read of them would show in a tile.
    membrane = membrane_map((64, 128))
    image = (membrane / 255.0).astype(np.float32)
    image[:, 96:] = 1000.0
    config = make_config(holdout=0.25, depth=2, base_channels=4, tile=(20,), w0=10.0, sigma=3.0)
    data = prepare_arrays(config, [image], [membrane])
    assert data.holdout["strips"][0]["region"] == "[:, 96:128]"
    (part,) = data.train
    assert part.image.shape == (1, 64, 96) and part.image.max() <= 1.0
    assert data.normalization["mean"][0] < 1.0  # normalised on the training part alone
    # The weight map is that of the part's own labels.
    classes, instances = labels_to_classes(membrane[:, :96], "membrane")
    np.testing.assert_array_equal(part.classes, classes)
    expected = compute_weight_map(instances, classes, w0=10.0, sigma=3.0)
    np.testing.assert_allclose(part.weights, expected, rtol=1e-6)
    augment = AugmentParams(gray=False)
    rng = np.random.default_rng(0)
    sampler = TileSampler(data.train, data.input_shape, data.output_shape, None, augment, rng)
    reads = [sampler.sample(4)[0].max().item() for _ in range(40)]
    assert max(reads) < 10.0  # intensity augmentation aside, the part holds 0..1
    # The same sampler over the whole image reads the strip: the check above can fail.
    zeros = np.zeros((64, 128), np.int64)
    whole = LabeledImage("a", image[np.newaxis], zeros, zeros, np.ones((64, 128), np.float32))
    sampler = TileSampler([whole], data.input_shape, data.output_shape, None, augment, rng)
    assert max(sampler.sample(4)[0].max().item() for _ in range(40)) >= 1000.0


def write_pairs(root, count, shape=(40, 40)):
    rng = np.random.default_rng(0)
    for index in range(count):
        membrane = membrane_map(shape, index % 3)
        noise = rng.integers(0, 40, size=shape)
        image = np.clip(membrane * 0.7 + noise, 0, 255).astype(np.uint8)
        io.write_image(root / "images" / f"{index:02d}.png", image)
        io.write_image(root / "labels" / f"{index:02d}.png", membrane)
    return root / "images", root / "labels"


def tiny_options(out, images, labels, **changes):
    options = dict(
        images=str(images),
        labels=str(labels),
        out=str(out),
        depth=2,
        base_channels=4,
        tile=(20,),
        steps=4,
        validate_every=2,
        log_every=1,
        optimizer="adam",
        learning_rate=0.01,
        augment="none",
        dropout=0.0,
        threads=1,
        holdout=0.25,
    )
    options.update(changes)
    return make_config(**options)


def test_resume_holds_out_the_same_images_and_ends_as_a_straight_run(tmp_path):
    images, labels = write_pairs(tmp_path / "data", 5)
    straight = train(tiny_options(tmp_path / "straight", images, labels), progress=False)
    config = tiny_options(tmp_path / "resumed", images, labels)
    notes = []
    first = train(config, progress=False, stop_after=2, notes=notes.append)
    stored = io.read_json(tmp_path / "resumed" / "config.json")["holdout"]
    assert stored == {"fraction": 0.25, "kind": "images", "images": ["02"], "of": 5}
    assert notes == ["holding out 1 of 5 images for validation: 02; --no-holdout to train on all"]
    assert first["interrupted"]
    second = train(config, resume=True, progress=False)
    assert io.read_json(tmp_path / "resumed" / "config.json")["holdout"] == stored
    assert second["validation"] == straight["validation"]
    assert second["best_value"] == straight["best_value"]
    a, _ = card.load_model(tmp_path / "straight")
    b, _ = card.load_model(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_cli_holdout_gives_way_to_validation_images_and_to_no_holdout(tmp_path, capsys):
    images, labels = write_pairs(tmp_path / "data", 2, shape=(40, 72))
    val_images, val_labels = write_pairs(tmp_path / "val", 1)
    toml = tmp_path / "options.toml"
    toml.write_text("holdout = 0.2\n")
    common = ["train", "--images", str(images), "--labels", str(labels), "--depth", "2"]
    common += ["--base-channels", "4", "--tile", "20", "--steps", "1", "--threads", "1"]
    common += ["--augment", "none", "--quiet"]
    off = ["--out", str(tmp_path / "off"), "--config", str(toml), "--no-holdout"]
    assert main([*common, *off]) == 0
    assert json.loads((tmp_path / "off" / "config.json").read_text())["holdout"] is None
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "both"), "--holdout", "0.2", "--no-holdout"]) == 2
    assert "give one" in capsys.readouterr().err
    common.remove("--quiet")
    code = main(
        [*common, "--out", str(tmp_path / "given"), "--config", str(toml)]
        + ["--val-images", str(val_images), "--val-labels", str(val_labels)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "validating on the given validation images; --holdout 0.2 unused" in out
    saved = json.loads((tmp_path / "given" / "config.json").read_text())
    assert saved["holdout"] is None and saved["calibration"]["images"] == 1
    assert "calibrated threshold" in out and "predict uses it" in out
    assert main([*common, "--out", str(tmp_path / "strips"), "--holdout", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "holding out a strip of 2 training image(s) for validation" in out
    assert "00[:, 36:72], 01[:, 36:72]" in out
    assert main([*common, "--out", str(tmp_path / "bad"), "--holdout", "0.6"]) == 2
    assert "holdout must be" in capsys.readouterr().err
