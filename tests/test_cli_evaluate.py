"""End-to-end tests of ``unetile evaluate`` on tiny files written to tmp_path."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from unetile import io
from unetile.cli import main

pytestmark = pytest.mark.fast


def two_cells() -> np.ndarray:
    """12x12 uint8 map, 255 = cell: a membrane frame and a membrane at column 5."""
    cells = np.zeros((12, 12), np.uint8)
    cells[1:-1, 1:-1] = 255
    cells[:, 5] = 0
    return cells


@pytest.fixture
def folders(tmp_path):
    truth = tmp_path / "truth"
    prediction = tmp_path / "prediction"
    io.write_image(truth / "a.png", two_cells())
    io.write_image(truth / "b.png", two_cells())
    io.write_image(prediction / "a.png", two_cells())  # perfect
    cut = two_cells()
    cut[6, 1:5] = 0  # a spurious membrane across the left cell: 4 px wrong, one split
    io.write_image(prediction / "b_labels.tif", cut)  # 'unetile predict' naming
    return prediction, truth


def test_evaluate_folders_prints_table_and_writes_json_and_csv(folders, tmp_path, capsys):
    prediction, truth = folders
    json_path, csv_path = tmp_path / "out" / "scores.json", tmp_path / "out" / "scores.csv"
    status = main(
        [
            "evaluate",
            str(prediction),
            str(truth),
            "--metrics",
            "pixel_error",
            "warping_error",
            "seg",
            "--json",
            str(json_path),
            "--csv",
            str(csv_path),
        ]
    )
    assert status == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["pixel_error", "warping_error", "splits", "mergers", "seg"]
    assert [line.split()[0] for line in table[1:]] == ["a", "b", "mean"]
    result = json.loads(json_path.read_text())
    first, second = result["images"]
    assert first["pixel_error"] == 0.0 and first["seg"] == 1.0
    assert second["ground_truth"].endswith("b.png")
    assert second["pixel_error"] == pytest.approx(4 / 144)
    assert second["warping_error"] == pytest.approx(4 / 144)
    assert (second["splits"], second["mergers"]) == (1, 0)
    # The left cell (40 px) is cut into 16 + 20 px: no half covers more than 20 px.
    assert second["seg"] == pytest.approx(1 / 2)
    assert result["mean"]["pixel_error"] == pytest.approx(2 / 144)
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["prediction", "ground_truth", "pixel_error", "warping_error", "splits"] + [
        "mergers",
        "seg",
    ]
    assert rows[-1][0] == "mean" and float(rows[-1][2]) == pytest.approx(2 / 144)
    assert not [p for p in json_path.parent.iterdir() if ".part" in p.name]


def test_evaluate_probabilities_in_8_bit_picks_the_best_threshold(tmp_path, capsys):
    truth = two_cells()
    # 8-bit probabilities: cells 89/255 = 0.35, membrane 64/255 = 0.25: only 0.3 separates.
    probabilities = np.where(truth > 0, 89, 64).astype(np.uint8)
    io.write_image(tmp_path / "p.png", probabilities)
    io.write_image(tmp_path / "t.png", truth)
    json_path = tmp_path / "scores.json"
    arguments = ["evaluate", str(tmp_path / "p.png"), str(tmp_path / "t.png")]
    status = main(
        [*arguments, "--probabilities", "--metrics", "pixel_error", "--json", str(json_path)]
    )
    assert status == 0
    mean = json.loads(json_path.read_text())["mean"]
    assert mean == {"pixel_error": 0.0, "pixel_error_threshold": 0.3}
    # Without --probabilities the same 8-bit file is a two-valued map: 89 is the cell value.
    assert main([*arguments, "--metrics", "pixel_error", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["mean"] == {"pixel_error": 0.0}


def test_evaluate_reads_the_cell_channel_of_a_probability_stack(tmp_path):
    truth = two_cells()
    cell = np.where(truth > 0, 0.9, 0.15).astype(np.float32)  # 0.2 is the first to separate
    io.write_image(tmp_path / "p_probabilities.tif", np.stack([1 - cell, cell]))
    io.write_image(tmp_path / "t.tif", truth)
    json_path = tmp_path / "scores.json"
    arguments = ["evaluate", str(tmp_path / "p_probabilities.tif"), str(tmp_path / "t.tif")]
    assert main([*arguments, "--probabilities", "--metrics", "iou", "--json", str(json_path)]) == 0
    mean = json.loads(json_path.read_text())["mean"]
    assert mean["iou"] == 1.0 and mean["iou_threshold"] == 0.2


def test_evaluate_cell_value_reads_black_cells(tmp_path):
    truth = 255 - two_cells()  # cells black
    io.write_image(tmp_path / "p.png", truth)
    io.write_image(tmp_path / "t.png", truth)
    json_path = tmp_path / "scores.json"
    arguments = ["evaluate", str(tmp_path / "p.png"), str(tmp_path / "t.png"), "--json"]
    assert main([*arguments, str(json_path), "--metrics", "seg", "--cell-value", "0"]) == 0
    assert json.loads(json_path.read_text())["mean"]["seg"] == 1.0
    # Without it, the frame and the membrane (255) would be the one "cell".
    assert main([*arguments, str(json_path), "--metrics", "iou"]) == 0
    assert json.loads(json_path.read_text())["mean"]["iou"] == 1.0


def test_evaluate_float_prediction_without_probabilities_exits_2_naming_the_file(tmp_path, capsys):
    io.write_image(tmp_path / "p.tif", np.full((12, 12), 0.5, np.float32))
    io.write_image(tmp_path / "t.png", two_cells())
    status = main(["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "t.png")])
    assert status == 2
    error = capsys.readouterr().err
    assert "p.tif" in error and "--probabilities" in error and "Traceback" not in error


def test_evaluate_shape_mismatch_exits_2_naming_both_files(tmp_path, capsys):
    io.write_image(tmp_path / "p.png", two_cells()[:10])
    io.write_image(tmp_path / "t.png", two_cells())
    assert main(["evaluate", str(tmp_path / "p.png"), str(tmp_path / "t.png")]) == 2
    error = capsys.readouterr().err
    assert "p.png vs" in error and "t.png" in error and "(10, 12)" in error


def test_evaluate_unpaired_file_exits_2(folders, capsys):
    prediction, truth = folders
    io.write_image(truth / "c.png", two_cells())
    assert main(["evaluate", str(prediction), str(truth)]) == 2
    assert "c.png: ground truth has no prediction" in capsys.readouterr().err


def test_evaluate_help_explains_how_files_are_read(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "uint8 0-255 -> /255" in text and "instance labels" in text


def test_evaluate_picks_labels_or_probabilities_from_a_predict_folder(tmp_path, capsys):
    truth = tmp_path / "truth"
    prediction = tmp_path / "prediction"
    io.write_image(truth / "a.png", two_cells())
    cut = two_cells()
    cut[6, 1:5] = 0
    io.write_image(prediction / "a_labels.tif", cut)
    probability = (two_cells() > 0).astype(np.float32) * 0.8
    io.write_image(prediction / "a_probabilities.tif", probability)
    io.write_image(prediction / "a_instances.tif", cut.astype(np.uint16))
    labels_json = tmp_path / "labels.json"
    assert main(["evaluate", str(prediction), str(truth), "--json", str(labels_json)]) == 0
    labels = json.loads(labels_json.read_text())
    assert labels["mean"]["pixel_error"] == pytest.approx(4 / 144)
    probabilities_json = tmp_path / "probabilities.json"
    code = main(
        [
            "evaluate",
            str(prediction),
            str(truth),
            "--probabilities",
            "--json",
            str(probabilities_json),
        ]
    )
    assert code == 0
    assert json.loads(probabilities_json.read_text())["mean"]["pixel_error"] == 0.0
