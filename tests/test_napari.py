"""The napari plugin: its logic headless (``ViewerModel``, workers iterated in this thread),
its Qt widgets under a display (``xvfb-run -a``), and the loop segment -> correct ->
fine-tune -> segment again end to end."""

import importlib
import importlib.util
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.components import ViewerModel  # noqa: E402

from unetile import io  # noqa: E402
from unetile.napari import _logic  # noqa: E402
from unetile.napari._sample import touching_cells  # noqa: E402
from unetile.napari._session import KEY, Session, session  # noqa: E402
from unetile.predict import card  # noqa: E402
from unetile.train.config import make_config  # noqa: E402
from unetile.train.loop import _sha256, prepare_arrays
from unetile.train.run import train

SMALL = dict(
    depth=2,
    base_channels=4,
    tile=(84,),
    threads=1,
    compile=False,
    log_every=5,
    checkpoint_every=1000,
    validate_every=1000,
    learning_rate=0.01,
)

needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY") or importlib.util.find_spec("pytestqt") is None,
    reason="Qt widget tests need a display (run under xvfb-run -a) and pytest-qt",
)


@pytest.fixture(scope="module")
def cells():
    return _logic.synthetic_cells(128, seed=3)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, cells):
    """A tiny model trained in a few seconds on the synthetic cells."""
    image, instances = cells
    out = tmp_path_factory.mktemp("models") / "base"
    config = make_config("cpu-fast", label_mode="instances", out=str(out), steps=40, **SMALL)
    train(config, progress=False, data=prepare_arrays(config, [image], [instances]))
    return out


def viewer_with(image, name="cells") -> tuple[ViewerModel, Session]:
    viewer = ViewerModel()
    viewer.add_image(image, name=name)
    return viewer, session(viewer)


def segmented(model_run, image):
    viewer, state = viewer_with(image)
    state.load(model_run)
    state.show(*_logic.run_to_end(state.segment_work("cells")))
    return viewer, state


# --------------------------------------------------------------------------
# Manifest and sample data
# --------------------------------------------------------------------------


def test_the_manifest_is_valid_and_names_what_exists():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("unetile")
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Segment",
        "Fine-tune",
        "Train",
        "Evaluate",
    }
    for command in manifest.contributions.commands:
        module, _, name = command.python_name.partition(":")
        assert hasattr(importlib.import_module(module), name), command.python_name


def test_sample_data_is_the_demos_touching_cells():
    (image, image_meta, image_kind), (truth, truth_meta, truth_kind) = touching_cells()
    assert (image_kind, truth_kind) == ("image", "labels")
    assert image.shape == truth.shape == (384, 384) and image.dtype == np.float32
    assert truth.max() >= 10 and image_meta["name"] == "cells"


# --------------------------------------------------------------------------
# Segment
# --------------------------------------------------------------------------


def test_segment_yields_progress_and_puts_three_layers(model_run, cells):
    image, _ = cells
    viewer, state = viewer_with(image)
    model = state.load(model_run)
    work = state.segment_work("cells")
    progress = []
    result = None
    while True:
        try:
            progress.append(next(work))
        except StopIteration as stop:
            result = stop.value
            break
    totals = {total for _, total in progress}
    assert len(totals) == 1 and progress[0][0] == 0 and progress[-1][0] == progress[-1][1]
    name, probabilities = result
    assert name == "cells" and probabilities.shape == (2, *image.shape)
    seg = state.show(name, probabilities)
    assert [layer.name for layer in viewer.layers] == [
        "cells",
        "cells probabilities",
        "cells labels",
        "cells instances",
    ]
    np.testing.assert_array_equal(viewer.layers["cells probabilities"].data, probabilities[1])
    assert viewer.layers["cells instances"].metadata[KEY] == {
        "image": "cells",
        "run": str(model_run),
        "kind": "instances",
    }
    # As the library draws them, with the options the model carries.
    from unetile.predict.engine import predict
    from unetile.predict.instances import InstanceOptions, extract_instances

    np.testing.assert_allclose(probabilities, predict(model.model, image, progress=False))
    stored = InstanceOptions.from_dict({**model.config["instances"], "threshold": 0.5})
    np.testing.assert_array_equal(seg.instances, extract_instances(probabilities, stored))
    assert viewer.layers.selection.active.name == "cells instances"


def test_post_processing_is_reapplied_without_the_network(model_run, cells, monkeypatch):
    image, _ = cells
    viewer, state = segmented(model_run, image)
    import unetile.predict

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(unetile.predict, "iter_predictions", no_network)
    probabilities = state.probabilities["cells"]
    results = state.set_post(method="components", min_size=0, threshold=0.3)
    expected = (probabilities[1] > 0.3).astype(np.uint8)
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, expected)
    assert results["cells"].instances.max() >= 1
    state.set_post(min_size=10**6)
    assert viewer.layers["cells instances"].data.max() == 0
    assert state.post.min_size == 10**6 and state.post.threshold == 0.3


def test_a_bad_option_is_one_line_and_changes_nothing(model_run, cells):
    image, _ = cells
    viewer, state = segmented(model_run, image)
    before = state.post
    with pytest.raises(io.InputError, match="threshold"):
        state.set_post(threshold=1.5)
    assert state.post == before


def test_cancel_leaves_the_layers_as_they_were(model_run, cells):
    image, _ = cells
    viewer, state = viewer_with(image)
    state.load(model_run)
    work = state.segment_work("cells")
    next(work), next(work)
    work.close()  # napari's worker.quit() closes the generator at its next yield
    assert [layer.name for layer in viewer.layers] == ["cells"]


def test_errors_are_the_librarys_one_line(tmp_path, model_run, cells):
    image, _ = cells
    viewer, state = viewer_with(np.stack([image] * 3, axis=-1), name="rgb")
    with pytest.raises(io.InputError, match="not a run folder"):
        state.load(tmp_path / "nothing")
    with pytest.raises(io.InputError, match="no model"):
        _logic.run_to_end(state.segment_work("rgb"))
    state.load(model_run)
    with pytest.raises(io.InputError) as error:
        _logic.run_to_end(state.segment_work("rgb"))
    assert "1 input channel" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(io.InputError, match="no layer 'gone'"):
        _logic.run_to_end(state.segment_work("gone"))


# --------------------------------------------------------------------------
# Lazy and multiscale layers
# --------------------------------------------------------------------------


def test_dask_zarr_and_multiscale_layers_segment_as_their_numpy_image(tmp_path, model_run, cells):
    """A lazy layer is read tile by tile in the worker; a multiscale layer at its level 0."""
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    image, _ = cells
    viewer, state = viewer_with(image)
    state.load(model_run)
    expected = _logic.run_to_end(state.segment_work("cells"))[1]
    stored = zarr.open_array(
        str(tmp_path / "cells.zarr"), mode="w", shape=image.shape, chunks=(32, 32), dtype="f4"
    )
    stored[:] = image
    viewer.add_image(da.from_array(image, chunks=(32, 32)), name="dask")
    viewer.add_image(stored, name="zarr")
    levels = [da.from_array(image, chunks=32), da.from_array(image[::2, ::2], chunks=32)]
    viewer.add_image(levels, name="multiscale", multiscale=True)
    for name in ("dask", "zarr", "multiscale"):
        assert not isinstance(viewer.layers[name].data, np.ndarray)
        found, probabilities = _logic.run_to_end(state.segment_work(name))
        assert found == name
        np.testing.assert_array_equal(probabilities, expected)
        state.show(name, probabilities)
        assert viewer.layers[f"{name} instances"].data.shape == image.shape


# --------------------------------------------------------------------------
# bioimage.io packages
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(model_run, cells, tmp_path_factory):
    """``unetile export RUN --format bioimageio`` of the tiny model."""
    pytest.importorskip("bioimageio.spec")
    import tifffile

    from unetile.cli import main

    folder = tmp_path_factory.mktemp("package")
    tifffile.imwrite(folder / "cells.tif", cells[0])
    out = folder / "cells model.zip"
    arguments = ["export", str(model_run), "--format", "bioimageio", "--out", str(out)]
    assert main([*arguments, "--image", str(folder / "cells.tif")]) == 0
    return out


def test_a_package_segments_exactly_as_its_run_folder(model_run, package, cells):
    image, _ = cells
    from_run = segmented(model_run, image)[1]
    viewer, state = viewer_with(image)
    model = state.load(package)
    assert model.is_package and model.name == "cells model" and model.source == package
    assert model.config == io.read_json(model_run / "config.json")
    state.show(*_logic.run_to_end(state.segment_work("cells")))
    assert state.post == from_run.post
    np.testing.assert_array_equal(state.probabilities["cells"], from_run.probabilities["cells"])
    for kind in ("labels", "instances"):
        ours = from_run.viewer.layers[f"cells {kind}"].data
        np.testing.assert_array_equal(viewer.layers[f"cells {kind}"].data, ours)
    assert viewer.layers["cells instances"].metadata[KEY]["run"] == str(package)
    # Fine-tuning it writes a new run folder beside the package, never into the temporary one.
    state.add_pair("cells", "cells instances")
    summary = _logic.run_to_end(state.fine_tune_work(steps=2))
    assert Path(summary["run_dir"]) == package.parent / "cells model_tuned1"
    assert state.adopt(summary).run_dir == package.parent / "cells model_tuned1"


def test_an_older_package_gives_its_torchscript_weights(tmp_path, model_run, package):
    """Without the attached run files: the TorchScript file's weights (read, not run) and its
    metadata's network, normalisation and classes."""
    older = tmp_path / "older.zip"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(older, "w") as target:
        for name in source.namelist():
            if name not in ("config.json", "model.safetensors"):
                target.writestr(name, source.read(name))
    model = _logic.LoadedModel.load(older)
    run, config = card.load_model(model_run)
    for key, value in run.state_dict().items():
        assert np.array_equal(model.model.state_dict()[key].numpy(), value.numpy()), key
    for key in ("model", "normalization", "classes"):
        assert model.config[key] == config[key]


def test_a_bad_or_foreign_zip_is_one_line(tmp_path):
    (tmp_path / "text.zip").write_text("not a zip")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("rdf.yaml", "type: model\n")
        archive.writestr("cat.png", b"png")
    with zipfile.ZipFile(tmp_path / "broken.zip", "w") as archive:
        archive.writestr("weights.torchscript.pt", b"not torchscript")
    cases = {
        "missing.zip": "no such file",
        "text.zip": "not a readable .zip",
        "photos.zip": "is no model package of 'unetile export",
        "broken.zip": "its TorchScript weights cannot be read",
    }
    for name, message in cases.items():
        with pytest.raises(io.InputError) as error:
            _logic.LoadedModel.load(tmp_path / name)
        assert message in str(error.value) and "\n" not in str(error.value), name


# --------------------------------------------------------------------------
# Fine-tune and train
# --------------------------------------------------------------------------


def test_a_new_run_folder_is_beside_the_old_one_and_never_an_existing_one(tmp_path):
    (tmp_path / "mine").mkdir()
    assert _logic.next_run_folder(tmp_path / "mine") == tmp_path / "mine_tuned1"
    (tmp_path / "mine_tuned1").mkdir()
    assert _logic.next_run_folder(tmp_path / "mine") == tmp_path / "mine_tuned2"
    assert _logic.next_run_folder(tmp_path / "mine_tuned1") == tmp_path / "mine_tuned2"


def test_stop_leaves_a_complete_new_run_and_the_old_one_untouched(model_run, cells):
    image, instances = cells
    before = _sha256(model_run / "model.safetensors")
    out = model_run.parent / "stopped"
    stop = threading.Event()
    stop.set()  # Stop pressed while the data were prepared: one step, then a complete run
    work = _logic.fine_tune(model_run, [image], [instances], out=out, steps=50, stop=stop)
    progress = []
    while True:
        try:
            progress.append(next(work))
        except StopIteration as stop:
            summary = stop.value
            break
    assert len(progress) == 1 and summary["interrupted"] and summary["step"] == 1
    assert _sha256(model_run / "model.safetensors") == before
    model, config = card.load_model(out)
    assert config["init"]["run"] == str(model_run)
    assert config["model"] == io.read_json(model_run / "config.json")["model"]
    with pytest.raises(io.InputError, match="is the model being fine-tuned"):
        _logic.fine_tune_config(model_run, out=model_run)


def test_training_yields_the_loss_curve_as_log_csv_grows(model_run, cells):
    image, instances = cells
    out = model_run.parent / "curve"
    work = _logic.fine_tune(model_run, [image], [instances], out=out, steps=23)
    progress = []
    while True:
        try:
            progress.append(next(work))
        except StopIteration as stop:
            summary = stop.value
            break
    points = [point for part in progress for point in part.points]
    # Every row of log.csv, each once, in order: steps 5, 10, 15, 20 (log_every) and 23.
    assert points == list(_logic.logged_losses(out)) and points[-1][0] == summary["step"] == 23
    assert {5, 10, 15, 20} <= {step for step, _ in points}
    assert all(np.isfinite(loss) for _, loss in points)


def test_stop_ends_a_long_part_within_a_step_and_keeps_a_complete_run(model_run, cells):
    image, instances = cells
    out = model_run.parent / "stopped_in_a_part"
    config = _logic.fine_tune_config(model_run, out, steps=10**5)
    data = _logic.training_data(config, [image], [instances])
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)  # the Stop button, half-way through a part
    began = time.perf_counter()
    timer.start()
    progress = []
    work = _logic.run_training(config, data, stop, part_seconds=600.0)
    while True:
        try:
            progress.append(next(work))
        except StopIteration as end:
            summary = end.value
            break
    timer.join()
    assert time.perf_counter() - began < 60  # not the 600 s part
    assert summary["interrupted"] and 0 < summary["step"] < 10**5
    assert progress[-1].step == summary["step"]
    card.load_model(out)  # a valid model
    # Nothing is lost: the run resumes from the step it stopped at.
    more = train(config, resume=True, progress=False, data=data, stop_after=summary["step"] + 2)
    assert more["step"] == summary["step"] + 2


def test_train_from_scratch_on_layers(tmp_path, cells):
    image, instances = cells
    viewer = ViewerModel()
    viewer.add_image(image, name="a")
    viewer.add_labels(instances, name="a truth")
    state = session(viewer)
    with pytest.raises(io.InputError, match="no training pairs"):
        _logic.run_to_end(state.train_work(tmp_path / "new"))
    state.add_pair("a", "a truth")
    options = {k: v for k, v in SMALL.items() if k != "compile"}
    summary = _logic.run_to_end(state.train_work(tmp_path / "new", steps=4, **options))
    assert summary["step"] == 4 and not summary["interrupted"]
    model = state.load(summary["run_dir"])
    assert model.config["classes"]["label_mode"] == "instances"
    with pytest.raises(io.InputError, match="not empty"):
        _logic.run_to_end(state.train_work(tmp_path / "new", steps=4))


def test_correct_fine_tune_and_segment_again_moves_toward_the_corrections(model_run, cells):
    """The issue's loop: segment, paint three cells where the model saw none, fine-tune a few
    steps into a new run, segment again. Against a control fine-tuned alike on the uncorrected
    labels, the new model sees more cell exactly where the cells were painted."""
    image, _ = cells
    viewer, state = segmented(model_run, image)
    before = state.probabilities["cells"][1].copy()
    layer = viewer.layers["cells instances"]
    uncorrected, corrected = layer.data.copy(), layer.data.copy()
    painted = []
    for centre in three_background_spots(before):
        disk = disk_mask(image.shape, centre, radius=7)
        corrected[disk] = corrected.max() + 1
        painted.append(disk)
    budget = dict(steps=10, threads=1, learning_rate=0.01)
    control = model_run.parent / "control"
    _logic.run_to_end(_logic.fine_tune(model_run, [image], [uncorrected], out=control, **budget))
    expected = _logic.segment_now(_logic.LoadedModel.load(control), image).probabilities[1]

    layer.data = corrected  # the user's brush
    state.add_pair("cells", "cells instances")
    summary = _logic.run_to_end(state.fine_tune_work(**budget))
    new_run = Path(summary["run_dir"])
    assert new_run == model_run.parent / "base_tuned1"
    state.adopt(summary)
    assert state.model.run_dir == new_run
    # The correction is kept as a layer of its own; Segment writes new outputs.
    assert viewer.layers["cells corrected"].metadata[KEY]["kind"] == "corrected"
    np.testing.assert_array_equal(viewer.layers["cells corrected"].data, corrected)
    state.show(*_logic.run_to_end(state.segment_work("cells")))
    assert "cells instances" in viewer.layers
    after = state.probabilities["cells"][1]
    toward = [after[m].mean() - expected[m].mean() for m in painted]
    assert all(gain > 0 for gain in toward) and np.mean(toward) > 0.02, toward
    # A second round accumulates: the corrected pair stays in the set, the next run is _tuned2.
    assert [labels.name for _, labels in state.pairs] == ["cells corrected"]
    assert _logic.next_run_folder(new_run) == model_run.parent / "base_tuned2"


def three_background_spots(probability, separation=30, border=10):
    """Three points far from any predicted cell and from each other."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(probability < 0.3)
    distance[:border], distance[-border:], distance[:, :border], distance[:, -border:] = 0, 0, 0, 0
    rows, cols = np.indices(probability.shape)
    spots = []
    for _ in range(3):
        spot = np.unravel_index(distance.argmax(), distance.shape)
        spots.append(spot)
        distance[(rows - spot[0]) ** 2 + (cols - spot[1]) ** 2 < separation**2] = 0
    return spots


def disk_mask(shape, centre, radius):
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


# --------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------


def test_evaluate_scores_objects_with_the_projects_metrics(cells):
    _, truth = cells
    viewer = ViewerModel()
    viewer.add_labels(truth, name="truth")
    worse = truth.copy()
    worse[truth == 1] = 0
    viewer.add_labels(worse, name="mine")
    viewer.add_labels(truth.copy(), name="same")
    state = session(viewer)
    with pytest.raises(io.InputError, match="one layer"):
        state.evaluate("truth", "truth")
    rows = dict(state.evaluate("same", "truth"))
    assert rows["f1@0.5"] == 1.0 and rows["seg"] == 1.0
    rows = dict(state.evaluate("mine", "truth"))
    assert rows["objects_predicted"] == rows["objects_true"] - 1 and rows["f1@0.5"] < 1
    viewer.add_labels(truth[:64], name="small")
    with pytest.raises(io.InputError, match="shape"):
        state.evaluate("small", "truth")


# --------------------------------------------------------------------------
# Qt widgets (pytest-qt, under xvfb-run -a)
# --------------------------------------------------------------------------


@needs_display
def test_segment_and_evaluate_widgets_in_a_viewer(make_napari_viewer, qtbot, model_run, cells):
    from unetile.napari._widgets import EvaluateWidget, SegmentWidget

    image, truth = cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth, name="truth")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.model_dir.value = model_run
    assert widget.model_info.value.startswith("base: 2 classes")
    assert widget.min_size.value == session(viewer).post.min_size
    widget.image.value = "cells"
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: "cells instances" in viewer.layers, timeout=20000)
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=20000)
    assert widget.progress.value == widget.progress.max
    widget.min_size.value = 0
    widget.method.value = "components"
    assert session(viewer).post.min_size == 0
    evaluate = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(evaluate, name="Evaluate")
    viewer.add_labels(truth.copy(), name="same")
    evaluate.labels.value, evaluate.truth.value = "same", "truth"
    evaluate.run_button.clicked.emit()
    table = evaluate.table.to_dict("list")
    assert table["metric"][0] == "f1@0.5" and table["value"][0] == "1"


@needs_display
def test_a_fault_is_a_notification_not_a_traceback(make_napari_viewer, tmp_path, monkeypatch):
    from unetile.napari import _widgets

    shown = []
    monkeypatch.setattr(_widgets, "show_error", shown.append)
    viewer = make_napari_viewer()
    widget = _widgets.SegmentWidget(viewer)
    widget.model_dir.value = tmp_path
    assert shown == [f"{tmp_path}: has no config.json; is it a unetile run?"] or (
        len(shown) == 1 and str(tmp_path) in shown[0] and "\n" not in shown[0]
    )


@needs_display
def test_the_zip_button_loads_a_package_and_a_bad_zip_is_a_notification(
    make_napari_viewer, tmp_path, monkeypatch, package
):
    from unetile.napari import _widgets

    shown = []
    monkeypatch.setattr(_widgets, "show_error", shown.append)
    viewer = make_napari_viewer()
    widget = _widgets.SegmentWidget(viewer)
    asked = []

    def dialog(mode, caption=None, start_path=None, filter=None):  # noqa: A002 (magicgui's name)
        asked.append((str(mode.value), filter))
        return package

    widget._file_dialog = dialog
    widget.choose_zip.clicked.emit()
    assert asked == [("r", "*.zip")] and shown == []
    assert widget.model_info.value.startswith("cells model: 2 classes")
    assert widget.model_info.value.endswith("(bioimage.io package)")
    assert session(viewer).model.source == package
    (tmp_path / "text.zip").write_text("not a zip")
    widget.model_dir.value = tmp_path / "text.zip"
    assert len(shown) == 1 and "not a readable .zip" in shown[0] and "\n" not in shown[0]
    assert widget.model_info.value == "no model loaded"


@needs_display
def test_the_loss_curve_grows_as_the_worker_yields_and_stop_ends_within_a_step(
    make_napari_viewer, qtbot, model_run, cells
):
    from unetile.napari._widgets import FineTuneWidget, SegmentWidget

    image, truth = cells
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth, name="truth")
    segment = SegmentWidget(viewer)
    segment.model_dir.value = model_run
    tune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(tune, name="Fine-tune")
    tune.image.value, tune.labels.value = "cells", "truth"
    tune.steps.value, tune.minutes.value = 10**5, 0.0
    plot = tune.trainer.plot
    assert plot.points == []
    tune.trainer.start.clicked.emit()
    drawn = []  # the curve's length each time the worker yields
    tune.trainer.worker.yielded.connect(lambda progress: drawn.append(len(plot.points)))
    qtbot.waitUntil(lambda: len(drawn) >= 2, timeout=60000)
    tune.trainer.stop.clicked.emit()
    qtbot.waitUntil(lambda: tune.result.value.startswith("saved"), timeout=60000)
    qtbot.waitUntil(lambda: segment.run_button.enabled and not segment.queue, timeout=60000)
    run = session(viewer).model.run_dir
    summary = io.read_json(run / "summary.json")
    assert summary["interrupted"] and summary["step"] < 10**5
    assert drawn == sorted(drawn) and 0 < drawn[0] < drawn[-1]
    # The curve is the run's log.csv, every row once.
    assert plot.points == list(_logic.logged_losses(run))
    assert plot.points[-1][0] == summary["step"]
    assert not plot.grab().isNull()  # it paints
