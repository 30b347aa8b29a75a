"""Continual-learning methods as pluggable objects; `METHODS` maps config names to classes."""

from __future__ import annotations

from recall.methods.base import Method, StepContext
from recall.methods.distillation import ILT, LwF, MiB
from recall.methods.finetune import FineTuning, Joint
from recall.methods.recall import Recall

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FineTuning, Joint, LwF, ILT, MiB, Recall)}


def build_method(name: str, **options) -> Method:
    """Create the method registered as `name` with its options (the `method` config section minus `name`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "StepContext", "build_method"]
