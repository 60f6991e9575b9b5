"""The trained model a user holds: :class:`Segmenter` (what ``unetile predict MODEL`` loads).

It keeps the network, its :class:`~unetile.predict.card.ModelCard` and the
:class:`~unetile.predict.postprocessing.PostProcessing` it carries, and
segments arrays (:meth:`Segmenter.segment`) or files
(:meth:`Segmenter.segment_files`) with one of two runners: in this process
(:class:`InProcess`, inputs grouped so that small images share forward
passes) or region by region, on a Dask cluster or resumably here
(:class:`Regions`). Both use the one tile loop and the one file writer.

Examples
--------
>>> segmenter = Segmenter.load("runs/isbi")  # doctest: +SKIP
>>> result = segmenter.with_post(min_size=20).segment(image)  # doctest: +SKIP
>>> result.instances.max()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..network.model import UNet
from ..numbers import flag
from . import engine
from .card import ModelCard, carry, load_network
from .engine import PredictOptions, read_input_image
from .files import predict_images_to_files, predict_to_files
from .outputs import OutputOwner, Outputs, remove_stale_work
from .postprocessing import PostProcessing

GROUP_INPUTS = 16  # inputs predicted together: one set-up, tiles batched across them
GROUP_PIXELS = 2**26  # ... up to this many pixels in all, which they may hold in memory
MAX_RESCALE = 64  # a rescaling beyond this is a wrong pixel size, not a real image


@dataclass(frozen=True)
class Segmentation:
    """The outputs of one image: ``(K, *spatial)`` probabilities, the class map, and the
    instance labels (None when not asked for)."""

    probabilities: np.ndarray
    labels: np.ndarray
    instances: np.ndarray | None = None


@dataclass
class FilesReport:
    """What :meth:`Segmenter.segment_files` did: the inputs written (with their outputs)
    and those that failed (with a one-line reason); the others went on regardless."""

    written: list[tuple[Path, dict[str, Path]]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


Reporter = Callable[[Path, dict | None, str | None], None]


@dataclass(frozen=True)
class Segmenter:
    """A trained network with its card and the post-processing it carries."""

    model: UNet
    card: ModelCard
    post: PostProcessing
    source: Path | None = None
    weights: str = io.MODEL_WEIGHTS  # the file in ``source`` the network came from

    @classmethod
    def load(cls, run_dir: str | os.PathLike, name: str = io.MODEL_WEIGHTS) -> Segmenter:
        """The model of a run folder (``unetile train --out``), checked as it loads."""
        card = ModelCard.read(run_dir)
        model = load_network(run_dir, card, name)
        carry(model, card)
        return cls(model, card, card.post, Path(run_dir), name)

    def with_post(self, **changes) -> Segmenter:
        """This model with its post-processing changed (:meth:`PostProcessing.with_`)."""
        post = self.post.with_(**changes)
        post.check(self.model.config.num_classes)
        return dataclasses.replace(self, post=post)

    def probabilities(self, image, options: PredictOptions | None = None, **changes):
        """``(K, *spatial)`` float32 probabilities (:func:`unetile.predict.engine.predict`)."""
        return engine.predict(self.model, image, options, **changes)

    def segment(
        self, image, options: PredictOptions | None = None, objects: bool = True, **changes
    ) -> Segmentation:
        """Probabilities, class map and (with ``objects``) instance labels of an image held
        in memory; for images larger than memory, :meth:`segment_files`."""
        probabilities = self.probabilities(image, options, **changes)
        instances = self.post.objects(probabilities) if objects else None
        return Segmentation(probabilities, self.post.labels(probabilities), instances)

    def segment_files(
        self,
        inputs: Sequence[str | os.PathLike],
        outputs: Outputs,
        options: PredictOptions | None = None,
        runner: InProcess | Regions | None = None,
        report: Reporter | None = None,
    ) -> FilesReport:
        """Segment image files (or folders of them, or zarr stores) into ``outputs``.

        Every output name is checked before any work; a bad input is reported
        (``report(path, None, reason)``) and the others go on; each written one
        is reported as ``report(path, outputs, None)``.
        """
        if self.source is None:
            raise ValueError("segment_files needs a model loaded from a run folder (load)")
        options = options or PredictOptions()
        jobs = outputs.plan(io.expand_inputs(inputs))
        owner = OutputOwner(Path(outputs.folder), self.source, self.weights)
        owner.check(jobs)
        self.post.check(self.model.config.num_classes, objects=outputs.instances)
        self._warn_small_tile(options)
        result = FilesReport()

        def record(path, written, reason):
            if written is not None:
                owner.record(written)
                result.written.append((path, written))
            else:
                result.failed.append((path, reason))
            if report is not None:
                report(path, written, reason)

        (runner or InProcess()).run(self, jobs, options, record)
        return result

    def _warn_small_tile(self, options: PredictOptions) -> None:
        tile, trained = options.tile_shape, self.card.training_tile
        if tile is None or trained is None or self.model.config.norm != "instance":
            return
        tile = tuple(tile) if isinstance(tile, tuple | list) else (tile,) * len(trained)
        if any(t < s for t, s in zip(tile, trained, strict=False)):
            # Instance norm normalises each tile by itself: small tiles change the result.
            warnings.warn(
                f"{self.source} uses instance norm, whose output depends on the tile; --tile "
                f"{options.tile_shape} is smaller than its training tile ({max(trained)} px): "
                "leave --tile out to use the largest tile that fits",
                stacklevel=3,
            )


# --------------------------------------------------------------------------
# The runners
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class InProcess:
    """Predict in this process: consecutive inputs share the network's set-up and forward
    passes; an input whose pixel size differs from the model's is resampled on request."""

    pixel_size: tuple[float, ...] | None = field(
        default=None,
        metadata=flag(
            "micrometres per pixel of the inputs, one value or one per axis (z,y,x); "
            "overrides their TIFF metadata (default: read from it)",
            metavar="UM",
        ),
    )
    rescale: bool = field(
        default=False,
        metadata=flag(
            "resample each input to the model's pixel size (linear), predict, and resample "
            "the outputs back to the input's size (probabilities linear, labels nearest); "
            "holds the image in memory",
            action="store_true",
        ),
    )

    def run(self, segmenter: Segmenter, jobs, options: PredictOptions, record) -> None:
        model, post = segmenter.model, segmenter.post
        if self.rescale and segmenter.card.pixel_size_um is None:
            raise io.InputError(
                f"{segmenter.source / io.MODEL_CONFIG}: the model has no pixel size to "
                "--rescale to; train it with --pixel-size (or on TIFFs that state theirs)"
            )

        def alone(image, rescaled, outputs: dict) -> None:
            (rescaled or predict_to_files)(model, image, options=options, **outputs, post=post)
            remove_stale_work(outputs)

        def together(images, outputs):
            for number in predict_images_to_files(model, images, outputs, options, post=post):
                remove_stale_work(outputs[number])
                yield number

        prepare = functools.partial(self._prepare, segmenter)
        _each_input_together(jobs, prepare, together, alone, record)

    def _prepare(self, segmenter: Segmenter, path: Path):
        """The image to predict, and the rescaling prediction when it needs one (else None)."""
        from .scale import predict_rescaled_to_files

        config = segmenter.model.config
        image = read_input_image(path, config.dims, config.in_channels)
        pixel_size = self.pixel_size or io.read_pixel_size(path, config.dims)
        model_pixel_size = segmenter.card.pixel_size_um
        if not self._needs_rescaling(path, pixel_size, model_pixel_size):
            return image, None
        rescaled = functools.partial(
            predict_rescaled_to_files, pixel_size=pixel_size, model_pixel_size=model_pixel_size
        )
        return np.asarray(image), rescaled

    def _needs_rescaling(self, path: Path, pixel_size, model_pixel_size) -> bool:
        """Whether to resample ``path``; warns when its pixel size is far from the model's."""
        from .scale import SAME, TOLERANCE, describe, relative_difference

        if pixel_size is None or model_pixel_size is None:
            if self.rescale:
                raise io.InputError(
                    f"{path}: states no pixel size to --rescale from; give it with --pixel-size"
                )
            return False
        difference = relative_difference(pixel_size, model_pixel_size)
        if self.rescale:
            factor = max(
                max(a / b, b / a) for a, b in zip(pixel_size, model_pixel_size, strict=True)
            )
            if factor > MAX_RESCALE:
                raise io.InputError(
                    f"{path}: pixel size {describe(pixel_size)} is {factor:.4g}x the model's "
                    f"{describe(model_pixel_size)}; --rescale resamples by at most "
                    f"{MAX_RESCALE}x: check the pixel sizes (--pixel-size, the file's "
                    "metadata, the model's config.json)"
                )
            return difference > SAME
        if difference > TOLERANCE:
            looks = "smaller" if pixel_size[-1] > model_pixel_size[-1] else "larger"
            warnings.warn(
                f"{path}: pixel size {describe(pixel_size)} differs from the model's "
                f"{describe(model_pixel_size)} by {100 * difference:.0f}% (more than "
                f"{100 * TOLERANCE:.0f}%): structures look {looks} than in training; add "
                "--rescale",
                stacklevel=2,
            )
        return False


@dataclass(frozen=True)
class Regions:
    """Predict region by region: on a Dask cluster (``workers`` or ``scheduler``), or here
    one region after another; resumable (``resume``)."""

    workers: int | None = field(
        default=None,
        metadata=flag(
            "predict on a local Dask cluster of N single-thread worker processes",
            metavar="N",
            kind=int,
        ),
    )
    scheduler: str | None = field(
        default=None,
        metadata=flag(
            "predict on a running Dask cluster (e.g. tcp://10.0.0.1:8786); inputs and --out "
            "must be on a file system every worker sees",
            metavar="ADDRESS",
        ),
    )
    resume: bool = field(
        default=False,
        metadata=flag(
            "continue a prediction that was stopped: regions already written are kept "
            "(works with or without a cluster)",
            action="store_true",
        ),
    )
    region_tiles: int = field(
        default=1,
        metadata=flag(
            "tiles per task along each axis, K**dims tiles a task (default 1)",
            metavar="K",
            kind=int,
        ),
    )

    def __post_init__(self):
        if self.workers is not None and self.scheduler is not None:
            raise io.InputError("give --workers (a local cluster) or --scheduler, not both")
        if self.workers is not None and self.workers < 1:
            raise io.InputError(f"--workers must be >= 1, got {self.workers}")
        if self.region_tiles < 1:
            raise io.InputError(f"--region-tiles must be >= 1, got {self.region_tiles}")

    def run(self, segmenter: Segmenter, jobs, options: PredictOptions, record) -> None:
        from .regions import dask_client, predict_regions

        if segmenter.model.config.padding != "valid":
            raise io.InputError(
                f"{segmenter.source}: --workers, --scheduler and --resume need a 'valid' "
                "model; a 'same' model's blended tiles depend on their neighbours"
            )
        with contextlib.ExitStack() as stack:
            client = None
            if self.workers is not None or self.scheduler is not None:
                client = stack.enter_context(dask_client(self.workers, self.scheduler))

            def one(path: Path, outputs: dict) -> None:
                try:
                    # Each worker opens the image itself, by path, and resolves the device.
                    predict_regions(
                        segmenter.model,
                        path,
                        options,
                        **outputs,
                        post=segmenter.post,
                        client=client,
                        resume=self.resume,
                        region_tiles=self.region_tiles,
                    )
                except KeyboardInterrupt:
                    warnings.warn(
                        f"{path}: the regions done so far are kept; add --resume to the same "
                        "command to continue",
                        stacklevel=2,
                    )
                    raise

            for path, outputs in jobs:
                if _reported(path, record, one, path, outputs):
                    record(path, outputs, None)


# --------------------------------------------------------------------------
# Many inputs: grouped, and one bad input never stops the others
# --------------------------------------------------------------------------


def _each_input_together(jobs, prepare, together, alone, record) -> None:
    """Every input, consecutive ones predicted together; a bad one is reported, the rest go on.

    ``prepare(path)`` gives ``(image, rescaled)``; inputs without a rescaling
    prediction are grouped (:data:`GROUP_INPUTS`, :data:`GROUP_PIXELS`) and
    ``together(images, outputs)`` yields the number of each finished one. When
    a group fails, its unfinished inputs run one by one through ``alone(image,
    rescaled, outputs)``, so that the bad one is named and the others are written.
    """
    group = []

    def predict_group() -> None:
        finished = 0
        try:
            images, outputs = [g[2] for g in group], [g[1] for g in group]
            for number in together(images, outputs):
                record(*group[number][:2], None)
                finished = number + 1
        except ValueError:
            # A bad input stops the shared forward passes: the rest go one at a time.
            for path, outputs, image in group[finished:]:
                if _reported(path, record, alone, image, None, outputs):
                    record(path, outputs, None)
        group.clear()

    for path, outputs in jobs:
        prepared = _reported(path, record, prepare, path)
        if prepared is None:
            continue
        image, rescaled = prepared
        if rescaled is not None:
            predict_group()  # outputs in input order
            if _reported(path, record, alone, image, rescaled, outputs):
                record(path, outputs, None)
            continue
        group.append((path, outputs, image))
        if len(group) >= GROUP_INPUTS or sum(g[2].size for g in group) >= GROUP_PIXELS:
            predict_group()
    predict_group()


def _reported(path: Path, record, function, *arguments):
    """``function(*arguments)``, or None with the error recorded as one line naming
    ``path``; True when ``function`` returns None."""
    try:
        result = function(*arguments)
    except ValueError as error:
        # One bad file must not stop a long batch; report it and go on.
        reason = str(error) if isinstance(error, io.InputError) else f"{path}: {error}"
        record(path, None, reason)
        return None
    return True if result is None else result
