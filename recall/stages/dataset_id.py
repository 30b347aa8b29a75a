"""The demo pipeline's `dataset_id` stage: one small file that identifies the dataset's content.

    python -m recall.stages.dataset_id data/toy            # -> data/toy.id.json

Every stage of dvc.yaml that reads the dataset depends on this file instead of on the dataset directory itself, so
that a no-op `dvc repro` checks the directory's ~4,800 files once (as this stage's dependency) and not once per stage
that reads them. The file changes exactly when a file of the dataset does (its name or its bytes): the sha256 of
every file's relative path and content, in path order. An edit in a generated dataset (the toy world) makes its
generating stage re-run first and put it back; an edit in a real one (data/voc) gives a new id and re-runs every
stage that reads it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from recall.commands import script

CHUNK = 1 << 20


def dataset_id(root: Path) -> dict:
    """{"files": n, "bytes": total, "sha256": ...} of every file under `root` (paths relative, '/'-separated)."""
    digest, files, total = hashlib.sha256(), 0, 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                total += len(chunk)
        digest.update(b"\0")
        files += 1
    return {"files": files, "bytes": total, "sha256": digest.hexdigest()}


def add_arguments(parser) -> None:
    parser.add_argument("root", help="the dataset's directory (dataset.root)")
    parser.add_argument("--out", default=None, help="default: <root>.id.json")
    parser.set_defaults(overrides=[], params=None)


def main(args) -> int:
    from recall.atomic import write_json
    from recall.errors import UserError

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: no such dataset directory (dataset.root); make it first (the toy world: `dvc repro "
                        "toyworld`)")
    found = dataset_id(root)
    if not found["files"]:
        raise UserError(f"{root}: the dataset directory holds no file")
    out = Path(args.out or f"{root}.id.json")
    write_json(out, {"root": root.as_posix(), **found})
    print(f"{out}: {found['files']} files, {found['bytes'] / 1e6:.1f} MB, sha256 {found['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
