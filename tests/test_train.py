import csv
import signal

import numpy as np
import pytest
import torch

from unetile import io
from unetile.data.augment import AugmentParams
from unetile.data.dataset import LabeledImage, labels_to_classes
from unetile.network.normalization import Normalization
from unetile.predict import card
from unetile.train.loop import (
    PRESETS,
    TrainConfig,
    TrainingData,
    _stop_on_interrupt,
    build_model,
    build_optimizer,
    flatten_optimizer_state,
    learning_rate_at,
    lower_is_better,
    make_config,
    prepare_arrays,
    unflatten_optimizer_state,
)
from unetile.train.run import train


def stripes_data(size=48, count=2, seed=0, validation=0) -> TrainingData:
    """A trivial task: bright square cells, dark 2-px membranes, a little noise."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count + validation):
        membrane = np.zeros((size, size), np.uint8)
        offset = index % 3
        for top in range(offset, size, 10):
            for left in range(offset, size, 10):
                membrane[top : top + 8, left : left + 8] = 255
        classes, instances = labels_to_classes(membrane, "membrane")
        image = (membrane / 255.0 + 0.1 * rng.normal(size=membrane.shape)).astype(np.float32)
        items.append(
            LabeledImage(
                name=f"{index:02d}",
                image=image[np.newaxis],
                classes=classes,
                instances=instances,
                weights=np.ones(classes.shape, np.float32),
            )
        )
    train_items = items[:count]
    return TrainingData(
        train=train_items,
        validation=items[count:],
        num_classes=2,
        in_channels=1,
        normalization=Normalization.from_images([item.image for item in train_items]).to_dict(),
        input_shape=(60, 60),
        output_shape=(44, 44),
    )


def tiny_config(out, **options) -> TrainConfig:
    settings = dict(
        out=str(out),
        depth=2,
        base_channels=4,
        dropout=0.5,
        tile=(44,),
        steps=6,
        log_every=1,
        checkpoint_every=100,
        validate_every=100,
        learning_rate=0.05,
        momentum=0.9,
        augment=AugmentParams(gray=False),
        threads=1,
    )
    settings.update(options)
    return make_config(**settings)


def test_paper_defaults_and_presets():
    config = TrainConfig()
    assert (config.optimizer, config.momentum, config.batch_size) == ("sgd", 0.99, 1)
    assert (config.w0, config.sigma, config.dropout, config.depth) == (10.0, 5.0, 0.5, 5)
    assert config.learning_rate == 1e-4  # the paper gives none; 1e-2 and 1e-3 diverge
    assert config.base_channels == 64 and config.augment == AugmentParams()
    fast = make_config("cpu-fast", steps=10)
    assert fast.preset == "cpu-fast" and fast.base_channels == 16 and fast.steps == 10
    assert fast.optimizer == PRESETS["cpu-fast"]["optimizer"] == "adam"
    # The measured CPU choice: instance norm, no w_c, a border term for the narrowest gaps.
    assert (fast.norm, fast.class_weights, fast.dropout) == ("instance", "none", 0.0)
    assert (fast.w0, fast.sigma) == (10.0, 2.0) and fast.augment == AugmentParams()
    assert fast.compile and not config.compile  # the paper's reference runs eagerly
    # Explicit options beat the preset.
    assert make_config("cpu-fast", base_channels=24).base_channels == 24
    with pytest.raises(ValueError, match="unknown training option 'learning_rat'"):
        make_config(learning_rat=0.1)
    with pytest.raises(ValueError, match="preset must be one of"):
        make_config("gpu-turbo")
    with pytest.raises(ValueError, match="keep_best 'iou' must be one of the metrics"):
        make_config(metrics="pixel_error", keep_best="iou")


def test_paper_preset_trains_the_paper_network_without_diverging(tmp_path):
    # Full width, drop-out, He init, SGD with momentum 0.99: 1e-2 gave nan by step 5.
    from unetile.data.synthetic import em_like

    sample = em_like((300, 300), rng=0)
    config = make_config("paper", out=str(tmp_path / "run"), tile=(4,), steps=20)
    data = prepare_arrays(config, [sample.image], [sample.membrane])
    summary = train(config, progress=False, data=data)
    assert summary["step"] == 20 and np.isfinite(summary["loss"])
    assert summary["num_parameters"] == 31_030_658


def test_config_round_trips_through_json():
    config = make_config(
        "cpu-fast", tile="20,132,132", dims=3, augment={"elastic_sigma": 4.0}, norm="none"
    )
    assert config.tile == (20, 132, 132) and config.norm is None
    assert config.augment.elastic_sigma == 4.0
    import json

    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_learning_rate_schedules_by_hand():
    constant = make_config(learning_rate=0.1, steps=100)
    assert learning_rate_at(constant, 0) == learning_rate_at(constant, 99) == 0.1
    cosine = make_config(learning_rate=0.1, steps=110, schedule="cosine", warmup_steps=10)
    assert learning_rate_at(cosine, 0) == pytest.approx(0.01)  # warm-up: (0 + 1) / 10
    assert learning_rate_at(cosine, 10) == pytest.approx(0.1)
    assert learning_rate_at(cosine, 60) == pytest.approx(0.05)  # half-way: cos(pi/2) = 0
    poly = make_config(learning_rate=0.1, steps=100, schedule="poly")
    assert learning_rate_at(poly, 50) == pytest.approx(0.1 * 0.5**0.9)


def test_errors_are_minimised_scores_maximised():
    assert lower_is_better("rand_error") and lower_is_better("pixel_error")
    assert not lower_is_better("iou") and not lower_is_better("f1")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_round_trips_without_pickle(optimizer):
    config = make_config(depth=2, base_channels=4, optimizer=optimizer)
    model = build_model(config, 1, 2)
    first = build_optimizer(config, model)
    model(torch.ones(1, 1, 20, 20)).sum().backward()
    first.step()
    tensors, description = flatten_optimizer_state(first.state_dict())
    import json

    description = json.loads(json.dumps(description))  # what the checkpoint stores
    second = build_optimizer(config, build_model(config, 1, 2))
    second.load_state_dict(unflatten_optimizer_state(tensors, description))
    a, b = first.state_dict(), second.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    for index, entries in a["state"].items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name]))


def test_training_lowers_the_loss_on_a_trivial_task(tmp_path):
    data = stripes_data()
    config = tiny_config(
        tmp_path / "run",
        steps=20,
        augment="none",
        dropout=0.0,
        optimizer="adam",
        learning_rate=0.01,
    )
    summary = train(config, progress=False, data=data)
    with open(tmp_path / "run" / "log.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 20
    # From about 1.0 (He init) to about 0.15 in 20 steps; ln 2 = 0.69 is chance.
    assert np.mean(losses[-4:]) < 0.35 * np.mean(losses[:4])
    assert summary["step"] == 20 and not summary["interrupted"]
    assert 0.0 < summary["data_fraction"] < 1.0
    assert summary["input_shape"] == [60, 60] and summary["output_shape"] == [44, 44]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, optimizer):
    # Augmentation, drop-out and momentum all on: every random and stateful part is resumed.
    data = stripes_data()
    options = dict(optimizer=optimizer, schedule="cosine")
    straight = train(tiny_config(tmp_path / "straight", **options), progress=False, data=data)
    config = tiny_config(tmp_path / "resumed", **options)
    first = train(config, progress=False, data=data, stop_after=3)
    assert first["interrupted"] and first["step"] == 3
    with pytest.raises(io.InputError, match="already holds a training run; add --resume"):
        train(config, progress=False, data=data)
    second = train(config, resume=True, progress=False, data=data)
    assert second["step"] == 6 and not second["interrupted"]
    assert straight["loss"] == second["loss"]
    a, _ = card.load_model(tmp_path / "straight")
    b, _ = card.load_model(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-6), name
    with open(tmp_path / "resumed" / "log.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5, 6]


def test_run_folder_holds_what_predict_needs(tmp_path):
    data = stripes_data(validation=1)
    config = tiny_config(
        tmp_path / "run", steps=4, validate_every=2, keep_best="pixel_error", log_every=2
    )
    summary = train(config, progress=False, data=data)
    run = tmp_path / "run"
    for name in (
        "model.safetensors",
        "last.safetensors",
        "checkpoint.safetensors",
        "config.json",
        "log.csv",
        "curves.png",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    model, saved = card.load_model(run)
    assert saved["model"]["base_channels"] == 4 and saved["model"]["depth"] == 2
    assert saved["classes"] == {
        "num_classes": 2,
        "foreground": 1,
        "label_mode": "membrane",
        "cell_value": 255,
        "target": "two-class",
    }
    assert saved["instances"]["method"] == "components"  # the paper's, for membrane maps
    assert saved["tile"] == {"input_shape": [60, 60], "output_shape": [44, 44]}
    assert saved["normalization"] == data.normalization
    assert TrainConfig.from_dict(saved["training"]) == config
    assert summary["best_metric"] == "pixel_error" and summary["best_step"] in (2, 4)
    assert set(summary["validation"]) == {"pixel_error", "rand_error", "iou"}
    with open(run / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["2", "4"]
    assert all(0.0 <= float(row["val_pixel_error"]) <= 1.0 for row in rows)
    best = min(rows, key=lambda row: float(row["val_pixel_error"]))
    assert summary["best_value"] == pytest.approx(float(best["val_pixel_error"]), abs=1e-6)


def test_first_interrupt_asks_to_stop_and_the_second_aborts():
    with _stop_on_interrupt() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stop_event_set_by_another_thread_ends_the_run_after_its_step(tmp_path):
    import threading

    data = stripes_data()
    stop = threading.Event()
    config = tiny_config(tmp_path / "run", steps=10**6, log_every=10**5)
    timer = threading.Timer(0.5, stop.set)  # a GUI's Stop button, while the loop runs
    timer.start()
    summary = train(config, progress=False, data=data, stop=stop)
    timer.join()
    assert summary["interrupted"] and 0 < summary["step"] < 10**6
    # Stopped as on Ctrl-C: a complete run folder, its log row and checkpoint at that step.
    model, _ = card.load_model(tmp_path / "run")
    with open(tmp_path / "run" / "log.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [summary["step"]]
    assert stop.is_set()  # the caller's event, left as it was


def test_he_initialisation_is_seeded():
    config = make_config(depth=2, base_channels=4, seed=7)
    a, b = build_model(config, 1, 2), build_model(config, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    other = build_model(make_config(depth=2, base_channels=4, seed=8), 1, 2)
    assert not torch.equal(a.contracting[0][0].weight, other.contracting[0][0].weight)


def test_time_budget_stops_the_run_and_validates_its_last_step(tmp_path):
    data = stripes_data(validation=1)
    config = tiny_config(tmp_path / "run", steps=1000, max_minutes=1e-6, validate_every=500)
    summary = train(config, progress=False, data=data)
    # 0.06 ms: over after the first step, which is validated and kept as the best.
    assert summary["step"] == 1 and summary["out_of_time"] and not summary["interrupted"]
    assert summary["best_step"] == 1 and summary["wall_seconds"] > 6e-5
    # The schedule follows time when time is further along than steps.
    cosine = make_config(learning_rate=1.0, steps=1000, schedule="cosine", max_minutes=1.0)
    assert learning_rate_at(cosine, 10, time_fraction=0.5) == pytest.approx(0.5)


def test_arrays_in_memory_train_like_files(tmp_path):
    from unetile.data.synthetic import em_like
    from unetile.train.loop import prepare_arrays

    samples = [em_like((48, 48), rng=seed) for seed in range(3)]
    config = tiny_config(tmp_path / "run", steps=2, tile=None, max_tile=44)
    images = [sample.image for sample in samples]
    labels = [sample.membrane for sample in samples]
    data = prepare_arrays(config, images[:2], labels[:2], images[2:], labels[2:])
    # Depth 2: 60 -> 44 is the largest valid tile <= 44 px (output) that fits 48 px.
    assert data.input_shape == (60, 60) and data.output_shape == (44, 44)
    assert len(data.train) == 2 and len(data.validation) == 1
    assert train(config, progress=False, data=data)["step"] == 2
    bad = labels[1].copy()
    bad[0, :2] = (0, 3)  # a third value besides cell (255) and membrane (0)
    with pytest.raises(ValueError, match=r"labels\[1\]: label values \[0, 3\] outside"):
        prepare_arrays(config, images[:2], [labels[0], bad])


def test_compiled_training_follows_the_eager_run(tmp_path):
    data = stripes_data()
    options = dict(steps=4, dropout=0.0, augment="none", optimizer="adam", learning_rate=0.01)
    eager = train(tiny_config(tmp_path / "eager", **options), progress=False, data=data)
    config = tiny_config(tmp_path / "compiled", compile=True, **options)
    compiled = train(config, progress=False, data=data)
    assert compiled["step"] == 4
    # Fused kernels round differently; the same four steps land on the same loss.
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)


def test_a_failing_compiler_falls_back_to_eager(tmp_path, monkeypatch):
    def broken(model):
        def forward(images):
            raise RuntimeError("no C++ compiler")

        return forward

    monkeypatch.setattr("unetile.train.loop._compiled", broken)
    config = tiny_config(tmp_path / "run", compile=True, steps=2)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError\); training"):
        summary = train(config, progress=False, data=stripes_data())
    assert summary["step"] == 2 and np.isfinite(summary["loss"])


def test_three_class_target_trains_and_the_model_carries_instance_options_tuned_on_validation(
    tmp_path,
):
    from unetile.data.synthetic import cells_like
    from unetile.predict.instances import InstanceOptions

    samples = [cells_like((96, 96), 3, touching_fraction=1.0, rng=seed) for seed in range(3)]
    config = tiny_config(
        tmp_path / "run",
        steps=3,
        tile=(76,),
        label_mode="instances",
        target="three-class",
        metrics=("f1",),
        keep_best="f1",
    )
    images = [sample.image for sample in samples]
    labels = [sample.instances for sample in samples]
    data = prepare_arrays(config, images[:2], labels[:2], images[2:], labels[2:])
    assert data.num_classes == 3
    assert set(np.unique(data.train[0].classes)) == {0, 1, 2}
    summary = train(config, progress=False, data=data)
    _, saved = card.load_model(tmp_path / "run")
    assert saved["model"]["num_classes"] == 3
    assert saved["calibration"] is None  # more than two classes: the labels stay the argmax
    options = InstanceOptions.from_dict(saved["instances"])
    assert options.foreground_classes == (1, 2) and options.seed == 1
    assert summary["instances"]["options"] == saved["instances"]
    assert 0.0 <= summary["instances"]["validation"]["f1@0.5"] <= 1.0
    with pytest.raises(ValueError, match="target 'three-class' needs instance labels"):
        tiny_config(tmp_path / "other", target="three-class")
