"""Where the authors' released code (LTTM/RECALL) decides, it is the default, and the alternative an option:
one test per point of docs/methods.md's table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recall.config import compose, section
from recall.data.classes import IGNORE_INDEX, PADDING, VOC_CLASSES
from recall.data.transforms import TrainTransform
from recall.labeling import ignore_padding, inpaint_background, label_replay_all
from recall.methods import StepContext, build_method
from recall.train import TrainConfig, iters_per_class, step_iterations


def _sample(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose columns count up (so the scale can be read off) and a mask of class 1."""
    image = np.tile(np.arange(size, dtype=np.uint8)[None, :, None], (size, 1, 3))
    return torch.from_numpy(image).permute(2, 0, 1), torch.ones((size, size), dtype=torch.int64)


def test_training_scales_the_original_image_as_the_authors(monkeypatch):
    """scale_reference=image: a 128 px image at s = 1 stays 128 px (a 64 px crop of it); crop: fitted to 64 first."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.5))  # s = the middle of [1, 1] ... = 1.0
    image, mask = _sample(128)
    for reference, spread in (("image", 63), ("crop", 126)):
        out, labels = TrainTransform(64, (1.0, 1.0), reference=reference)(image, mask)
        columns = out[0, 0].numpy()  # normalised, but monotonic in the original column index
        raw = np.round(columns * 0.229 * 255 + 0.485 * 255)
        assert raw.max() - raw.min() == pytest.approx(spread, abs=2), reference
    with pytest.raises(ValueError, match="scale_reference"):
        TrainTransform(64, (1.0, 1.0), reference="other")


def test_crop_padding_is_its_own_label_never_inpainted_and_ignored_by_the_loss(monkeypatch):
    image, mask = _sample(32)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.0))  # s = 0.5: a 16 px image in a 32 px crop
    _, labels = TrainTransform(32, (0.5, 0.5))(image, mask)
    assert set(np.unique(labels.numpy())) == {1, PADDING}
    targets = torch.tensor([[[0, 255, PADDING]]])
    prev = torch.tensor([[[[0.0, 0.0, 0.0]], [[9.0, 9.0, 9.0]]]])  # the previous model says class 1 everywhere
    inpainted = inpaint_background(targets, prev, include_ignore=True)
    assert inpainted.tolist() == [[[1, 1, PADDING]]]  # background and void inpainted, padding never
    assert ignore_padding(inpainted).tolist() == [[[1, 1, IGNORE_INDEX]]]
    recall = build_method("recall", inpaint_padding=True)  # this project's behaviour before the fix
    old = recall.rewrite_targets(torch.zeros(1, 3, 1, 3), targets,
                                 SimpleNamespace(prev_model=lambda x: {"out": prev}, setting="overlapped"))
    assert old.tolist() == [[[1, 1, 1]]]


def test_label_evaluation_takes_the_argmax_over_all_outputs_or_only_background_and_the_class():
    logits = torch.tensor([[[[5.0]], [[1.0]], [[9.0]]]])  # channels: background, class 3, class 7
    assert label_replay_all(logits, torch.tensor([0, 3, 7])).item() == 7  # the authors: another class may win
    from recall.labeling import label_replay
    assert label_replay(logits, 1, 3).item() == 0  # restricted to {background, class 3}: background wins
    assert build_method("recall").label_space == "all" and build_method("recall", label_space="class")
    with pytest.raises(ValueError, match="label_space"):
        build_method("recall", label_space="any")


def test_helpers_start_from_a_fresh_decoder_with_the_authors_learning_rate(tmp_path):
    from recall.model import ModelConfig, SegmentationModel, load_checkpoint, save_checkpoint

    cfg = ModelConfig(head_channels=16)
    step0 = SegmentationModel(cfg, [15])
    torch.nn.init.constant_(step0.head.project[0].weight, 0.5)
    save_checkpoint(step0, tmp_path / "steps" / "0" / "model.pt", {"classes_per_step": [15]})
    run = SimpleNamespace(model_cfg=cfg, task=[list(range(1, 16)), [16], [17]],
                          step_dir=lambda k: tmp_path / "steps" / str(k),
                          trained_model=lambda k: load_checkpoint(tmp_path / "steps" / str(k) / "model.pt", cfg)[0])
    recall = build_method("recall")
    helper = recall.helper_model(run, 1)
    assert all(torch.equal(a, b) for a, b in zip(helper.encoder.state_dict().values(),
                                                 step0.encoder.state_dict().values()))
    assert not torch.equal(helper.head.project[0].weight, step0.head.project[0].weight)  # random, as the authors
    assert torch.equal(build_method("recall", helper_init="step0").helper_model(run, 1).head.project[0].weight,
                       step0.head.project[0].weight)
    t = TrainConfig(lr_incremental=5e-4, lr_end=5e-6, iters_per_class={"overlapped": 1500})
    helper_cfg = build_method("recall", helper_iters_per_class=1000).helper_train_config(t)
    assert helper_cfg.lr_incremental == pytest.approx(2e-4) and helper_cfg.lr_end == pytest.approx(2e-6)
    assert helper_cfg.iters_per_class == 1000 and t.iters_per_class == {"overlapped": 1500}


def test_the_sequential_setting_does_not_inpaint():
    targets = torch.zeros(1, 1, 2, dtype=torch.long)
    prev = {"out": torch.tensor([[[[0.0, 0.0]], [[9.0, 9.0]]]])}
    for setting, option, expected in (("sequential", False, [[0, 0]]), ("overlapped", False, [[1, 1]]),
                                      ("sequential", True, [[1, 1]])):
        ctx = SimpleNamespace(prev_model=lambda x: prev, setting=setting)
        out = build_method("recall", inpaint_sequential=option).rewrite_targets(torch.zeros(1, 3, 1, 2), targets, ctx)
        assert out[0].tolist() == expected, (setting, option)


def test_the_paper_profile_follows_the_gin_files():
    cfg = compose(["experiment=paper_voc", "protocol=15-1x5", "method=recall", "replay=web"])
    t = section(cfg.train, TrainConfig)
    ctx = lambda setting: StepContext(step=1, task=[[1], [2]], new_classes=[16], old_classes=[], setting=setting)
    assert [step_iterations(t, ctx(s), 0) for s in ("overlapped", "disjoint", "sequential")] == [1500, 1000, 1000]
    assert iters_per_class(TrainConfig(iters_per_class=7), "disjoint") == 7
    assert cfg.method.helper_iters_per_class == 1000 and cfg.model.head == "deeplabv2"
    assert compose(["experiment=paper_voc", "method=ft"]).method.get("helper_iters_per_class") is None
    from recall.replay.web import FlickrSource
    source = FlickrSource(**{k: v for k, v in cfg.replay.source.items() if k != "standin"})
    assert [source.query(n) for n in ("aeroplane", "tvmonitor", "diningtable", "pottedplant", "cow")] == \
        ["airplane", "monitor", "dining table", "potted plant", "cow"]
    assert source.sizes == ("url_c",)


def test_the_deeplab_v2_head_sums_four_dilated_classifiers_and_grows_per_step():
    from recall.model import DeepLabV2Classifier, ModelConfig, SegmentationModel

    model = SegmentationModel(ModelConfig(head="deeplabv2", aspp_rates=[1, 2, 3, 4]), [15])
    (first,) = model.classifiers
    assert isinstance(first, DeepLabV2Classifier) and [b.dilation for b in first.branches] == [(1, 1), (2, 2),
                                                                                              (3, 3), (4, 4)]
    x = torch.randn(1, 3, 32, 32)
    features = model.encoder(x)[-1]
    assert torch.allclose(first(features), sum(b(features) for b in first.branches), atol=1e-6)
    model.eval()
    before = model(x)["out"].softmax(1)[:, 0]
    model.add_classes(2, init="background")  # MiB's init: the new classes split background's probability
    after = model(x)["out"].softmax(1)
    assert torch.allclose(after[:, 0] + after[:, 16:].sum(1), before, atol=1e-5)
    assert torch.allclose(after[:, 16], after[:, 0], atol=1e-5) and torch.allclose(after[:, 17], after[:, 0],
                                                                                  atol=1e-5)
    with pytest.raises(ValueError, match="model.head"):
        ModelConfig(head="deeplabv4")


def test_the_class_mapping_averages_every_image_of_a_class_and_names_ade20k_classes(tiny_world, tmp_path):
    from recall.replay.classmap import map_classes

    class Constant(torch.nn.Module):
        source_names = ["a", "b"]

        def forward(self, images):
            return torch.tensor([[2.0, 1.0]]).expand(len(images), 2)

    from recall.data.voc import image_classes, read_split
    present = image_classes(tiny_world, read_split(tiny_world, "train"), progress=False)
    mapping = map_classes(Constant(), tiny_world, num_classes=20)
    assert all(m["n_images"] == sum(c in v for v in present.values()) for c, m in mapping.items())
    from recall.data.datasets.ade20k import ADE20K_CLASSES
    ade = map_classes(Constant(), tiny_world, num_classes=150, class_names=ADE20K_CLASSES)
    assert ade[1]["name"] == "wall" and ade[1]["name"] != VOC_CLASSES[1]


def test_the_classmap_stage_names_the_dataset_s_own_classes(tiny_world, tmp_path):
    """dataset=ade20k: the mapping file labels ADE20K's classes (not VOC's names on ADE's indices)."""
    from recall.sim.standin_weights import make_standin_classifier
    from recall.stages.classmap import class_mapping

    weights = make_standin_classifier(tmp_path / "classifier.pth")
    cfg = compose(["dataset=ade20k", f"dataset.root={tiny_world}", "dataset.mask_dir=SegmentationClass",
                   "dataset.train_split=train", "replay=gan", f"replay.classifier.weights={weights}",
                   f"replay.mapping={tmp_path}/mapping.json"])
    class_mapping(cfg)
    saved = json.loads((tmp_path / "mapping.json").read_text())
    assert saved["1"]["name"] == "wall" and saved["150"]["n_images"] == 0
