"""One reader for Pascal VOC 2012, the SBD ``train_aug`` layout and the toy world.

Layout: ``root/<image_dir>/<id>.jpg``, ``root/<mask_dir>/<id>.png`` (palette "P" or grey "L"
PNGs holding class indices, 255 = ignore) and ``root/ImageSets/Segmentation/<split>.txt``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from recall.atomic import write_json
from recall.data.classes import BACKGROUND, IGNORE_INDEX
from recall.errors import UserError

SPLITS_DIR = Path("ImageSets") / "Segmentation"
IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"
NUM_LABEL_VALUES = 256
MASK_MODES = ("P", "L")
CACHE_VERSION = 1

# Errors PIL raises for unreadable / truncated / corrupt files.
# Errors PIL raises for unreadable / truncated / corrupt files.
PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(UserError):
    """A problem with the dataset files on disk; the message names the offending file."""


class ArchiveError(DatasetError):
    """A download that failed, or an archive that is truncated or not the expected one; names the file."""


def split_file(root: str | Path, split: str) -> Path:
    """Path of the id list of ``split``."""
    return Path(root) / SPLITS_DIR / f"{split}.txt"


def _parse_id(line: str) -> str:
    """An id from a split-file line; also accepts ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines."""
    first = line.split()[0]
    return Path(first).stem if ("/" in first or "." in first) else first


def read_split(root: str | Path, split: str) -> list[str]:
    """The ids listed in ``root/ImageSets/Segmentation/<split>.txt``, in file order."""
    path = split_file(root, split)
    if not path.is_file():
        raise DatasetError(f"{path}: split file is missing; is {Path(root)} a VOC-layout dataset root "
                           f"with a '{split}' split (generate the toy world or point to VOC2012)?")
    ids = [_parse_id(line) for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split file is empty")
    return ids


def _missing(path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path}: file is missing; the {what} listed in the split has no file "
                        f"(re-extract / regenerate the dataset, or remove the id from the split)")


def load_image(path: str | Path) -> Image.Image:
    """Load an image as RGB, raising ``DatasetError`` naming the file if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except PIL_ERRORS as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from error


def load_mask(path: str | Path) -> np.ndarray:
    """Load a label mask (palette "P" or grey "L" PNG) as an (H, W) uint8 array of class indices."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "mask")
    try:
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise DatasetError(f"{path}: mask has mode {image.mode!r}; expected a palette ('P') or "
                                   f"grey ('L') PNG of class indices")
            return np.array(image, dtype=np.uint8)
    except PIL_ERRORS as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read mask ({error})") from error


def check_image_header(path: Path, mask_path: Path, mask_shape: tuple[int, int]) -> None:
    """The image exists, its header decodes and its size is the mask's (no pixel is decoded): the cheap check
    that every image of a split gets before any training (a missing or undecodable image must not surface
    mid-epoch)."""
    if not path.is_file():
        raise _missing(path, "image")
    try:
        with Image.open(path) as opened:
            size = opened.size
    except PIL_ERRORS as error:
        raise DatasetError(f"{path}: cannot read the image ({error})") from error
    if size != mask_shape[::-1]:
        raise DatasetError(f"{mask_path}: mask size {mask_shape[1]}x{mask_shape[0]} differs from its image {path} "
                           f"({size[0]}x{size[1]}); the mask must label every pixel of the image")


def present_labels(mask: np.ndarray) -> np.ndarray:
    """The sorted label values occurring in ``mask``."""
    return np.flatnonzero(np.bincount(mask.ravel(), minlength=NUM_LABEL_VALUES))


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise ``DatasetError`` if a label is neither in 0..num_classes nor 255."""
    bad = labels[(labels > num_classes) & (labels != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(f"{path}: mask has label values {bad.tolist()} outside 0..{num_classes} "
                           f"and {IGNORE_INDEX} (wrong num_classes, or a colour-coded mask?)")


def _check_label_map(label_map: torch.Tensor | None) -> torch.Tensor | None:
    if label_map is None:
        return None
    if label_map.shape != (NUM_LABEL_VALUES,) or label_map.dtype.is_floating_point:
        raise ValueError(f"label_map must be an integer tensor of shape ({NUM_LABEL_VALUES},), "
                         f"got {tuple(label_map.shape)} {label_map.dtype}")
    return label_map.long()


class VOCSegmentation(torch.utils.data.Dataset):
    """(image, mask) pairs from a VOC-layout root: image ``tv_tensors.Image`` uint8 CHW, mask int64 HW."""

    def __init__(self, root: str | Path, split: str = "train", ids: Sequence[str] | None = None,
                 num_classes: int = 20, mask_dir: str = "SegmentationClass", image_dir: str = "JPEGImages",
                 transform: Callable | None = None, label_map: torch.Tensor | None = None,
                 cache_in_memory: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.ids: list[str] = list(ids) if ids is not None else read_split(self.root, split)
        self.num_classes = num_classes
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir
        self.transform = transform
        self.label_map = _check_label_map(label_map)
        # decoded, validated samples kept after their first read (small datasets like the toy world only)
        self._memory: dict[int, tuple[Image.Image, np.ndarray]] | None = {} if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}{IMAGE_SUFFIX}"

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}{MASK_SUFFIX}"

    def load_raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The validated PIL image and uint8 mask of item ``i``."""
        if self._memory is not None and i in self._memory:
            return self._memory[i]
        image_path, mask_path = self.image_path(i), self.mask_path(i)
        image, mask = load_image(image_path), load_mask(mask_path)
        mask_size = (mask.shape[1], mask.shape[0])
        if image.size != mask_size:
            raise DatasetError(f"{mask_path}: mask size {mask_size} differs from image size {image.size} "
                               f"of {image_path} (sizes are width x height)")
        check_labels(present_labels(mask), self.num_classes, mask_path)
        if self._memory is not None:
            self._memory[i] = (image, mask)
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors  # here: `import torchvision` loads its model zoo and torch._dynamo

        pil_image, array = self.load_raw(i)
        image = tv_tensors.Image(torch.from_numpy(np.array(pil_image)).permute(2, 0, 1).contiguous())
        mask = torch.from_numpy(array.astype(np.int64))
        if self.label_map is not None:  # before the transform, so that padding added by a crop stays 255
            mask = self.label_map[mask]
        mask = tv_tensors.Mask(mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"VOCSegmentation(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


# ------------------------------------------------------------------------ class index

def _fingerprint(mask_paths: Iterable[Path], num_classes: int) -> str:
    """A hash of the mask files' names, sizes and mtimes (changes when any mask changes)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION};{num_classes}".encode())
    for path in mask_paths:
        try:
            st = path.stat()
        except FileNotFoundError as error:
            raise _missing(path, "mask" if path.suffix == MASK_SUFFIX else "image") from error
        digest.update(f"\n{path.name};{st.st_size};{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _read_cache(cache: Path, fingerprint: str) -> dict[str, frozenset[int]] | None:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    return {k: frozenset(v) for k, v in data["classes"].items()}




def image_classes(root: str | Path, ids: Sequence[str], num_classes: int = 20,
                  mask_dir: str = "SegmentationClass", cache: Path | None = None,
                  progress: bool = True, write_cache: bool = True,
                  image_dir: str | None = None) -> dict[str, frozenset[int]]:
    """For each id, the classes in its mask excluding background (0) and ignore (255).

    With ``image_dir``, every id's image is checked too (it exists, its header decodes, its size is the mask's):
    the pre-flight of a run, so that a bad file fails before training, naming the file. With ``cache`` (a JSON
    file), results are reused while the ids and files are unchanged; with ``write_cache=False`` the cache is only
    read (``recall run --dry-run`` writes nothing).
    """
    mask_paths = [Path(root) / mask_dir / f"{i}{MASK_SUFFIX}" for i in ids]
    image_paths = None if image_dir is None else [Path(root) / image_dir / f"{i}{IMAGE_SUFFIX}" for i in ids]
    fingerprint = None
    if cache is not None:
        cache = Path(cache)
        fingerprint = _fingerprint(mask_paths + (image_paths or []), num_classes)
        cached = _read_cache(cache, fingerprint)
        if cached is not None and list(cached) == list(ids):
            return cached

    result: dict[str, frozenset[int]] = {}
    items = zip(ids, mask_paths, image_paths or [None] * len(mask_paths))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(mask_paths), desc="indexing classes", unit="mask")
    for image_id, path, image_path in items:
        mask = load_mask(path)
        if image_path is not None:
            check_image_header(image_path, path, mask.shape)
        labels = present_labels(mask)
        check_labels(labels, num_classes, path)
        result[image_id] = frozenset(int(c) for c in labels if c not in (BACKGROUND, IGNORE_INDEX))

    if cache is not None and write_cache:
        payload = {"fingerprint": fingerprint, "classes": {k: sorted(v) for k, v in result.items()}}
        write_json(cache, payload, indent=None)
    return result
