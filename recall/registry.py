"""Lazy references by name: "package.module:attribute" strings that registries resolve when an entry is used.

A registry of the product may name an object that lives outside it (e.g. a simulated replay source in
``recall.sim``) without importing it: the product never imports the simulations, and a registry entry costs
nothing until it is chosen.
"""

from __future__ import annotations

import importlib


def resolve(reference: str):
    """The object a "module:attribute" reference names."""
    module, sep, attribute = reference.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"bad reference {reference!r}: expected 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)
