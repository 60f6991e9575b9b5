"""Synthetic microscopy images with exact ground truth, for tests, benchmarks and demos.

Two generators of 2D images, seedable and fast (0.1-0.3 s for 1024x1024 on one
core; 4096x4096 takes about 4 s for cells_like, 8-10 s for em_like):

- :func:`em_like`: electron-microscopy-like tiling of cells separated by thin
  dark membranes (2-3 px), with texture, vesicles, blur and noise, like the
  ISBI 2012 images; gives the binary membrane map in the ISBI convention.
- :func:`cells_like`: light-microscopy-like blob cells on a background, a
  chosen fraction of them touching other cells along a shared boundary with no
  background gap (the case the paper's weight map is for).

Images are float32 in [0, 1]; instance ids are int32, 0 for background or
membrane and 1..n for the cells, numbered in raster order of their first pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage, sparse
from skimage.measure import label

from .weights import touching_borders

# Mean area in px^2 of one cell when num_cells is not given.
EM_CELL_AREA = 45 * 45
CELLS_CELL_AREA = 90 * 90
# Fraction of the image the cells of cells_like cover; low enough that random
# placement with gaps always finds room.
CELLS_COVERAGE = 0.3
# Smallest background gap in px between a separate cell and any other cell.
CELLS_GAP = 3
# Membrane fragments: interior pieces smaller than this (px) become membrane,
# as they would be too small to be a cell profile.
EM_MIN_CELL_AREA = 12


@dataclass(frozen=True, eq=False)
class SyntheticEM:
    """An EM-like image with its ground truth.

    Attributes
    ----------
    image : ndarray of float32, shape (height, width)
        Gray values in [0, 1]; membranes are dark.
    membrane : ndarray of uint8, shape (height, width)
        ISBI 2012 convention: 255 on cells, 0 on membranes.
    instances : ndarray of int32, shape (height, width)
        Cell ids 1..n, 0 on membranes; equal to
        ``unetile.data.weights.instances_from_membrane_map(membrane)``.
    """

    image: np.ndarray
    membrane: np.ndarray
    instances: np.ndarray


@dataclass(frozen=True, eq=False)
class SyntheticCells:
    """A light-microscopy-like image of cells with its ground truth.

    Attributes
    ----------
    image : ndarray of float32, shape (height, width)
        Gray values in [0, 1]; cells are brighter than the background.
    instances : ndarray of int32, shape (height, width)
        Cell ids 1..n, 0 on background. Touching cells share a boundary with
        no background pixel between them.
    """

    image: np.ndarray
    instances: np.ndarray


def em_like(
    shape: Sequence[int],
    num_cells: int | None = None,
    *,
    rng: np.random.Generator | int,
) -> SyntheticEM:
    """An EM-like image: a Voronoi tiling of cells separated by 2-3 px dark membranes.

    Cell boundaries are the edges of a Voronoi diagram of ``num_cells`` random
    seeds, bent by a smooth random warp so that they curve like neurite
    profiles. Cells get their own gray value, a smooth texture and dark
    vesicles; the whole image is blurred (sigma 1 px) and gets Gaussian noise.
    Interior fragments smaller than 12 px are merged into the membrane, so
    the number of cells can differ slightly from ``num_cells`` (a seed's region
    may also be cut in two by the warp or the image border).

    Parameters
    ----------
    shape : (int, int)
        Image height and width in pixels, each >= 16.
    num_cells : int, optional
        Number of Voronoi seeds; by default one per 45x45 px.
    rng : numpy.random.Generator or int
        Random generator or seed.

    Returns
    -------
    SyntheticEM
        ``image`` (float32 in [0, 1]), ``membrane`` (uint8, 255 = cell,
        0 = membrane) and ``instances`` (int32).
    """
    shape = _check_shape(shape)
    rng = _as_generator(rng)
    area = shape[0] * shape[1]
    if num_cells is None:
        num_cells = max(1, round(area / EM_CELL_AREA))
    _check_num_cells(num_cells, area, smallest_area=12 * 12, name="em_like")
    spacing = math.sqrt(area / num_cells)

    # The random draws happen in this order; changing it changes every image of a seed.
    regions = _warped_voronoi(shape, num_cells, spacing, rng)
    membrane = _membranes_between(regions, spacing, rng)
    del regions
    membrane, instances = _cells_inside(membrane)
    image = _em_image(instances, membrane, rng)
    membrane_map = np.where(membrane, np.uint8(0), np.uint8(255))
    return SyntheticEM(image=image, membrane=membrane_map, instances=instances)


def _warped_voronoi(shape, num_cells: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Voronoi regions of ``num_cells`` random seeds, read at warped positions: curved borders."""
    area = shape[0] * shape[1]
    seeds = np.zeros(shape, dtype=np.int32)
    flat = rng.choice(area, size=num_cells, replace=False)
    seeds.flat[flat] = np.arange(1, num_cells + 1, dtype=np.int32)
    nearest = ndimage.distance_transform_edt(
        seeds == 0, return_distances=False, return_indices=True
    )
    voronoi = seeds[tuple(nearest)]
    del nearest

    amplitude = 0.12 * spacing
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    columns = np.arange(shape[1], dtype=np.float32)[None, :]
    warp_rows = rows + amplitude * _smooth_noise(shape, spacing / 2, rng)
    warp_columns = columns + amplitude * _smooth_noise(shape, spacing / 2, rng)
    np.clip(np.rint(warp_rows), 0, shape[0] - 1, out=warp_rows)
    np.clip(np.rint(warp_columns), 0, shape[1] - 1, out=warp_columns)
    return voronoi[warp_rows.astype(np.intp), warp_columns.astype(np.intp)]


def _membranes_between(regions: np.ndarray, spacing: float, rng: np.random.Generator):
    """Membrane pixels along the region boundaries, 2 px wide and 3 px in places."""
    shape = regions.shape
    # Both sides of every region boundary: 2 px membranes; a one-sided extra
    # pixel where a smooth field is positive makes them 3 px there.
    membrane = np.zeros(shape, dtype=bool)
    vertical_change = regions[1:, :] != regions[:-1, :]
    membrane[1:, :] |= vertical_change
    membrane[:-1, :] |= vertical_change
    horizontal_change = regions[:, 1:] != regions[:, :-1]
    membrane[:, 1:] |= horizontal_change
    membrane[:, :-1] |= horizontal_change
    del vertical_change, horizontal_change
    thicker = np.zeros(shape, dtype=bool)
    thicker[:-1, :] |= membrane[1:, :]
    thicker[:, :-1] |= membrane[:, 1:]
    membrane |= thicker & (_smooth_noise(shape, spacing, rng) > 0)
    return membrane


def _cells_inside(membrane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The membrane with fragments too small to be a cell added, and the cells it encloses."""
    instances, _ = ndimage.label(~membrane, output=np.int32)
    sizes = np.bincount(instances.ravel())
    small = sizes < EM_MIN_CELL_AREA
    small[0] = False
    if small.any():
        membrane |= small[instances]
        new_ids = np.cumsum(~small, dtype=np.int32) - 1
        new_ids[small] = 0
        instances = new_ids[instances]
    return membrane, instances


def _em_image(instances: np.ndarray, membrane: np.ndarray, rng: np.random.Generator):
    """Gray values: textured cells with dark vesicles, dark membranes, blur and noise."""
    shape = instances.shape
    num_found = int(instances.max())
    cell_gray = rng.uniform(0.55, 0.85, num_found + 1).astype(np.float32)
    image = cell_gray[instances]
    image += 0.07 * _smooth_noise(shape, 4.0, rng)
    vesicles = rng.random(shape, dtype=np.float32) < 0.0015
    image -= 2.5 * ndimage.gaussian_filter(vesicles.astype(np.float32), 1.2)
    image[membrane] = 0.12 + 0.05 * _smooth_noise(shape, 8.0, rng)[membrane]
    image = ndimage.gaussian_filter(image, 1.0)
    image += 0.04 * rng.standard_normal(shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    return image


def cells_like(
    shape: Sequence[int],
    num_cells: int | None = None,
    touching_fraction: float = 0.5,
    *,
    rng: np.random.Generator | int,
) -> SyntheticCells:
    """A light-microscopy-like image of blob cells, some touching, on a background.

    Cells are star-shaped blobs (a circle with random low-order wobble) whose
    mean radius makes them cover about 30 % of the image.
    ``round(touching_fraction * num_cells)`` cells (at least two when that is
    1) are placed in clusters of two or three overlapping blobs; the overlap
    is split between them by the smaller normalised distance to each centre,
    so touching cells share a boundary with no background gap. The other
    cells keep a gap of at least 3 px from every other cell. Cells are bright
    domes on a dim, unevenly lit background, with a darker line along shared
    boundaries, blurred (sigma 1.5 px) and noisy.

    Parameters
    ----------
    shape : (int, int)
        Image height and width in pixels, each >= 16.
    num_cells : int, optional
        Number of cells; by default one per 90x90 px.
    touching_fraction : float
        Fraction of cells, in [0, 1], that touch at least one other cell.
    rng : numpy.random.Generator or int
        Random generator or seed.

    Returns
    -------
    SyntheticCells
        ``image`` (float32 in [0, 1]) and ``instances`` (int32).

    Raises
    ------
    ValueError
        If the cells cannot be placed (too many for the image).
    """
    shape = _check_shape(shape)
    rng = _as_generator(rng)
    area = shape[0] * shape[1]
    if num_cells is None:
        num_cells = max(1, round(area / CELLS_CELL_AREA))
    _check_num_cells(num_cells, area, smallest_area=16 * 16, name="cells_like")
    if not 0.0 <= touching_fraction <= 1.0:
        raise ValueError(f"touching_fraction must be in [0, 1], got {touching_fraction}")

    # The random draws happen in this order; changing it changes every image of a seed.
    mean_radius = math.sqrt(CELLS_COVERAGE * area / (math.pi * num_cells))
    blobs = _random_blobs(num_cells, mean_radius, rng)
    clusters = _cluster_sizes(num_cells, touching_fraction, rng)
    centres = _place_cells(shape, blobs.radii, blobs.outer, clusters, rng)
    instances, rho = _rasterise_blobs(shape, blobs, centres)
    instances = _keep_seed_components(instances, centres)
    image = _cells_image(instances, rho, num_cells, mean_radius, rng)
    return SyntheticCells(image=image.astype(np.float32), instances=instances)


class _Blobs(NamedTuple):
    """Star-shaped blobs: radius factor 1 + sum_m wobble_m cos(m theta + phase_m), m = 2, 3, 4.

    ``outer`` is each blob's largest possible radius, for boxes and spacing.
    """

    radii: np.ndarray
    wobble: np.ndarray
    phases: np.ndarray
    outer: np.ndarray


def _random_blobs(num_cells: int, mean_radius: float, rng: np.random.Generator) -> _Blobs:
    radii = mean_radius * rng.uniform(0.8, 1.2, num_cells)
    # Wobble amplitudes sum to at most 0.16, so a blob reaches at least
    # 0.84 of its radius in every direction.
    wobble = rng.uniform(0.0, 0.04, (num_cells, 3))
    wobble[:, 0] *= 2.0
    phases = rng.uniform(0.0, 2.0 * math.pi, (num_cells, 3))
    outer = radii * (1.0 + wobble.sum(axis=1))
    return _Blobs(radii, wobble, phases, outer)


def _rasterise_blobs(shape, blobs: _Blobs, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids, and each pixel's normalised distance ``rho`` to the cell it belongs to.

    Each pixel goes to the cell with the smallest normalised distance
    rho = |x - centre| / radius(angle); it is inside that cell when rho < 1.
    """
    instances = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.inf, dtype=np.float32)
    for cell in range(len(blobs.radii)):
        centre = centres[cell]
        low = np.maximum(np.floor(centre - blobs.outer[cell]).astype(int), 0)
        high = np.minimum(np.ceil(centre + blobs.outer[cell]).astype(int) + 1, shape)
        rows = np.arange(low[0], high[0], dtype=np.float32)[:, None] - centre[0]
        columns = np.arange(low[1], high[1], dtype=np.float32)[None, :] - centre[1]
        angle = np.arctan2(rows, columns)
        factor = 1.0 + sum(
            blobs.wobble[cell, order] * np.cos((order + 2) * angle + blobs.phases[cell, order])
            for order in range(3)
        )
        rho = np.sqrt(rows**2 + columns**2) / (blobs.radii[cell] * factor)
        box = (slice(low[0], high[0]), slice(low[1], high[1]))
        claim = (rho < 1.0) & (rho < best[box])
        best[box][claim] = rho[claim]
        instances[box][claim] = cell + 1
    return instances, best


def _cells_image(instances, rho, num_cells: int, mean_radius: float, rng: np.random.Generator):
    """Dim, unevenly lit background; cells are domes, brightest at the centre."""
    shape = instances.shape
    image = 0.15 + 0.05 * _smooth_noise(shape, mean_radius * 4, rng)
    cell_gray = rng.uniform(0.5, 0.85, num_cells + 1).astype(np.float32)
    inside = instances > 0
    dome = 1.0 - 0.35 * np.minimum(rho[inside], 1.0) ** 2
    image[inside] = cell_gray[instances[inside]] * dome
    image += 0.04 * _smooth_noise(shape, 3.0, rng)
    image[touching_borders(instances)] *= 0.6
    image = ndimage.gaussian_filter(image, 1.5)
    image += 0.03 * rng.standard_normal(shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    return image


def touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, of distinct cells that are 4-adjacent (2D) or 6-adjacent.

    Parameters
    ----------
    instances : ndarray of int
        Instance ids, 0 = background.

    Returns
    -------
    set of (int, int)
        The touching pairs.
    """
    instances = np.asarray(instances)
    pairs: set[tuple[int, int]] = set()
    for axis in range(instances.ndim):
        first = np.moveaxis(instances, axis, 0)[:-1].ravel()
        second = np.moveaxis(instances, axis, 0)[1:].ravel()
        touching = (first != second) & (first > 0) & (second > 0)
        low = np.minimum(first[touching], second[touching])
        high = np.maximum(first[touching], second[touching])
        pairs.update(zip(low.tolist(), high.tolist(), strict=True))
    return pairs


def _cluster_sizes(num_cells: int, touching_fraction: float, rng: np.random.Generator):
    """Sizes of the groups of cells: 1 for a separate cell, 2 or 3 for touching ones."""
    touching = round(touching_fraction * num_cells)
    if touching == 1:
        touching = 2 if num_cells >= 2 else 0
    sizes = []
    while touching > 0:
        size = 3 if touching >= 5 and rng.random() < 0.3 else 2
        if touching == 3:
            size = 3
        sizes.append(size)
        touching -= size
    sizes += [1] * (num_cells - sum(sizes))
    return sizes


def _place_cells(shape, radii, outer, clusters, rng, attempts: int = 200) -> np.ndarray:
    """Cell centres: clusters overlap inside, everything else is kept CELLS_GAP apart."""
    num_cells = len(outer)
    centres = np.zeros((num_cells, 2))
    group = np.full(num_cells, -1)
    extent = np.array(shape, dtype=float) - 1.0
    start = 0
    for cluster, size in enumerate(clusters):
        members = range(start, start + size)
        for _ in range(attempts):
            if _try_cluster(members, centres, group, radii, outer, start, cluster, extent, rng):
                break
        else:
            raise ValueError(
                f"cells_like: no room for {num_cells} cells in an image of {tuple(shape)} px; "
                "lower num_cells"
            )
        start += size
    return centres


def _try_cluster(members, centres, group, radii, outer, placed, cluster, extent, rng) -> bool:
    for position, cell in enumerate(members):
        for _ in range(50):
            if position == 0:
                candidate = rng.uniform(0.0, 1.0, 2) * extent
            else:
                anchor = rng.choice(list(members)[:position])
                angle = rng.uniform(0.0, 2.0 * math.pi)
                # Closer than 0.84 of the radii's sum: the blobs overlap, so they touch.
                distance = rng.uniform(0.55, 0.78) * (radii[anchor] + radii[cell])
                candidate = centres[anchor] + distance * np.array(
                    [math.sin(angle), math.cos(angle)]
                )
                if np.any(candidate < 0) or np.any(candidate > extent):
                    continue
            distances = np.hypot(*(centres[:placed] - candidate).T)
            others = group[:placed] != cluster
            if np.any(distances[others] < outer[:placed][others] + outer[cell] + CELLS_GAP):
                continue
            mates = ~others
            if np.any(distances[mates] < 0.5 * (radii[:placed][mates] + radii[cell])):
                continue
            centres[cell] = candidate
            group[cell] = cluster
            placed += 1
            break
        else:
            group[list(members)] = -1
            return False
    return True


def _keep_seed_components(instances: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Drop any piece of a cell cut off from the piece around its centre."""
    pieces = label(instances, background=0, connectivity=1)
    if pieces.max() == np.count_nonzero(np.bincount(instances.ravel())[1:]):
        return instances
    seed_rows, seed_columns = np.rint(centres).astype(int).T
    keep = np.zeros(pieces.max() + 1, dtype=bool)
    keep[pieces[seed_rows, seed_columns]] = True
    keep[0] = False
    return np.where(keep[pieces], instances, 0).astype(np.int32)


def _smooth_noise(shape, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field with zero mean, unit standard deviation and features of ``scale`` px.

    White noise on a grid ``scale`` times coarser, smoothed up to full size by
    cubic B-splines applied one axis at a time as sparse matrices, so the cost
    is a few operations per pixel whatever ``scale`` (a Gaussian filter's grows
    with it).
    """
    scale = max(float(scale), 1.0)
    coarse_shape = tuple(math.ceil(size / scale) + 4 for size in shape)
    field = rng.standard_normal(coarse_shape, dtype=np.float32)
    for axis, size in enumerate(shape):
        matrix = _bspline_matrix(size, coarse_shape[axis], scale)
        field = np.moveaxis(matrix @ np.moveaxis(field, axis, 0), 0, axis)
    field = np.ascontiguousarray(field, dtype=np.float32)
    field -= field.mean()
    deviation = field.std()
    if deviation > 0:
        field /= deviation
    return field


def _bspline_matrix(size: int, coarse_size: int, scale: float) -> sparse.csr_matrix:
    """Sparse (size, coarse_size) matrix evaluating a cubic B-spline at ``i / scale + 1.5``."""
    position = np.arange(size) / scale + 1.5
    base = np.floor(position).astype(np.intp)
    fraction = position - base
    weights = np.stack(
        [
            (1 - fraction) ** 3 / 6,
            (3 * fraction**3 - 6 * fraction**2 + 4) / 6,
            (-3 * fraction**3 + 3 * fraction**2 + 3 * fraction + 1) / 6,
            fraction**3 / 6,
        ],
        axis=1,
    ).astype(np.float32)
    columns = base[:, None] + np.arange(-1, 3)[None, :]
    rows = np.repeat(np.arange(size), 4)
    return sparse.csr_matrix((weights.ravel(), (rows, columns.ravel())), shape=(size, coarse_size))


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(size) for size in shape)
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be (height, width) with both >= 16 pixels, got {shape}")
    return shape


def _check_num_cells(num_cells: int, area: int, smallest_area: int, name: str) -> None:
    if num_cells < 1:
        raise ValueError(f"{name}: num_cells must be >= 1, got {num_cells}")
    if area / num_cells < smallest_area:
        raise ValueError(
            f"{name}: {num_cells} cells leave {area / num_cells:.0f} px per cell, fewer than "
            f"{smallest_area}; lower num_cells or enlarge shape"
        )


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy.random.Generator or an int seed, got {rng!r}")
