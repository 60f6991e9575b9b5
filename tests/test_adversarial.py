"""The files and mistakes real users bring, against every command.

Each case runs the CLI in-process and asserts the exit status, ONE line on
stderr that names what is wrong (never a traceback), and that nothing under a
final name was lost or half-written. Training cases fail before the first
step. The faults (kill -9, a full disk, two processes on one folder) are at
the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetile import io
from unetile.cli import main
from unetile.network.model import UNet
from unetile.predict import card
from unetile.predict.outputs import OWNER_RECORD

pytestmark = pytest.mark.fast

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``unetile ARGV`` (option errors exit through SystemExit)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


def assert_one_line(error: str, *fragments: str) -> None:
    """Exactly one error line (warnings may precede it) holding every fragment, no traceback."""
    assert "Traceback" not in error, error
    lines = [line for line in error.strip().splitlines() if ": error: " in line]
    assert len(lines) == 1, error
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a final name in ``folder`` with its content hash (hidden ones left out)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def visible(folder: Path) -> list[str]:
    """Names in ``folder`` that are not hidden (final names only)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def tiny_model(**options) -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2, dropout=0.0, **options)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model.eval()


def save_run(run_dir: Path, model: UNet | None = None, **entries) -> Path:
    model = model or tiny_model()
    config = {
        "model": model.config.to_dict(),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "classes": {"foreground": 1, "num_classes": 2},
        "tile": {"input_shape": [68, 68], "output_shape": [52, 52]},
    }
    config.update(entries)
    card.save_model(run_dir, model, config)
    return run_dir


def write_training_set(root: Path, size=(40, 40), names=("a", "b")) -> tuple[Path, Path]:
    """Tiny PNG pairs: bright 8-px squares (cells, 255) on dark 2-px membranes (0)."""
    for index, name in enumerate(names):
        membrane = np.zeros(size, np.uint8)
        for top in range(index % 2, size[0], 10):
            for left in range(index % 2, size[1], 10):
                membrane[top : top + 8, left : left + 8] = 255
        image = (membrane * 0.7 + 20).astype(np.uint8)
        io.write_image(root / "images" / f"{name}.png", image)
        io.write_image(root / "labels" / f"{name}.png", membrane)
    return root / "images", root / "labels"


TINY = ["--depth", "2", "--base-channels", "2", "--steps", "2", "--tile", "52", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A training set, a trained-looking run folder and a prediction input, shared read-only."""
    root = tmp_path_factory.mktemp("adversarial")
    write_training_set(root)
    save_run(root / "run")
    tifffile.imwrite(root / "input.tif", np.random.default_rng(0).random((24, 30), np.float32))
    return root


def train_argv(data: Path, out: Path, *options) -> list:
    return ["train", "--images", data / "images", "--labels", data / "labels", "--out", out]


# --------------------------------------------------------------------------
# Bad numbers on the command line: refused before any work, with the range.
# --------------------------------------------------------------------------

TRAIN_NUMBERS = [
    ("--sigma", "nan", "sigma must be a finite number in (0, 1000]"),
    ("--sigma", "inf", "sigma must be a finite number"),
    ("--sigma", "-2", "sigma must be a finite number"),
    ("--w0", "nan", "w0 must be a finite number in [0, 1000]"),
    ("--w0", "-inf", "w0 must be a finite number"),
    ("--lr", "nan", "learning_rate must be a finite number in (0, 10]"),
    ("--lr", "inf", "learning_rate must be a finite number"),
    ("--lr", "0", "learning_rate must be a finite number"),
    ("--lr", "1e9", "learning_rate must be a finite number"),
    ("--momentum", "1", "momentum must be in [0, 1)"),
    ("--momentum", "nan", "momentum must be a finite number"),
    ("--momentum", "-0.5", "momentum must be a finite number"),
    ("--weight-decay", "nan", "weight_decay must be a finite number"),
    ("--weight-decay", "-1", "weight_decay must be a finite number"),
    ("--dice-weight", "inf", "dice_weight must be a finite number"),
    ("--clip-grad-norm", "nan", "clip_grad_norm must be a finite number > 0"),
    ("--clip-grad-norm", "0", "clip_grad_norm must be a finite number > 0"),
    ("--max-minutes", "nan", "max_minutes must be a finite number"),
    ("--max-minutes", "0", "max_minutes must be a finite number"),
    ("--max-minutes", "inf", "max_minutes must be a finite number"),
    ("--dropout", "1", "dropout must be in [0, 1)"),
    ("--dropout", "nan", "dropout must be a finite number"),
    ("--dropout", "-0.1", "dropout must be a finite number"),
    ("--depth", "30", "depth must be a whole number in [1, 10]"),
    ("--depth", "0", "depth must be a whole number in [1, 10]"),
    ("--depth", "2.5", "argument --depth"),
    ("--base-channels", "0", "base_channels must be a whole number in [1, 1024]"),
    ("--base-channels", "100000", "base_channels must be a whole number in [1, 1024]"),
    ("--batch-size", "0", "batch_size must be a whole number in [1, 4096]"),
    ("--batch-size", "1.5", "argument --batch-size"),
    ("--batch-size", "1000000", "batch_size must be a whole number in [1, 4096]"),
    ("--steps", "0", "steps must be a whole number in [1, 1000000000]"),
    ("--steps", "-3", "steps must be a whole number"),
    ("--steps", "ten", "argument --steps"),
    ("--warmup-steps", "-1", "warmup_steps must be a whole number"),
    ("--seed", "-1", "seed must be a whole number"),
    ("--threads", "0", "threads must be a whole number in [1, 1024]"),
    ("--validate-every", "0", "validate_every must be a whole number"),
    ("--checkpoint-every", "0", "checkpoint_every must be a whole number"),
    ("--log-every", "-5", "log_every must be a whole number"),
    ("--max-tile", "0", "max_tile must be a whole number"),
    ("--num-classes", "1", "num_classes must be a whole number in [2, 65536]"),
    ("--num-classes", "100000", "num_classes must be a whole number"),
    ("--foreground", "-1", "foreground must be a whole number"),
    ("--tile", "0", "tile entry (pixels) must be a whole number in [1, 65536]"),
    ("--tile", "1.5", "tile must be whole pixel sizes such as 388 or 20,92,92"),
    ("--tile", "abc", "tile must be whole pixel sizes"),
    ("--tile", "99999999", "tile entry (pixels) must be a whole number"),
    ("--channels", "0", "channels must be a whole number in [1, 1024]"),
    ("--channels", "2.5", "argument --channels"),
    ("--device", "mps", "mps"),
    ("--device", "cuda:7", "cuda"),
    ("--device", "tpu", "--device"),
]


@pytest.mark.parametrize(("flag", "value", "message"), TRAIN_NUMBERS)
def test_train_refuses_a_bad_number_before_any_work(data, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    argv = train_argv(data, out) + TINY + [f"{flag}={value}"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


PREDICT_NUMBERS = [
    (["--tile", "0"], "--tile: must be a whole number in [1, 65536]"),
    (["--tile", "-4"], "--tile"),
    (["--tile", "nan"], "--tile"),
    (["--tile", "1.5"], "--tile"),
    (["--tile", "1000000"], "--tile"),
    (["--tile", "60000"], "GiB for activations"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "nan"], "--batch-size"),
    (["--batch-size", "4096", "--tile", "4000"], "use a smaller --tile or --batch-size"),
    (["--grow", "-1"], "--grow"),
    (["--grow", "2.5"], "--grow"),
    (["--memory-budget", "0"], "--memory-budget"),
    (["--memory-budget", "-1"], "--memory-budget"),
    (["--memory-budget", "nan"], "--memory-budget"),
    (["--memory-budget", "inf"], "--memory-budget"),
    (["--memory-budget", "1e300"], "--memory-budget"),
    (["--memory-budget", "900000"], "lower --memory-budget"),
    (["--device", "mps"], "--device"),
    (["--format", "png"], "--format"),
]


@pytest.mark.parametrize(("options", "message"), PREDICT_NUMBERS)
def test_predict_refuses_a_bad_number_before_any_work(data, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    argv = ["predict", data / "run", data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv + options, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


EVALUATE_NUMBERS = [
    (["--cell-class", "-1", "--probabilities"], "--cell-class"),
    (["--cell-class", "1.5"], "--cell-class"),
    (["--cell-value", "nan"], "--cell-value"),
    (["--cell-value", "inf"], "--cell-value"),
    (["--connectivity", "5"], "--connectivity"),
    (["--metrics", "accuracy"], "--metrics"),
]


@pytest.mark.parametrize(("options", "message"), EVALUATE_NUMBERS)
def test_evaluate_refuses_a_bad_number(data, tmp_path, capsys, options, message):
    labels = data / "labels" / "a.png"
    argv = ["evaluate", labels, labels, "--json", tmp_path / "s.json"]
    status, error = run_cli(argv + options, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert not (tmp_path / "s.json").exists()


DEMO_NUMBERS = [
    (["--minutes", "0"], "--minutes"),
    (["--minutes", "nan"], "--minutes"),
    (["--minutes", "inf"], "--minutes"),
    (["--minutes", "-1"], "--minutes"),
    (["--size", "10"], "--size"),
    (["--size", "nan"], "--size"),
    (["--size", "100000000"], "--size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "0.5"], "--seed"),
]


def test_demo_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "demo"
    out.write_text("notes")
    status, error = run_cli(["demo", "--out", out, "--quiet", "--minutes", "0.01"], capsys)
    assert status == 2
    assert_one_line(error, "demo")
    assert out.read_text() == "notes"


@pytest.mark.parametrize(("options", "message"), DEMO_NUMBERS)
def test_demo_refuses_a_bad_number_before_any_work(tmp_path, capsys, options, message):
    out = tmp_path / "demo"
    status, error = run_cli(["demo", "--out", out, "--quiet"] + options, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


# --------------------------------------------------------------------------
# Bad TOML files: every value checked for its type and range.
# --------------------------------------------------------------------------

TOML_CASES = [
    ("batch_size = 1.5", "batch_size must be a whole number"),
    ("depth = 2.5", "depth must be a whole number"),
    ("depth = 30", "depth must be a whole number in [1, 10]"),
    ("steps = 'ten'", "steps must be a whole number"),
    ("steps = true", "steps must be a whole number"),
    ("learning_rate = nan", "learning_rate must be a finite number"),
    ("sigma = inf", "sigma must be a finite number"),
    ("w0 = -1e400", "w0 must be a finite number"),
    ("compile = 'yes'", "compile must be true or false"),
    ("cache_weights = 1", "cache_weights must be true or false"),
    ("tile_shape = [0, 52]", "tile_shape entry (pixels) must be a whole number"),
    ("tile_shape = [52.5]", "tile_shape entry (pixels) must be a whole number"),
    ("tile_shape = '52;60'", "tile_shape must be whole pixel sizes"),
    ("device = 3", "device must be a name"),
    ("[augment]\nshift = -1", "shift (pixels) must be a finite number"),
    ("[augment]\nelastic_sigma = nan", "elastic_sigma (pixels) must be a finite number"),
    ("[augment]\nelastic_grid = 2.5", "elastic_grid (control points) must be a whole number"),
    ("[augment]\ncontrast = [1]", "contrast must be a range [low, high]"),
    ("[augment]\ngamma = [nan, 2]", "gamma bound must be a finite number"),
    ("[augment]\nflip = 'no'", "flip must be true or false"),
    ("[augment]\nzoom = 2", "unknown option 'zoom' in [augment]"),
    ("learning-rat = 0.1", "unknown option 'learning-rat'"),
    ("steps = [", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), TOML_CASES)
def test_train_refuses_a_bad_toml_value(data, tmp_path, capsys, text, message):
    options = tmp_path / "options.toml"
    options.write_text(text + "\n")
    out = tmp_path / "run"
    status, error = run_cli(train_argv(data, out) + ["--config", options, "--quiet"], capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


def test_train_config_that_is_a_folder_or_missing(data, tmp_path, capsys):
    out = tmp_path / "run"
    status, error = run_cli(train_argv(data, out) + ["--config", tmp_path], capsys)
    assert status == 2
    assert_one_line(error, str(tmp_path), "folder")
    status, error = run_cli(train_argv(data, out) + ["--config", tmp_path / "no.toml"], capsys)
    assert status == 2
    assert_one_line(error, "no.toml: no such file")
    assert visible(out) == []


# --------------------------------------------------------------------------
# Bad model folders: checked before the network is allocated.
# --------------------------------------------------------------------------


def _edit_config(run: Path, edit) -> None:
    config = json.loads((run / io.MODEL_CONFIG).read_text())
    edit(config)
    (run / io.MODEL_CONFIG).write_text(json.dumps(config))


def _set(path: tuple, value):
    def edit(config):
        entry = config
        for key in path[:-1]:
            entry = entry[key]
        entry[path[-1]] = value

    return edit


MODEL_FOLDER_CASES = [
    (_set(("model", "base_channels"), 1000), "weights do not fit config.json"),
    (_set(("model", "base_channels"), 10**9), "base_channels must be a whole number in [1, 1024]"),
    (_set(("model", "depth"), 30), "depth must be a whole number in [1, 10]"),
    (_set(("model", "depth"), 2.5), "depth must be a whole number"),
    (_set(("model", "depth"), 3), "weights do not fit config.json"),
    (_set(("model", "in_channels"), 3), "weights do not fit config.json"),
    (_set(("model", "num_classes"), "2"), "num_classes must be a whole number"),
    (_set(("model", "dropout"), float("nan")), "dropout must be a finite number"),
    (_set(("model", "padding"), "reflect"), "padding must be one of"),
    (_set(("model", "colour"), 1), "bad 'model' entry"),
    (_set(("normalization", "mean"), [float("nan")]), "normalization mean must be a finite"),
    (_set(("normalization", "std"), [0.0]), "normalization std must be a finite number > 0"),
    (_set(("normalization", "std"), [-1.0]), "normalization std must be a finite number > 0"),
    (_set(("normalization", "std"), [1e400]), "normalization std must be a finite number"),
    (_set(("normalization", "mean"), [0.1, 0.2, 0.3]), "has 3 values"),
    (_set(("normalization",), "zscore"), "'normalization' must hold"),
    (_set(("classes",), "cells"), "'classes' must be a table"),
    (_set(("classes", "foreground"), 7), "classes foreground must be a whole number in [0, 1]"),
    (_set(("classes", "foreground"), 1.5), "classes foreground must be a whole number"),
    (_set(("classes", "num_classes"), 3), "differs from the model's 2"),
    (lambda config: config.pop("model"), "has no 'model' entry"),
    (_set(("instances",), [1, 2]), "'instances' must be a table of instance options"),
    (_set(("pixel_size_um",), [-0.5, 0.5]), "'pixel_size_um' must be 1 or 2 positive numbers"),
    (_set(("pixel_size_um",), 0), "'pixel_size_um' must be 1 or 2 positive numbers"),
    (lambda config: config.pop("normalization"), "has no 'normalization' entry"),
    (_set(("instances",), {"colour": 1}), "bad 'instances' entry (unknown instance option"),
]


@pytest.mark.parametrize(("edit", "message"), MODEL_FOLDER_CASES)
def test_predict_refuses_a_bad_model_folder(data, tmp_path, capsys, edit, message):
    run = save_run(tmp_path / "run")
    _edit_config(run, edit)
    out = tmp_path / "out"
    argv = ["predict", run, data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


def test_a_config_json_nested_too_deeply_is_refused(data, tmp_path, capsys):
    run = save_run(tmp_path / "run")
    text = (run / io.MODEL_CONFIG).read_text().rstrip()
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    (run / io.MODEL_CONFIG).write_text(text[:-1] + f', "training": {deep}}}')
    before = snapshot(tmp_path)
    for argv in (
        ["predict", run, data / "input.tif", "--out", tmp_path / "out", "--no-progress"],
        ["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt"],
        train_argv(data, tmp_path / "new") + TINY + ["--init", run],
    ):
        status, error = run_cli(argv, capsys)
        assert status == 2
        assert_one_line(error, "config.json: nested too deeply to read")
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_symlink_loop_among_the_inputs_is_refused(data, tmp_path, capsys, given):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.tif").symlink_to(inputs / "b.tif")
    (inputs / "b.tif").symlink_to(inputs / "a.tif")
    tifffile.imwrite(inputs / "c.tif", np.zeros((24, 30), np.float32))
    out = tmp_path / "out"
    argv = ["predict", data / "run", inputs if given == "folder" else inputs / "a.tif"]
    status, error = run_cli(argv + ["--out", out, "--no-progress"], capsys)
    assert status == 2
    assert_one_line(error, "a.tif: a symbolic link that leads to no file (a loop of links)")
    assert visible(out) == []
    (inputs / "b.tif").unlink()
    status, error = run_cli(argv + ["--out", out, "--no-progress"], capsys)
    assert status == 2
    assert_one_line(error, "a.tif: a symbolic link that leads to no file (its target is missing)")


def test_resume_with_a_log_without_its_step_column_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_argv(data, out) + TINY, capsys)[0] == 0
    log = out / "log.csv"
    log.write_text("loss,lr\n0.5,0.01\n")
    before = snapshot(out)
    argv = train_argv(data, out) + TINY + ["--resume", "--steps", "4"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "log.csv: not the log.csv of this run (no 'step' column", "move it")
    assert snapshot(out) == before


def _nan_weight(run: Path) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    card.save_model(run, model, json.loads((run / io.MODEL_CONFIG).read_text()))


def _pickle_weights(run: Path) -> None:
    import pickle

    marker = run / "pwned"
    payload = pickle.dumps({"x": 1}) + f"os.system('touch {marker}')".encode()
    (run / io.MODEL_WEIGHTS).write_bytes(payload)


def _torch_saved_weights(run: Path) -> None:
    torch.save(tiny_model().state_dict(), run / io.MODEL_WEIGHTS)


WEIGHT_CASES = [
    (_nan_weight, "holds NaN or infinite values"),
    (lambda run: (run / io.MODEL_WEIGHTS).write_bytes(b""), "not a safetensors weights file"),
    (lambda run: (run / io.MODEL_WEIGHTS).write_bytes(b"\x00" * 7), "not a safetensors"),
    (_pickle_weights, "not a safetensors weights file"),
    (_torch_saved_weights, "not a safetensors weights file"),
    (lambda run: (run / io.MODEL_WEIGHTS).unlink(), "no such file"),
    (lambda run: (run / io.MODEL_CONFIG).write_text("{not json"), "not valid JSON"),
    (lambda run: (run / io.MODEL_CONFIG).write_text("[1, 2]"), "has no 'model' entry"),
    (lambda run: (run / io.MODEL_CONFIG).unlink(), "config.json: no such file"),
    (lambda run: (run / io.MODEL_CONFIG).write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
]


@pytest.mark.parametrize(("damage", "message"), WEIGHT_CASES)
def test_predict_refuses_damaged_weights(data, tmp_path, capsys, damage, message):
    run = save_run(tmp_path / "run")
    damage(run)
    out = tmp_path / "out"
    argv = ["predict", run, data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []
    assert not (run / "pwned").exists()


def test_predict_model_folder_that_is_a_file_or_missing(data, tmp_path, capsys):
    out = tmp_path / "out"
    for run in (data / "input.tif", tmp_path / "nowhere"):
        argv = ["predict", run, data / "input.tif", "--out", out, "--no-progress"]
        status, error = run_cli(argv, capsys)
        assert status == 2
        assert_one_line(error, "not a run folder")
    assert visible(out) == []


# --------------------------------------------------------------------------
# Bad input files for predict: reported one by one, nothing half-written.
# --------------------------------------------------------------------------


def _float_image(values):
    def write(path: Path) -> Path:
        image = np.random.default_rng(1).random((24, 30)).astype(np.float32)
        for index, value in values:
            image[index] = value
        tifffile.imwrite(path.with_suffix(".tif"), image)
        return path.with_suffix(".tif")

    return write


def _write_bytes(content: bytes, suffix: str):
    def write(path: Path) -> Path:
        path = path.with_suffix(suffix)
        path.write_bytes(content)
        return path

    return write


def _array(array: np.ndarray, suffix: str = ".tif"):
    def write(path: Path) -> Path:
        path = path.with_suffix(suffix)
        if suffix == ".tif":
            tifffile.imwrite(path, array)
        else:
            io.write_image(path, array)
        return path

    return write


PREDICT_INPUTS = [
    (_float_image([((3, 4), np.nan)]), "NaN or infinite"),
    (_float_image([((slice(None), slice(None)), np.nan)]), "NaN or infinite"),
    (_float_image([((0, 0), np.inf)]), "NaN or infinite"),
    (_float_image([((23, 29), -np.inf)]), "NaN or infinite"),
    (_array(np.full((24, 30), 1e300, np.float64)), "too large for float32"),
    (_write_bytes(b"", ".tif"), "cannot be read as an image"),
    (_write_bytes(b"II*\x00garbage", ".tif"), "cannot be read as an image"),
    (_write_bytes(b"\x89PNG\r\n\x1a\nbroken", ".png"), "cannot be read as an image"),
    (_write_bytes(b"hello", ".png"), "cannot be read as an image"),
    (_array(np.zeros((2, 24, 30), np.float32)), "2 channel(s); the model expects 1"),
    (_array(np.random.default_rng(0).integers(0, 255, (24, 30, 3), np.uint8), ".png"), "3 chan"),
    (_array(np.zeros((2, 3, 24, 30), np.float32)), "does not fit a model"),
    (_array(np.zeros((24,), np.float32)), "does not fit a model"),
    (_array(np.zeros((4, 0), np.float32)), ""),
]


@pytest.mark.parametrize(("write", "message"), PREDICT_INPUTS)
def test_predict_reports_a_bad_input_and_writes_nothing_for_it(
    data, tmp_path, capsys, write, message
):
    bad = write(tmp_path / "bad")
    out = tmp_path / "out"
    argv = ["predict", data / "run", bad, data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, bad.name, message)
    assert "1 of 2 input(s) failed" in error
    # The good input is still predicted; the bad one leaves nothing, not even scratch.
    assert visible(out) == ["input_labels.tif"]
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [OWNER_RECORD]  # which model wrote the folder; no scratch


def test_predict_refuses_colliding_outputs_before_any_work(data, tmp_path, capsys):
    for folder, suffix in (("a", ".tif"), ("b", ".png")):
        (tmp_path / folder).mkdir()
        io.write_image(tmp_path / folder / f"x{suffix}", np.zeros((24, 30), np.uint8))
    out = tmp_path / "out"
    argv = ["predict", data / "run", tmp_path / "a" / "x.tif", tmp_path / "b" / "x.png"]
    status, error = run_cli(argv + ["--out", out, "--no-progress"], capsys)
    assert status == 2
    assert_one_line(error, "x.png: would write", "x_labels.tif", "same file stem")
    assert not out.exists()


def test_predict_refuses_an_output_that_would_replace_an_input(data, tmp_path, capsys):
    io.write_image(tmp_path / "x.tif", np.zeros((24, 30), np.uint8))
    io.write_image(tmp_path / "x_labels.tif", np.ones((24, 30), np.uint8))
    before = snapshot(tmp_path)
    argv = ["predict", data / "run", tmp_path, "--out", tmp_path, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "x_labels.tif: is an input and would be overwritten")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "missing", "empty folder"])
def test_predict_bad_out_or_inputs(data, tmp_path, capsys, kind):
    out = tmp_path / "out"
    inputs = [data / "input.tif"]
    expected = ""
    if kind == "file":
        out.write_text("a file")
        expected = "exists and is not a folder"
    elif kind == "missing":
        inputs = [tmp_path / "nothing.tif"]
        expected = "nothing.tif: no such file"
    else:
        (tmp_path / "empty").mkdir()
        inputs = [tmp_path / "empty"]
        expected = "no .tif/.tiff/.png images"
    status, error = run_cli(["predict", data / "run", *inputs, "--out", out], capsys)
    assert status == 2
    assert_one_line(error, expected)
    assert kind != "file" or out.read_text() == "a file"


def test_predict_of_a_bad_model_output_is_refused(data, tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight.fill_(1e38)
        model.classifier.bias.fill_(-1e38)
    run = save_run(tmp_path / "run", model, normalization={"mean": [0.0], "std": [1e-30]})
    out = tmp_path / "out"
    argv = ["predict", run, data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "input.tif")
    assert visible(out) == []


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mode & 0o777
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_the_permissions_of_an_ordinary_write(
    data, tmp_path, capsys, umask, mask, expected
):
    umask(mask)
    out = tmp_path / "out"
    argv = ["predict", data / "run", data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv + ["--save-probabilities", "--instances"], capsys)
    assert status == 0, error
    io.write_image(tmp_path / "own" / "a.png", np.zeros((4, 4), np.uint8))
    io.write_json(tmp_path / "own" / "a.json", {"a": 1})
    save_run(tmp_path / "own" / "run")
    with io.atomic_path(tmp_path / "own" / "folder") as temporary:
        os.remove(temporary)
        temporary.mkdir()  # a writer that makes a folder (a zarr store)
    assert (tmp_path / "own" / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
    modes = {**_modes(out), **_modes(tmp_path / "own")}
    assert len(modes) >= 6 and set(modes.values()) == {expected}, modes
    assert io.current_umask() == mask


# --------------------------------------------------------------------------
# Files that image editors write: read as meant.
# --------------------------------------------------------------------------


def _save_pil(path: Path, array: np.ndarray, mode: str, palette=None) -> Path:
    from PIL import Image

    picture = Image.fromarray(array, mode)
    if palette is not None:
        picture.putpalette(palette)
    picture.save(path)
    return path


def test_gray_png_with_constant_alpha_is_one_channel_with_a_note(tmp_path):
    gray = np.arange(20 * 20, dtype=np.uint8).reshape(20, 20)
    path = _save_pil(tmp_path / "la.png", np.stack([gray, np.full_like(gray, 255)], -1), "LA")
    with pytest.warns(UserWarning, match="constant alpha channel"):
        read = io.read_image(path)
    assert read.shape == (20, 20) and np.array_equal(read, gray)
    rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], -1)
    with pytest.warns(UserWarning, match="constant alpha"):
        assert np.array_equal(io.read_image(_save_pil(tmp_path / "rgba.png", rgba, "RGBA")), gray)


def test_alpha_that_varies_is_kept_and_colour_stays_colour(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (12, 12, 3), np.uint8)
    assert io.read_image(_save_pil(tmp_path / "rgb.png", colour, "RGB")).shape == (12, 12, 3)
    masked = np.concatenate([colour, rng.integers(0, 255, (12, 12, 1), np.uint8)], -1)
    assert io.read_image(_save_pil(tmp_path / "rgba.png", masked, "RGBA")).shape == (12, 12, 4)


def test_palette_labels_give_their_indices_and_colour_labels_are_refused(tmp_path):
    indices = np.zeros((10, 10), np.uint8)
    indices[2:5, 2:5] = 1
    indices[6:9, 6:9] = 2
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759
    path = _save_pil(tmp_path / "p.png", indices, "P", palette)
    assert np.array_equal(io.read_labels(path), indices)
    colour = np.random.default_rng(0).integers(0, 255, (10, 10, 3), np.uint8)
    with pytest.raises(io.InputError, match="is a colour image"):
        io.read_labels(_save_pil(tmp_path / "c.png", colour, "RGB"))


def test_16_bit_and_float_images_keep_their_range(tmp_path):
    deep = np.array([[0, 40000], [65535, 7]], np.uint16)
    io.write_image(tmp_path / "deep.png", deep)
    assert io.read_image(tmp_path / "deep.png").dtype == np.uint16
    assert np.array_equal(io.read_image(tmp_path / "deep.png"), deep)
    values = np.array([[-3.5, 1e6], [0.25, 2.0]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    assert np.array_equal(io.read_image(tmp_path / "f.tif"), values)


def test_training_on_editor_pngs_alpha_images_and_palette_labels(tmp_path, capsys):
    images, labels = write_training_set(tmp_path, size=(32, 32))
    for image_path, label_path in zip(
        sorted(images.iterdir()), sorted(labels.iterdir()), strict=True
    ):
        gray = io.read_image(image_path)
        _save_pil(image_path, np.stack([gray, np.full_like(gray, 255)], -1), "LA")
        indices = (io.read_image(label_path) > 0).astype(np.uint8) * 255
        _save_pil(label_path, indices, "P", [0, 0, 0] + [9, 9, 9] * 255)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY, "--tile", "44"]
    status, error = run_cli(argv, capsys)
    assert status == 0, error
    assert "constant alpha channel" in error and "Traceback" not in error
    config = json.loads((out / io.MODEL_CONFIG).read_text())
    assert config["model"]["in_channels"] == 1


def test_repeated_warnings_are_one_line_with_a_count_and_torch_deprecations_are_not_shown(
    tmp_path, capsys, monkeypatch
):
    import warnings

    from unetile.cli import export

    def noisy(args):
        warnings.warn_explicit(  # as torch says it on import, from its own file
            "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`",
            DeprecationWarning,
            torch.jit._script.__file__,
            366,
        )
        warnings.warn("unclosed file <_io.BufferedReader name='x.zip'>", ResourceWarning, 1)
        for index in range(54):  # each of 27 files twice
            text = f"{tmp_path}/{index // 2:02d}.png: constant alpha channel (255) dropped"
            warnings.warn(text, stacklevel=1)
        for _ in range(3):
            warnings.warn("training tiles held no labelled pixel", stacklevel=1)
        raise io.InputError(f"{tmp_path}/run: stop here")

    monkeypatch.setattr(export, "run", noisy)
    argv = ["export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "m.onnx"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    lines = error.strip().splitlines()
    assert "deprecated" not in error and "script_method" not in error and "unclosed" not in error
    assert lines == [
        f"unetile export: warning: {tmp_path}/00.png: constant alpha channel (255) dropped",
        "unetile export: warning: training tiles held no labelled pixel",
        "unetile export: warning: the same for 26 more file(s) (01.png, 02.png, 03.png, ...): "
        "constant alpha channel (255) dropped",
        "unetile export: warning: training tiles held no labelled pixel (said 3 times)",
        f"unetile export: error: {tmp_path}/run: stop here",
    ]


def test_alpha_warnings_of_many_training_images_are_grouped(tmp_path, capsys):
    names = tuple(f"{index:02d}" for index in range(6))
    images, labels = write_training_set(tmp_path, size=(32, 32), names=names)
    for path in images.iterdir():
        gray = io.read_image(path)
        _save_pil(path, np.stack([gray, np.full_like(gray, 255)], -1), "LA")
    argv = ["train", "--images", images, "--labels", labels, "--out", tmp_path / "run", *TINY]
    status, error = run_cli(argv + ["--tile", "44"], capsys)
    assert status == 0, error
    alpha = [line for line in error.splitlines() if "constant alpha channel" in line]
    assert len(alpha) == 2, error
    assert "00.png: constant alpha channel (255) dropped" in alpha[0]
    assert "the same for 5 more file(s) (01.png, 02.png, 03.png, ...)" in alpha[1]


# --------------------------------------------------------------------------
# Bad training data: refused before the first step, naming the file.
# --------------------------------------------------------------------------


def _replace(kind: str, name: str, array: np.ndarray, suffix: str = ".png"):
    def damage(images: Path, labels: Path) -> None:
        folder = images if kind == "image" else labels
        (folder / f"{name}.png").unlink()
        path = folder / f"{name}{suffix}"
        tifffile.imwrite(path, array) if suffix == ".tif" else io.write_image(path, array)

    return damage


def _tiny_pair(images: Path, labels: Path) -> None:
    io.write_image(images / "a.png", np.zeros((3, 5), np.uint8))
    io.write_image(labels / "a.png", np.full((3, 5), 255, np.uint8))


def _instances_label(images: Path, labels: Path) -> None:
    ids = np.zeros((40, 40), np.uint8)
    for index, top in enumerate(range(0, 40, 10)):
        ids[top : top + 8, 0:8] = index + 1
    io.write_image(labels / "a.png", ids)


TRAIN_DATA_CASES = [
    (_replace("image", "a", np.full((40, 40), np.nan, np.float32), ".tif"), "a.tif", "NaN"),
    (_replace("label", "a", np.zeros((30, 40), np.uint8)), "a.png", "shape (30, 40) differs"),
    (_replace("label", "a", np.arange(1600, dtype=np.uint16).reshape(40, 40)), "a.png", "values"),
    (_instances_label, "a.png", "looks like instance labels"),
    (
        _replace(
            "label", "a", np.repeat([0, 128, 255], 14)[:40].astype(np.uint8)[None].repeat(40, 0)
        ),
        "a.png",
        "found 3 value(s) (0, 128, 255)",
    ),
    (_replace("label", "a", np.full((40, 40), 0.5, np.float32), ".tif"), "a", "label"),
    (_tiny_pair, "a", "3 x 5 px is too small to train on: height and width need at least 16"),
    (_replace("label", "a", np.zeros((3, 5), np.uint8)), "a.png", "differs"),
    (lambda images, labels: (labels / "b.png").unlink(), "b.png", "has no label"),
    (lambda images, labels: (images / "b.png").unlink(), "b.png", "has no image"),
    (lambda images, labels: (images / "b.png").write_bytes(b"junk"), "b.png", "cannot be read"),
    (lambda images, labels: (labels / "b.png").write_bytes(b""), "b.png", "cannot be read"),
    (_replace("image", "a", np.zeros((2, 40, 40), np.uint8), ".tif"), "channels", "same channels"),
]


@pytest.mark.parametrize(("damage", "name", "message"), TRAIN_DATA_CASES)
def test_train_refuses_bad_data_before_the_first_step(tmp_path, capsys, damage, name, message):
    images, labels = write_training_set(tmp_path)
    damage(images, labels)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, name, message)
    assert set(visible(out)) <= {"cache"}  # at most weight maps of the images read


@pytest.mark.parametrize(
    ("mode", "label", "message"),
    [
        ("instances", "binary", "looks like a binary map"),
        ("classes", "binary", "for a binary map use --label-mode membrane --cell-value 255"),
        ("membrane", "ones", "give --cell-value 1"),
    ],
)
def test_labels_that_look_like_another_mode_say_what_was_found(
    tmp_path, capsys, mode, label, message
):
    images, labels = write_training_set(tmp_path)
    if label == "ones":
        for path in labels.iterdir():
            io.write_image(path, (io.read_image(path) > 0).astype(np.uint8))
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv + ["--label-mode", mode], capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out) == []


def _soft_edged_mask(size: int = 64, centres=((20, 22), (44, 40)), radius: float = 11.0):
    """Discs (255) on 0 with anti-aliased edges: each pixel's disc coverage, as editors save."""
    fine = 8
    rows, cols = np.mgrid[0 : size * fine, 0 : size * fine] / fine
    inside = np.zeros(rows.shape, bool)
    for top, left in centres:
        inside |= (rows - top) ** 2 + (cols - left) ** 2 <= radius**2
    coverage = inside.reshape(size, fine, size, fine).mean(axis=(1, 3))
    return np.round(coverage * 255).astype(np.uint8)


def test_a_binary_mask_with_soft_edges_is_binarised_with_one_warning(tmp_path, capsys):
    mask = _soft_edged_mask()
    between = (mask > 0) & (mask < 255)
    assert 0.01 < between.mean() < 0.05 and np.unique(mask).size > 10  # soft, mostly binary
    from unetile.data.dataset import labeled_images_from_arrays, soft_edge_mask

    binary, share, midpoint = soft_edge_mask(mask, 255)
    assert midpoint == 127.5 and share == pytest.approx(between.mean())
    assert np.array_equal(binary, np.where(mask >= 128, 255, 0))
    images = tmp_path / "images"
    labels = tmp_path / "labels"
    for name in ("a", "b"):
        io.write_image(images / f"{name}.png", (mask * 0.6 + 30).astype(np.uint8))
        io.write_image(labels / f"{name}.png", mask)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv + ["--label-mode", "membrane"], capsys)
    assert status == 0, error
    assert "instance" not in error and "Traceback" not in error
    soft = [line for line in error.splitlines() if "soft edges" in line]
    assert len(soft) == 2, error  # one line per file, naming it
    assert "a.png" in soft[0] and "b.png" in soft[1]
    assert f"{between.mean():.2%} of pixels between" in soft[0]
    assert "binarised at the midpoint 127.5" in soft[0] and "two values only" in soft[0]
    assert (out / io.MODEL_WEIGHTS).is_file()
    # Trained on what the midpoint gives: the same classes as the binarised mask.
    with pytest.warns(UserWarning, match="soft edges"):
        [image], _ = labeled_images_from_arrays([mask], [mask], with_weights=False)
    assert np.array_equal(image.classes, (mask >= 128).astype(np.int64))


def test_soft_edges_with_another_cell_value_and_instance_labels_are_told_apart(tmp_path, capsys):
    from unetile.data.dataset import soft_edge_mask

    mask = _soft_edged_mask()
    images, labels = write_training_set(tmp_path, size=(64, 64), names=("a",))
    io.write_image(labels / "a.png", mask)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv + ["--cell-value", "1"], capsys)
    assert status == 2
    assert_one_line(error, "a.png", "binary mask with soft edges", "give --cell-value 255")
    # Instance labels (whole regions of each id) stay instance labels.
    ids = np.zeros((64, 64), np.uint8)
    ids[4:30, 4:30], ids[34:60, 4:30], ids[4:60, 34:60] = 1, 2, 3
    ids[60:, :] = 0
    assert soft_edge_mask(ids, 3) is None
    sparse = np.zeros((200, 200), np.uint16)  # 97% background, the largest id a big cell
    sparse[10:13, 10:13], sparse[20:23, 20:23], sparse[50:80, 50:80] = 1, 2, 9
    assert soft_edge_mask(sparse, 9) is None
    border = np.zeros((64, 64), np.uint8)  # one value along every edge: a border class
    border[10:30, 10:30] = 128
    border[11:29, 11:29] = 255
    assert soft_edge_mask(border, 255) is None


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_train_refuses_an_empty_or_missing_folder(tmp_path, capsys, folder):
    images, labels = write_training_set(tmp_path)
    for path in (images if folder == "images" else labels).iterdir():
        path.unlink()
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, folder, "no .tif/.tiff/.png images")
    argv[2 if folder == "images" else 4] = tmp_path / "missing"
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "missing: not a folder")


def test_tiles_without_labels_warn(tmp_path, capsys):
    images, labels = write_training_set(tmp_path, size=(16, 16))
    for path in labels.iterdir():
        io.write_image(path, np.full((16, 16), 255, np.uint8))  # one cell: a few labelled pixels
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    argv += ["--tile", "44", "--steps", "8", "--log-every", "8"]
    options = tmp_path / "far.toml"
    options.write_text("[augment]\nshift = 400.0\n")  # every tile shifted out of view
    status, error = run_cli(argv + ["--config", options], capsys)
    assert status == 0, error
    assert "training tiles held no labelled pixel" in error


# --------------------------------------------------------------------------
# Run folders are owned: no run or model is replaced unasked.
# --------------------------------------------------------------------------


def test_train_never_replaces_a_model_it_did_not_make(data, tmp_path, capsys):
    out = save_run(tmp_path / "run")
    before = snapshot(out)
    status, error = run_cli(train_argv(data, out) + TINY, capsys)
    assert status == 2
    assert_one_line(error, "already holds a model", "--overwrite")
    assert snapshot(out) == before
    status, error = run_cli(train_argv(data, out) + TINY + ["--overwrite"], capsys)
    assert status == 0, error
    assert snapshot(out)[io.MODEL_WEIGHTS] != before[io.MODEL_WEIGHTS]
    assert (out / "checkpoint.safetensors").is_file()


def test_train_refuses_a_finished_run_and_resume_with_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_argv(data, out) + TINY, capsys)[0] == 0
    before = snapshot(out)
    status, error = run_cli(train_argv(data, out) + TINY, capsys)
    assert status == 2
    assert_one_line(error, "already holds a training run")
    status, error = run_cli(train_argv(data, out) + TINY + ["--resume", "--overwrite"], capsys)
    assert status == 2
    assert_one_line(error, "give one")
    status, error = run_cli(
        train_argv(data, out) + TINY + ["--resume", "--optimizer", "adam"], capsys
    )
    assert status == 2
    assert_one_line(error, "another optimiser")
    assert snapshot(out) == before


def test_train_out_that_is_a_file(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("notes")
    status, error = run_cli(train_argv(data, out) + TINY, capsys)
    assert status == 2
    assert_one_line(error, "exists and is not a folder")
    assert out.read_text() == "notes"


def test_resume_without_a_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    status, error = run_cli(train_argv(data, out) + TINY + ["--resume"], capsys)
    assert status == 2
    assert_one_line(error, "holds no checkpoint")


# --------------------------------------------------------------------------
# evaluate: ground truth is read as said, never guessed silently.
# --------------------------------------------------------------------------


def _cells() -> np.ndarray:
    cells = np.zeros((16, 16), np.uint8)
    cells[1:-1, 1:-1] = 255
    cells[:, 7] = 0
    return cells


def test_a_binary_truth_with_one_stray_value_is_refused_not_read_as_instances(tmp_path, capsys):
    truth = _cells()
    truth[3, 3] = 254  # one stray value, as a lossy editor leaves it
    io.write_image(tmp_path / "truth.png", truth)
    io.write_image(tmp_path / "prediction.png", _cells())
    argv = ["evaluate", tmp_path / "prediction.png", tmp_path / "truth.png"]
    status, error = run_cli(argv + ["--json", tmp_path / "s.json"], capsys)
    assert status == 2
    assert_one_line(error, "truth.png: holds 3 value(s) (0, 254, 255)", "--truth-mode binary")
    assert not (tmp_path / "s.json").exists()
    status, error = run_cli(argv + ["--truth-mode", "binary"], capsys)
    assert status == 2
    assert_one_line(error, "give --cell-value")
    status, error = run_cli(
        argv + ["--truth-mode", "binary", "--cell-value", "255", "--json", tmp_path / "s.json"],
        capsys,
    )
    assert status == 0, error
    scores = json.loads((tmp_path / "s.json").read_text())["mean"]
    assert scores["rand_error"] < 0.01 and scores["pixel_error"] == pytest.approx(1 / 256)


def test_instance_truth_is_said_once(tmp_path, capsys):
    ids = np.zeros((16, 16), np.uint16)
    ids[1:8, 1:8], ids[9:15, 1:8], ids[1:15, 9:15] = 1, 2, 3
    io.write_image(tmp_path / "truth.tif", ids)
    io.write_image(tmp_path / "prediction.tif", ids)
    status, error = run_cli(
        ["evaluate", tmp_path / "prediction.tif", tmp_path / "truth.tif"], capsys
    )
    assert status == 0
    assert error.count("read as instance labels") == 1


def _evaluate_files(truth: np.ndarray, prediction: np.ndarray, suffix=(".tif", ".tif")):
    def write(folder: Path) -> tuple[Path, Path]:
        paths = folder / f"p{suffix[0]}", folder / f"t{suffix[1]}"
        for path, array in zip(paths, (prediction, truth), strict=True):
            tifffile.imwrite(path, array) if path.suffix == ".tif" else io.write_image(path, array)
        return paths

    return write


EVALUATE_FILES = [
    (_evaluate_files(_cells(), _cells()[:10]), [], "differs from ground_truth shape"),
    (_evaluate_files(_cells(), _cells().astype(np.float32)), [], "pass --probabilities"),
    (
        _evaluate_files(_cells(), np.full((16, 16), np.nan, np.float32)),
        ["--probabilities"],
        "must be finite and lie in [0, 1]",
    ),
    (
        _evaluate_files(_cells(), np.full((16, 16), 3.0, np.float32)),
        ["--probabilities"],
        "must be finite and lie in [0, 1]",
    ),
    (
        _evaluate_files(_cells().astype(np.float32) / 3, _cells()),
        ["--truth-mode", "instances"],
        "instance labels are integers",
    ),
    (
        _evaluate_files(
            np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8),
            _cells(),
            (".tif", ".png"),
        ),
        [],
        "is a colour image",
    ),
    (_evaluate_files(_cells(), _cells()), ["--cell-value", "7"], "no pixel of the cell value 7"),
]


@pytest.mark.parametrize(("write", "options", "message"), EVALUATE_FILES)
def test_evaluate_refuses_files_it_cannot_score(tmp_path, capsys, write, options, message):
    prediction, truth = write(tmp_path)
    argv = [
        "evaluate",
        prediction,
        truth,
        "--json",
        tmp_path / "s.json",
        "--csv",
        tmp_path / "s.csv",
    ]
    status, error = run_cli(argv + options, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("target", ["json folder", "csv under a file", "missing truth"])
def test_evaluate_output_paths_and_missing_files(tmp_path, capsys, target):
    prediction, truth = _evaluate_files(_cells(), _cells())(tmp_path)
    argv = ["evaluate", prediction, truth]
    if target == "json folder":
        (tmp_path / "scores").mkdir()
        argv += ["--json", tmp_path / "scores"]
        expected = "scores: Is a directory"
    elif target == "csv under a file":
        argv += ["--csv", tmp_path / "p.tif" / "s.csv"]
        expected = "exists and is not a folder"
    else:
        argv[2] = tmp_path / "gone.tif"
        expected = "gone.tif: no such file"
    before = snapshot(tmp_path)
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, expected)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------
# export: the same model-folder checks, nothing written on failure.
# --------------------------------------------------------------------------

EXPORT_CASES = [
    (_set(("model", "depth"), 30), [], "depth must be a whole number in [1, 10]"),
    (_set(("model", "base_channels"), 1000), [], "weights do not fit config.json"),
    (_set(("normalization", "std"), [0.0]), [], "normalization std must be a finite number > 0"),
    (_set(("classes", "foreground"), 9), [], "classes foreground must be a whole number"),
    (lambda config: None, ["--format", "tflite"], "--format"),
    (lambda config: None, ["--check", "--image", "/nonexistent.tif"], "no such file"),
]


@pytest.mark.parametrize(("edit", "options", "message"), EXPORT_CASES)
def test_export_refuses_a_bad_model_folder(tmp_path, capsys, edit, options, message):
    run = save_run(tmp_path / "run")
    _edit_config(run, edit)
    out = tmp_path / "exported" / "model.onnx"
    argv = ["export", run, "--out", out]
    argv += options if "--format" in options else ["--format", "onnx", *options]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert visible(out.parent) == []


def test_export_to_a_folder_or_under_a_file(tmp_path, capsys):
    run = save_run(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "taken", "Is a directory"), (tmp_path / "file" / "m.pt", "")):
        status, error = run_cli(["export", run, "--format", "torchscript", "--out", out], capsys)
        assert status == 2
        assert_one_line(error, message)
    assert visible(tmp_path / "taken") == [] and (tmp_path / "file").read_text() == "x"


# --------------------------------------------------------------------------
# An output that lands on an input is refused: nothing lost, nothing written.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [io.MODEL_WEIGHTS, io.MODEL_CONFIG])
def test_export_onto_the_runs_own_files_is_refused(tmp_path, capsys, name):
    run = save_run(tmp_path / "run")
    before = snapshot(tmp_path)
    for out in (run / name, tmp_path / "link.pt"):
        if out.name == "link.pt":
            out.symlink_to(run / name)  # the same file by another name
            before = snapshot(tmp_path)
        argv = ["export", run, "--format", "torchscript", "--out", out]
        status, error = run_cli(argv, capsys)
        assert status == 2
        assert_one_line(error, str(out), "--out would overwrite a file of the run", "another --out")
        assert snapshot(tmp_path) == before and not any(run.glob(".*part*"))
    status, error = run_cli(
        ["export", run, "--format", "torchscript", "--out", run / "m.pt"], capsys
    )
    assert status == 0, error  # an export beside the model is fine


@pytest.mark.parametrize("target", ["json on truth", "csv on prediction", "json and csv one file"])
def test_evaluate_output_onto_an_input_is_refused(tmp_path, capsys, target):
    predictions, truths = tmp_path / "pred", tmp_path / "truth"
    for index in range(2):
        io.write_image(predictions / f"{index:02d}_labels.png", _cells())
        io.write_image(truths / f"{index:02d}.png", _cells())
    argv = ["evaluate", predictions, truths]
    if target == "json on truth":
        argv += ["--json", truths / "00.png"]
        expected = ["00.png: --json would overwrite a ground-truth file"]
    elif target == "csv on prediction":
        argv += ["--csv", predictions / "01_labels.png"]
        expected = ["01_labels.png: --csv would overwrite a prediction"]
    else:
        argv += ["--json", tmp_path / "s.txt", "--csv", tmp_path / "s.txt"]
        expected = ["s.txt: given to both --json and --csv"]
    before = snapshot(tmp_path)
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, *expected)
    assert snapshot(tmp_path) == before


def test_train_out_on_its_init_run_or_inside_the_data_is_refused(data, tmp_path, capsys):
    images, labels = write_training_set(tmp_path)
    init = tmp_path / "init"
    assert run_cli(train_argv(tmp_path, init) + TINY, capsys)[0] == 0
    before = snapshot(tmp_path)
    argv = train_argv(tmp_path, init) + TINY + ["--init", init, "--overwrite"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "init: --out would overwrite the --init run", "give another --out")
    assert snapshot(tmp_path) == before
    for folder, flag in ((labels, "--labels"), (images, "--images")):
        out = folder / "run"
        status, error = run_cli(train_argv(tmp_path, out) + TINY, capsys)
        assert status == 2
        assert_one_line(error, f"run: --out lies inside the {flag} folder", "outside it")
        assert not out.exists() and snapshot(tmp_path) == before


# --------------------------------------------------------------------------
# Faults: two processes on one folder, a full disk, kill -9.
# --------------------------------------------------------------------------


@pytest.mark.slow  # a second Python process
def test_second_training_on_a_folder_refuses_with_the_first_ones_pid(data, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from unetile import io\n"
            f"with io.folder_lock({str(out)!r}):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        status, error = run_cli(train_argv(data, out) + TINY, capsys)
        assert status == 2
        assert_one_line(error, f"is being trained by another process (PID {holder.pid}")
        assert visible(out) == []
    finally:
        holder.kill()
        holder.wait()
    # The kernel freed the killed holder's lock: the folder is usable, with a note.
    status, error = run_cli(train_argv(data, out) + TINY, capsys)
    assert status == 0, error
    assert f"process {holder.pid} was stopped while it held this folder" in error


def test_a_lock_held_in_this_process_also_refuses(data, tmp_path, capsys):
    out = tmp_path / "run"
    with io.folder_lock(out):
        status, error = run_cli(train_argv(data, out) + TINY, capsys)
    assert status == 2
    assert_one_line(error, f"PID {os.getpid()}")


def _no_space(path, code=errno.ENOSPC):
    raise OSError(code, os.strerror(code), str(path))


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "No space left on device (the disk is full"),
        (errno.EROFS, "Read-only file system (read-only file system: choose a folder"),
        (errno.EACCES, "Permission denied (no permission: choose a folder"),
        (errno.EDQUOT, "(the disk quota is used up"),
    ],
)
def test_write_errors_while_predicting_leave_no_output_and_no_scratch(
    data, tmp_path, capsys, monkeypatch, code, message
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(tifffile, "imwrite", lambda path, *a, **k: _no_space(path, code))
    argv = ["predict", data / "run", data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, message)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_full_disk_at_the_final_save_keeps_the_checkpoint_and_says_where(
    data, tmp_path, capsys, monkeypatch
):
    from unetile import train as training

    out = tmp_path / "run"
    real_save = card.save_model

    def failing_save(run_dir, model, config, name=io.MODEL_WEIGHTS):
        if name == training.LAST_WEIGHTS:
            _no_space(Path(run_dir) / name)
        real_save(run_dir, model, config, name)

    monkeypatch.setattr(card, "save_model", failing_save)
    argv = train_argv(data, out) + TINY + ["--steps", "4", "--checkpoint-every", "2"]
    argv += ["--augment", "none"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "No space left on device", "the checkpoint of step", "--resume")
    assert (out / training.CHECKPOINT).is_file()
    monkeypatch.setattr(card, "save_model", real_save)
    status, error = run_cli(argv + ["--resume"], capsys)
    assert status == 0, error
    assert json.loads((out / "summary.json").read_text())["step"] == 4


def test_scratch_of_a_killed_prediction_is_removed_by_the_next_run(data, tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / f"{io.SCRATCH_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / io.LOCK_NAME).write_text("12345\n")
    (stale / "labels.zarr").write_bytes(b"\0" * 4096)
    live = out / f"{io.SCRATCH_PREFIX}live"
    live.mkdir()
    with io.folder_lock(live):  # another prediction still at work
        argv = ["predict", data / "run", data / "input.tif", "--out", out, "--no-progress"]
        status, error = run_cli(argv, capsys)
    assert status == 0, error
    assert "removed the scratch of an interrupted run" in error
    assert not stale.exists() and live.exists()
    assert visible(out) == ["input_labels.tif"]


@pytest.mark.slow  # a second Python process
def test_kill_9_during_training_then_resume_gives_the_same_weights(data, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    options = TINY + ["--steps", "30", "--checkpoint-every", "2", "--threads", "1"]
    options += ["--augment", "none", "--optimizer", "adam", "--lr", "0.01"]
    straight = tmp_path / "straight"
    assert run_cli(train_argv(data, straight) + options, capsys)[0] == 0
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "unetile", *map(str, train_argv(data, out) + options)],
        env={**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[1])},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "the run ended before it was killed"
    status, error = run_cli(train_argv(data, out) + options + ["--resume"], capsys)
    assert status == 0, error
    for name in ("last.safetensors", "model.safetensors"):
        first, second = load_file(straight / name), load_file(out / name)
        assert all(torch.equal(first[key], second[key]) for key in first), name


def test_channels_states_what_the_model_expects(tmp_path, capsys):
    images, labels = write_training_set(tmp_path)
    out = tmp_path / "rgb"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv + ["--channels", "3"], capsys)
    assert status == 0, error
    assert json.loads((out / io.MODEL_CONFIG).read_text())["model"]["in_channels"] == 3
    # A gray image feeds the colour model as R = G = B; colour into a gray model is refused.
    predicted = tmp_path / "predicted"
    argv = ["predict", out, images / "a.png", "--out", predicted, "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    colour = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
    io.write_image(tmp_path / "colour" / "a.png", colour)
    gray_run = tmp_path / "gray"
    argv = ["train", "--images", tmp_path / "colour", "--labels", labels, "--out", gray_run]
    argv += [*TINY, "--channels", "1"]
    (labels / "b.png").unlink()
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, "a: has 3 channel(s); the model expects 1", "--channels")
    assert visible(gray_run) in ([], ["cache"])
    argv = ["predict", tmp_path / "rgb", tmp_path / "colour" / "a.png", "--out", predicted]
    assert run_cli(argv + ["--no-progress"], capsys)[0] == 0
    status, error = run_cli(
        [
            "predict",
            save_run(tmp_path / "run"),
            tmp_path / "colour" / "a.png",
            "--out",
            tmp_path / "gray_predicted",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 2
    assert_one_line(error, "has 3 channel(s); the model expects 1")


def test_evaluate_reads_palette_predictions_as_their_indices(tmp_path, capsys):
    from PIL import Image

    cells = (_cells() > 0).astype(np.uint8)
    picture = Image.fromarray(cells, "P")
    picture.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    picture.save(tmp_path / "prediction.png")
    io.write_image(tmp_path / "truth.png", _cells())
    argv = ["evaluate", tmp_path / "prediction.png", tmp_path / "truth.png"]
    status, error = run_cli(argv + ["--json", tmp_path / "s.json"], capsys)
    assert status == 0, error
    assert json.loads((tmp_path / "s.json").read_text())["mean"]["pixel_error"] == 0.0


def test_init_from_a_model_with_nan_weights_is_refused(data, tmp_path, capsys):
    init = tmp_path / "init"
    assert run_cli(train_argv(data, init) + TINY, capsys)[0] == 0
    config = json.loads((init / io.MODEL_CONFIG).read_text())
    model = UNet.from_config(config["model"])
    with torch.no_grad():
        model.classifier.bias[0] = float("inf")
    card.save_model(init, model, config)
    out = tmp_path / "tuned"
    status, error = run_cli(train_argv(data, out) + TINY + ["--init", init], capsys)
    assert status == 2
    assert_one_line(error, "holds NaN or infinite values", "--init")
    assert set(visible(out)) <= {"cache"}


# --------------------------------------------------------------------------
# Silent nonsense, second round: options that would have trained or
# predicted something meaningless end in one line.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "all_ignored", "message"),
    [
        ("0", False, "--ignore-value 0 leaves only class 1"),
        ("0", True, "every label pixel is the --ignore-value 0; nothing to learn"),
    ],
)
def test_an_ignore_value_that_removes_a_whole_class_is_refused(
    tmp_path, capsys, value, all_ignored, message
):
    images, labels = write_training_set(tmp_path)
    if all_ignored:
        for path in labels.iterdir():
            io.write_image(path, np.zeros((40, 40), np.uint8))
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, *TINY]
    status, error = run_cli(argv + ["--ignore-value", value], capsys)
    assert status == 2
    assert_one_line(error, str(labels), message, "no class left" if not all_ignored else "")
    assert not (out / io.MODEL_WEIGHTS).exists()
    assert set(visible(out)) <= {"cache"}


def test_resuming_a_region_prediction_at_another_precision_is_refused(
    data, tmp_path, capsys, monkeypatch
):
    from unetile import precision
    from unetile.predict.regions import RECORDS, work_folder

    monkeypatch.setattr(precision, "cpu_features", lambda: {"avx2": True, "avx512_bf16": True})
    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, np.random.default_rng(1).random((60, 50), np.float32))
    out = tmp_path / "out"
    argv = ["predict", data / "run", image, "--out", out, "--tile", "12", "--no-progress"]
    argv += ["--resume"]
    calls, original = [], UNet.forward

    def interrupted(self, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, inputs)

    monkeypatch.setattr(UNet, "forward", interrupted)
    assert run_cli(argv + ["--precision", "fp32"], capsys)[0] == 130
    monkeypatch.setattr(UNet, "forward", original)
    work = work_folder(out / "cells_labels.tif")
    records = sorted((work / RECORDS).iterdir())
    assert records
    status, error = run_cli(argv + ["--precision", "bf16"], capsys)
    assert status == 2
    assert_one_line(error, str(work), "another precision (fp32, now bf16)", "delete that folder")
    assert sorted((work / RECORDS).iterdir()) == records and visible(out) == []
    assert run_cli(argv + ["--precision", "fp32"], capsys)[0] == 0
    assert visible(out) == ["cells_labels.tif"] and not work.exists()


def test_a_second_model_into_the_same_out_is_refused(data, tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.classifier.bias += 0.1
    other = save_run(tmp_path / "other", model)
    out = tmp_path / "out"
    argv = [data / "input.tif", "--out", out, "--no-progress"]
    assert run_cli(["predict", data / "run", *argv], capsys)[0] == 0
    assert run_cli(["predict", data / "run", *argv], capsys)[0] == 0  # the same model: fine
    before = snapshot(out)
    status, error = run_cli(["predict", other, *argv], capsys)
    assert status == 2
    assert_one_line(error, str(out), "holds the outputs of another model", "input_labels.tif")
    assert snapshot(out) == before
    record = json.loads((out / OWNER_RECORD).read_text())
    assert record["outputs"] == ["input_labels.tif"]
    (out / "input_labels.tif").unlink()  # its outputs deleted: the folder is free again
    assert run_cli(["predict", other, *argv], capsys)[0] == 0
    assert visible(out) == ["input_labels.tif"]


def test_a_one_class_model_and_a_bad_pixel_size_with_rescale_are_refused(data, tmp_path, capsys):
    one = save_run(tmp_path / "one", tiny_model(num_classes=1), classes={"foreground": 0})
    out = tmp_path / "out"
    argv = [data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(["predict", one, *argv], capsys)
    assert status == 2
    assert_one_line(error, str(one / io.MODEL_CONFIG), "model num_classes 1", "train it again")
    assert visible(out) == []
    shrunk = save_run(tmp_path / "shrunk", pixel_size_um=[-0.5, -0.5])
    status, error = run_cli(["predict", shrunk, *argv, "--rescale", "--pixel-size", "1"], capsys)
    assert status == 2
    assert_one_line(error, str(shrunk / io.MODEL_CONFIG), "'pixel_size_um' must be 1 or 2")
    assert visible(out) == []


def test_auto_plan_on_images_too_small_to_train_gives_trainings_error(tmp_path, capsys):
    images, labels = write_training_set(tmp_path)
    _tiny_pair(images, labels)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--labels", labels, "--out", out, "--quiet"]
    trained = run_cli(argv + ["--depth", "2", "--base-channels", "2", "--steps", "2"], capsys)
    planned = run_cli(argv + ["--preset", "auto", "--plan"], capsys)
    assert trained[0] == planned[0] == 2
    message = "a: 3 x 5 px is too small to train on: height and width need at least 16"
    assert_one_line(trained[1], message)
    assert_one_line(planned[1], message)
    assert [line for line in planned[1].splitlines() if "error" in line] == [
        line for line in trained[1].splitlines() if "error" in line
    ]
    assert set(visible(out)) <= {"cache"}


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_one(
    data, tmp_path, capsys, monkeypatch
):
    import safetensors.torch
    from safetensors import SafetensorError

    from unetile import train as training

    out = tmp_path / "run"
    real_save, checkpoints = safetensors.torch.save_file, []

    def full_disk(tensors, filename, metadata=None):
        if metadata is not None:  # a checkpoint: the second finds the disk full
            checkpoints.append(filename)
            if len(checkpoints) == 2:
                raise SafetensorError(
                    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                    'message: "No space left on device" })'
                )
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    argv = train_argv(data, out) + TINY + ["--steps", "4", "--checkpoint-every", "2"]
    argv += ["--augment", "none"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(
        error,
        str(out / training.CHECKPOINT),
        "No space left on device (the disk is full",
        "the checkpoint of step 2 is kept",
        "--resume",
    )
    assert not [p for p in out.iterdir() if ".tmp" in p.name or ".part" in p.name]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    status, error = run_cli(argv + ["--resume"], capsys)
    assert status == 0, error
    assert json.loads((out / "summary.json").read_text())["step"] == 4


def _interrupted_region_run(argv, capsys, monkeypatch, at_call=3) -> None:
    """``predict ARGV`` stopped by Ctrl-C in the forward pass number ``at_call``."""
    calls, original = [], UNet.forward

    def interrupted(self, inputs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return original(self, inputs)

    monkeypatch.setattr(UNet, "forward", interrupted)
    assert run_cli(argv, capsys)[0] == 130
    monkeypatch.setattr(UNet, "forward", original)


def test_a_truncated_completion_record_is_said_and_its_region_done_again(
    data, tmp_path, capsys, monkeypatch
):
    from unetile.predict.regions import RECORDS, work_folder

    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, np.random.default_rng(1).random((60, 50), np.float32))
    common = ["predict", data / "run", image, "--tile", "12", "--no-progress", "--resume"]
    common += ["--precision", "fp32", "--instances"]
    assert run_cli(common + ["--out", tmp_path / "straight"], capsys)[0] == 0
    out = tmp_path / "out"
    _interrupted_region_run(common + ["--out", out], capsys, monkeypatch, at_call=4)
    record = work_folder(out / "cells_labels.tif") / RECORDS / "0.npz"
    record.write_bytes(record.read_bytes()[:40])
    status, error = run_cli(common + ["--out", out], capsys)
    assert status == 0, error
    assert "Traceback" not in error and ": error: " not in error
    assert f"{record}: a damaged completion record" in error and "predicted again" in error
    for name in ("cells_labels.tif", "cells_instances.tif"):
        expected = tifffile.imread(tmp_path / "straight" / name)
        assert np.array_equal(tifffile.imread(out / name), expected), name


def test_a_corrupt_zarr_chunk_is_reported_and_the_rest_of_the_batch_written(data, tmp_path, capsys):
    import zarr

    store = tmp_path / "a.zarr"
    array = zarr.open_array(str(store), mode="w", shape=(40, 40), chunks=(20, 20), dtype="f4")
    array[:] = np.random.default_rng(0).random((40, 40))
    chunk = next(p for p in sorted(store.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not a chunk")
    out = tmp_path / "out"
    argv = ["predict", data / "run", store, data / "input.tif", "--out", out, "--no-progress"]
    status, error = run_cli(argv, capsys)
    assert status == 2
    assert_one_line(error, f"{store}: cannot read its pixels", "damaged chunk or file")
    assert "1 of 2 input(s) failed" in error
    assert visible(out) == ["input_labels.tif"]


@pytest.mark.parametrize(
    "name",
    [pytest.param("model.zip", marks=pytest.mark.slow), "model.pt"],  # bioimageio imports slowly
)
def test_the_partial_files_of_a_killed_export_are_removed_by_the_next(data, tmp_path, capsys, name):
    stem, suffix = name.split(".")
    left = [tmp_path / f".{stem}.k1ll3d.part.{suffix}"]
    left.append(tmp_path / f"..{stem}.k1ll3d.part.a8c.part.{suffix}")  # nested by a packager
    others = [tmp_path / f".other.x.part.{suffix}", tmp_path / f".{stem}x.y.part.{suffix}"]
    for path in left + others:
        path.write_bytes(b"\0" * 2048)
    argv = ["export", data / "run", "--format", "torchscript", "--out", tmp_path / name]
    if suffix == "zip":  # the bioimage.io package of 'export --check'
        pytest.importorskip("bioimageio.spec")
        argv = ["export", data / "run", "--format", "bioimageio", "--out", tmp_path / name]
        argv += ["--image", data / "input.tif"]
    status, error = run_cli(argv, capsys)
    assert status == 0, error
    assert f"removed 2 partial file(s) of an interrupted write of {name}" in error
    assert not any(path.exists() for path in left) and all(path.exists() for path in others)
    assert (tmp_path / name).is_file()


def test_a_plain_predict_after_a_killed_region_run_removes_its_work_folder(
    data, tmp_path, capsys, monkeypatch
):
    from unetile.predict.regions import work_folder

    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, np.random.default_rng(1).random((60, 50), np.float32))
    out = tmp_path / "out"
    argv = ["predict", data / "run", image, "--out", out, "--no-progress", "--tile", "12"]
    _interrupted_region_run(argv + ["--resume"], capsys, monkeypatch)
    work = work_folder(out / "cells_labels.tif")
    assert work.is_dir()
    status, error = run_cli(argv, capsys)
    assert status == 0, error
    assert f"{work}: removed the work folder of an interrupted region run" in error
    assert not work.exists() and visible(out) == ["cells_labels.tif"]


@pytest.mark.parametrize("pixel_size", ["0.0001", "100"])
def test_rescale_beyond_64x_is_refused_naming_the_pixel_sizes(data, tmp_path, capsys, pixel_size):
    run = save_run(tmp_path / "run", pixel_size_um=[0.5, 0.5])
    out = tmp_path / "out"
    argv = ["predict", run, data / "input.tif", "--out", out, "--no-progress", "--rescale"]
    status, error = run_cli(argv + ["--pixel-size", pixel_size], capsys)
    assert status == 2
    assert_one_line(error, "input.tif: pixel size", "the model's 0.5 x 0.5 µm", "at most 64x")
    assert "memory" not in error and visible(out) == []
    assert run_cli(argv + ["--pixel-size", "0.25"], capsys)[0] == 0  # 2x: resampled


def test_a_run_folder_whose_name_is_not_utf8_trains_predicts_exports_resumes_and_inits(
    data, tmp_path, capsys
):
    # A name from another system's encoding (Latin-1 "é"): Python holds it as a surrogate.
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run-\xe9"))
    argv = train_argv(data, out) + TINY + ["--augment", "none", "--checkpoint-every", "1"]
    assert run_cli(argv, capsys)[0] == 0
    predicted = tmp_path / "predicted"
    status, error = run_cli(["predict", out, data / "input.tif", "--out", predicted], capsys)
    assert status == 0, error
    assert (predicted / "input_labels.tif").is_file()
    status, error = run_cli(
        ["export", out, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys
    )
    assert status == 0, error
    longer = [a if a != "2" or i != argv.index("--steps") + 1 else "3" for i, a in enumerate(argv)]
    status, error = run_cli(longer + ["--resume"], capsys)
    assert status == 0, error
    tuned = tmp_path / "tuned"
    status, error = run_cli(train_argv(data, tuned) + TINY + ["--init", out], capsys)
    assert status == 0, error
