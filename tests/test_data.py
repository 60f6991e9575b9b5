import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetile import io
from unetile.data.augment import AugmentParams
from unetile.data.dataset import (
    IGNORE,
    LabeledImage,
    TileSampler,
    channels_first,
    compute_weight_map,
    labels_to_classes,
    load_labeled_images,
)
from unetile.network.normalization import Normalization

pytestmark = pytest.mark.fast


def squares_membrane(size: int = 32, cell: int = 8, gap: int = 2) -> np.ndarray:
    """A grid of square cells (255) separated by membranes (0) of ``gap`` px."""
    label = np.zeros((size, size), np.uint8)
    for top in range(gap, size, cell + gap):
        for left in range(gap, size, cell + gap):
            label[top : top + cell, left : left + cell] = 255
    return label


def write_pairs(folder, count=2, shape=(32, 32)):
    images, labels = folder / "images", folder / "labels"
    for index in range(count):
        io.write_image(images / f"{index:02d}.tif", np.full(shape, index, np.uint8))
        io.write_image(labels / f"{index:02d}.tif", squares_membrane(shape[0]))
    return images, labels


# --------------------------------------------------------------------------
# Bad data fails at start-up with a one-line error naming the file.
# --------------------------------------------------------------------------


def test_empty_folder_is_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(io.InputError, match=r"empty: no \.tif/\.tiff/\.png images"):
        load_labeled_images(images, empty)


def test_label_without_image_names_the_label(tmp_path):
    images, labels = write_pairs(tmp_path)
    io.write_image(labels / "07.tif", squares_membrane())
    with pytest.raises(io.InputError, match=r"labels/07\.tif: label has no image"):
        load_labeled_images(images, labels)


def test_image_without_label_names_the_image(tmp_path):
    images, labels = write_pairs(tmp_path)
    io.write_image(images / "09.tif", np.zeros((32, 32), np.uint8))
    with pytest.raises(io.InputError, match=r"images/09\.tif: image has no label"):
        load_labeled_images(images, labels)


def test_shapes_that_differ_name_both_files(tmp_path):
    images, labels = write_pairs(tmp_path)
    io.write_image(labels / "01.tif", squares_membrane(30)[:, :30])
    with pytest.raises(io.InputError) as error:
        load_labeled_images(images, labels)
    message = str(error.value)
    assert "labels/01.tif: shape (30, 30) differs from image 01.tif (32, 32)" in message
    assert "\n" not in message


def test_membrane_label_with_a_third_value_is_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    label = squares_membrane()
    label[0, 0] = 128
    io.write_image(labels / "00.tif", label)
    with pytest.raises(io.InputError, match=r"labels/00\.tif: label values \[0, 128\] outside"):
        load_labeled_images(images, labels, label_mode="membrane", cell_value=255)


def test_class_label_outside_the_declared_classes_is_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    io.write_image(labels / "00.tif", (squares_membrane() > 0).astype(np.uint8) * 2)
    io.write_image(labels / "01.tif", np.full((32, 32), 3, np.uint8))
    with pytest.raises(
        io.InputError, match=r"labels/01\.tif: label value 3 outside the classes 0\.\.2"
    ):
        load_labeled_images(images, labels, label_mode="classes", num_classes=3)


def test_unreadable_file_is_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    (images / "01.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(io.InputError, match=r"images/01\.tif: cannot be read as an image"):
        load_labeled_images(images, labels)


def test_nan_pixels_are_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    image = np.zeros((32, 32), np.float32)
    image[3, 4] = np.nan
    io.write_image(images / "01.tif", image)
    with pytest.raises(io.InputError, match=r"images/01\.tif: holds NaN or infinite pixels"):
        load_labeled_images(images, labels)


def test_channel_counts_that_differ_are_named(tmp_path):
    images, labels = write_pairs(tmp_path)
    io.write_image(images / "01.tif", np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(io.InputError, match=r"images/01\.tif: 2 channels, but 00\.tif has 1"):
        load_labeled_images(images, labels)


def test_good_pairs_load_with_classes_instances_and_weights(tmp_path):
    images, labels = write_pairs(tmp_path, count=2)
    loaded, num_classes = load_labeled_images(images, labels, label_mode="membrane")
    assert num_classes == 2
    assert [item.name for item in loaded] == ["00", "01"]
    first = loaded[0]
    assert first.image.shape == (1, 32, 32) and first.image.dtype == np.float32
    assert first.image[0, 0, 0] == 0 and loaded[1].image[0, 0, 0] == 1
    # 32 px with 8 px cells and 2 px gaps: cells start at 2, 12, 22 -> 3 x 3 cells.
    assert first.instances.max() == 9
    assert first.classes.sum() == 9 * 64
    # Gaps between two cells get the border term; cell pixels do not.
    assert first.weights[5, 11] > first.weights[5, 5] + 1.0


# --------------------------------------------------------------------------
# Layout, labels, normalisation.
# --------------------------------------------------------------------------


def test_channel_layouts():
    assert channels_first(np.zeros((5, 6)), 2).shape == (1, 5, 6)
    assert channels_first(np.zeros((2, 5, 6)), 2).shape == (2, 5, 6)  # TIFF: channels first
    assert channels_first(np.zeros((5, 6, 2)), 2, channels_last=True).shape == (2, 5, 6)  # PNG
    assert channels_first(np.zeros((50, 60, 3)), 2).shape == (3, 50, 60)  # RGB TIFF
    assert channels_first(np.zeros((4, 5, 6)), 3).shape == (1, 4, 5, 6)
    with pytest.raises(ValueError, match="expected 2 spatial axes"):
        channels_first(np.zeros((2, 3, 4, 5)), 2)


def test_rgb_png_is_read_channels_first(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 7
    io.write_image(tmp_path / "images" / "a.png", rgb)
    io.write_image(tmp_path / "labels" / "a.png", np.full((8, 8), 255, np.uint8))
    loaded, _ = load_labeled_images(tmp_path / "images", tmp_path / "labels", with_weights=False)
    assert loaded[0].image.shape == (3, 8, 8)
    assert loaded[0].image[:, 0, 0].tolist() == [0, 7, 0]


def test_label_modes_by_hand():
    membrane = np.array([[255, 255, 0, 255], [255, 255, 0, 255], [0, 0, 0, 0]], np.uint8)
    classes, instances = labels_to_classes(membrane, "membrane", cell_value=255)
    assert classes.tolist() == [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]]
    assert instances.max() == 2 and instances[0, 0] != instances[0, 3]
    # Inverted convention: the cells are black.
    classes, _ = labels_to_classes(255 - membrane, "membrane", cell_value=0)
    assert classes.tolist() == [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]]

    ids = np.array([[0, 3, 3], [0, 0, 0], [5, 5, 0]])
    classes, instances = labels_to_classes(ids, "instances")
    assert classes.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert instances.tolist() == ids.tolist()

    # Touching cells 3 | 5 get a background line along their contact.
    touching = np.array([[3, 3, 5, 5, 0], [3, 3, 5, 5, 0]])
    classes, instances = labels_to_classes(touching, "instances")
    assert classes.tolist() == [[1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    assert instances.tolist() == [[3, 0, 0, 5, 0], [3, 0, 0, 5, 0]]
    # The three-class target makes that line class 2 (border); the weight map's cells stay.
    classes, border_instances = labels_to_classes(touching, "instances", 3, target="three-class")
    assert classes.tolist() == [[1, 2, 2, 1, 0], [1, 2, 2, 1, 0]]
    assert border_instances.tolist() == instances.tolist()
    with pytest.raises(ValueError, match="give 3 classes"):
        labels_to_classes(touching, "instances", 2, target="three-class")
    with pytest.raises(ValueError, match="needs instance labels"):
        labels_to_classes(touching, "classes", 6, target="three-class")

    # Two regions of class 1 apart and one of class 2 touching: three cells.
    class_map = np.array([[1, 0, 1, 2], [1, 0, 1, 2]])
    classes, instances = labels_to_classes(class_map, "classes", num_classes=3)
    assert classes.tolist() == class_map.tolist()
    assert len(np.unique(instances[instances > 0])) == 3
    assert instances[0, 2] != instances[0, 3]


def test_normalization_statistics_by_hand():
    first = np.array([[[0.0, 2.0]], [[10.0, 10.0]]])  # (2 channels, 1, 2)
    second = np.array([[[4.0, 6.0]], [[10.0, 10.0]]])
    stats = Normalization.from_images([first, second])
    assert stats.mean == (3.0, 10.0)
    assert stats.std[0] == pytest.approx(np.sqrt(5.0))
    assert stats.std[1] == 1.0  # constant channel: no division by zero
    assert Normalization.of(stats.to_dict()) == stats
    normalized = stats.apply(first)
    assert normalized.dtype == np.float32
    assert normalized[0, 0].tolist() == pytest.approx([-3 / np.sqrt(5.0), -1 / np.sqrt(5.0)])
    assert normalized[1].tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="must give 1 or 2 mean and std values, got 3 and 1"):
        Normalization((0.0, 1.0, 2.0), (1.0,)).apply(first)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalization.of(([0.0], [0.0]))


def test_weight_maps_are_cached_on_disk_by_content(tmp_path, monkeypatch):
    _, instances = labels_to_classes(squares_membrane(), "membrane")
    classes = (instances > 0).astype(np.int64)
    first = compute_weight_map(instances, classes, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("weights-*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cached weight map was recomputed")

    monkeypatch.setattr("unetile.data.weights.weight_map", fail)
    assert np.array_equal(compute_weight_map(instances, classes, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="recomputed"):  # other sigma: another key
        compute_weight_map(instances, classes, sigma=3.0, cache_dir=tmp_path)


# --------------------------------------------------------------------------
# Tile geometry.
# --------------------------------------------------------------------------


def coded_image(shape):
    """Image whose pixel value is its own class label times 10 plus nothing else."""
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 2, size=shape).astype(np.int64)
    return LabeledImage(
        name="coded",
        image=(10.0 * classes)[np.newaxis].astype(np.float32),
        classes=classes,
        instances=classes.astype(np.int32),
        weights=np.ones(shape, np.float32) * 2.0,
    )


def test_tiles_have_the_network_shapes_and_aligned_labels():
    item = coded_image((40, 30))
    sampler = TileSampler([item], (44, 44), (4, 4), None, None, np.random.default_rng(0))
    assert sampler.margin == 20
    for _ in range(5):
        images, labels, weights = sampler.sample(3)
        assert images.shape == (3, 1, 44, 44) and images.dtype == torch.float32
        assert labels.shape == (3, 4, 4) and labels.dtype == torch.int64
        assert weights.shape == (3, 4, 4)
        inside = labels != IGNORE
        centre = images[:, 0, 20:24, 20:24]
        assert torch.equal(centre[inside], 10.0 * labels[inside])
        assert torch.all(weights[inside] == 2.0) and torch.all(weights[~inside] == 0.0)


def test_tile_at_the_corner_is_mirrored_and_ignores_the_outside():
    item = coded_image((12, 10))
    sampler = TileSampler([item], (14, 14), (6, 6), None, None, np.random.default_rng(0))
    images, labels, _ = sampler.tiles_at([(0, (0, 0))])
    # Output tile centred on pixel (0, 0): rows/cols -3..2; three of them outside.
    assert (labels[0, :3] == IGNORE).all() and (labels[0, :, :3] == IGNORE).all()
    assert torch.equal(labels[0, 3:, 3:], torch.from_numpy(item.classes[:3, :3]))
    # Input tile reads rows -7..6, mirrored without repeating the edge pixel.
    expected = np.pad(item.image[0], 7, mode="reflect")[:14, :14]
    assert np.array_equal(images[0, 0].numpy(), expected)


def test_every_pixel_is_a_centre_equally_often():
    small, large = coded_image((3, 4)), coded_image((6, 4))
    sampler = TileSampler([small, large], (4, 4), (4, 4), None, None, np.random.default_rng(3))
    counts = [np.zeros((3, 4)), np.zeros((6, 4))]
    for index, centre in sampler.draw_positions(36_000):
        counts[index][centre] += 1
    # 36 pixels in all: each should be the centre 1000 times (binomial sd ~ 31).
    everything = np.concatenate([c.ravel() for c in counts])
    assert everything.min() > 850 and everything.max() < 1150


def test_augmented_tiles_keep_labels_aligned_with_the_image():
    item = LabeledImage(
        name="blocks",
        image=np.kron(np.eye(6), np.ones((10, 10)))[np.newaxis].astype(np.float32) * 10.0,
        classes=np.kron(np.eye(6), np.ones((10, 10))).astype(np.int64),
        instances=np.kron(np.eye(6), np.ones((10, 10))).astype(np.int32),
        weights=np.ones((60, 60), np.float32),
    )
    params = AugmentParams(gray=False)
    sampler = TileSampler([item], (28, 28), (20, 20), None, params, np.random.default_rng(0))
    assert sampler.slack > 3 * params.elastic_sigma
    agreement = []
    for _ in range(10):
        images, labels, _ = sampler.sample(1)
        inside = labels[0] != IGNORE
        centre = images[0, 0, 4:24, 4:24]
        predicted = (centre > 5.0).long()
        agreement.append((predicted[inside] == labels[0][inside]).float().mean().item())
    # Bicubic interpolation blurs block edges by about a pixel; the rest must agree.
    assert np.mean(agreement) > 0.93


def test_sampler_state_restores_the_same_tiles():
    item = coded_image((30, 30))
    sampler = TileSampler(
        [item], (28, 28), (20, 20), None, AugmentParams(), np.random.default_rng(5)
    )
    sampler.sample(2)
    state = sampler.state()
    first = sampler.sample(2)
    sampler.set_state(state)
    second = sampler.sample(2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_class_weights_none_leaves_cells_at_one():
    classes, instances = labels_to_classes(squares_membrane(), "membrane")
    plain = compute_weight_map(instances, classes, class_weights="none")
    balanced = compute_weight_map(instances, classes, class_weights="balanced")
    assert np.all(plain[classes == 1] == 1.0)
    # 9 cells of 64 px = 576 of 1024 px: balanced weights are the inverse frequencies / 2.
    assert balanced[5, 5] == pytest.approx(1024 / (2 * 576))


def reflect(coordinate: int, size: int) -> int:
    """Mirror a coordinate into [0, size) without repeating the edge (numpy 'reflect')."""
    if size == 1:
        return 0
    period = 2 * (size - 1)
    folded = coordinate % period
    return folded if folded < size else period - folded


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    output=st.integers(1, 9),
    margin=st.integers(0, 6),
    data=st.data(),
)
def test_every_tile_pixel_reads_its_own_image_pixel(height, width, output, margin, data):
    # Pixel values are their own flat index, so any shift or flip would show.
    index = np.arange(height * width).reshape(height, width)
    item = LabeledImage(
        name="index",
        image=index[np.newaxis].astype(np.float32),
        classes=index.astype(np.int64),
        instances=index.astype(np.int32),
        weights=np.ones((height, width), np.float32),
    )
    input_size = output + 2 * margin
    sampler = TileSampler(
        [item], (input_size,) * 2, (output,) * 2, None, None, np.random.default_rng(0)
    )
    centre = (data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1)))
    images, labels, weights = sampler.tiles_at([(0, centre)])
    top, left = centre[0] - output // 2, centre[1] - output // 2
    for i in range(input_size):
        for j in range(input_size):
            y, x = top - margin + i, left - margin + j
            assert images[0, 0, i, j] == index[reflect(y, height), reflect(x, width)]
    for i in range(output):
        for j in range(output):
            y, x = top + i, left + j
            inside = 0 <= y < height and 0 <= x < width
            assert labels[0, i, j] == (index[y, x] if inside else IGNORE)
            assert weights[0, i, j] == (1.0 if inside else 0.0)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 12)),
    output=st.integers(1, 5),
    margin=st.integers(0, 4),
    data=st.data(),
)
def test_every_voxel_of_a_two_channel_stack_reads_its_own_voxel(shape, output, margin, data):
    index = np.arange(np.prod(shape)).reshape(shape)
    item = LabeledImage(
        name="stack",
        image=np.stack([index, -index]).astype(np.float32),
        classes=index.astype(np.int64),
        instances=index.astype(np.int32),
        weights=np.ones(shape, np.float32),
    )
    size = output + 2 * margin
    sampler = TileSampler([item], (size,) * 3, (output,) * 3, None, None, np.random.default_rng(0))
    centre = tuple(data.draw(st.integers(0, extent - 1)) for extent in shape)
    images, labels, weights = sampler.tiles_at([(0, centre)])
    first = [c - output // 2 for c in centre]
    for offset in np.ndindex(*(size,) * 3):
        source = tuple(
            reflect(f - margin + o, n) for f, o, n in zip(first, offset, shape, strict=True)
        )
        assert images[(0, 0, *offset)] == index[source]
        assert images[(0, 1, *offset)] == -index[source]
    for offset in np.ndindex(*(output,) * 3):
        position = tuple(f + o for f, o in zip(first, offset, strict=True))
        inside = all(0 <= p < n for p, n in zip(position, shape, strict=True))
        assert labels[(0, *offset)] == (index[position] if inside else IGNORE)
        assert weights[(0, *offset)] == (1.0 if inside else 0.0)


def test_a_border_window_copies_no_more_than_the_window(monkeypatch):
    # A 44-px window at the edge of a 600 x 900 image: every gather stays window-sized.
    item = coded_image((600, 900))
    sampler = TileSampler([item], (44, 44), (4, 4), None, None, np.random.default_rng(0))
    largest = []
    original = torch.Tensor.index_select

    def recording(tensor, axis, rows):
        largest.append(tensor.numel())
        return original(tensor, axis, rows)

    monkeypatch.setattr(torch.Tensor, "index_select", recording)
    images, labels, _ = sampler.tiles_at([(0, (0, 450))])
    assert largest and max(largest) <= 44 * 44
    assert images.shape == (1, 1, 44, 44) and (labels[0, :2] == IGNORE).all()


def test_training_images_are_stored_on_a_gpu_only_when_they_fit(monkeypatch):
    from unetile.data.dataset import _storage_device

    items = [coded_image((100, 100))]  # 1 channel: 16 bytes per pixel, 160,000 bytes
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 200_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (440_000, 10**9))
    assert _storage_device(gpu, items) == gpu  # a quarter of 640,000 (cache counts as free)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (400_000, 10**9))
    assert _storage_device(gpu, items) == torch.device("cpu")
    assert _storage_device(torch.device("cpu"), items) == torch.device("cpu")
