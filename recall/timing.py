"""Where a run's seconds go: `with phase("train"): ...` adds the wall time of the block to the process's tally,
and `write(path)` saves it (a run's `timing.json`, which `benchmarks/demo_profile.py` reads). Not a result:
no metric, checkpoint or DVC output depends on it."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recall.atomic import write_json

SECONDS: dict[str, float] = defaultdict(float)


@contextmanager
def phase(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[name] += time.perf_counter() - start


def write(path: Path) -> None:
    write_json(path, {name: round(seconds, 3) for name, seconds in SECONDS.items()})
