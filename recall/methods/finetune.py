"""Baselines without any protection against forgetting: fine-tuning (FT) and joint training (upper bound)."""

from __future__ import annotations

from recall.methods.base import Method


class FineTuning(Method):
    """Plain cross-entropy on the current step's images and labels: the lower bound."""

    name = "ft"


class Joint(Method):
    """Trains on every image with a class seen so far, with all their labels: the upper bound.

    Breaks the privacy rule on purpose (it reads earlier steps' images); with protocol `joint` it is
    ordinary offline training on all classes.
    """

    name = "joint"
    data = "cumulative"
