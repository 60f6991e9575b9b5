"""config.py: the options' one source, the output tile, the old input-tile spellings."""

import json
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_train import write_dataset

from unetile import io
from unetile.cli import build_parser, main
from unetile.network.model import is_valid_input_size, output_size
from unetile.train.config import (
    TrainConfig,
    is_valid_output_size,
    make_config,
    options_table,
    read_toml,
    upgrade_stored_options,
)
from unetile.train.loop import tile_geometry

pytestmark = pytest.mark.fast

README_OPTIONS = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_the_parser_is_the_fields_flags_types_and_choices():
    actions = {action.dest: action for action in train_parser()._actions}
    for item in fields(TrainConfig):
        if item.metadata["flag"] is False:  # written by unetile (the auto plan), no flag
            assert item.name not in actions and item.name == "auto"
            continue
        action = actions[item.name]
        assert action.default is None  # "not given": the preset and the file fill it
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        assert flag in action.option_strings
        assert item.metadata["help"] in action.help
        if item.metadata["choices"]:
            assert tuple(action.choices) == tuple(item.metadata["choices"])
    assert actions["steps"].type is int and actions["learning_rate"].type is float
    assert actions["compile"].option_strings == ["--compile", "--no-compile"]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_config(optimizer="lbfgs")  # the same choices check TOML and Python options


def test_docs_options_table_is_generated_from_the_fields():
    # Regenerate: python -c "from unetile.train.config import options_table; print(options_table())"
    assert options_table() in README_OPTIONS.read_text()


@settings(max_examples=40, deadline=None)
@given(
    depth=st.integers(2, 5), padding=st.sampled_from(["valid", "same"]), size=st.integers(4, 700)
)
def test_tile_is_the_output_tile_and_the_old_input_spelling_gives_the_same_geometry(
    depth, padding, size
):
    if not is_valid_input_size(size, depth, padding):
        return
    output = output_size(size, depth, padding)
    assert is_valid_output_size(output, depth, padding)
    config = make_config(depth=depth, padding=padding, tile=(output,))
    images = [(2048, 2048)]
    assert tile_geometry(config, images) == ((size, size), (output, output))
    with pytest.warns(FutureWarning, match=f"read as tile = {output}"):
        old = make_config(depth=depth, padding=padding, tile_shape=(size,))
    assert old.tile == (output,)
    # The automatic tile: the largest valid output up to max_tile.
    bounded = make_config(depth=depth, padding=padding, max_tile=output)
    assert tile_geometry(bounded, images) == ((size, size), (output, output))


def test_paper_tile_in_and_out_and_an_input_size_read_as_before():
    config = make_config()
    assert tile_geometry(config, [(512, 512)]) == ((572, 572), (388, 388))  # the paper's
    assert tile_geometry(make_config(tile=388), [(512, 512)]) == ((572, 572), (388, 388))
    with pytest.warns(FutureWarning, match=r"tile 572 is an input size.*write --tile 388"):
        assert make_config(tile="572").tile == (388,)
    with pytest.raises(ValueError, match="tile 390 is not an output size .* 388 or 404"):
        make_config(tile=390)
    with pytest.raises(ValueError, match="give the output tile 'tile' only"):
        make_config(tile=388, tile_shape=572)
    with pytest.raises(ValueError, match="tile_shape 570 .* is not valid"):
        make_config(tile_shape=570)
    # Depth 2 (context margin 8 px): the largest output tile <= 40 that fits 48 px images.
    assert tile_geometry(make_config(depth=2, max_tile=40), [(48, 48)]) == ((56, 56), (40, 40))


def test_cli_reads_an_input_size_tile_and_an_old_toml_key_with_one_line_warnings(tmp_path, capsys):
    options = tmp_path / "old.toml"
    options.write_text("tile_shape = [572, 572]\n")
    with pytest.warns(FutureWarning, match="'tile_shape' .* tile = 388,388"):
        assert make_config(**read_toml(options)).tile == (388, 388)
    base = ["train", "--images", str(tmp_path / "none"), "--labels", str(tmp_path / "none")]
    for extra in (["--tile", "572"], ["--config", str(options)], ["--max-tile", "572"]):
        assert main([*base, "--out", str(tmp_path / "run"), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("unetile train: warning:"), lines
        assert "388" in lines[0] and "not a folder" in lines[1]


def test_old_run_resumes_with_its_tiles_silently(tmp_path, capsys):
    images, labels = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    common = ["--depth", "2", "--base-channels", "2", "--threads", "1", "--quiet"]
    first = ["train", "--images", str(images), "--labels", str(labels), "--out", str(run)]
    assert main([*first, *common, "--steps", "3", "--checkpoint-every", "2"]) == 0
    stored = io.read_json(run / io.MODEL_CONFIG)
    assert stored["training"]["tile"] is None and stored["tile"]["input_shape"] == [56, 56]
    # What a run of the previous release stored: the input tile and an input bound.
    training = {k: v for k, v in stored["training"].items() if k != "tile"}
    stored["training"] = {**training, "tile_shape": [56], "max_tile": 60, "steps": 5}
    (run / io.MODEL_CONFIG).write_text(json.dumps(stored))
    assert upgrade_stored_options(stored["training"])["max_tile"] == 44
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    resumed = io.read_json(run / io.MODEL_CONFIG)
    assert resumed["training"]["tile"] == [40] and "tile_shape" not in resumed["training"]
    assert resumed["tile"] == stored["tile"]
    assert io.read_json(run / "summary.json")["step"] == 5
