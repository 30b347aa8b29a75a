"""The datasets the product knows by config name (`dataset.name`), beyond what their config file says.

A dataset in VOC layout (``root/<image_dir>/<id>.jpg``, ``root/<mask_dir>/<id>.png``, ``root/ImageSets/Segmentation/
<split>.txt``) needs no entry: its conf/dataset/<name>.yaml gives its root, splits, directories, ``num_classes`` and
``classes``. A dataset whose class names the code knows, or that ``recall data prepare`` builds from an official
archive, is a module here (a ``Dataset``), its line below and its config file. Entries are "module:attribute"
references, imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from recall.registry import resolve

DATASETS: dict[str, str] = {
    "voc": "recall.data.datasets.voc:VOC",  # Pascal VOC 2012 + SBD's train_aug
    "ade20k": "recall.data.datasets.ade20k:ADE20K",  # ADE20K SceneParsing, 150 classes
    "toy": "recall.data.datasets.voc:TOY",  # the toy world (`recall toyworld`, a simulation): VOC's class names
}


@dataclass(frozen=True)
class KnownArchive:
    """An official archive: where it is published, its SHA-256 and size (bytes, None if no source gives it)."""

    dataset: str
    name: str
    url: str
    sha256: str
    size: int | None
    source: str  # where the digest was copied from


@dataclass(frozen=True)
class Preparation:
    """What `recall data prepare <name>` does: read the official ``archive`` (its top folder ``prefix``; ``title``
    names it in messages) into a root in VOC layout. ``prepare(extraction) -> summary`` does the dataset's part,
    with the shared ways to read the archive and write files that ``extraction`` (``recall.data.prepare.Extraction``)
    offers: a dataset module imports no archive code, so a run, which reads its class names, does not depend on it.

    ``mask_dir`` and ``official_counts`` (images per split of the official archive) are what the prepared root
    holds besides JPEGImages/. Preparations of one ``family`` may share a root; ``after`` is the preparation that
    must be complete in it first (SBD adds to VOC 2012's); ``id_prefix`` starts every image id of the family (how a
    root of another dataset is told apart)."""

    name: str
    title: str
    archive: KnownArchive
    prefix: str
    mask_dir: str
    official_counts: dict[str, int]
    prepare: Callable[[object], dict]
    family: str
    after: str | None = None
    id_prefix: str = ""


@dataclass(frozen=True)
class Dataset:
    """A dataset the code knows: its class names (background first; None: numbers, or the config's ``classes``),
    how to get it onto disk (``setup``, a command with ``{root}``) and its ``recall data prepare`` preparations."""

    name: str
    classes: tuple[str, ...] | None
    setup: str
    preparations: tuple[Preparation, ...] = field(default=())


def known(name: str) -> Dataset | None:
    """The registered dataset of config name ``name``, or None (a VOC-layout dataset described by its config alone)."""
    return resolve(DATASETS[name]) if name in DATASETS else None


def preparations() -> dict[str, Preparation]:
    """Every `recall data prepare` target by name, in registry order."""
    return {p.name: p for name in DATASETS for p in known(name).preparations}


def class_names(dataset_name: str, num_classes: int) -> list[str]:
    """Names of classes 0..num_classes (background first): those of the dataset registered as `dataset_name`
    (`DATASETS`: VOC's for voc and the toy world, ADE20K's for ade20k), numbers for any other dataset. A known
    dataset with another class count is a configuration error."""
    dataset = known(dataset_name)
    names = dataset.classes if dataset is not None else None
    if names is None:
        return [str(c) for c in range(num_classes + 1)]
    if num_classes != len(names) - 1:
        raise ValueError(f"dataset {dataset_name!r} has {len(names) - 1} classes, not num_classes={num_classes}")
    return list(names)


def dataset_class_names(dataset) -> list[str]:
    """Names of classes 0..num_classes of a `dataset` config section: its `classes` list (background first), or,
    when that is null, the known names of its `name` (`class_names`). A new VOC-layout dataset is one config file in
    conf/dataset/ with its root, splits, directories and class names: it needs no entry in `DATASETS`."""
    from recall.errors import UserError

    n = int(dataset.num_classes)
    given = dataset.get("classes")
    if given is None:
        try:
            return class_names(str(dataset.name), n)
        except ValueError as error:
            raise UserError(f"dataset.num_classes={n}: {error}") from None
    if isinstance(given, str) or not all(isinstance(c, (str, int)) for c in given):
        raise UserError(f"dataset.classes={given!r}: a list of class names, background first (e.g. [background, "
                        "cat, dog]), or null")
    names = [str(c) for c in given]
    if len(names) != n + 1:
        raise UserError(f"dataset.classes has {len(names)} names; dataset.num_classes={n} needs {n + 1} "
                        "(background first, then classes 1..num_classes)")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise UserError(f"dataset.classes names {', '.join(repeated)} more than once: every class needs its own name")
    return names
