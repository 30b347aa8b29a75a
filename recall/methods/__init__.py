"""Continual-learning methods as pluggable objects; `METHODS` maps config names (conf/method/<name>.yaml) to
classes. A new method is a module here, its line below, a config file and its test.

`RUN_SOURCES` are the replay sources a run makes itself (config name `replay.name`): they change how the run's
method trains (`for_source` wraps it) and have no pool to build. Today one: the memory of stored exemplars (SSUL-M),
which stores training images on purpose (`recall.replay.leakage.STORED_DATA_SOURCES`)."""

from __future__ import annotations

import inspect

from recall.errors import ReplayError, UserError
from recall.methods.base import Method, StepContext
from recall.methods.distillation import ILT, LwF, MiB
from recall.methods.finetune import FineTuning, Joint
from recall.methods.plop import PLOP
from recall.methods.pseudo_replay import PseudoReplay
from recall.methods.recall import Recall
from recall.registry import resolve

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FineTuning, Joint, LwF, ILT, MiB, PLOP, Recall,
                                                              PseudoReplay)}


def build_method(name: str, **options) -> Method:
    """Create the method registered as `name` with its options (the `method` config section minus `name`)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as error:  # an option the method does not have
        raise UserError(f"method={name}: {error}; its options: {', '.join(inspect.signature(cls).parameters)}") \
            from None
    return cls(**options)


RUN_SOURCES: dict[str, str] = {
    "memory": "recall.methods.memory:MemoryReplay",  # stored exemplars of earlier steps, as SSUL-M (stored data!)
}


def for_source(method: Method, replay: dict) -> Method:
    """`method` as the replay source `replay` (the run's `replay` config section) makes it train: a run source wraps
    it (`RUN_SOURCES`, built with the section's other keys; e.g. `replay=memory` wraps it with the replay of stored
    exemplars); a pool source, or none, leaves it as it is (a replay method's stream reads its pool)."""
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


__all__ = ["METHODS", "RUN_SOURCES", "Method", "StepContext", "build_method", "for_source"]
