"""The leakage guard: keep the dataset's own images (and near copies of them) out of a replay pool.

Pascal VOC's photos were themselves taken from Flickr, so a web crawl for "cat" can return a VOC
*evaluation* image, resized or recompressed. Replaying it would leak test data into training. When a
pool is built, every candidate image is compared with every train and val image of the dataset:

- *exact*: sha256 of the file bytes and of the decoded RGB pixels (``pixel_sha256``);
- *perceptual*: a 64-bit DCT hash (pHash: the signs of the 8×8 lowest frequencies of a 32×32 grey
  thumbnail against their median), which survives resizing and recompression. A candidate within
  ``max_distance`` bits (Hamming) of a dataset image whose 8×8 colour thumbnail is also close
  (mean absolute difference <= ``MAX_COLOUR_DIFFERENCE``) is dropped. The colour check is needed
  because pHash sees only grey structure: two different smooth toy scenes can be 6 bits apart.

``LeakageGuard.from_dataset`` hashes the dataset once; ``check`` answers for one candidate.

The rule behind it, "an incremental step never reads an earlier step's image", has one exception made on purpose:
a *stored-data* source (``STORED_DATA_SOURCES``: ``replay=memory``, SSUL-M's exemplars) replays real training
images of earlier steps, as the real-image bound of generated replay. ``check_replay_privacy`` lets those sources,
and no other, read earlier steps' images.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from recall.data.voc import PIL_ERRORS, DatasetError, read_split

# replay sources that store training images of earlier steps on purpose (their runs are tagged and marked as such)
STORED_DATA_SOURCES = frozenset({"memory"})


HASH_SIZE = 8  # 8×8 low frequencies = 64 bits
THUMBNAIL = 32  # the grey thumbnail the DCT is taken of (4× the hash size, as pHash does)
# Bits that may differ for a "near copy". Measured on 200 toy val images, each resized (48-128 px, also
# to another aspect ratio) and recompressed (JPEG q 50-90): 99% within 4 bits, 2 of 1000 above 6.
# Distinct toy images are mostly 8+ bits apart, a few smooth scenes 6 (the colour check separates those).
DEFAULT_MAX_DISTANCE = 6
# Mean absolute difference (0-255) of 8×8 RGB thumbnails: the copies above are within 5, the closest
# distinct pHash pair found (two smooth scenes, 6 bits apart) 31.
MAX_COLOUR_DIFFERENCE = 16.0
COLOUR_THUMBNAIL = 8


def check_replay_privacy(source: str, step: int, images: Iterable[str], earlier: Iterable[str]) -> None:
    """Refuse a replay at ``step`` that reads training images of earlier steps (``images`` among ``earlier``),
    unless ``source`` stores data on purpose (``STORED_DATA_SOURCES``)."""
    if source in STORED_DATA_SOURCES:
        return
    reused = sorted(set(images).intersection(earlier))
    if reused:
        raise RuntimeError(f"privacy violation: replay={source} at step {step} would read {len(reused)} training "
                           f"images of earlier steps (e.g. {reused[:3]}); only a stored-data source "
                           f"({', '.join(sorted(STORED_DATA_SOURCES))}) may, on purpose")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (with the size), equal for byte-different encodings of one image."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    digest = hashlib.sha256(f"rgb:{array.shape[1]}x{array.shape[0]}:".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def dataset_images(root: str | Path, splits: Iterable[str] = ("train", "val"), image_dir: str = "JPEGImages",
                   suffix: str = ".jpg", progress: bool = False, desc: str = "hashing dataset images"
                   ) -> Iterator[tuple[str, str, bytes, Image.Image]]:
    """``(split, image id, file bytes, decoded image)`` of every image of ``splits``, for hashing them.

    A missing or undecodable file raises ``DatasetError`` naming it. The image is closed after each step.
    """
    root = Path(root)
    items = [(split, image_id) for split in splits for image_id in read_split(root, split)]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=desc, unit="img")
    for split, image_id in items:
        path = root / image_dir / f"{image_id}{suffix}"
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise DatasetError(f"{path}: file is missing; the image listed in split {split!r} has no file") from error
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except PIL_ERRORS as error:
            raise DatasetError(f"{path}: cannot read image ({error})") from error
        with image:
            yield split, image_id, data, image


def dataset_hashes(root: str | Path, splits: Iterable[str] = ("train", "val"), image_dir: str = "JPEGImages",
                   suffix: str = ".jpg", progress: bool = False) -> set[str]:
    """sha256 of the file bytes and of the decoded RGB pixels of every image of ``splits``.

    A run checks its replay pool against them before training (``recall.replay.leakage`` does more when a
    pool is built).
    """
    hashes: set[str] = set()
    for _, _, data, image in dataset_images(root, splits, image_dir, suffix, progress):
        hashes.update({sha256_bytes(data), pixel_sha256(image)})
    return hashes



def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of a column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix(THUMBNAIL)


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit pHash of an image (an int; compare two with ``hamming``)."""
    grey = np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def colour_thumbnail(image: Image.Image) -> np.ndarray:
    """The 8×8 RGB thumbnail (float32) the colour check compares."""
    return np.asarray(image.convert("RGB").resize((COLOUR_THUMBNAIL, COLOUR_THUMBNAIL), Image.Resampling.BOX),
                      dtype=np.float32)


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


@dataclass(frozen=True)
class Match:
    """Why a candidate was refused: which dataset image it copies, exactly or within ``distance`` bits."""

    kind: str  # "exact" or "perceptual"
    dataset_id: str | None
    distance: int


class LeakageGuard:
    """Exact and perceptual hashes of a dataset's images; ``check`` finds a candidate's copy among them."""

    def __init__(self, exact: Iterable[str] = (), perceptual: dict[str, int] | None = None,
                 thumbnails: dict[str, np.ndarray] | None = None, max_distance: int = DEFAULT_MAX_DISTANCE) -> None:
        if not 0 <= int(max_distance) < HASH_SIZE * HASH_SIZE:
            raise ValueError(f"leakage guard: max_distance is a number of hash bits in 0..63, got {max_distance!r}")
        self.exact = frozenset(exact)
        perceptual = perceptual or {}
        self.ids = list(perceptual)
        self.hashes = np.array([perceptual[i] for i in self.ids], dtype=np.uint64)
        self.thumbnails = thumbnails or {}  # id -> colour thumbnail; without one only pHash decides
        self.max_distance = int(max_distance)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def params(self) -> dict:
        return {"exact_hashes": len(self.exact), "perceptual_hashes": len(self.ids), "max_distance": self.max_distance,
                "max_colour_difference": MAX_COLOUR_DIFFERENCE}

    @classmethod
    def from_dataset(cls, root: str | Path, splits: Iterable[str] = ("train", "val"), image_dir: str = "JPEGImages",
                     suffix: str = ".jpg", max_distance: int = DEFAULT_MAX_DISTANCE,
                     progress: bool = False) -> LeakageGuard:
        """Hash every image of ``splits`` (file bytes, decoded pixels, pHash); ids are ``<split>/<image id>``."""
        exact: set[str] = set()
        perceptual: dict[str, int] = {}
        thumbnails: dict[str, np.ndarray] = {}
        for split, image_id, data, image in dataset_images(root, splits, image_dir, suffix, progress,
                                                           desc="leakage guard: hashing dataset images"):
            exact.update({sha256_bytes(data), pixel_sha256(image)})
            perceptual.setdefault(f"{split}/{image_id}", perceptual_hash(image))
            thumbnails.setdefault(f"{split}/{image_id}", colour_thumbnail(image))
        return cls(exact, perceptual, thumbnails, max_distance=max_distance)

    def check(self, image: Image.Image, hashes: Iterable[str] = ()) -> Match | None:
        """The dataset image that ``image`` copies (``hashes``: its sha256 values), or None."""
        if self.exact.intersection(hashes):
            return Match("exact", None, 0)
        if not len(self.ids):
            return None
        distances = np.bitwise_count(self.hashes ^ np.uint64(perceptual_hash(image)))
        close = np.flatnonzero(distances <= self.max_distance)
        if not len(close):
            return None
        colours = colour_thumbnail(image)
        for k in close[np.argsort(distances[close], kind="stable")]:
            thumbnail = self.thumbnails.get(self.ids[k])
            if thumbnail is None or float(np.abs(thumbnail - colours).mean()) <= MAX_COLOUR_DIFFERENCE:
                return Match("perceptual", self.ids[k], int(distances[k]))
        return None
