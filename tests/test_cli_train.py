import csv
import json
from dataclasses import fields

import numpy as np
import pytest

from unetile import io
from unetile.cli import build_parser, main
from unetile.predict import card
from unetile.train.loop import TrainConfig

pytestmark = pytest.mark.fast


def write_dataset(root, names=("a", "b"), size=40, seed=0):
    """Tiny TIFF pairs: bright 8-px squares (cells, 255) on dark 2-px membranes (0)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(names):
        membrane = np.zeros((size, size), np.uint8)
        for top in range(index, size, 10):
            for left in range(index, size, 10):
                membrane[top : top + 8, left : left + 8] = 255
        noise = rng.integers(0, 40, size=membrane.shape)
        image = np.clip(membrane * 0.7 + noise, 0, 255).astype(np.uint8)
        io.write_image(root / "images" / f"{name}.tif", image)
        io.write_image(root / "labels" / f"{name}.tif", membrane)
    return root / "images", root / "labels"


@pytest.fixture
def dataset(tmp_path):
    images, labels = write_dataset(tmp_path / "train")
    val_images, val_labels = write_dataset(tmp_path / "val", names=("c",), seed=1)
    options = tmp_path / "options.toml"
    options.write_text(
        "\n".join(
            [
                "depth = 2",
                "base-channels = 4",
                "tile = 36",
                "steps = 2",
                "optimizer = 'adam'",
                "learning_rate = 0.01",
                "validate_every = 2",
                "log_every = 1",
                "threads = 1",
                "keep_best = 'iou'",
                "[augment]",
                "elastic_sigma = 4.0",
                "gray = false",
            ]
        )
        + "\n"
    )
    return tmp_path, images, labels, val_images, val_labels, options


def test_cli_trains_with_toml_options_overridden_by_the_command_line(dataset, capsys):
    root, images, labels, val_images, val_labels, options = dataset
    run = root / "run"
    code = main(
        ["train", "--images", str(images), "--labels", str(labels)]
        + ["--val-images", str(val_images), "--val-labels", str(val_labels)]
        + ["--out", str(run), "--config", str(options), "--steps", "4", "--quiet"]
    )
    assert code == 0
    model, saved = card.load_model(run)
    training = saved["training"]
    assert training["steps"] == 4  # the command line beats the file's 2
    assert training["depth"] == 2 and training["base_channels"] == 4  # from the file
    assert training["tile"] == [36] and saved["tile"]["output_shape"] == [36, 36]
    assert training["augment"]["elastic_sigma"] == 4.0 and training["augment"]["gray"] is False
    assert training["augment"]["rotation"] is True  # untouched fields keep the paper's value
    assert model.config.base_channels == 4
    with open(run / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[1]["val_iou"] and rows[3]["val_iou"] and not rows[0]["val_iou"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == "iou" and summary["best_step"] in (2, 4)
    assert (run / "last.safetensors").is_file() and (run / "curves.png").is_file()

    # --resume with only --out: the stored options, more steps from the command line.
    code = main(["train", "--out", str(run), "--resume", "--steps", "6", "--quiet"])
    assert code == 0
    with open(run / "log.csv") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == [str(s) for s in range(1, 7)]
    assert io.read_json(run / "config.json")["training"]["steps"] == 6


def test_unknown_toml_key_names_the_file_and_the_key(dataset, capsys):
    root, images, labels, *_ = dataset
    bad = root / "bad.toml"
    bad.write_text("steps = 2\nlearning_rat = 0.1\n")
    code = main(
        ["train", "--images", str(images), "--labels", str(labels), "--out", str(root / "r")]
        + ["--config", str(bad)]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "bad.toml: unknown option 'learning_rat'" in error and "\n" not in error
    bad.write_text("[augment]\nelastic_sigmaa = 3\n")
    assert main(["train", "--out", str(root / "r"), "--config", str(bad)]) == 2
    assert "bad.toml: unknown option 'elastic_sigmaa' in [augment]" in capsys.readouterr().err


def test_bad_data_fails_before_training_with_one_line(dataset, capsys):
    root, images, labels, *_ = dataset
    io.write_image(labels / "a.tif", np.zeros((30, 40), np.uint8))
    code = main(
        ["train", "--images", str(images), "--labels", str(labels), "--out", str(root / "r")]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "labels/a.tif: shape (30, 40) differs from image a.tif (40, 40)" in error
    assert not (root / "r" / "checkpoint.safetensors").exists()


def test_missing_required_options_and_bad_values_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--images is required" in capsys.readouterr().err
    code = main(["train", "--images", "x", "--labels", "y", "--out", "z", "--lr", "-1"])
    assert code == 2
    assert "learning_rate must be a finite number in (0, 10]" in capsys.readouterr().err


def test_help_documents_every_option_with_its_default():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    destinations = {action.dest for action in train_parser._actions}
    options = {f.name for f in fields(TrainConfig) if f.metadata["flag"] is not False}
    missing = options - destinations
    assert not missing, f"TrainConfig fields without a command-line option: {missing}"
    text = " ".join(train_parser.format_help().split())  # the same at any terminal width
    for expected in (
        "--lr X learning rate (default: 0.0001)",
        "SGD momentum (paper: 0.99) (default: 0.99)",
        "--steps N training steps (default: 10000)",
        "'membrane': binary map, --cell-value marks cells",
        "an [augment] table (elastic, elastic_sigma,",
    ):
        assert expected in text, expected
    for action in train_parser._actions:
        if action.dest in {f.name for f in fields(TrainConfig)}:
            assert "(default: " in action.help, action.dest


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "gpu"], "--device"),
        (["--sigma", "0"], "sigma must be a finite number in (0, 1000]"),
        (["--w0", "-1"], "w0 must be a finite number in [0, 1000]"),
        (["--foreground", "5"], "--foreground 5 is not a class"),
        (["--resume"], "holds no checkpoint"),
    ],
)
def test_bad_options_are_one_line_errors(dataset, capsys, options, message):
    root, images, labels, _, _, _ = dataset
    code = main(
        ["train", "--images", str(images), "--labels", str(labels), "--out", str(root / "r")]
        + options
    )
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_validation_image_without_cells_is_named_at_start_up(dataset, capsys):
    root, images, labels, val_images, val_labels, _ = dataset
    io.write_image(val_labels / "c.tif", np.zeros((40, 40), np.uint8))
    code = main(
        ["train", "--images", str(images), "--labels", str(labels), "--out", str(root / "r")]
        + ["--val-images", str(val_images), "--val-labels", str(val_labels), "--steps", "1"]
    )
    assert code == 2
    assert "c: no pixel of the foreground class 1" in capsys.readouterr().err
    assert not (root / "r" / "checkpoint.safetensors").exists()
