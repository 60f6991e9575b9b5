"""Where a prediction's files go: their names, the checks before any work, their owner.

An ``--out`` folder gets ``NAME_labels``, and on request ``NAME_probabilities``
and ``NAME_instances``, for each input ``NAME``; two inputs that would write
one file, or an output that would replace an input, are refused before
anything runs, and a folder holds the outputs of one model only
(:class:`OutputOwner`).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import io
from ..numbers import flag
from .regions import work_folder


@dataclass(frozen=True)
class Outputs:
    """What is written for each input, and where.

    Attributes
    ----------
    folder : Path
        The output folder.
    format : {"tif", "zarr"}
        Tiled BigTIFF or zarr store.
    save_probabilities : bool
        Also write the per-class probabilities.
    instances : bool
        Also write instance labels (one id per cell).
    """

    folder: Path
    format: str = field(
        default="tif",
        metadata=flag(
            "output format: tiled BigTIFF or zarr store (default tif)", choices=("tif", "zarr")
        ),
    )
    save_probabilities: bool = field(
        default=False,
        metadata=flag("also write the per-class probabilities", action="store_true"),
    )
    instances: bool = field(
        default=False,
        metadata=flag(
            "also write instance labels (one id per cell), extracted as the model's "
            "config.json says (its 'instances' entry, written by training) unless the "
            "options below say otherwise; models without one: the paper's connected components",
            action="store_true",
        ),
    )

    def plan(self, paths: list[Path]) -> list[tuple[Path, dict[str, Path]]]:
        """Each input with its output paths; InputError before any work when they collide."""
        folder = Path(self.folder)
        if folder.exists() and not folder.is_dir():
            raise io.InputError(f"{folder}: exists and is not a folder; give a folder as --out")
        suffix = ".zarr" if self.format == "zarr" else ".tif"
        return planned_outputs(paths, folder, suffix, self.save_probabilities, self.instances)


def planned_outputs(
    paths: list[Path], out: Path, suffix: str, probabilities: bool, instances: bool
) -> list[tuple[Path, dict[str, Path]]]:
    """Each input with its output paths; InputError before any work if two would collide.

    Two inputs of the same stem (``a/x.png``, ``b/x.tif``) would write the
    same outputs, and an output may not replace one of the inputs.
    """
    jobs = []
    writers: dict[Path, Path] = {}
    inputs = {path.resolve(): path for path in paths}
    for path in paths:
        stem = io.image_stem(path)
        outputs = {"labels": out / f"{stem}_labels{suffix}"}
        if probabilities:
            outputs["probabilities"] = out / f"{stem}_probabilities{suffix}"
        if instances:
            outputs["instances"] = out / f"{stem}_instances{suffix}"
        for output in outputs.values():
            key = output.resolve()
            if key in writers and writers[key] != path:
                raise io.InputError(
                    f"{path}: would write {output} as {writers[key]} does (same file stem); "
                    "rename one of them or predict them into different --out folders"
                )
            if key in inputs:
                raise io.InputError(
                    f"{inputs[key]}: is an input and would be overwritten by the output of "
                    f"{path}; give another --out"
                )
            writers[key] = path
        jobs.append((path, outputs))
    return jobs


def remove_stale_work(outputs: dict) -> None:
    """The work folder of an interrupted region run (--workers, --resume) of these outputs,
    removed with one warning once a plain prediction has written them: it is obsolete."""
    work = work_folder(outputs["labels"])
    if not work.is_dir():
        return
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    shutil.rmtree(work, ignore_errors=True)
    warnings.warn(
        f"{work}: removed the work folder of an interrupted region run ({size / 2**20:.1f} MiB); "
        "its outputs are written now",
        stacklevel=2,
    )


OWNER_RECORD = ".unetile-outputs.json"


class OutputOwner:
    """Which model wrote the outputs in an --out folder (``.unetile-outputs.json``).

    A folder holds the outputs of one model: a prediction with another model
    (other weights) is refused while any output recorded for the first one is
    still there, so that a folder never mixes the labels of two models.
    """

    def __init__(self, out: Path, model_dir: Path, weights_name: str = io.MODEL_WEIGHTS):
        self.path = out / OWNER_RECORD
        self.model_dir = model_dir
        digest = hashlib.sha256()
        with open(model_dir / weights_name, "rb") as weights:
            for block in iter(lambda: weights.read(2**24), b""):
                digest.update(block)
        self.sha256 = digest.hexdigest()
        self.outputs: list[str] = []

    def _found(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            found = io.read_json(self.path)
        except io.InputError:
            return None  # unreadable: as if absent, rewritten by the next output
        return found if isinstance(found, dict) else None

    def check(self, jobs) -> None:
        """InputError when --out holds outputs that another model wrote."""
        found = self._found()
        if found is None:
            return
        if found.get("weights_sha256") == self.sha256:
            self.outputs = [name for name in found.get("outputs", []) if isinstance(name, str)]
            return
        left = [
            name
            for name in found.get("outputs", [])
            if isinstance(name, str) and (self.path.parent / name).exists()
        ]
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise io.InputError(
                f"{self.path.parent}: holds the outputs of another model "
                f"({found.get('model', 'unknown')}: {left[0]}{more}, recorded in "
                f"{OWNER_RECORD}); predict into another --out, or delete those outputs first"
            )

    def record(self, outputs: dict) -> None:
        """Add the written ``outputs`` to the record."""
        names = [Path(path).name for path in outputs.values()]
        self.outputs += [name for name in names if name not in self.outputs]
        io.write_json(
            self.path,
            {
                "model": str(self.model_dir.resolve()),
                "weights_sha256": self.sha256,
                "outputs": self.outputs,
            },
        )
