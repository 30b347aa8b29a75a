"""The on-disk replay pool: images from outside the training set, one JSON record per image.

Layout (a single directory, so DVC can cache it as one stage output)::

    <root>/owner.json          what made the pool: its source and the source's parameters (recall.ownership)
    <root>/images/<id>.jpg     the replay images (RGB JPEG)
    <root>/manifest.jsonl      one record per image, appended as images are written
    <root>/pool.json           summary written when a build finishes (counts, drops, params); absent while one runs
    <root>/leakage.jsonl       candidates dropped as copies of dataset images (see recall.replay.leakage)
    <root>/duplicates.jsonl    candidates dropped as repeats of an image already in the pool

A record holds ``id``, ``target_class`` (1-based VOC index), ``target_name``, ``source``,
``source_class`` (the source's own class name, or the query for web sources), ``source_index``
(the index the source produced it at), ``license``, ``owner`` (None when unknown), ``sha256``
(of the file bytes), ``pixel_sha256`` (of the decoded RGB pixels), ``width``, ``height``, plus
any extra JSON values the source attached (e.g. ``url``).

Writes are crash-safe: an image is written to a temp file and renamed, then its manifest line is
appended and fsynced. A killed build leaves at most one truncated manifest line (ignored with a
note) and one orphan image: the temp file, or the image named with its class's next id, which no
record lists yet (both removed when a build starts or finishes; no other file is ever deleted). A
*source* yields images deterministically per index, so a resumed build continues where the manifest
ends, and its drop counts are those of an uninterrupted build: they are counted from the two logs,
whose lines past the last image of their class (a killed build's) are dropped when a build resumes.

A pool holds one source's images: building into a pool made by another source, or by the same source with
other parameters, is refused, and so is building into a directory recall did not make (recall.ownership).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from recall.atomic import write_bytes, write_json
from recall.data.classes import VOC_CLASSES
from recall.data.voc import PIL_ERRORS, DatasetError, load_mask
from recall.errors import ReplayError
from recall.locks import DirectoryLock
from recall.ownership import Marker, claim, read_marker, write_marker
from recall.replay.leakage import LeakageGuard, pixel_sha256, sha256_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "pool.json"
LEAKAGE_NAME = "leakage.jsonl"  # one line per candidate dropped as a copy of a dataset image
DUPLICATES_NAME = "duplicates.jsonl"  # one line per candidate dropped as a repeat of a pool image
IMAGE_SUFFIX = ".jpg"
JPEG_QUALITY = 95
# A source whose images keep being rejected (duplicates, dataset copies) is abandoned for a class
# after this many rejected indices per requested image, so a degenerate source cannot loop forever.
MAX_REJECTS_PER_IMAGE = 10

CORE_FIELDS = ("id", "target_class", "target_name", "source", "source_class", "source_index", "license",
               "owner", "sha256", "pixel_sha256", "width", "height")
REQUIRED_FIELDS = ("id", "target_class", "sha256")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_ID_PATTERN = re.compile(r"^c(\d+)_(\d+)$")
_TEMP_PATTERN = re.compile(r"^\.(c\d+_\d+\.jpg)\.\d+\.tmp$")  # recall.atomic's temp file of an image
class ReplaySource(Protocol):
    """What ``build_pool`` asks of a source (``FolderSource``, ``ToyGenerator``, a web client...).

    ``images`` yields ``(image, meta)`` for the source indices ``start .. start + count - 1`` of
    the target class, deterministically per index; an index the source cannot deliver (a corrupt
    file) is simply not yielded. ``meta`` holds ``index`` (the source index), ``source_class``,
    ``license``, ``owner`` and optionally ``file_sha256`` (bytes of an original file) and extra
    JSON values. ``available`` returns how many indices exist for a class (None: unlimited).
    """

    name: str

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]: ...

    def available(self, class_index: int, class_name: str) -> int | None: ...

    @property
    def params(self) -> dict: ...


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _append_line(path: Path, record: Mapping) -> None:
    """Append ``record`` as one JSON line and fsync: a killed writer leaves at most a truncated last line."""
    with open(path, "ab") as handle:
        handle.write((json.dumps(record, sort_keys=False) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------- pool


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(k in value for k in REQUIRED_FIELDS)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def describe_problems(problems: list[tuple[str | None, str]], total: int) -> str:
    """E.g. ``skipped 3 of 600 replay images (2 missing, 1 corrupt)``."""
    if not problems:
        return f"all {total} replay images ok"
    reasons = Counter(reason.split(":")[0] for _, reason in problems)  # "missing", "corrupt", ...
    detail = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return f"skipped {len(problems)} of {total} replay images ({detail})"


class ReplayPool:
    """A replay pool directory (see the module docstring). One writer at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.image_dir = self.root / IMAGES_DIR
        self.manifest_path = self.root / MANIFEST_NAME
        self.summary_path = self.root / SUMMARY_NAME
        self.notes: list[str] = []  # e.g. a truncated manifest line, filled by reading
        self._next_index: dict[int, int] | None = None
        self._tail_checked = False

    def __repr__(self) -> str:
        return f"ReplayPool(root={str(self.root)!r})"

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}{IMAGE_SUFFIX}"

    # ---------------------------------------------------------------- reading
    def _read_manifest(self) -> tuple[list[dict], list[tuple[str | None, str]]]:
        """Parsed records and per-line problems; a truncated last line is only noted."""
        self.notes = []
        if not self.manifest_path.is_file():
            return [], []
        text = self.manifest_path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        records: list[dict] = []
        problems: list[tuple[str | None, str]] = []
        seen: set[str] = set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it: possibly cut by a killed writer
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not _is_record(record):
                if last:
                    note = f"{self.manifest_path}: ignored a truncated last line (a build was interrupted)"
                    self.notes.append(note)
                    log.warning(note)
                else:
                    problems.append((None, f"bad manifest line: line {number} is not a record"))
                continue
            image_id = str(record["id"])
            if not _SAFE_ID.match(image_id):
                problems.append((image_id, "unsafe id: only [A-Za-z0-9_-] allowed"))
            elif image_id in seen:
                problems.append((image_id, f"duplicate id: line {number}"))
            else:
                seen.add(image_id)
                records.append(record)
        return records, problems

    def records(self, target_class: int | None = None) -> list[dict]:
        """The manifest's records (no file checks), optionally of one target class."""
        records, _ = self._read_manifest()
        if target_class is None:
            return records
        return [r for r in records if int(r["target_class"]) == int(target_class)]

    def load(self, verify: bool = True) -> tuple[list[dict], list[tuple[str | None, str]]]:
        """Records whose image is usable, and ``(id, reason)`` for those skipped; never raises on bad files.

        Reasons start with ``missing`` or ``corrupt`` (bytes changed, or undecodable). With ``verify=False``
        only the files' existence is checked (no decoding, no hashing).
        """
        records, problems = self._read_manifest()
        good: list[dict] = []
        for record in records:
            path = self.image_path(record["id"])
            if not path.is_file():
                problems.append((record["id"], f"missing: {path}"))
                continue
            if verify:
                data = path.read_bytes()
                if sha256_bytes(data) != record["sha256"]:
                    problems.append((record["id"], f"corrupt: {path} changed since it was written (sha256 mismatch)"))
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.load()
                except PIL_ERRORS as error:
                    problems.append((record["id"], f"corrupt: {path} cannot be decoded ({error})"))
                    continue
            good.append(record)
        return good, problems

    def summary(self) -> dict | None:
        """The ``pool.json`` of the last finished build, if any."""
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- writing
    def _repair_tail(self) -> None:
        """Make the manifest end with a newline: drop a truncated last line, keep a complete one."""
        if self._tail_checked or not self.manifest_path.is_file():
            self._tail_checked = True
            return
        data = self.manifest_path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                complete = _is_record(json.loads(data[cut:]))
            except ValueError:
                complete = False
            with open(self.manifest_path, "r+b") as handle:
                if complete:
                    handle.seek(0, os.SEEK_END)
                    handle.write(b"\n")
                else:
                    log.warning("%s: dropped a truncated last line (a build was interrupted)", self.manifest_path)
                    handle.truncate(cut)
                handle.flush()
                os.fsync(handle.fileno())
        self._tail_checked = True

    def _next_ids(self) -> dict[int, int]:
        """Per class, the counter of the next id add() takes (ids come from the target class and a counter)."""
        next_ids: dict[int, int] = {}
        for record in self._read_manifest()[0]:
            match = _ID_PATTERN.match(str(record["id"]))
            if match:
                c, k = int(match.group(1)), int(match.group(2))
                next_ids[c] = max(next_ids.get(c, 0), k + 1)
        return next_ids

    def _allocate_id(self, target_class: int) -> str:
        if self._next_index is None:
            self._next_index = self._next_ids()
        k = self._next_index.get(target_class, 0)
        self._next_index[target_class] = k + 1
        return _image_id(target_class, k)

    def add(self, image: Image.Image, record: dict) -> dict:
        """Write ``image`` as a new pool image and append its record; returns the full record.

        ``record`` needs ``target_class``; ``id``, hashes and size are computed here (a given
        ``id`` is ignored: ids come from the target class and a counter, never from external strings).
        """
        return self._add_encoded(encode_jpeg(image), image.size, pixel_sha256(image), record)

    def add_copy(self, source: ReplayPool, record: Mapping, extra: Mapping | None = None) -> dict:
        """Copy ``record``'s image from pool ``source`` byte for byte (no re-encoding), with its record and the
        ``extra`` fields; it gets this pool's next id of its class. Returns the full record."""
        data = source.image_path(record["id"]).read_bytes()
        fields = {k: v for k, v in record.items() if k != "id"}
        return self._add_encoded(data, (int(record["width"]), int(record["height"])), record["pixel_sha256"],
                                 {**fields, **(extra or {})})

    def _add_encoded(self, data: bytes, size: tuple[int, int], pixels_sha: str, record: Mapping) -> dict:
        if "target_class" not in record:
            raise ReplayError("a replay record needs 'target_class' (1-based VOC class index)")
        target = int(record["target_class"])
        self._repair_tail()
        self.image_dir.mkdir(parents=True, exist_ok=True)
        full = {
            "id": self._allocate_id(target),
            "target_class": target,
            "target_name": record.get("target_name") or (VOC_CLASSES[target] if target < len(VOC_CLASSES) else None),
            "source": record.get("source"),
            "source_class": record.get("source_class"),
            "source_index": record.get("source_index"),
            "license": record.get("license"),
            "owner": record.get("owner"),
            "sha256": sha256_bytes(data),
            "pixel_sha256": pixels_sha,
            "width": int(size[0]),
            "height": int(size[1]),
        }
        full.update({k: v for k, v in record.items() if k not in full and k != "index" and _jsonable(v)})
        write_bytes(self.image_path(full["id"]), data)
        _append_line(self.manifest_path, full)
        return full

    def note_leak(self, record: Mapping) -> None:
        """Append a dropped dataset copy to ``leakage.jsonl`` (the build counts its lines)."""
        _append_line(self.root / LEAKAGE_NAME, {k: v for k, v in record.items() if _jsonable(v)})

    def note_duplicate(self, record: Mapping) -> None:
        """Append a dropped repeat of a pool image to ``duplicates.jsonl`` (the build counts its lines)."""
        _append_line(self.root / DUPLICATES_NAME, {k: v for k, v in record.items() if _jsonable(v)})

    def dropped(self) -> Counter:
        """Candidates dropped so far, counted from the logs: dataset_copies, near_copies, duplicates."""
        counts = Counter()
        for line in _log_lines(self.root / LEAKAGE_NAME):
            counts["dataset_copies" if line.get("match") == "exact" else "near_copies"] += 1
        counts["duplicates"] = len(_log_lines(self.root / DUPLICATES_NAME))
        return counts

    def forget_drops_after(self, next_index: Mapping[int, int]) -> None:
        """Drop the log lines of candidates at or past ``next_index`` of their class (a killed build examined them
        after its last image; the resumed build examines them again): the logs then hold what an uninterrupted
        build's hold at this point."""
        for name in (LEAKAGE_NAME, DUPLICATES_NAME):
            path = self.root / name
            if not path.is_file():
                continue
            lines = _log_lines(path)
            kept = [line for line in lines if isinstance(line.get("source_index"), int)
                    and line["source_index"] < next_index.get(int(line.get("target_class", -1)), 0)]
            if len(kept) != len(lines) or not path.read_bytes().endswith(b"\n"):
                write_bytes(path, "".join(json.dumps(line) + "\n" for line in kept).encode())

    def remove_orphans(self) -> int:
        """Delete what a killed ``add`` left, and nothing else: its temp file, or the image it renamed into place
        before its manifest line was written, i.e. one named with the next id of its class (the id ``add`` takes
        next), which no record lists. Returns how many files were removed."""
        if not self.image_dir.is_dir():
            return 0
        next_ids = self._next_ids()
        removed = 0
        for path in self.image_dir.iterdir():
            match = _ID_PATTERN.match(path.stem)
            orphan = _TEMP_PATTERN.match(path.name) or (
                match and path.suffix == IMAGE_SUFFIX
                and path.stem == _image_id(int(match.group(1)), next_ids.get(int(match.group(1)), 0)))
            if orphan and path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        return removed


def _image_id(target_class: int, k: int) -> str:
    return f"c{target_class:03d}_{k:06d}"


def _log_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines log (a line cut short by a killed writer is left out)."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


# --------------------------------------------------------------------------------- ownership
def pool_marker(source: ReplaySource) -> Marker:
    """A pool's marker: the source it holds images of, with the parameters that define those images."""
    return Marker("pool", "recall pool", {"source": getattr(source, "name", type(source).__name__),
                                          "source_params": source.params})


def pool_owner(root: str | Path) -> dict | None:
    """What made the pool at `root`: its marker, or for a pool from before markers its pool.json's source (None:
    unknown, e.g. a pool assembled with ReplayPool.add)."""
    root = Path(root)
    marker = read_marker(root)
    if marker is not None:
        return marker
    summary = ReplayPool(root).summary()
    params = (summary or {}).get("params")
    if isinstance(params, dict) and "source" in params:
        return {"kind": "pool", "made_by": "recall pool",
                "params": {"source": params["source"], "source_params": params.get("source_params")}}
    return None


def same_source(marker: Marker) -> Callable[[dict], str | None]:
    """What a pool build accepts: a pool of the same source with the same source parameters."""
    def accepts(found: dict) -> str | None:
        mine, theirs = marker.params, found.get("params") or {}
        if "selection" in theirs:
            return ("it is a selection of another pool (`recall select`): building into it would add unselected "
                    "images; pass replay.pool= the pool it was selected from, or a new directory")
        if theirs.get("source") != mine["source"]:
            return (f"its images come from source {theirs.get('source')}, not {mine['source']}; a pool holds one "
                    "source's images: pass replay.pool= a new directory")
        if theirs.get("source_params") != mine["source_params"]:
            differ = sorted(k for k in set(theirs.get("source_params") or {}) | set(mine["source_params"])
                            if (theirs.get("source_params") or {}).get(k) != mine["source_params"].get(k))
            return (f"it was built with other {mine['source']} parameters (differ: {', '.join(differ)}); pass "
                    "replay.pool= a new directory, or the parameters it was built with")
        return None
    return accepts


def claim_pool(root: Path, marker: Marker) -> dict | None:
    """Check that a build may write into `root` (recall.ownership.claim); returns the marker found."""
    return claim(root, marker, "replay.pool", accepts=same_source(marker), legacy=pool_owner)


# --------------------------------------------------------------------------------- build


def build_pool(source: ReplaySource, classes: Mapping[int, str], per_class: int, root: str | Path,
               guard: LeakageGuard | None = None, progress: bool = True, lock: bool = True) -> dict:
    """Fill ``root`` with ``per_class`` replay images for every target class; returns the summary.

    Resumable and idempotent: each class continues after the last source index in the manifest,
    and a complete pool is left untouched. Images that ``guard`` finds to be copies of dataset
    images (exact or perceptual, see ``recall.replay.leakage``) are dropped and listed in
    ``leakage.jsonl``; repeats of an image already in the pool (same content or same
    ``source_id``, e.g. a Flickr photo id) are dropped as duplicates (``duplicates.jsonl``). The
    summary counts both. ``root`` must be new, empty, or a pool of this source with the same source
    parameters (see the module docstring); ``lock``: hold the pool's lock while building (False: the
    caller holds it).
    """
    if per_class < 0:
        raise ReplayError(f"per_class must be >= 0, got {per_class}")
    marker = pool_marker(source)
    claim_pool(Path(root), marker)
    with DirectoryLock(root, what="a `recall pool` build", option="replay.pool") if lock else contextlib.nullcontext():
        Path(root).mkdir(parents=True, exist_ok=True)
        write_marker(root, marker)
        return _build(source, classes, per_class, ReplayPool(root), guard, progress)


def _build(source: ReplaySource, classes: Mapping[int, str], per_class: int, pool: ReplayPool,
           guard: LeakageGuard | None, progress: bool) -> dict:
    classes = {int(c): str(name) for c, name in classes.items()}
    guard = guard if guard is not None else LeakageGuard()
    params = {"source": getattr(source, "name", type(source).__name__), "source_params": source.params,
              "per_class": per_class, "classes": {str(c): n for c, n in sorted(classes.items())},
              "leakage_guard": guard.params, "jpeg_quality": JPEG_QUALITY, "format_version": FORMAT_VERSION}

    existing = pool.records()
    have = Counter(int(r["target_class"]) for r in existing)
    previous = pool.summary()
    if all(have[c] >= per_class for c in classes) and previous is not None and previous.get("params") == params:
        if progress:
            print(f"replay pool {pool.root}: complete ({sum(have[c] for c in classes)} images), nothing to do",
                  file=sys.stderr)
        return previous

    next_index: dict[int, int] = {}
    for record in existing:
        c, index = int(record["target_class"]), record.get("source_index")
        if isinstance(index, int):
            next_index[c] = max(next_index.get(c, 0), index + 1)
        else:  # no source index recorded (added by hand): count it
            next_index[c] = max(next_index.get(c, 0), have[c])
    known = {r["sha256"] for r in existing} | {r["pixel_sha256"] for r in existing if r.get("pixel_sha256")}
    known_ids = {str(r["source_id"]) for r in existing if r.get("source_id") is not None}
    pool.summary_path.unlink(missing_ok=True)  # no longer complete: a run refuses the pool until this build ends
    orphans = pool.remove_orphans()  # what a killed build left
    pool.forget_drops_after(next_index)

    dropped = Counter()
    shortfall: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(max(per_class - have[c], 0) for c in classes), desc=f"replay pool ({params['source']})",
                   unit="img")
    for c, name in sorted(classes.items()):
        start = next_index.get(c, 0)
        available = source.available(c, name)
        rejects, limit = 0, MAX_REJECTS_PER_IMAGE * max(per_class, 1)
        while have[c] < per_class:
            if available is not None and start >= available:
                shortfall[name] = {"missing": per_class - have[c], "reason": f"source has only {available} images"}
                break
            if rejects > limit:
                shortfall[name] = {"missing": per_class - have[c],
                                   "reason": f"source kept yielding rejected images ({rejects} in a row)"}
                break
            count = per_class - have[c]
            yielded = 0
            for position, (image, meta) in enumerate(source.images(c, name, start, count)):
                yielded += 1
                data, pixels_sha = encode_jpeg(image), pixel_sha256(image)
                hashes = {sha256_bytes(data), pixels_sha}
                if meta.get("file_sha256"):
                    hashes.add(str(meta["file_sha256"]))
                index = int(meta.get("index", start + position))
                match = guard.check(image, hashes)
                if match is not None:
                    dropped["dataset_copies" if match.kind == "exact" else "near_copies"] += 1
                    rejects += 1
                    pool.note_leak({"target_class": c, "source_index": index, "source_id": meta.get("source_id"),
                                    "url": meta.get("url"), "match": match.kind, "dataset_id": match.dataset_id,
                                    "distance": match.distance})
                    continue
                source_id = meta.get("source_id")
                if hashes & known or (source_id is not None and str(source_id) in known_ids):
                    dropped["duplicates"] += 1
                    rejects += 1
                    pool.note_duplicate({"target_class": c, "source_index": index, "source_id": source_id,
                                         "match": "content" if hashes & known else "source_id"})
                    continue
                record = {"target_class": c, "target_name": name, "source": params["source"], **meta,
                          "source_index": index}
                full = pool._add_encoded(data, image.size, pixels_sha, record)
                known.update({full["sha256"], full["pixel_sha256"]})
                if source_id is not None:
                    known_ids.add(str(source_id))
                have[c] += 1
                rejects = 0
                if bar is not None:
                    bar.update(1)
            start += count
            if yielded == 0 and available is None:
                shortfall[name] = {"missing": per_class - have[c], "reason": "source yielded no more images"}
                break
    if bar is not None:
        bar.close()

    orphans += pool.remove_orphans()
    final = Counter(int(r["target_class"]) for r in pool.records())
    logged = pool.dropped()  # this build's drops and every earlier build's, as an uninterrupted build counts them
    summary = {
        "format_version": FORMAT_VERSION,
        "total": sum(final[c] for c in classes),
        "counts": {name: final[c] for c, name in sorted(classes.items())},
        "dropped_dataset_copies": logged["dataset_copies"],
        "dropped_near_copies": logged["near_copies"],
        "dropped_duplicates": logged["duplicates"],
        "source_skipped": dict(getattr(source, "skipped", {}) or {}),
        # each file a source skipped, with the reason (sources that list them: a user's folder)
        "source_problems": [{"item": item, "reason": reason} for item, reason in getattr(source, "problems", [])],
        "shortfall": shortfall,
        "params": params,
    }
    write_json(pool.summary_path, summary)
    if progress:
        short = f", {sum(v['missing'] for v in shortfall.values())} short" if shortfall else ""
        print(f"replay pool {pool.root}: {summary['total']} images for {len(classes)} classes "
              f"(dropped {dropped['dataset_copies']} dataset copies, {dropped['near_copies']} near copies of dataset "
              f"images, {dropped['duplicates']} duplicates, "
              f"source skipped {sum(summary['source_skipped'].values())}{short}"
              + (f"; removed {orphans} image(s) a killed build left" if orphans else "") + ")", file=sys.stderr)
    return summary


# ------------------------------------------------------------------------------ dataset

class PoolDataset(torch.utils.data.Dataset):
    """Replay images as ``(image tv_tensors.Image uint8 CHW, mask tv_tensors.Mask int64 HW or None)``.

    ``classes`` keeps only records of those target classes; ``labels_dir`` holds the pixel labels
    made by label evaluation (``<labels_dir>/<id>.png``, uint8). Unusable images are skipped at
    construction and listed in ``.problems``; ``.records[i]["target_class"]`` is item i's class.
    Without labels the mask is None (use a collate function that accepts it).
    """

    def __init__(self, pool_root: str | Path, classes: Iterable[int] | None = None,
                 labels_dir: str | Path | None = None, transform: Callable | None = None,
                 verify: bool = True, cache_in_memory: bool = False) -> None:
        self.pool = ReplayPool(pool_root)
        records, self.problems = self.pool.load(verify=verify)
        wanted = None if classes is None else {int(c) for c in classes}
        self.records = [r for r in records if wanted is None or int(r["target_class"]) in wanted]
        self.labels_dir = None if labels_dir is None else Path(labels_dir)
        self.transform = transform
        # decoded (image, labels) kept after their first read: pools of small images (the toy world) only
        self._memory: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def keep(self, mask: Sequence[bool]) -> int:
        """Keep only the records whose entry in ``mask`` is true; returns how many were dropped."""
        if len(mask) != len(self.records):
            raise ValueError(f"keep: {len(mask)} flags for {len(self.records)} records")
        before = len(self.records)
        self.records = [r for r, flag in zip(self.records, mask) if flag]
        if self._memory is not None:
            self._memory.clear()
        return before - len(self.records)

    @property
    def target_classes(self) -> list[int]:
        return [int(r["target_class"]) for r in self.records]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from torchvision import tv_tensors  # here: `import torchvision` loads its model zoo and torch._dynamo

        if self._memory is not None and i in self._memory:
            array, labels = self._memory[i]
        else:
            array, labels = self.load_raw(i)
            if self._memory is not None:
                self._memory[i] = (array, labels)
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
        mask = None if labels is None else tv_tensors.Mask(torch.from_numpy(labels.astype(np.int64)))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item ``i``'s uint8 HWC image and, with ``labels_dir``, its uint8 label array (checked sizes)."""
        record = self.records[i]
        path = self.pool.image_path(record["id"])
        try:
            with Image.open(path) as pil:
                array = np.array(pil.convert("RGB"))
        except (FileNotFoundError, *PIL_ERRORS) as error:
            raise DatasetError(f"{path}: cannot read replay image ({error})") from error
        labels = None
        if self.labels_dir is not None:
            mask_path = self.labels_dir / f"{record['id']}.png"
            labels = load_mask(mask_path)
            if labels.shape != array.shape[:2]:
                raise DatasetError(f"{mask_path}: label size {labels.shape[::-1]} differs from replay image "
                                   f"size {array.shape[1::-1]} of {path} (stale labels? re-run label evaluation)")
        return array, labels

    def __repr__(self) -> str:
        return f"PoolDataset(root={str(self.pool.root)!r}, n={len(self)})"
