"""Continual-learning methods as pluggable objects; `METHODS` maps config names (conf/method/<name>.yaml) to
classes. A new method is a module here, its line below, a config file and its test."""

from __future__ import annotations

import inspect

from recall.errors import UserError
from recall.methods.base import Method, StepContext
from recall.methods.distillation import ILT, LwF, MiB
from recall.methods.finetune import FineTuning, Joint
from recall.methods.plop import PLOP
from recall.methods.pseudo_replay import PseudoReplay
from recall.methods.recall import Recall

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


def for_source(method: Method, replay: dict) -> Method:
    """The method as its replay source makes it train (`recall.replay.run_sources.for_source`: e.g. `replay=memory`
    wraps it with the replay of stored exemplars); most sources leave it as it is."""
    from recall.replay.run_sources import for_source as wrap

    return wrap(method, replay)


__all__ = ["METHODS", "Method", "StepContext", "build_method", "for_source"]
