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
    saved = torch.load(pretrained / "classifier.pth", weights_only=True)
    assert set(saved["state_dict"]) - set(encoder) == {"fc.weight", "fc.bias"}  # the classifier layer, only there
    assert saved["preprocessing"]["input_size"] == 32  # the size it was trained at
    assert saved["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's, as the encoder's
    assert json.loads((pretrained / "metrics.json").read_text())["train_images"] == 2 * toy_imagenet.NUM_CLASSES


def test_the_segmentation_model_starts_from_the_pretrained_encoder(pretrained: Path, tmp_path: Path):
    from recall.model import ModelConfig, SegmentationModel
    from recall.errors import ReplayError

    model = SegmentationModel(ModelConfig(pretrained_file=str(pretrained / "encoder.pth")), [15])
    saved = torch.load(pretrained / "encoder.pth", weights_only=True)
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in saved.items())
    broken = {k: v for k, v in saved.items() if not k.startswith("layer4.")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ReplayError, match="missing keys: layer4"):  # a strict check, no silent random layers
        SegmentationModel(ModelConfig(pretrained_file=str(tmp_path / "broken.pth")), [15])


def test_the_class_mapping_uses_the_pretrained_classifier(pretrained: Path, tiny_world: Path):
    from recall.replay.classifier import imagenet_classifier
    from recall.replay.classmap import map_classes

    classifier = imagenet_classifier("test_resnet", weights=pretrained / "classifier.pth",
                                     names=pretrained / "classes.json")
    assert classifier.source_names == toy_imagenet.class_names() and classifier.input_size == 32
    mapping = map_classes(classifier, tiny_world, num_classes=20)
    assert all(m["source_name"] in classifier.source_names for m in mapping.values() if m["n_images"])


def test_the_class_map_sees_the_held_out_images_as_the_pretraining_did(pretrained: Path):
    """One model, one preprocessing: the classifier the class map loads from classifier.pth scores the pretraining's
    held-out images exactly as the pretraining measured them (its top-1), logit for logit."""
    import timm

    from recall.replay.classifier import SourceClassifier, classify, imagenet_classifier

    images, labels, names = toy_imagenet.classification_set("val", 1, size=32, workers=1)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    loaded = imagenet_classifier("test_resnet", weights=pretrained / "classifier.pth",
                                 names=pretrained / "classes.json")
    probabilities = classify(loaded, images)
    top1 = int((probabilities.argmax(1) == torch.from_numpy(labels)).sum()) / len(labels)
    assert top1 == json.loads((pretrained / "metrics.json").read_text())["top1"]
    network = timm.create_model("test_resnet", pretrained=False, num_classes=len(names))
    network.load_state_dict(torch.load(pretrained / "classifier.pth", weights_only=True)["state_dict"])
    as_pretrained = SourceClassifier(network, names, input_size=32)  # the pretraining's module, ImageNet's mean/std
    assert torch.equal(classify(as_pretrained, images), probabilities)
    as_timm_defaults = SourceClassifier(network, names, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
    assert not torch.equal(classify(as_timm_defaults, images), probabilities)  # what the old path did differs


def test_a_classifier_file_without_its_preprocessing_is_refused(pretrained: Path, tmp_path: Path):
    from recall.replay.classifier import imagenet_classifier, save_classifier
    from recall.errors import ReplayError

    state = torch.load(pretrained / "classifier.pth", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(ReplayError, match=r"plain\.pth: the classifier file does not say how its images were "
                                          r"preprocessed.*torch\.save\(\{'state_dict'"):
        imagenet_classifier("test_resnet", weights=tmp_path / "plain.pth", names=pretrained / "classes.json")
    torch.save({"state_dict": state, "preprocessing": {"mean": [0.5, 0.5], "std": [1, 1, 1], "input_size": 32}},
               tmp_path / "bad.pth")
    with pytest.raises(ReplayError, match=r"bad\.pth: its 'preprocessing' must be"):
        imagenet_classifier("test_resnet", weights=tmp_path / "bad.pth", names=pretrained / "classes.json")
    for suffix in (".pth", ".safetensors"):  # both formats carry it
        path = save_classifier(tmp_path / f"again{suffix}", state, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48)
        loaded = imagenet_classifier("test_resnet", weights=path, names=pretrained / "classes.json")
        assert loaded.input_size == 48 and loaded.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_the_classmap_stage_scores_the_map_against_the_simulations_truth(pretrained: Path, tiny_world: Path,
                                                                          tmp_path: Path, capsys):
    from recall.cli import main

    mapping = tmp_path / "map.json"
    assert main(["classmap", f"dataset.root={tiny_world}", "replay=toy_gan",
                 f"replay.classifier.weights={pretrained}/classifier.pth",
                 f"replay.classifier.names={pretrained}/classes.json", f"replay.mapping={mapping}",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
    check = json.loads((tmp_path / "map_check.json").read_text())
    chosen = {int(c): m["source_class"] for c, m in json.loads(mapping.read_text()).items() if m["source_class"] is not None}
    assert check["truth"]["correct"] == toy_imagenet.class_map_score(chosen)["correct"]
    assert check["truth"]["classes"] == len(chosen) == check["classes"]
    assert check["shared"] == {name: names for name, names in check["shared"].items() if len(names) > 1}
    out = capsys.readouterr()
    assert f"{check['truth']['correct']} of {len(chosen)} classes get their look-alike" in out.out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.role = 'classmap'")
    assert runs[0].data.metrics["classmap/truth_correct"] == check["truth"]["correct"]
