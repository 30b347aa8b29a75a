"""Atomic file writes: a temp file in the same directory, flushed to disk, then renamed over the target.

A killed process leaves either the old file or the new one, never half a file. Used for every JSON and text
output of the project (run results, caches, manifests' summaries, mappings).

``durable=False`` keeps the temp file and the rename but skips the flush to disk (``fsync``): still safe against a
killed process (the page cache outlives it), not against a power loss, after which the file may be empty or cut
short. For bulk writes of many files whose caller syncs once at the end (``os.sync()``) and can re-check them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, payload, indent: int | None = 2) -> None:
    write_text(path, json.dumps(payload, indent=indent) + "\n")
