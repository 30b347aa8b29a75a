"""The replay sources by config name (`replay.name`), and how one is built from its `replay.source` options.

`SOURCES` make a pool of outside images before a run (`recall pool`). The sources a run makes itself, which change
how its method trains (the memory of stored exemplars), are `recall.methods.RUN_SOURCES`: the pool stages never
import them.

Every pool source implements ``images(class_index, class_name, start, count)`` and ``available(...)``
(see ``recall.replay.pool.ReplaySource``). Entries are "module:class" references, imported only when chosen:
the toy sources are simulations (``recall.sim``), which the product never imports.
"""

from __future__ import annotations

import inspect

from recall.registry import resolve
from recall.errors import ReplayError
from recall.replay.leakage import STORED_DATA_SOURCES

SOURCES: dict[str, str] = {
    "folder": "recall.replay.folder:FolderSource",  # your own images, ROOT/<class_name>/*.jpg
    "gan": "recall.replay.gan:BigGANSource",  # BigGAN-deep (pytorch-pretrained-biggan), as the paper
    "web": "recall.replay.web:FlickrSource",  # Flickr text search through flickrapi, as the paper
    "diffusion": "recall.replay.diffusion:DiffusionSource",  # a local diffusers text-to-image pipeline (RECALL's successors)
    "toy_gan": "recall.sim.toy_gan:ToyGenerator",  # the toy world's BigGAN stand-in
    "toy_diffusion": "recall.sim.toy_diffusion:ToyDiffusion",  # the toy world's diffusion stand-in (class names)
    "toy_web": "recall.sim.toy_web:ToyWebPhotos",  # the Flickr stand-in's photos, rendered without HTTP
}


def build_source(name: str, **options):
    """The replay source registered as ``name``, constructed with ``options``."""
    if name in STORED_DATA_SOURCES:
        raise ReplayError(f"replay={name} is made by `recall run` itself (stored exemplars): there is no pool to build")
    try:
        cls = resolve(SOURCES[name])
    except KeyError:
        raise ReplayError(f"unknown replay source {name!r}; known sources: {sorted(SOURCES)}") from None
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as error:
        raise ReplayError(f"replay source {name!r}: bad options {sorted(options)} ({error}); "
                          f"expected {inspect.signature(cls)}") from None
    return cls(**options)

