"""`recall data prepare`: the official archives of Pascal VOC 2012, SBD and ADE20K in the layout the loader reads.

Every dataset ends up as ``root/JPEGImages/<id>.jpg``, ``root/<mask dir>/<id>.png`` (class indices, 255 =
ignore) and ``root/ImageSets/Segmentation/<split>.txt``, so :class:`recall.data.voc.VOCSegmentation` reads all
three:

* **voc** (``VOCtrainval_11-May-2012.tar``): ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
  ImageSets/Segmentation}`` as they are (palette PNGs with 255 borders; ``train`` 1,464, ``val`` 1,449).
* **sbd** (``benchmark.tgz``, on top of voc in the same root): ``SegmentationClassAug/`` and
  ``train_aug.txt`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted (10,582 images). Each SBD
  ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``: class indices 0-20, no borders) becomes a palette
  PNG, **except** for images that have a VOC ``SegmentationClass`` mask: those keep VOC's mask, 255 borders
  included (a hard link). That is the usual practice: mmsegmentation's ``voc_aug.py`` trains VOC's own train
  images on ``SegmentationClass`` and only the other 9,118 on SBD's masks, and the widely shared
  ``SegmentationClassAug.zip`` of the DeepLab lists (MiB's ``data/download_voc.sh`` fetches it) has 255 border
  labels, which only VOC's own masks carry. ``val`` stays VOC val (1,449), its masks linked into
  ``SegmentationClassAug`` too, so ``conf/dataset/voc.yaml`` works unchanged.
* **ade20k** (``ADEChallengeData2016.zip``): ``images/{training,validation}`` → ``JPEGImages``,
  ``annotations/...`` → ``SegmentationClass`` (``train`` 20,210, ``val`` 2,000). Masks are kept as they are:
  0 = "other" (pixels of none of the 150 classes), 1..150 the classes. That is how MiB reads them
  (``dataset/ade.py`` uses the PNG values directly and its ADE tasks list 0 with the step-0 classes): 0 is the
  background slot. MiB trains on 0 as background but *ignores* it at test (``inverted_order[0] = 255`` when
  ``train=False``); that is an evaluation convention, not a property of the files, so the files keep it.

An ``--archive`` may also be a directory holding the extracted archive (``VOCdevkit/``, ``benchmark_RELEASE/``,
``ADEChallengeData2016/``): its files are hard-linked (copied across file systems) instead of extracted.

Re-running is cheap and safe: every file is written atomically (a killed run leaves no half file), files already
in place are skipped, and ``prepared.json`` says which preparations finished, so a half-done one is reported.
The dataset files are not flushed to disk one by one (tens of thousands of ``fsync`` calls take minutes on a
spinning disk or NFS): one ``os.sync()`` after the last of them, before ``prepared.json`` says "complete". A power
loss before that leaves it "in progress", and the next run re-checks what is in place: a file is skipped only if
it has the archive member's size (a converted SBD mask: only if it is a whole PNG, ending with its IEND chunk).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from recall.atomic import write_bytes, write_json, write_text
from recall.data.classes import voc_palette
from recall.data.fetch import (
    KNOWN_ARCHIVES,
    PROGRESS_DELAY,
    Archive,
    ArchiveError,
    StorageError,  # noqa: F401  (re-exported: raised by prepare)
    obtain,
    storing,
)
from recall.data.voc import (
    IMAGE_SUFFIX,
    MASK_SUFFIX,
    SPLITS_DIR,
    DatasetError,
    read_split,
    split_file,
)

DATASETS = ("voc", "sbd", "ade20k")
IMAGE_DIR = "JPEGImages"
MANIFEST = "prepared.json"
IN_PROGRESS, COMPLETE = "in progress", "complete"
SBD_NUM_CLASSES = 20
SHOW_MISSING = 3  # missing files named in an error
DRAIN_BYTES = 1 << 20
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every PNG: the empty IEND chunk and its CRC


@dataclass(frozen=True)
class Layout:
    """What a prepared dataset holds besides JPEGImages/, and the split sizes of the official archives."""

    mask_dir: str
    official_counts: dict[str, int]


LAYOUTS: dict[str, Layout] = {
    "voc": Layout("SegmentationClass", {"train": 1464, "val": 1449}),
    "sbd": Layout("SegmentationClassAug", {"train_aug": 10582, "val": 1449}),
    "ade20k": Layout("SegmentationClass", {"train": 20210, "val": 2000}),
}

VOC_PREFIX = "VOCdevkit/VOC2012/"
SBD_PREFIX = "benchmark_RELEASE/dataset/"
ADE_PREFIX = "ADEChallengeData2016/"
ADE_SPLITS = {"training": "train", "validation": "val"}
PREFIXES = {"voc": VOC_PREFIX, "sbd": SBD_PREFIX, "ade20k": ADE_PREFIX}


# --------------------------------------------------------------------------- check


def _prepare_hint(dataset: str, root: Path) -> str:
    known = KNOWN_ARCHIVES[dataset]
    needs_voc = " (after `recall data prepare voc` in the same root)" if dataset == "sbd" else ""
    return (f"prepare it with `recall data prepare {dataset} --root {root} --archive {known.name}`{needs_voc}; "
            f"the official archive is {known.url}")


def _root_hint(root: Path) -> str:
    """A likely intended root, for a user who pointed at a parent of the dataset (e.g. the extracted VOCdevkit)."""
    for inner in ("VOCdevkit/VOC2012", "VOC2012", "voc", "ade20k"):
        if (root / inner / IMAGE_DIR).is_dir():
            return f" ({root / inner} looks like a dataset root: did you mean --root {root / inner}?)"
    return ""


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise DatasetError(f"{path}: not valid JSON ({error}); delete it and prepare again") from error


def _file_names(directory: Path, hint: str) -> set[str]:
    if not directory.is_dir():
        raise DatasetError(f"{directory}: missing directory; {hint}")
    return {entry.name for entry in os.scandir(directory) if entry.is_file()}


def _check_split(root: Path, split: str, folders: dict[Path, tuple[set[str], str]], hint: str) -> int:
    """Number of ids in ``split``; raises if the split file is missing or an id has no image or mask."""
    if not split_file(root, split).is_file():
        raise DatasetError(f"{split_file(root, split)}: split file is missing; {hint}")
    ids = read_split(root, split)
    for folder, (names, suffix) in folders.items():
        missing = [i for i in ids if f"{i}{suffix}" not in names]
        if missing:
            examples = ", ".join(str(folder / f"{i}{suffix}") for i in missing[:SHOW_MISSING])
            raise DatasetError(f"{root}: {len(missing)} of the {len(ids)} '{split}' ids have no file in "
                               f"{folder.name}/ (e.g. {examples}): the preparation is partial or the files were "
                               f"moved; {hint}")
    return len(ids)


def check(dataset: str, root: str | Path) -> dict[str, int]:
    """Images per split of a complete prepared ``dataset`` in ``root``; ``DatasetError`` saying what to do if not."""
    root = Path(root)
    hint = _prepare_hint(dataset, root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; {hint}")
    if read_manifest(root).get(dataset, {}).get("status") == IN_PROGRESS:
        raise DatasetError(f"{root}: the {dataset} preparation did not finish ({MANIFEST} says '{IN_PROGRESS}'); "
                           f"run the same `recall data prepare {dataset} --root {root} --archive ...` again: "
                           f"it resumes where it stopped")
    return _check_files(dataset, root, f"{hint}{_root_hint(root)}")


def _check_files(dataset: str, root: Path, hint: str) -> dict[str, int]:
    """Images per split, once every id of every split has its image and mask (``hint`` says what to do if not)."""
    layout = LAYOUTS[dataset]
    folders = {root / IMAGE_DIR: (_file_names(root / IMAGE_DIR, hint), IMAGE_SUFFIX),
               root / layout.mask_dir: (_file_names(root / layout.mask_dir, hint), MASK_SUFFIX)}
    return {split: _check_split(root, split, folders, hint) for split in layout.official_counts}


def _check_extracted(dataset: str, root: Path, archive: Archive) -> dict[str, int]:
    """``check`` after an extraction: a missing file now means the archive itself lacks it."""
    try:
        return _check_files(dataset, root, "see the archive's contents")
    except DatasetError as error:
        raise ArchiveError(f"{archive.path}: the archive lacks files the {dataset} layout needs: it is truncated "
                           f"or not the official one ({error})") from error


# --------------------------------------------------------------------------- reading archives


@dataclass(frozen=True)
class Member:
    """A file of an archive: its '/'-separated name inside it, its size and how to get its bytes."""

    name: str
    size: int
    read: Callable[[], bytes]
    path: Path | None = None  # set for an extracted archive (a directory): the file is linked, not copied


def _tar_members(path: Path, bar, prefix: str) -> Iterator[Member]:
    """The files of a (compressed) tar, in archive order; a tar cut short is an error, never a silent end."""
    size = path.stat().st_size
    bar.total = size  # (not reset(): it draws the bar at once)
    with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
        for info in tar:
            bar.update(handle.tell() - bar.n)
            if info.isfile():
                yield Member(info.name, info.size, lambda info=info: tar.extractfile(info).read())
        # a truncated .tgz raises EOFError on its own; a plain tar cut between two files just ends, but without
        # the two zero blocks that close every tar
        if tar.fileobj is handle and tar.offset + 2 * tarfile.BLOCKSIZE > size:
            raise tarfile.ReadError(f"the archive ends at byte {size} without the end-of-archive marker")
        while tar.fileobj.read(DRAIN_BYTES):  # the padding after the marker: lets gzip check its trailer (CRC, size)
            pass
        bar.update(size - bar.n)


def _zip_members(path: Path, bar, prefix: str) -> Iterator[Member]:
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        bar.total = len(infos)
        for info in infos:
            yield Member(info.filename, info.file_size, lambda info=info: archive.read(info))
            bar.update()


def _dir_members(path: Path, bar, prefix: str) -> Iterator[Member]:
    """The files under ``path/prefix`` of an extracted archive, named as inside the archive."""
    files = sorted(p for p in (path / prefix).rglob("*") if p.is_file())
    bar.total = len(files)
    for file in files:
        yield Member(file.relative_to(path).as_posix(), file.stat().st_size, file.read_bytes, file)
        bar.update()


def _is_zip(path: Path) -> bool:
    """A zip by its content, whatever its name: its central directory, or (a zip cut short) its first header."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04" or zipfile.is_zipfile(handle)


def members(path: Path, prefix: str, desc: str, progress: bool = True) -> Iterator[Member]:
    """The files of an archive (tar, tar.gz/tgz, zip) or of a directory holding an extracted archive.

    ``prefix`` is the archive's folder the caller needs: a directory is walked there only (an archive is read
    in one pass and has no such shortcut)."""
    from tqdm import tqdm

    reader = _dir_members if path.is_dir() else _zip_members if _is_zip(path) else _tar_members
    with tqdm(desc=desc, disable=not progress, file=sys.stderr, unit_scale=True, delay=PROGRESS_DELAY,
              unit="B" if reader is _tar_members else "file") as bar:
        yield from reader(path, bar, prefix)


@contextmanager
def reading(path: Path):
    """Turn the errors of a truncated or damaged archive into one ``ArchiveError`` that names it."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ArchiveError(f"{path}: cannot read the archive ({type(error).__name__}: {error}); it is truncated "
                           f"or damaged (an interrupted download or copy?): delete it and fetch it again; files "
                           f"already extracted are kept and skipped next time") from error


def _under(name: str, prefix: str) -> PurePosixPath | None:
    """``name`` relative to the archive folder ``prefix``, or None outside it (``./`` of ``tar czf x.tgz .`` dropped)."""
    while name.startswith("./"):
        name = name[2:]
    return PurePosixPath(name[len(prefix):]) if name.startswith(prefix) else None


# --------------------------------------------------------------------------- writing files


def link_or_copy(source: Path, dest: Path, durable: bool = False) -> None:
    """Put ``source`` at ``dest`` atomically: a hard link where the file system allows it, a copy otherwise.

    A copy is flushed to disk only if ``durable`` (see :func:`recall.atomic.write_bytes`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    os.replace(tmp, dest)


def place(member: Member, dest: Path, counts: Counter, durable: bool = False) -> None:
    """Write ``member`` at ``dest`` unless a file of its size is there already (a finished earlier run).

    Not flushed to disk unless ``durable``: :func:`prepare` syncs once at the end."""
    if dest.is_file() and dest.stat().st_size == member.size:
        counts["skipped"] += 1
        return
    if member.path is not None:
        link_or_copy(member.path, dest, durable)
    else:
        write_bytes(dest, member.read(), durable=durable)
    counts["written"] += 1


def _is_whole_png(path: Path) -> bool:
    """``path`` is a file ending with a PNG's IEND chunk (not an empty or cut-short one left by a power loss)."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < len(PNG_END):
                return False
            handle.seek(-len(PNG_END), os.SEEK_END)
            return handle.read() == PNG_END
    except (FileNotFoundError, IsADirectoryError):
        return False


def _remove_stale_tmp(root: Path, folders: tuple[str, ...]) -> None:
    """Temporary files of a killed earlier run (``.<name>.<pid>.tmp``); they would otherwise be versioned."""
    for tmp in root.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink(missing_ok=True)
    for folder in folders:
        if (root / folder).is_dir():
            for tmp in (root / folder).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def _write_split(root: Path, split: str, ids: list[str]) -> None:
    write_text(split_file(root, split), "".join(f"{i}\n" for i in ids))


def _set_manifest(root: Path, dataset: str, entry: dict) -> None:
    manifest = read_manifest(root)
    manifest[dataset] = entry
    write_json(root / MANIFEST, manifest)


def _warn_counts(dataset: str, counts: dict[str, int], archive: Archive) -> None:
    """A preparation from the official archives that does not give the published split sizes is suspicious."""
    expected = LAYOUTS[dataset].official_counts
    if archive.official and counts != expected:
        print(f"recall: warning: {dataset} from the official {archive.path.name} gave {counts}, "
              f"expected {expected}", file=sys.stderr)


# --------------------------------------------------------------------------- VOC 2012


def _voc_dest(root: Path, rel: PurePosixPath) -> Path | None:
    """Where a file of VOCdevkit/VOC2012/ goes: the images, the class masks and the segmentation splits only."""
    wanted = {("JPEGImages",): IMAGE_SUFFIX, ("SegmentationClass",): MASK_SUFFIX,
              ("ImageSets", "Segmentation"): ".txt"}
    suffix = wanted.get(rel.parts[:-1])
    return root.joinpath(*rel.parts) if suffix and rel.suffix == suffix else None


def prepare_voc(root: Path, archive: Archive, progress: bool = True) -> dict:
    counts = Counter()
    with reading(archive.path):
        for member in members(archive.path, VOC_PREFIX, "VOC 2012", progress):
            rel = _under(member.name, VOC_PREFIX)
            dest = _voc_dest(root, rel) if rel else None
            if dest is not None:
                place(member, dest, counts)
    return {"files_written": counts["written"], "files_skipped": counts["skipped"]}


# --------------------------------------------------------------------------- SBD


def sbd_mask(data: bytes, name: str) -> np.ndarray:
    """The class indices of an SBD ``cls/<id>.mat``: MATLAB struct ``GTcls``, field ``Segmentation`` (uint8 0-20)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mask = np.asarray(loadmat(io.BytesIO(data), struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation)
    except (MatReadError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ArchiveError(f"{name}: not an SBD class annotation (a MATLAB struct GTcls with a Segmentation "
                           f"field): {type(error).__name__}: {error}") from error
    if mask.ndim != 2 or mask.size == 0 or mask.min() < 0 or mask.max() > SBD_NUM_CLASSES:
        raise ArchiveError(f"{name}: Segmentation must be a 2-D array of class indices 0..{SBD_NUM_CLASSES}, got "
                           f"shape {mask.shape} with values {mask.min() if mask.size else None}.."
                           f"{mask.max() if mask.size else None}")
    return mask.astype(np.uint8)


def mask_png(mask: np.ndarray) -> bytes:
    """A palette PNG (the VOC colours) of a class-index mask, like VOC's own SegmentationClass files."""
    from PIL import Image

    image = Image.fromarray(mask, mode="L")
    image.putpalette(voc_palette())  # makes it a "P" image holding the same indices
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _require_voc(root: Path) -> tuple[list[str], list[str]]:
    try:
        check("voc", root)
    except DatasetError as error:
        raise DatasetError(f"{root}: SBD is added to a prepared VOC 2012 in the same root, and VOC 2012 is not "
                           f"ready there: {error}") from error
    return read_split(root, "train"), read_split(root, "val")


def _sbd_member(root: Path, rel: PurePosixPath, member: Member, voc_masks: set[str], lists: dict,
                counts: Counter) -> None:
    """Handle one file of benchmark_RELEASE/dataset/: a split list, a class .mat or an image."""
    folder = rel.parts[0] if len(rel.parts) == 2 else None
    if len(rel.parts) == 1 and rel.name in ("train.txt", "val.txt"):
        lists[rel.stem] = member.read().decode().split()
    elif folder == "cls" and rel.suffix == ".mat" and rel.stem not in voc_masks:  # VOC's own masks win
        dest = root / LAYOUTS["sbd"].mask_dir / f"{rel.stem}{MASK_SUFFIX}"
        if _is_whole_png(dest):  # the size of a conversion is not known in advance: a whole PNG is the check
            counts["masks_skipped"] += 1
        else:
            write_bytes(dest, mask_png(sbd_mask(member.read(), member.name)), durable=False)
            counts["masks_converted"] += 1
    elif folder == "img" and rel.suffix == IMAGE_SUFFIX and not (root / IMAGE_DIR / rel.name).is_file():
        # VOC 2012 has them all; only a stray one is taken. Its presence alone means "done" (a file of another size
        # may be VOC's own), so it is flushed to disk at once: a power loss cannot leave it cut short. Strays are
        # rare (VOC 2012's JPEGImages holds SBD's images), so this costs little.
        place(member, root / IMAGE_DIR / rel.name, counts, durable=True)


def train_aug_ids(sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted: the usual 10,582-image ``train_aug``."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def prepare_sbd(root: Path, archive: Archive, progress: bool = True) -> dict:
    voc_train, voc_val = _require_voc(root)
    voc_masks = set(voc_train) | set(voc_val)
    lists: dict[str, list[str]] = {}
    counts = Counter()
    with reading(archive.path):
        for member in members(archive.path, SBD_PREFIX, "SBD", progress):
            rel = _under(member.name, SBD_PREFIX)
            if rel is not None:
                _sbd_member(root, rel, member, voc_masks, lists, counts)
    if set(lists) != {"train", "val"}:
        raise ArchiveError(f"{archive.path}: no {SBD_PREFIX}train.txt and val.txt in the archive (found "
                           f"{sorted(lists)}): it is truncated or not SBD's benchmark.tgz")
    mask_dir = root / LAYOUTS["sbd"].mask_dir
    for image_id in sorted(voc_masks):
        source = root / LAYOUTS["voc"].mask_dir / f"{image_id}{MASK_SUFFIX}"
        dest = mask_dir / f"{image_id}{MASK_SUFFIX}"
        if not (dest.is_file() and dest.stat().st_size == source.stat().st_size):  # a link, or a whole copy
            link_or_copy(source, dest)
            counts["voc_masks_linked"] += 1
    _write_split(root, "train_aug", train_aug_ids(lists["train"], lists["val"], voc_train, voc_val))
    return {"masks_converted": counts["masks_converted"], "masks_skipped": counts["masks_skipped"],
            "voc_masks_linked": counts["voc_masks_linked"], "images_added": counts["written"],
            "sbd_train": len(lists["train"]), "sbd_val": len(lists["val"])}


# --------------------------------------------------------------------------- ADE20K


def _ade_dest(root: Path, rel: PurePosixPath) -> tuple[str, Path] | None:
    """(split, destination) of a file of ADEChallengeData2016/, or None for the files not needed."""
    if len(rel.parts) != 3 or rel.parts[1] not in ADE_SPLITS:
        return None
    kind, folder, name = rel.parts
    if kind == "images" and rel.suffix == IMAGE_SUFFIX:
        return ADE_SPLITS[folder], root / IMAGE_DIR / name
    if kind == "annotations" and rel.suffix == MASK_SUFFIX:
        return ADE_SPLITS[folder], root / LAYOUTS["ade20k"].mask_dir / name
    return None


def prepare_ade20k(root: Path, archive: Archive, progress: bool = True) -> dict:
    counts = Counter()
    splits: dict[str, list[str]] = {split: [] for split in ADE_SPLITS.values()}
    with reading(archive.path):
        for member in members(archive.path, ADE_PREFIX, "ADE20K", progress):
            rel = _under(member.name, ADE_PREFIX)
            target = _ade_dest(root, rel) if rel else None
            if target is not None:
                split, dest = target
                place(member, dest, counts)
                if dest.suffix == IMAGE_SUFFIX:
                    splits[split].append(dest.stem)
    for split, ids in splits.items():
        if not ids:
            raise ArchiveError(f"{archive.path}: no {ADE_PREFIX}images/ files of the '{split}' split: the archive "
                               f"is truncated or not ADEChallengeData2016.zip")
        _write_split(root, split, sorted(ids))
    return {"files_written": counts["written"], "files_skipped": counts["skipped"]}


# --------------------------------------------------------------------------- entry point

PREPARERS: dict[str, Callable[[Path, Archive, bool], dict]] = {
    "voc": prepare_voc, "sbd": prepare_sbd, "ade20k": prepare_ade20k}


FAMILIES = {"voc": "voc", "sbd": "voc", "ade20k": "ade20k"}  # datasets that may share a root


def _refuse_mixing(dataset: str, root: Path) -> None:
    """ADE20K and VOC (+SBD) share file and split names (``train.txt``): they cannot live in the same root."""
    family = FAMILIES[dataset]
    others = [name for name in read_manifest(root) if FAMILIES.get(name, name) != family]
    reason = f"{MANIFEST} lists {', '.join(others)}" if others else None
    if reason is None and family not in {FAMILIES.get(name) for name in read_manifest(root)}:
        ids = read_split(root, "train") if split_file(root, "train").is_file() else []
        if ids and any(i.startswith("ADE_") for i in ids) != (family == "ade20k"):
            reason = f"{split_file(root, 'train')} lists the ids of another dataset"
    if reason:
        raise DatasetError(f"{root}: holds another dataset ({reason}); {dataset} needs its own root, e.g. --root "
                           f"{root.parent / family}")


def _check_extracted_source(dataset: str, archive: Archive) -> None:
    """A directory given as the archive must hold the archive's top folder (not be that folder, nor a parent)."""
    prefix = PREFIXES[dataset]
    if archive.path.is_dir() and not (archive.path / prefix).is_dir():
        raise ArchiveError(f"{archive.path}: no {prefix} inside; give the directory the archive was extracted in "
                           f"(the one holding {PurePosixPath(prefix).parts[0]}/)")


def prepare(dataset: str, root: str | Path, sources: list[str] | None = None, sha256: str | None = None,
            downloads: str | Path | None = None, progress: bool = True, **fetch_options) -> dict:
    """Check ``root`` (no sources), or fetch, verify and extract the archive into it (sources: files/dirs/URLs).

    Returns a summary: the dataset, the root, images per split and what this call did. A preparation that
    finished earlier is not done again (nothing is downloaded).
    """
    if dataset not in PREPARERS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    root = Path(root)
    if not sources:
        return {"dataset": dataset, "root": str(root), "splits": check(dataset, root), "done": "checked"}
    if read_manifest(root).get(dataset, {}).get("status") == COMPLETE:
        try:
            return {"dataset": dataset, "root": str(root), "splits": check(dataset, root), "done": "already prepared"}
        except DatasetError:
            pass  # files went missing since: prepare again
    _refuse_mixing(dataset, root)
    if dataset == "sbd":
        _require_voc(root)  # before a download of 1.4 GB
    archive = obtain(dataset, list(sources), Path(downloads) if downloads else root.parent / "downloads", sha256,
                     progress=progress, **fetch_options)
    _check_extracted_source(dataset, archive)
    with storing(f"preparing {dataset} in {root}"):
        root.mkdir(parents=True, exist_ok=True)
        provenance = {"archive": archive.path.name, "sha256": archive.sha256, "official": archive.official}
        _set_manifest(root, dataset, {"status": IN_PROGRESS, **provenance})
        work = PREPARERS[dataset](root, archive, progress)
        _remove_stale_tmp(root, (IMAGE_DIR, LAYOUTS[dataset].mask_dir, str(SPLITS_DIR)))
        splits = _check_extracted(dataset, root, archive)
        _warn_counts(dataset, splits, archive)
        os.sync()  # the files were written without fsync: on disk before the manifest says so (a power loss -> resume)
        _set_manifest(root, dataset, {"status": COMPLETE, **provenance, "splits": splits})
    return {"dataset": dataset, "root": str(root), "splits": splits, "done": "prepared", **work}


def describe(summary: dict) -> str:
    """The summary printed by ``recall data prepare``."""
    layout = LAYOUTS[summary["dataset"]]
    splits = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    extra = {k: v for k, v in summary.items() if k not in ("dataset", "root", "splits", "done")}
    head = (f"{summary['dataset']} in {summary['root']}: {summary['done']}; images per split: {splits} "
            f"({IMAGE_DIR}/, {layout.mask_dir}/, {SPLITS_DIR}/)")
    lines = [head]
    if extra:
        lines.append("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in extra.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ `recall data prepare`
def add_arguments(parser) -> None:
    data = parser.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="without --archive, check ROOT; with it, fetch, verify and extract into ROOT",
                        description="Check that ROOT holds the prepared dataset (VOC layout), or build it from the "
                                    "official archive: a file, an extracted directory or an http(s) URL (downloaded "
                                    "with resume, SHA-256 checked). sbd needs voc prepared in the same ROOT first.")
    p.add_argument("dataset", choices=["voc", "sbd", "ade20k"])
    p.add_argument("--root", required=True, help="the dataset root, e.g. data/voc (conf/dataset/*.yaml: root)")
    p.add_argument("--archive", nargs="+", default=[], metavar="FILE_OR_URL",
                   help="the archive; several values are alternatives (mirrors), tried in order")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (default: the official one)")
    p.add_argument("--downloads", default=None, help="where URLs are downloaded to (default: ROOT/../downloads)")


def main(args) -> int:
    print(describe(prepare(args.dataset, args.root, args.archive, sha256=args.sha256, downloads=args.downloads)))
    return 0
