"""Where a run's inputs come from: the DVC content hash of a path, as `dvc.lock` records it."""

from __future__ import annotations

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
