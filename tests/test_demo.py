import json

import numpy as np

from unetile.cli import main
from unetile.demo import merged_touching_pairs


def test_merged_touching_pairs_by_hand():
    truth = np.array([[1, 1, 2, 2, 0, 3, 3]])
    merged = np.array([[5, 5, 5, 5, 0, 6, 6]])
    split = np.array([[5, 5, 0, 7, 0, 6, 6]])
    assert merged_touching_pairs(merged, truth) == (1, 1)
    assert merged_touching_pairs(split, truth) == (1, 0)


def test_demo_writes_figures_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--size", "256", "--quiet"]) == 0
    for name in ("figure3_weight_map.png", "prediction_overlay.png", "input.png", "curves.png"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "metrics.json").read_text())
    for run in ("weighted", "unweighted"):
        for pipeline in ("components", "watershed"):
            assert 0.0 <= report[run][pipeline]["f1@0.5"] <= 1.0
            assert report[run][pipeline]["touching_pairs"] > 0
        carried = json.loads((out / "runs" / run / "config.json").read_text())["instances"]
        assert report[run]["watershed"]["options"] == carried  # what training picked
        assert report[run]["components"]["options"]["method"] == "components"
        assert report[run]["training_steps"] == 3
        assert report[run]["cells_true"] > 0
    assert report["weighted"]["w0"] == 10.0 and report["unweighted"]["w0"] == 0.0
    assert "F1@0.5" in capsys.readouterr().out
    # A second run replaces the earlier demo instead of refusing the folder.
    assert main(["demo", "--out", str(out), "--minutes", "0.02", "--size", "128", "--quiet"]) == 0


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.05", "--quiet"]) == 2
    assert "not an earlier demo folder" in capsys.readouterr().err


def test_the_figure_names_the_instance_options_each_model_carried(tmp_path, monkeypatch):
    from unetile import demo
    from unetile.predict.instances import InstanceOptions

    carried = InstanceOptions(method="components", threshold=0.8, min_size=215)
    seeded = InstanceOptions(method="watershed", seed_threshold=0.7)
    assert (
        demo.describe_instances(carried) == "connected components, threshold 0.8, min size 215 px"
    )
    assert demo.describe_instances(seeded.to_dict()) == "seeded watershed (seeds > 0.7), argmax"
    titles = []

    def keep_titles(figure, path):
        titles.extend(axis.get_title() for axis in figure.axes)

    monkeypatch.setattr(demo, "_save_figure", keep_titles)
    cells = np.zeros((16, 16), np.int32)
    cells[2:6, 2:6] = 1
    scores = {"f1@0.5": 1.0, "touching_pairs": 0, "touching_pairs_merged": 0}
    paper = InstanceOptions().to_dict()
    results = {
        "weighted": {
            "components": {**scores, "options": paper},
            "watershed": {**scores, "options": carried.to_dict()},
        },
        "unweighted": {
            "components": {**scores, "options": paper},
            "watershed": {**scores, "options": seeded.to_dict()},
        },
    }
    predicted = {name: {"components": cells, "watershed": cells} for name in results}
    demo.figure_prediction(np.zeros((16, 16)), cells, predicted, results, tmp_path / "f.png")
    titles = [title.replace(",\n", ", ") for title in titles]  # wrapped after commas
    weighted = [t for t in titles if "w0 = 10" in t]
    unweighted = [t for t in titles if "w0 = 0)" in t]
    assert any("connected components, threshold 0.8, min size 215 px" in t for t in weighted)
    assert not any("seeded watershed" in t for t in weighted)
    assert any("seeded watershed (seeds > 0.7)" in t for t in unweighted)
    assert sum("connected components, argmax" in t for t in titles) == 2  # the paper's row
