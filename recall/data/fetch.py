"""Getting the official dataset archives: a resumable download and a SHA-256 check.

``obtain(sources, downloads, expected)`` returns a local archive whose digest is the expected one. A source is a
local file or directory (used in place) or an http(s) URL, downloaded into ``downloads/<name>`` through
``<name>.part``: an interrupted download (a cut connection, a killed process) keeps the bytes received so far and
the next attempt asks only for the rest (HTTP ``Range``). Several sources are alternatives (mirrors), tried in order.

The digests of the official archives are their datasets' (``KnownArchive`` entries of ``recall.data.datasets``'
modules), copied from projects that verify them on every download (never computed here): a user's ``--sha256``
replaces them, e.g. for a repackaged archive.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from recall.data.datasets import KnownArchive
from recall.data.voc import ArchiveError, DatasetError

CHUNK_BYTES = 1 << 20
HASH_CHUNK_BYTES = 8 << 20
DOWNLOAD_ATTEMPTS = 5         # per source and command; the .part file keeps what they received
CONNECT_TIMEOUT = 30.0        # seconds
READ_TIMEOUT = 120.0          # seconds without a byte before an attempt is given up
BACKOFF_SECONDS = 2.0         # doubled after each failed attempt, at most MAX_BACKOFF_SECONDS
MAX_BACKOFF_SECONDS = 60.0
MAX_ATTEMPTS_FACTOR = 10      # attempts that bring bytes do not count as failures, but all tries are bounded
RETRY_STATUSES = (408, 429)   # retried like 5xx
PART_SUFFIX = ".part"
PROGRESS_DELAY = 1.0          # seconds before a progress bar shows (none for a quick step)


@dataclass(frozen=True)
class Archive:
    """A local archive ready to be read; ``official`` when its digest is the published one."""

    path: Path
    sha256: str | None  # None for a directory (an already extracted archive: nothing to hash)
    official: bool


# --------------------------------------------------------------------------- download


def is_url(source: str) -> bool:
    return urlsplit(str(source)).scheme in ("http", "https")


def url_file_name(url: str) -> str:
    """The file name a URL downloads to (its last path segment)."""
    name = Path(unquote(urlsplit(url).path)).name
    if not name:
        raise ArchiveError(f"{url}: the URL does not end with a file name")
    return name


def _part_size(part: Path) -> int:
    return part.stat().st_size if part.is_file() else 0


class StorageError(DatasetError):
    """A disk error (full, read-only, no permission) while writing; the files finished so far are kept."""


@contextmanager
def storing(what: str):
    """Turn an ``OSError`` of the local disk (ENOSPC, EACCES, ...) into a ``StorageError`` saying what failed."""
    try:
        yield
    except OSError as error:
        raise StorageError(f"{what} failed: {error}; the files finished so far are kept: free some space or fix "
                           f"the permissions, then run the same command again to resume") from error


def _range_start(response) -> int | None:
    """The first byte of a 206 answer, from its ``Content-Range: bytes <start>-<end>/<size>``."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _receive(url: str, part: Path, session, progress: bool, size: int | None) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (asking for it with Range). Raises on a short read."""
    offset = _part_size(part)
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
        if offset and response.status_code == 416:  # nothing after offset: the part is whole (the digest decides)
            return
        response.raise_for_status()
        if offset and response.status_code != 206:  # the server ignores Range: start again
            offset = 0
        elif offset and _range_start(response) != offset:  # not the bytes asked for: start again from byte 0
            part.unlink(missing_ok=True)
            raise ConnectionError(f"asked for the bytes from {offset}, the server sent Content-Range "
                                  f"{response.headers.get('Content-Range')!r}; restarting from byte 0")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        received = _append(response, part, offset, total, progress)
    if total is not None and received < total:
        raise ConnectionError(f"the connection closed after {received} of {total} bytes")


def _append(response, part: Path, offset: int, total: int | None, progress: bool) -> int:
    """Write the response body after the first ``offset`` bytes of ``part``; returns the part's size."""
    from tqdm import tqdm

    with open(part, "r+b" if offset else "wb") as handle, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name, disable=not progress,
                 file=sys.stderr, delay=PROGRESS_DELAY) as bar:
        handle.seek(offset)
        handle.truncate()
        # the raw bytes (never decoded: a .tgz sent with Content-Encoding: gzip stays a .tgz), and a short body
        # keeps what it brought: the caller compares the size with Content-Length
        response.raw.enforce_content_length = False
        while chunk := response.raw.read(CHUNK_BYTES, decode_content=False):
            handle.write(chunk)
            bar.update(len(chunk))
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def _promote(part: Path, dest: Path, sha256: str | None, progress: bool) -> None:
    """Rename a whole ``part`` to ``dest`` once its digest is the expected one; a wrong part is deleted."""
    if sha256 is not None:
        actual = sha256_of(part, progress)
        if actual != sha256.lower():
            part.unlink()
            raise ArchiveError(_mismatch(dest, sha256, actual, "the download was deleted: check the URL and "
                                                               "download it again"))
    os.replace(part, dest)


def download(url: str, dest: Path, attempts: int = DOWNLOAD_ATTEMPTS, backoff: float = BACKOFF_SECONDS,
             progress: bool = True, size: int | None = None, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it after a failure.

    ``dest`` exists only once every byte arrived (``size`` of them, when known) and, with ``sha256``, once the
    digest matched, so an existing ``dest`` is not downloaded again. It gives up after ``attempts`` tries in a row
    that brought no new byte (at most ``MAX_ATTEMPTS_FACTOR * attempts`` tries in all).
    """
    import requests
    import urllib3

    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    error: Exception | None = None
    failures = tries = 0
    with requests.Session() as session:
        while failures < attempts and tries < MAX_ATTEMPTS_FACTOR * attempts:
            if failures:
                time.sleep(min(backoff * 2 ** (failures - 1), MAX_BACKOFF_SECONDS))
            tries, before = tries + 1, _part_size(part)
            try:
                _receive(url, part, session, progress, size)
                if size is not None and _part_size(part) < size:
                    raise ConnectionError(f"{part} holds {_part_size(part)} of the {size} bytes expected")
                _promote(part, dest, sha256, progress)
                return dest
            except requests.HTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status is not None and status < 500 and status not in RETRY_STATUSES:  # 404, 403: no use
                    raise ArchiveError(f"{url}: the server answered {err}; check the URL") from err
                error = err
            except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as err:
                error = err  # a network failure: the next attempt resumes
            failures = 0 if _part_size(part) > before else failures + 1  # bytes received: not a failure in a row
    raise ArchiveError(f"{url}: download failed after {tries} attempts ({error}); {part} keeps the "
                       f"{_part_size(part)} bytes received: run the same command again to resume")


# --------------------------------------------------------------------------- verification


def sha256_of(path: Path, progress: bool = True) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"sha256 {path.name}", disable=not progress, file=sys.stderr,
                                          delay=PROGRESS_DELAY) as bar:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify(path: Path, expected: str | None, size: int | None = None, progress: bool = True) -> str:
    """The SHA-256 of ``path``; raises ``ArchiveError`` if it (or the size) differs from the expected one."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ArchiveError(f"{path}: {actual_size} bytes, expected {size}: the archive is truncated or not the "
                           f"official one; delete it and download it again (or pass --sha256 for another archive)")
    actual = sha256_of(path, progress)
    if expected is not None and actual != expected.lower():
        raise ArchiveError(_mismatch(path, expected, actual, f"delete it and download it again, or pass "
                                                             f"--sha256 {actual} if you trust this file"))
    return actual


def _mismatch(path: Path, expected: str, actual: str, advice: str) -> str:
    return (f"{path}: SHA-256 mismatch: expected {expected.lower()}, got {actual}; the file is damaged, partial "
            f"or another archive: {advice}")


def _local(source: str, downloads: Path, attempts: int, backoff: float, progress: bool, size: int | None,
           sha256: str | None) -> Path:
    if is_url(source):
        with storing(f"downloading {source}"):
            return download(source, downloads / url_file_name(source), attempts, backoff, progress, size, sha256)
    path = Path(source).expanduser()
    if not path.exists():
        raise ArchiveError(f"{path}: no such file; give the path of the downloaded archive or its URL")
    return path


def obtain(known: KnownArchive | None, sources: list[str], downloads: Path, sha256: str | None = None,
           attempts: int = DOWNLOAD_ATTEMPTS, backoff: float = BACKOFF_SECONDS, progress: bool = True) -> Archive:
    """The first of ``sources`` that can be fetched, verified against ``sha256`` or the official digest (``known``).

    A directory (an archive extracted by hand) is taken as it is: there are no bytes to hash.
    A checksum mismatch is an error at once (another mirror would not make this file right).
    """
    expected = sha256 or (known.sha256 if known else None)
    size = known.size if known and not sha256 else None
    failures = []
    for source in sources:
        try:
            path = _local(source, downloads, attempts, backoff, progress, size, expected)
        except ArchiveError as err:
            failures.append(str(err))
            continue
        if path.is_dir():
            return Archive(path, None, official=False)
        digest = verify(path, expected, size, progress)
        if expected is None:
            print(f"recall: warning: no known SHA-256 for {path.name}; not verified (sha256 {digest})", file=sys.stderr)
        return Archive(path, digest, official=known is not None and digest == known.sha256)
    raise ArchiveError("no source could be fetched:\n  " + "\n  ".join(failures))
