"""The dataset registry (recall/data/datasets/): a dataset in VOC layout is one config file, with no registry entry;
a registered dataset's class names, setup command and preparations come from its module."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recall import config
from recall.cli import main
from recall.data.classes import VOC_CLASSES
from recall.data.datasets import DATASETS, class_names, dataset_class_names, known, preparations
from recall.data.datasets.ade20k import ADE20K_CLASSES
from recall.data.protocol import steps
from recall.data.voc import VOCSegmentation, image_classes, read_split
from recall.plan import dataset_status

NAMES = ["background", "leaf", "stone", "shell"]
SPLITS = {"learn": ["a", "b", "c", "d"], "check": ["e", "f"]}


def _shapes_root(root: Path) -> Path:
    """A tiny VOC-layout dataset under another name and other directories: 6 images of 16x12, 3 classes."""
    for split, ids in SPLITS.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for n, image_id in enumerate(ids):
            mask = np.zeros((12, 16), dtype=np.uint8)
            mask[2:8, 3:9] = 1 + n % 3
            mask[0, :] = 255  # a void border
            (root / "photos").mkdir(exist_ok=True)
            (root / "labels").mkdir(exist_ok=True)
            Image.fromarray(np.full((12, 16, 3), 40 * n, dtype=np.uint8)).save(root / "photos" / f"{image_id}.jpg")
            Image.fromarray(mask, mode="L").save(root / "labels" / f"{image_id}.png")
    return root


@pytest.fixture
def shapes_conf(tmp_path, monkeypatch) -> Path:
    """conf/ with one more file, the config of dataset=shapes, and nothing else changed."""
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    root = _shapes_root(tmp_path / "shapes")
    (conf / "dataset" / "shapes.yaml").write_text(
        f"name: shapes\nroot: {root}\nnum_classes: 3\ntrain_split: learn\nval_split: check\n"
        f"image_dir: photos\nmask_dir: labels\nclasses: [{', '.join(NAMES)}]\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    return conf


def test_a_voc_layout_dataset_is_one_config_file_read_by_the_normal_code(shapes_conf, capsys):
    """`dataset=shapes` composes from the config file alone (no registry entry, no module): the class names, the
    splits, the images and masks, the plan's status and `recall run --dry-run` read it as they read VOC."""
    assert "shapes" not in DATASETS and known("shapes") is None
    cfg = config.compose(["dataset=shapes", "protocol=2-1"])
    d = cfg.dataset
    assert dataset_class_names(d) == NAMES
    assert [read_split(d.root, s) for s in (d.train_split, d.val_split)] == list(SPLITS.values())
    data = VOCSegmentation(d.root, d.train_split, num_classes=d.num_classes, mask_dir=d.mask_dir,
                           image_dir=d.image_dir)
    image, mask = data[1]
    assert tuple(image.shape) == (3, 12, 16) and set(mask.unique().tolist()) == {0, 2, 255}
    assert image_classes(d.root, data.ids, num_classes=3, mask_dir=d.mask_dir, progress=False)["c"] == {3}
    assert steps(str(cfg.protocol.name), int(d.num_classes)) == [[1, 2], [3]]
    status = dataset_status(cfg)
    assert status["prepared"] and status["splits"] == {"learn": 4, "check": 2} and "prepare" not in status
    capsys.readouterr()
    assert main(["run", "dataset=shapes", "protocol=2-1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "shell" in out
    # without `classes`, an unregistered dataset's classes are numbers; the plan says to put it in VOC layout
    d.classes = None
    assert dataset_class_names(d) == ["0", "1", "2", "3"]
    cfg.dataset.root = str(shapes_conf / "nowhere")
    assert dataset_status(cfg)["prepare"] == f"put it in VOC layout under {shapes_conf / 'nowhere'}"


def test_the_registered_datasets_names_setup_and_preparations():
    assert list(DATASETS) == ["voc", "ade20k", "toy"]
    assert class_names("voc", 20) == class_names("toy", 20) == list(VOC_CLASSES)
    assert class_names("ade20k", 150) == list(ADE20K_CLASSES)
    assert known("toy").setup == "recall toyworld {root}" and known("toy").preparations == ()
    assert list(preparations()) == ["voc", "sbd", "ade20k"]  # `recall data prepare`'s choices, in this order
    assert {name: p.family for name, p in preparations().items()} == {"voc": "voc", "sbd": "voc",
                                                                      "ade20k": "ade20k"}
    assert preparations()["sbd"].after == "voc" and preparations()["sbd"].mask_dir == "SegmentationClassAug"
    for name in DATASETS:  # every registered dataset has its config file, of the same name
        composed = config.compose([f"dataset={name}"]).dataset
        assert composed.name == name and composed.classes is None
        assert len(dataset_class_names(composed)) == composed.num_classes + 1
