import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetile.data.synthetic import cells_like, em_like, touching_pairs
from unetile.data.weights import instances_from_membrane_map

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("generator", [em_like, cells_like])
def test_same_seed_same_image_and_generator_equals_int_seed(generator):
    first = generator((96, 80), num_cells=8, rng=11)
    second = generator((96, 80), num_cells=8, rng=np.random.default_rng(11))
    other = generator((96, 80), num_cells=8, rng=12)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.instances, second.instances)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("shape", [(64, 64), (100, 130)])
def test_shapes_dtypes_and_value_ranges(shape):
    em = em_like(shape, rng=0)
    assert em.image.shape == em.membrane.shape == em.instances.shape == shape
    assert (em.image.dtype, em.membrane.dtype, em.instances.dtype) == (
        np.float32,
        np.uint8,
        np.int32,
    )
    assert 0.0 <= em.image.min() and em.image.max() <= 1.0
    assert set(np.unique(em.membrane)) == {0, 255}
    cells = cells_like(shape, rng=0)
    assert cells.image.shape == cells.instances.shape == shape
    assert (cells.image.dtype, cells.instances.dtype) == (np.float32, np.int32)
    assert 0.0 <= cells.image.min() and cells.image.max() <= 1.0
    # Ids are consecutive 1..n.
    for instances in (em.instances, cells.instances):
        np.testing.assert_array_equal(np.unique(instances), np.arange(instances.max() + 1))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_cells=st.integers(1, 40))
def test_membrane_map_and_instances_agree(seed, num_cells):
    em = em_like((128, 128), num_cells=num_cells, rng=seed)
    np.testing.assert_array_equal(instances_from_membrane_map(em.membrane), em.instances)
    np.testing.assert_array_equal(em.instances == 0, em.membrane == 0)


def test_em_membranes_are_thin_dark_and_cells_number_about_the_seeds():
    em = em_like((256, 256), num_cells=40, rng=3)
    membrane = em.membrane == 0
    # A 2-3 px line has every pixel within 2 px of a cell; only junctions are thicker.
    depth = ndimage.distance_transform_edt(membrane)
    assert np.mean(depth[membrane] <= 2) > 0.97
    assert 0.05 < membrane.mean() < 0.2
    assert em.image[membrane].mean() < em.image[~membrane].mean() - 0.25
    assert 35 <= em.instances.max() <= 45


@pytest.mark.parametrize(("fraction", "touching_cells"), [(0.0, 0), (0.3, 6), (0.5, 10), (1.0, 20)])
def test_touching_fraction_of_cells_share_a_boundary(fraction, touching_cells):
    cells = cells_like((256, 256), num_cells=20, touching_fraction=fraction, rng=5)
    instances = cells.instances
    assert instances.max() == 20
    pairs = touching_pairs(instances)
    touching = {cell for pair in pairs for cell in pair}
    assert len(touching) == touching_cells
    # Every other cell keeps a background gap of at least 3 px: no other id
    # within Chebyshev distance 2 (Euclidean <= 2.83 px).
    largest = ndimage.maximum_filter(instances, size=5)
    smallest = ndimage.minimum_filter(np.where(instances == 0, 10**6, instances), size=5)
    crowded = (instances > 0) & ((largest != instances) | (smallest != instances))
    assert set(np.unique(instances[crowded]).tolist()) == touching
    foreground = instances > 0
    assert cells.image[foreground].mean() > cells.image[~foreground].mean() + 0.2


def test_touching_pairs_by_hand():
    instances = np.array([[1, 1, 2], [0, 3, 0], [4, 0, 5]])
    assert touching_pairs(instances) == {(1, 2), (1, 3)}


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="shape must be"):
        em_like((8, 64), rng=0)
    with pytest.raises(ValueError, match="shape must be"):
        cells_like((64, 64, 64), rng=0)
    with pytest.raises(ValueError, match="rng must be"):
        em_like((64, 64), rng=None)
    with pytest.raises(ValueError, match="lower num_cells"):
        em_like((64, 64), num_cells=1000, rng=0)
    with pytest.raises(ValueError, match="touching_fraction"):
        cells_like((64, 64), touching_fraction=1.5, rng=0)
