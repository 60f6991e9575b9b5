"""--preset auto: the fingerprint, the rules, the plan, and the command line."""

import json

import numpy as np
import pytest
from test_cli_train import write_dataset

from unetile import io
from unetile.cli import main
from unetile.data import synthetic
from unetile.data.dataset import labeled_images_from_arrays
from unetile.train import auto
from unetile.train.config import auto_defaults, make_config


def measured(images, labels, label_mode):
    items, _ = labeled_images_from_arrays(images, labels, label_mode=label_mode, with_weights=False)
    return auto.fingerprint(
        [item.image for item in items],
        [item.instances for item in items],
        [i.classes for i in items],
    )


def test_a_membrane_map_gets_the_narrow_border_term_without_class_balance():
    em = [synthetic.em_like((256, 256), rng=seed) for seed in range(2)]
    print_ = measured([e.image for e in em], [e.membrane for e in em], "membrane")
    # Every background pixel of an EM membrane map lies in a 2-3 px gap between two cells.
    assert print_.narrow_gap_share > 0.95 and 2.0 < print_.median_gap < 6.0
    assert print_.foreground_share > 0.8 and print_.cells > 40
    chosen = {name: choice.value for name, choice in auto.choose(print_).items()}
    assert (chosen["w0"], chosen["sigma"], chosen["class_weights"]) == (10.0, 2.0, "none")
    assert chosen["depth"] == 5 and chosen["tile"] == (244, 244)  # at most the 256 px image
    assert chosen["norm"] == "instance"
    assert "augment" not in chosen  # synthetic slices share their intensities


@pytest.mark.parametrize(
    ("touching", "w0", "sigma"), [(0.6, 10.0, 5.0), (0.0, 0.0, 5.0)], ids=["touching", "apart"]
)
def test_cells_on_background_get_the_papers_border_term_only_where_they_touch(touching, w0, sigma):
    cells = [synthetic.cells_like((256, 256), touching_fraction=touching, rng=s) for s in range(2)]
    print_ = measured([c.image for c in cells], [c.instances for c in cells], "instances")
    assert print_.narrow_gap_share < 0.05  # the background is wide: not a membrane map
    assert (print_.touching_share > 0.4) == (touching > 0)
    chosen = {name: choice.value for name, choice in auto.choose(print_).items()}
    assert (chosen["w0"], chosen["sigma"], chosen["class_weights"]) == (w0, sigma, "none")


def test_small_images_get_a_shallower_network_and_a_tile_inside_them():
    em = [synthetic.em_like((100, 120), rng=seed) for seed in range(2)]
    print_ = measured([e.image for e in em], [e.membrane for e in em], "membrane")
    chosen = {name: choice.value for name, choice in auto.choose(print_).items()}
    # Depth 5 reads 92 px of context a side, depth 4 44 px: at most half of 100 px.
    assert chosen["depth"] == 4 and chosen["tile"][0] <= 100


def test_images_of_different_brightness_get_wider_gray_augmentation():
    em = [synthetic.em_like((128, 128), rng=seed) for seed in range(3)]
    images = [e.image * gain for e, gain in zip(em, (0.5, 1.0, 1.6), strict=True)]
    print_ = measured(images, [e.membrane for e in em], "membrane")
    assert print_.intensity_mean_spread > auto.INTENSITY_SPREAD
    augment = auto.choose(print_)["augment"].value
    assert augment["contrast"] == (0.67, 1.5) and augment["elastic"]


def test_width_is_the_widest_that_takes_enough_steps_in_the_budget():
    flops = {16: 1.0, 32: 4.0, 64: 16.0}
    # 0.3 s a step at width 16: 12 minutes give 2,400 steps at 16, 600 at 32.
    assert auto.choose_width(0.3, 12.0, flops).value == 16
    assert auto.choose_width(0.05, 12.0, flops).value == 32  # 14,400 / 3,600 / 900
    assert auto.choose_width(0.01, 12.0, flops).value == 64
    assert auto.choose_width(5.0, 1.0, flops).value == 16  # none fits: the narrowest


@pytest.fixture
def folders(tmp_path):
    return write_dataset(tmp_path / "train", names=("a", "b", "c", "d", "e"), size=64)


def test_the_plan_fills_what_is_not_given_and_says_why(folders, monkeypatch):
    images, labels = folders
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    config = make_config("auto", images=str(images), labels=str(labels), sigma=3.0)
    plan = config.auto
    assert config.sigma == 3.0 and plan["reasons"]["sigma"] == "as given"
    assert "sigma" in plan["given"] and config.w0 == 10.0  # membranes 2 px wide
    assert config.class_weights == "none" and config.norm == "instance"
    assert config.max_minutes == auto.DEFAULT_MINUTES and config.holdout == auto.HOLDOUT
    # 0.2 s a step at width 16 over 15 minutes: 4,500 steps at 16, fewer than 1,500 at 32.
    assert config.base_channels == 16 and "4,500" in plan["reasons"]["base_channels"]
    assert plan["fingerprint"]["images"] == 5 and plan["seconds"] < 30
    again = make_config("auto", images=str(images), labels=str(labels), sigma=3.0)
    assert again.auto["choices"] == plan["choices"]  # the same data, the same plan
    text = auto.describe(plan)
    assert "sigma = 3.0: as given" in text and "base_channels = 16" in text


def test_cli_prints_the_plan_stores_it_and_resumes_without_planning_again(
    folders, tmp_path, capsys, monkeypatch
):
    images, labels = folders
    run = tmp_path / "run"
    common = ["--base-channels", "4", "--steps", "2", "--no-compile", "--quiet"]
    code = main(
        ["train", "--images", str(images), "--labels", str(labels), "--out", str(run)]
        + ["--preset", "auto", "--max-minutes", "5", "--validate-every", "1"]
        + common[:-1]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("auto: measured 5 image(s)") and "base_channels = 4: as given" in out
    stored = io.read_json(run / io.MODEL_CONFIG)["training"]
    assert stored["preset"] == "auto" and stored["auto"]["choices"]["depth"] == stored["depth"]
    assert json.dumps(stored["auto"])  # plain JSON

    def no_second_plan(options, device=None):
        raise AssertionError("a resumed run keeps its plan")

    monkeypatch.setattr(auto, "plan", no_second_plan)
    code = main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"])
    assert code == 0


def test_the_plan_of_isbi_like_folders_reads_their_files_only_once_each(folders, monkeypatch):
    images, labels = folders
    reads = []
    original = io.read_image
    monkeypatch.setattr(
        io, "read_image", lambda path, **k: reads.append(path) or original(path, **k)
    )
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    monkeypatch.setattr(auto, "FINGERPRINT_IMAGES", 3)
    plan = auto.plan({"images": str(images), "labels": str(labels)}, defaults=auto_defaults())
    assert plan["fingerprint_images"] == 3 and len([r for r in reads if "images" in str(r)]) == 3
    assert np.isfinite(plan["fingerprint"]["cell_diameter"])


def test_plan_flag_writes_a_config_file_that_trains_without_timing_again(
    folders, tmp_path, capsys, monkeypatch
):
    images, labels = folders
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    data = ["--images", str(images), "--labels", str(labels)]
    assert main(["train", *data, "--preset", "auto", "--plan"]) == 0
    text = capsys.readouterr().out
    assert '\npreset = "auto"\n' in text and "\nsigma = 2.0  # " in text
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(text)

    def no_timing(*args, **kwargs):
        raise AssertionError("every timed choice is in the file")

    monkeypatch.setattr(auto, "seconds_per_step", no_timing)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would: the file makes it safe
    config = make_config(**{**io_options(plan_file), "images": str(images), "labels": str(labels)})
    assert config.base_channels == 16 and config.steps == 13500 and config.sigma == 2.0
    with pytest.raises(ValueError, match="each process would time it apart"):
        make_config("auto", images=str(images), labels=str(labels))
    assert main(["train", *data, "--plan"]) == 2
    assert "add --preset auto" in capsys.readouterr().err


def io_options(path):
    from unetile.train.config import read_toml

    return read_toml(path)


def test_instance_labels_keep_and_calibrate_by_seg(tmp_path, monkeypatch):
    for index in range(4):
        cells = synthetic.cells_like((96, 96), touching_fraction=0.6, rng=index)
        io.write_image(tmp_path / "images" / f"{index}.tif", (cells.image * 255).astype(np.uint8))
        io.write_image(tmp_path / "labels" / f"{index}.tif", cells.instances.astype(np.uint16))
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    options = dict(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"))
    config = make_config("auto", label_mode="instances", **options)
    assert config.keep_best == "seg" and "seg" in config.metrics and config.sigma == 5.0
    assert (
        make_config("auto", label_mode="instances", keep_best="iou", **options).keep_best == "iou"
    )


def touching_cells(root, count=4, size=96):
    for index in range(count):
        cells = synthetic.cells_like((size, size), touching_fraction=0.6, rng=index)
        io.write_image(root / "images" / f"{index}.tif", (cells.image * 255).astype(np.uint8))
        io.write_image(root / "labels" / f"{index}.tif", cells.instances.astype(np.uint16))
    return dict(images=str(root / "images"), labels=str(root / "labels"))


def test_auto_races_its_weight_map_against_the_baseline_and_keeps_the_record(tmp_path, monkeypatch):
    from unetile.train import race
    from unetile.train.run import train

    options = touching_cells(tmp_path)
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    small = dict(depth=2, base_channels=4, tile=(20,), steps=4, validate_every=2, threads=1)
    small.update(compile=False, augment="none", holdout=0.25)
    config = make_config(
        "auto",
        label_mode="instances",
        out=str(tmp_path / "run"),
        max_minutes=1.0,
        **options,
        **small,
    )
    entrants = race.contenders(config)
    assert entrants["baseline"] == {"w0": 10.0, "sigma": 2.0, "class_weights": "none"}
    assert entrants["rules"] == {name: getattr(config, name) for name in race.WEIGHT_FIELDS}
    notes = []
    summary = train(config, progress=False, notes=notes.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    record = saved["training"]["auto"]["race"]
    # One 96 px held-out image is one unit: no noise estimate, so the baseline goes on.
    assert record["units"] == 1 and record["winner"] == "baseline"
    assert set(record["scores"]) == {"baseline", "rules"}
    winner = tmp_path / "run" / "race" / record["winner"]
    assert saved["training"]["init"] == str(winner)  # the winner goes on from its weights
    assert saved["training"]["sigma"] == record["weights"]["sigma"]
    assert (tmp_path / "run" / "race" / "baseline" / "model.safetensors").is_file()
    assert any(note.startswith("auto race:") for note in notes)
    assert summary["step"] == 4
    # A weight map the user gives is not raced.
    given = make_config(
        "auto", label_mode="instances", out=str(tmp_path / "r2"), sigma=5.0, **options, **small
    )
    assert race.contenders(given) == {}


def test_a_poor_held_out_score_is_said():
    from unetile.train.race import poor_result

    assert "poor (iou 0.30" in poor_result({"validation": {"iou": 0.3, "f1": 0.9}})
    assert poor_result({"validation": {"iou": 0.8, "f1": 0.7, "pixel_error": 0.9}}) is None
