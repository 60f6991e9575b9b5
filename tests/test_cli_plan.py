"""``unetile plan``: the plan of --preset auto as a --config file that trains the same config."""

import numpy as np
import pytest
from test_auto import touching_cells
from test_cli_train import write_dataset

from unetile import io
from unetile.cli import build_parser, main
from unetile.cli.train import config_from_args
from unetile.train import auto
from unetile.train.config import tomllib


def membranes(root):
    images, labels = write_dataset(root, names=("a", "b", "c", "d", "e"), size=64)
    return str(images), str(labels)


def membranes_of_uneven_brightness(root):
    images, labels = membranes(root)
    for name, gain in (("a", 0.4), ("e", 1.8)):  # beyond auto.INTENSITY_SPREAD: a wider [augment]
        image = io.read_image(f"{images}/{name}.tif").astype(float)
        io.write_image(f"{images}/{name}.tif", np.clip(image * gain, 0, 255).astype(np.uint8))
    return images, labels


def cells(root):
    folders = touching_cells(root)
    return folders["images"], folders["labels"]


def config_of(argv):
    """The TrainConfig 'unetile train ARGV' would train (parsed and resolved, not trained)."""
    return config_from_args(build_parser().parse_args([str(part) for part in argv]))[0]


def without_record(config) -> dict:
    return {name: value for name, value in config.to_dict().items() if name != "auto"}


def run_cli(argv, capsys):
    try:
        status = main([str(part) for part in argv])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    return status, capsys.readouterr()


@pytest.mark.parametrize(
    ("data", "options", "decided"),
    [
        (membranes, [], "holdout"),
        (membranes_of_uneven_brightness, ["--max-minutes", "5"], "augment"),
        (cells, ["--label-mode", "instances"], "keep_best"),
    ],
    ids=["membranes", "uneven-brightness", "instances"],
)
def test_the_plan_trains_the_config_preset_auto_gives(
    data, options, decided, tmp_path, capsys, monkeypatch
):
    images, labels = data(tmp_path / "train")
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    status, captured = run_cli(["plan", images, labels, *options], capsys)
    assert status == 0
    assert captured.err.count("\n") == 1 and "--config plan.toml" in captured.err
    table = tomllib.loads(captured.out)  # valid TOML, each choice with its reason
    assert table["preset"] == "auto" and decided in table and "images" not in table
    assert "# largest valid output tile" in captured.out and captured.out.startswith("# ")
    plan = tmp_path / "plan.toml"
    plan.write_text(captured.out)
    out = str(tmp_path / "run")
    direct = config_of(["train", images, labels, "--preset", "auto", "--out", out, *options])

    def no_timing(*args, **kwargs):
        raise AssertionError("the plan file holds every timed choice")

    monkeypatch.setattr(auto, "seconds_per_step", no_timing)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the file makes it safe
    from_file = config_of(["train", images, labels, "--config", plan, "--out", out])
    assert without_record(from_file) == without_record(direct)
    assert from_file.preset == "auto" and decided in from_file.auto["given"]
    if "--label-mode" in options:
        assert 'label_mode = "instances"  # given' in captured.out


def test_the_plan_keeps_what_its_config_file_gives(tmp_path, capsys, monkeypatch):
    images, labels = membranes(tmp_path / "train")
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    kept = tmp_path / "kept.toml"
    kept.write_text("sigma = 3.0\nlearning_rate = 0.0005\n")
    status, captured = run_cli(["plan", images, labels, "--config", kept], capsys)
    assert status == 0
    assert "\nsigma = 3.0  # as given\n" in captured.out
    assert "\nlearning_rate = 0.0005  # given\n" in captured.out


def test_train_plan_still_writes_the_plan_with_a_one_line_deprecation_note(
    tmp_path, capsys, monkeypatch
):
    images, labels = membranes(tmp_path / "train")
    monkeypatch.setattr(auto, "seconds_per_step", lambda *args, **kwargs: 0.2)
    argv = ["--images", images, "--labels", labels, "--preset", "auto", "--plan"]
    status, old = run_cli(["train", *argv], capsys)
    assert status == 0
    (note,) = old.err.strip().splitlines()
    assert note.startswith("unetile train: warning: --plan is replaced by 'unetile plan")
    status, new = run_cli(["plan", images, labels], capsys)
    assert status == 0 and tomllib.loads(old.out) == tomllib.loads(new.out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root, argv: argv.__setitem__(1, str(root / "nope")), "nope: not a folder"),
        (lambda root, argv: argv.extend(["--max-minutes", "-1"]), "bad plan option"),
        (lambda root, argv: argv.extend(["--config", root / "bad.toml"]), "unknown option 'lr'"),
        (lambda root, argv: argv.extend(["--config", root / "fast.toml"]), "plans --preset auto"),
        (lambda root, argv: argv.pop(), "the following arguments are required: LABELS"),
    ],
    ids=["no-folder", "bad-value", "unknown-key", "other-preset", "no-labels"],
)
def test_bad_input_exits_2_with_one_line(change, message, tmp_path, capsys):
    images, labels = membranes(tmp_path / "train")
    (tmp_path / "bad.toml").write_text("lr = 0.1\n")
    (tmp_path / "fast.toml").write_text('preset = "cpu-fast"\n')
    argv = ["plan", images, labels]
    change(tmp_path, argv)
    status, captured = run_cli(argv, capsys)
    assert status == 2 and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert ": error: " in line and message in line and "Traceback" not in captured.err


def test_train_takes_the_folders_as_arguments_or_flags(tmp_path, capsys):
    images, labels = membranes(tmp_path / "train")
    out = str(tmp_path / "run")
    by_flag = config_of(["train", "--images", images, "--labels", labels, "--out", out])
    assert config_of(["train", images, labels, "--out", out]) == by_flag
    status, captured = run_cli(["train", images, labels, "--images", labels, "--out", out], capsys)
    assert status == 2
    (line,) = captured.err.strip().splitlines()
    assert "name two folders: give one" in line
    status, captured = run_cli(["train", "--out", out], capsys)
    assert (
        status == 2
        and "--images is required (as IMAGES or --images, or in --config)" in captured.err
    )
