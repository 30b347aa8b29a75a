"""The replay sources a run makes itself, by config name (`replay.name`): they change how the run's method trains
(`for_source` wraps it), and have no pool to build. Today one: the memory of stored exemplars (SSUL-M), which stores
training images on purpose (`recall.replay.leakage.STORED_DATA_SOURCES`). Apart from `recall.replay.sources` so
that the pool stages, which never build them, do not depend on their code.
"""

from __future__ import annotations

import inspect

from recall.errors import ReplayError
from recall.registry import resolve

RUN_SOURCES: dict[str, str] = {
    "memory": "recall.replay.memory:MemoryReplay",  # stored exemplars of earlier steps, as SSUL-M (stored data!)
}


def for_source(method, replay: dict):
    """`method` as the replay source `replay` (the run's `replay` config section) makes it train: a run source wraps
    it (`RUN_SOURCES`, built with the section's other keys); a pool source, or none, leaves it as it is (a replay
    method reads its pool itself)."""
    name = replay.get("name")
    if name not in RUN_SOURCES:
        return method
    cls = resolve(RUN_SOURCES[name])
    options = dict(replay)
    try:
        inspect.signature(cls).bind(method, **options)
    except TypeError as error:
        raise ReplayError(f"replay={name}: bad options {sorted(options)} ({error}); "
                          f"expected {inspect.signature(cls)}") from None
    return cls(method, **options)
