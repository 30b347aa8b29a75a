"""The toy "ImageNet" (recall/sim/toy_imagenet.py) and pretraining on it (recall pretrain)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recall.sim import toy_imagenet
from recall.sim.toyworld import CLASS_STYLES


def test_the_class_space_is_broad_and_holds_the_generators_classes():
    classes = toy_imagenet.class_space()
    assert len(classes) >= 100 and len({c.name for c in classes}) == len(classes)
    kinds = [c.kind for c in classes]
    assert set(kinds[:toy_imagenet.GENERATOR_CLASSES]) == {"lookalike", "variant", "distractor"}
    assert {c.target for c in classes if c.kind == "lookalike"} == set(CLASS_STYLES)  # a look-alike of each class
    others = [c for c in classes if c.kind == "other"]
    assert len(others) >= 60 and all(toy_imagenet._far_from_the_toy_world(c.style) for c in others)
    from recall.sim.toy_gan import ToyGenerator
    assert ToyGenerator().source_names == [c.name for c in classes]  # the generator samples this class space


def test_images_vary_within_a_class_and_are_deterministic():
    a = toy_imagenet.render(7, 0, "train", size=32)
    assert np.array_equal(a, toy_imagenet.render(7, 0, "train", size=32))
    others = [toy_imagenet.render(7, i, "train", size=32) for i in range(1, 6)]
    assert all(np.abs(a.astype(int) - o).mean() > 10 for o in others), "the same class, different images"
    assert not np.array_equal(a, toy_imagenet.render(7, 0, "val", size=32))


def test_no_image_is_one_of_the_toy_worlds(tiny_world: Path):
    """Checked by hash: the toy world's images (at the same size) never occur in the toy ImageNet."""
    from PIL import Image

    world = {hashlib.sha256(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest()
             for p in (tiny_world / "JPEGImages").glob("*.jpg")}
    images, labels, names = toy_imagenet.classification_set("train", 1, size=64, workers=1)
    assert len(images) == len(labels) == len(names) == toy_imagenet.NUM_CLASSES
    assert not world & {hashlib.sha256(x.tobytes()).hexdigest() for x in images}


def test_the_rendering_processes_do_not_change_the_images():
    one = toy_imagenet.classification_set("val", 1, size=16, workers=1)
    two = toy_imagenet.classification_set("val", 1, size=16, workers=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from recall.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain") / "out"
    metrics = pretrain(PretrainConfig(train_per_class=2, val_per_class=1, size=32, epochs=1, workers=1),
                       "test_resnet", out, progress=False)
    assert metrics["classes"] == toy_imagenet.NUM_CLASSES and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    return out


def test_pretrain_writes_the_encoder_the_classifier_and_its_accuracy(pretrained: Path):
    assert sorted(p.name for p in pretrained.iterdir()) == ["classes.json", "classifier.pth", "encoder.pth",
                                                             "metrics.json"]
    assert json.loads((pretrained / "classes.json").read_text()) == toy_imagenet.class_names()
    encoder = torch.load(pretrained / "encoder.pth", weights_only=True)
    classifier = torch.load(pretrained / "classifier.pth", weights_only=True)
    assert set(classifier) - set(encoder) == {"fc.weight", "fc.bias"}  # the classifier layer, only there
    assert json.loads((pretrained / "metrics.json").read_text())["train_images"] == 2 * toy_imagenet.NUM_CLASSES


def test_the_segmentation_model_starts_from_the_pretrained_encoder(pretrained: Path, tmp_path: Path):
    from recall.model import ModelConfig, SegmentationModel
    from recall.replay.pool import ReplayError

    model = SegmentationModel(ModelConfig(pretrained_file=str(pretrained / "encoder.pth")), [15])
    saved = torch.load(pretrained / "encoder.pth", weights_only=True)
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in saved.items())
    broken = {k: v for k, v in saved.items() if not k.startswith("layer4.")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ReplayError, match="missing keys: layer4"):  # a strict check, no silent random layers
        SegmentationModel(ModelConfig(pretrained_file=str(tmp_path / "broken.pth")), [15])


def test_the_class_mapping_uses_the_pretrained_classifier(pretrained: Path, tiny_world: Path):
    from recall.replay.classmap import imagenet_classifier, map_classes

    classifier = imagenet_classifier("test_resnet", weights=pretrained / "classifier.pth",
                                     names=pretrained / "classes.json", input_size=32)
    assert classifier.source_names == toy_imagenet.class_names()
    mapping = map_classes(classifier, tiny_world, num_classes=20, input_size=32)
    assert all(m["source_name"] in classifier.source_names for m in mapping.values() if m["n_images"])
