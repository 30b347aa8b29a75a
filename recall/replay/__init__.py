"""Replay sources and the on-disk replay pool.

``SOURCES`` maps a config name to a source class; ``build_source("toy_gan", truncation=1.0)``
creates one. Every source implements ``images(class_index, class_name, start, count)`` and
``available(class_index, class_name)`` (see ``recall.replay.pool.ReplaySource``).
"""

from __future__ import annotations

import inspect

from recall.replay.folder import FolderSource
from recall.replay.gan import BigGANSource
from recall.replay.pool import (PoolDataset, ReplayError, ReplayPool, build_pool, dataset_hashes,
                                describe_problems)
from recall.replay.toy_gan import ToyGenerator
from recall.replay.toy_web import ToyWebPhotos
from recall.replay.web import FlickrSource

SOURCES: dict[str, type] = {"folder": FolderSource, "gan": BigGANSource, "toy_gan": ToyGenerator,
                            "toy_web": ToyWebPhotos, "web": FlickrSource}


def build_source(name: str, **options):
    """The replay source registered as ``name``, constructed with ``options``."""
    try:
        cls = SOURCES[name]
    except KeyError:
        raise ReplayError(f"unknown replay source {name!r}; known sources: {sorted(SOURCES)}") from None
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as error:
        raise ReplayError(f"replay source {name!r}: bad options {sorted(options)} ({error}); "
                          f"expected {inspect.signature(cls)}") from None
    return cls(**options)


__all__ = ["SOURCES", "BigGANSource", "FlickrSource", "FolderSource", "PoolDataset", "ReplayError", "ReplayPool", "ToyGenerator", "ToyWebPhotos",
           "build_pool", "build_source", "dataset_hashes", "describe_problems"]
