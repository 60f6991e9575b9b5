"""Batch norm with statistics averaged over whole training images and frozen: tile-exact."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import stripes_data, tiny_config

from unetile.network.model import UNet, batch_norms, estimate_batch_norm
from unetile.network.tiling import Tiling
from unetile.predict import card, predict
from unetile.train.config import make_config
from unetile.train.run import train


def test_estimate_sets_the_plain_average_of_the_tiles_statistics():
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=2, depth=2, base_channels=4, norm="batch")
    tiles = [
        torch.randn(1, 1, 44, 44) * scale + shift for scale, shift in ((1, 0), (3, 2), (2, -1))
    ]
    first = model.contracting[0][0]  # the first convolution feeds the first batch norm
    with torch.no_grad():
        outputs = [first(tile) for tile in tiles]
    means = torch.stack([out.mean(dim=(0, 2, 3)) for out in outputs])
    variances = torch.stack([out.var(dim=(0, 2, 3), unbiased=True) for out in outputs])
    model.train()
    assert estimate_batch_norm(model, iter(tiles)) == 3
    norm = batch_norms(model)[0]
    # Not the momentum-weighted running value (0.1 per tile): the plain mean of the three.
    assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, variances.mean(0), atol=1e-4)
    assert norm.momentum == 0.1 and norm.training  # restored as found
    with pytest.raises(ValueError, match="at least one input tile"):
        estimate_batch_norm(model, iter([]))


def frozen_run(tmp_path, share, **options):
    config = tiny_config(
        tmp_path / "run",
        norm="batch",
        freeze_batch_norm=share,
        dropout=0.0,
        optimizer="adam",
        learning_rate=0.01,
        **options,
    )
    return config, train(config, progress=False, data=stripes_data(size=64, count=3))


def test_frozen_statistics_come_from_the_training_images_and_stay_fixed(tmp_path):
    config, summary = frozen_run(tmp_path, 0.5, steps=6)
    assert summary["step"] == 6
    model, _ = card.load_model(tmp_path / "run")
    norm = batch_norms(model)[0]
    # Frozen after step 3: the last three steps ran with the norms in evaluation mode,
    # so the counter of batches seen stopped where the average was taken.
    assert int(norm.num_batches_tracked) == 3 * 4  # 3 images x 2 x 2 tiles of 44 px over 64 px
    # The last weights and the kept model share the statistics.
    last, _ = card.load_model(tmp_path / "run", name="last.safetensors")
    assert torch.equal(batch_norms(last)[0].running_mean, norm.running_mean)


def test_a_run_frozen_at_its_end_estimates_once_after_the_last_step(tmp_path):
    _, summary = frozen_run(tmp_path, 1.0, steps=4)
    model, _ = card.load_model(tmp_path / "run")
    assert summary["step"] == 4 and int(batch_norms(model)[0].num_batches_tracked) == 12


def test_resume_across_the_freeze_reaches_the_same_weights(tmp_path):
    data = stripes_data(size=64, count=3)
    options = dict(norm="batch", freeze_batch_norm=0.5, dropout=0.0, steps=8)
    straight = train(tiny_config(tmp_path / "a", **options), progress=False, data=data)
    config = tiny_config(tmp_path / "b", **options)
    train(config, progress=False, data=data, stop_after=6)  # past the freeze at step 4
    resumed = train(config, resume=True, progress=False, data=data)
    assert straight["loss"] == resumed["loss"]
    a, _ = card.load_model(tmp_path / "a")
    b, _ = card.load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), rtol=0, atol=1e-6), name


@pytest.fixture(scope="module")
def frozen_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frozen")
    frozen_run(folder, 0.5, steps=6)
    model, _ = card.load_model(folder / "run")
    return model


@settings(max_examples=12, deadline=None)
@given(
    height=st.integers(20, 90),
    width=st.integers(20, 90),
    tile=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_whole_for_frozen_batch_norm(frozen_model, height, width, tile, seed):
    tiling = Tiling.of(frozen_model)
    image = np.random.default_rng(seed).normal(size=(height, width)).astype(np.float32)
    whole_tile = (tiling.at_least(max(height, width)),) * 2
    whole = predict(frozen_model, image, tile_shape=whole_tile, progress=False)
    tiled = predict(frozen_model, image, tile_shape=(tiling.at_least(tile),) * 2, progress=False)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-5)


def test_freeze_needs_batch_norm():
    with pytest.raises(ValueError, match="freeze_batch_norm needs norm 'batch'"):
        make_config(norm="instance", freeze_batch_norm=0.8)
    with pytest.raises(ValueError, match="freeze_batch_norm"):
        make_config(norm="batch", freeze_batch_norm=1.5)
