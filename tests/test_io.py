import numpy as np
import pytest
import torch

from unetile import io
from unetile.network.model import UNet
from unetile.predict import card

pytestmark = pytest.mark.fast


def test_list_images_skips_hidden_sidecars_and_temporaries(tmp_path):
    for name in ("01.tif", "02.png", "._01.tif", ".03.x1y2.part.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in io.list_images(tmp_path)] == ["01.tif", "02.png"]


def test_list_images_of_an_empty_folder_names_it(tmp_path):
    with pytest.raises(io.InputError, match=f"{tmp_path}: no .tif/.tiff/.png images"):
        io.list_images(tmp_path)


def test_match_by_stem_names_the_orphan_label(tmp_path):
    images = [tmp_path / "images" / "01.tif"]
    labels = [tmp_path / "labels" / "01.png", tmp_path / "labels" / "02.png"]
    with pytest.raises(
        io.InputError, match=r"labels/02.png: label has no image with the stem '02'"
    ):
        io.match_by_stem(images, labels)


def test_write_is_atomic_when_interrupted(tmp_path):
    target = tmp_path / "out.tif"

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), io.atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise Interrupted
    assert list(tmp_path.iterdir()) == []


def test_images_round_trip_and_bad_files_are_one_line_errors(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    io.write_image(tmp_path / "a.png", array)
    io.write_image(tmp_path / "a.tif", array.astype(np.float32))
    assert np.array_equal(io.read_image(tmp_path / "a.png"), array)
    assert io.read_image(tmp_path / "a.tif").dtype == np.float32
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(io.InputError, match=r"bad.tif: cannot be read as an image"):
        io.read_image(tmp_path / "bad.tif")


def test_model_round_trips_through_safetensors_and_json(tmp_path):
    model = UNet(base_channels=2, depth=2)
    card.save_model(tmp_path, model, {"model": model.config.to_dict(), "normalization": None})
    loaded, config = card.load_model(tmp_path)
    assert config["unetile_version"] and config["model"]["base_channels"] == 2
    for (name, tensor), other in zip(
        model.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(tensor, other), name
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(io.InputError, match="model.safetensors: not a safetensors weights file"):
        card.load_model(tmp_path)
