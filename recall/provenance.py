"""Where a run's inputs come from: the DVC content hash of a path, as `dvc.lock` records it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

LOCK_FILE = "dvc.lock"


def dvc_hash(path: str | Path, lock_file: str | Path = LOCK_FILE) -> str:
    """The md5 DVC recorded for ``path`` as a stage output (a directory's ends in ``.dir``).

    Returns ``"untracked"`` when no stage of ``lock_file`` outputs ``path`` (a run outside `dvc repro`
    on data DVC does not know) and ``"no dvc.lock"`` when the file is absent. When `dvc repro` runs a
    stage, the stages it depends on are already locked, so the hash is the one of the data it reads.
    """
    lock = Path(lock_file)
    if not lock.is_file():
        return "no dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return "unreadable dvc.lock"
    wanted = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out.get("path", "")).as_posix().rstrip("/") == wanted and out.get("md5"):
                return str(out["md5"])
    return "untracked"


def dvc_file_hash(path: str | Path) -> str | None:
    """The md5 a ``.dvc`` file (``dvc add``, e.g. the repository's data.dvc) records for ``path``, or None."""
    wanted = Path(path).resolve()
    candidates = [*Path(".").glob("*.dvc"), Path(f"{Path(path).as_posix().rstrip('/')}.dvc")]
    for dvc_file in candidates:
        if not dvc_file.is_file():
            continue
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        except yaml.YAMLError:
            continue
        for out in outs:
            if (dvc_file.parent / out.get("path", "")).resolve() == wanted and out.get("md5"):
                return str(out["md5"])
    return None


def content_id(path: str | Path) -> str:
    """An identity of the data at ``path`` that changes when it does: the hash DVC recorded (a stage output in
    dvc.lock, or a ``.dvc`` file), else ``files:<sha256>`` of every file's relative name, size and mtime."""
    recorded = dvc_hash(path)
    if recorded not in ("untracked", "no dvc.lock", "unreadable dvc.lock"):
        return recorded
    recorded = dvc_file_hash(path)
    if recorded:
        return recorded
    root = Path(path)
    if not root.exists():
        return "missing"
    listing = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stat = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            listing.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files:" + listing.hexdigest()
