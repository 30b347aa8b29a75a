"""`recall data prepare`: the official archives of Pascal VOC 2012, SBD and ADE20K in the layout the loader reads.

What each dataset's preparation does is its module's (``recall.data.datasets``: voc.py for voc and sbd, ade20k.py);
this module is what they share: reading archives, writing files, the check of a prepared root and the command.

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

from recall.atomic import write_bytes, write_json, write_text
from recall.data.datasets import Preparation, preparations
from recall.data.fetch import (
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

IMAGE_DIR = "JPEGImages"
MANIFEST = "prepared.json"
IN_PROGRESS, COMPLETE = "in progress", "complete"
SHOW_MISSING = 3  # missing files named in an error
DRAIN_BYTES = 1 << 20
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every PNG: the empty IEND chunk and its CRC





# --------------------------------------------------------------------------- check


def _preparation(dataset: str) -> Preparation:
    known = preparations()
    if dataset not in known:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(known)}")
    return known[dataset]


def _prepare_hint(dataset: str, root: Path) -> str:
    preparation = _preparation(dataset)
    known = preparation.archive
    after = (f" (after `recall data prepare {preparation.after}` in the same root)" if preparation.after else "")
    return (f"prepare it with `recall data prepare {dataset} --root {root} --archive {known.name}`{after}; "
            f"the official archive is {known.url}")


def _root_hint(root: Path) -> str:
    """A likely intended root, for a user who pointed at a parent of the dataset (e.g. the extracted VOCdevkit, or
    data/ holding data/voc: a root named after its family)."""
    families = dict.fromkeys(p.family for p in preparations().values())
    for inner in ("VOCdevkit/VOC2012", "VOC2012", *families):
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
    preparation = _preparation(dataset)
    mask_dir = preparation.mask_dir
    folders = {root / IMAGE_DIR: (_file_names(root / IMAGE_DIR, hint), IMAGE_SUFFIX),
               root / mask_dir: (_file_names(root / mask_dir, hint), MASK_SUFFIX)}
    return {split: _check_split(root, split, folders, hint) for split in preparation.official_counts}


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


def under(name: str, prefix: str) -> PurePosixPath | None:
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


def is_whole_png(path: Path) -> bool:
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


def write_split(root: Path, split: str, ids: list[str]) -> None:
    write_text(split_file(root, split), "".join(f"{i}\n" for i in ids))


@dataclass(frozen=True)
class Extraction:
    """What a dataset's preparation (``Preparation.prepare``) gets: the root it fills, the archive it reads, and the
    ways to read and write files every preparation shares. (A dataset module imports nothing of this module.)"""

    root: Path
    archive: Archive
    progress: bool = True

    def reading(self):
        """The context every read of the archive happens in (``reading``)."""
        return reading(self.archive.path)

    def files(self, prefix: str, desc: str) -> Iterator[tuple[PurePosixPath, Member]]:
        """(path under the archive folder ``prefix``, member) of the archive's files there, in archive order."""
        for member in members(self.archive.path, prefix, desc, self.progress):
            rel = under(member.name, prefix)
            if rel is not None:
                yield rel, member

    def write_split(self, split: str, ids: list[str]) -> None:
        write_split(self.root, split, ids)

    image_dir = IMAGE_DIR
    place = staticmethod(place)
    link_or_copy = staticmethod(link_or_copy)
    is_whole_png = staticmethod(is_whole_png)


def _set_manifest(root: Path, dataset: str, entry: dict) -> None:
    manifest = read_manifest(root)
    manifest[dataset] = entry
    write_json(root / MANIFEST, manifest)


def _warn_counts(dataset: str, counts: dict[str, int], archive: Archive) -> None:
    """A preparation from the official archives that does not give the published split sizes is suspicious."""
    expected = _preparation(dataset).official_counts
    if archive.official and counts != expected:
        print(f"recall: warning: {dataset} from the official {archive.path.name} gave {counts}, "
              f"expected {expected}", file=sys.stderr)








# --------------------------------------------------------------------------- entry point



def _ids_of(family: str, ids: list[str], known) -> bool:
    """Whether ``ids`` may be those of ``family``: they start with its id prefix (ADE20K's "ADE_"), and with no other
    family's."""
    own = tuple(p.id_prefix for p in known if p.family == family and p.id_prefix)
    foreign = tuple(p.id_prefix for p in known if p.family != family and p.id_prefix)
    return (not own or any(i.startswith(own) for i in ids)) and not any(i.startswith(foreign) for i in ids)


def _refuse_mixing(dataset: str, root: Path) -> None:
    """ADE20K and VOC (+SBD) share file and split names (``train.txt``): they cannot live in the same root."""
    known = preparations()
    families = {name: p.family for name, p in known.items()}  # preparations of one family may share a root
    family = families[dataset]
    others = [name for name in read_manifest(root) if families.get(name, name) != family]
    reason = f"{MANIFEST} lists {', '.join(others)}" if others else None
    if reason is None and family not in {families.get(name) for name in read_manifest(root)}:
        ids = read_split(root, "train") if split_file(root, "train").is_file() else []
        if ids and not _ids_of(family, ids, known.values()):
            reason = f"{split_file(root, 'train')} lists the ids of another dataset"
    if reason:
        raise DatasetError(f"{root}: holds another dataset ({reason}); {dataset} needs its own root, e.g. --root "
                           f"{root.parent / family}")


def _require(preparation: Preparation, root: Path) -> None:
    """The preparation ``preparation`` adds to (``after``) is complete in ``root``."""
    first = _preparation(preparation.after)
    try:
        check(first.name, root)
    except DatasetError as error:
        raise DatasetError(f"{root}: {preparation.title} is added to a prepared {first.title} in the same root, and "
                           f"{first.title} is not ready there: {error}") from error


def _check_extracted_source(dataset: str, archive: Archive) -> None:
    """A directory given as the archive must hold the archive's top folder (not be that folder, nor a parent)."""
    prefix = _preparation(dataset).prefix
    if archive.path.is_dir() and not (archive.path / prefix).is_dir():
        raise ArchiveError(f"{archive.path}: no {prefix} inside; give the directory the archive was extracted in "
                           f"(the one holding {PurePosixPath(prefix).parts[0]}/)")


def prepare(dataset: str, root: str | Path, sources: list[str] | None = None, sha256: str | None = None,
            downloads: str | Path | None = None, progress: bool = True, **fetch_options) -> dict:
    """Check ``root`` (no sources), or fetch, verify and extract the archive into it (sources: files/dirs/URLs).

    Returns a summary: the dataset, the root, images per split and what this call did. A preparation that
    finished earlier is not done again (nothing is downloaded).
    """
    preparation = _preparation(dataset)
    root = Path(root)
    if not sources:
        return {"dataset": dataset, "root": str(root), "splits": check(dataset, root), "done": "checked"}
    if read_manifest(root).get(dataset, {}).get("status") == COMPLETE:
        try:
            return {"dataset": dataset, "root": str(root), "splits": check(dataset, root), "done": "already prepared"}
        except DatasetError:
            pass  # files went missing since: prepare again
    _refuse_mixing(dataset, root)
    if preparation.after:
        _require(preparation, root)  # before a download (SBD's: 1.4 GB)
    downloads = Path(downloads) if downloads else root.parent / "downloads"
    archive = obtain(preparation.archive, list(sources), downloads, sha256, progress=progress, **fetch_options)
    _check_extracted_source(dataset, archive)
    with storing(f"preparing {dataset} in {root}"):
        root.mkdir(parents=True, exist_ok=True)
        provenance = {"archive": archive.path.name, "sha256": archive.sha256, "official": archive.official}
        _set_manifest(root, dataset, {"status": IN_PROGRESS, **provenance})
        work = preparation.prepare(Extraction(root, archive, progress))
        _remove_stale_tmp(root, (IMAGE_DIR, preparation.mask_dir, str(SPLITS_DIR)))
        splits = _check_extracted(dataset, root, archive)
        _warn_counts(dataset, splits, archive)
        os.sync()  # the files were written without fsync: on disk before the manifest says so (a power loss -> resume)
        _set_manifest(root, dataset, {"status": COMPLETE, **provenance, "splits": splits})
    return {"dataset": dataset, "root": str(root), "splits": splits, "done": "prepared", **work}


def describe(summary: dict) -> str:
    """The summary printed by ``recall data prepare``."""
    mask_dir = _preparation(summary["dataset"]).mask_dir
    splits = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    extra = {k: v for k, v in summary.items() if k not in ("dataset", "root", "splits", "done")}
    head = (f"{summary['dataset']} in {summary['root']}: {summary['done']}; images per split: {splits} "
            f"({IMAGE_DIR}/, {mask_dir}/, {SPLITS_DIR}/)")
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
    p.add_argument("dataset", choices=list(preparations()))
    p.add_argument("--root", required=True, help="the dataset root, e.g. data/voc (conf/dataset/*.yaml: root)")
    p.add_argument("--archive", nargs="+", default=[], metavar="FILE_OR_URL",
                   help="the archive; several values are alternatives (mirrors), tried in order")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (default: the official one)")
    p.add_argument("--downloads", default=None, help="where URLs are downloaded to (default: ROOT/../downloads)")


def main(args) -> int:
    print(describe(prepare(args.dataset, args.root, args.archive, sha256=args.sha256, downloads=args.downloads)))
    return 0
