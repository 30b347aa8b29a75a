from __future__ import annotations

import dataclasses

import pytest
import torch

from recall.errors import UserError
from recall.model import (
    ModelConfig,
    SegmentationModel,
    load_checkpoint,
    save_checkpoint,
)

CFG = ModelConfig(head_channels=16)


def test_output_shape_and_growth_keeps_old_weights():
    model = SegmentationModel(CFG, [3])
    x = torch.randn(2, 3, 64, 64)
    assert model(x)["out"].shape == (2, 4, 64, 64)
    old = model.classifiers[0].weight.detach().clone()
    model.add_classes(2)
    assert model(x)["out"].shape == (2, 6, 64, 64)
    assert torch.equal(model.classifiers[0].weight, old)


def test_encoder_output_stride_8():
    model = SegmentationModel(CFG, [3])
    assert model(torch.randn(1, 3, 64, 64))["encoder"].shape[-1] == 8


def test_background_aware_init_splits_background_probability():
    model = SegmentationModel(CFG, [3]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p_bg_before = model(x)["out"].softmax(1)[:, 0]
        model.add_classes(2, init="background")
        probs = model(x)["out"].softmax(1)
    # background's old probability is now shared by background and the 2 new classes, equally
    torch.testing.assert_close(probs[:, 0] + probs[:, 4] + probs[:, 5], p_bg_before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs[:, 4], probs[:, 0], rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = SegmentationModel(CFG, [3, 1])
    save_checkpoint(model, tmp_path / "m.pt", {"classes_per_step": [3, 1]})
    loaded, meta = load_checkpoint(tmp_path / "m.pt", CFG)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), loaded.eval()
    assert torch.equal(model(x)["out"], loaded(x)["out"]) and meta["classes_per_step"] == [3, 1]
    assert not (tmp_path / "m.pt.tmp").exists()


def test_frozen_bn_has_no_batchnorm_left():
    model = SegmentationModel(ModelConfig(head_channels=16, frozen_bn=True), [3])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    plain = SegmentationModel(CFG, [3]).eval()
    fast = SegmentationModel(dataclasses.replace(CFG, channels_last=True), [3]).eval()
    fast.load_state_dict(plain.state_dict())
    fast.add_classes(2)
    plain.add_classes(2)
    fast.classifiers[1].load_state_dict(plain.classifiers[1].state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x)["out"], fast(x)["out"], atol=1e-5)
    assert fast.classifiers[1].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("saved, wanted", [("aspp", "deeplabv2"), ("deeplabv2", "aspp")])
def test_a_checkpoint_of_another_head_is_one_line_naming_the_file_and_the_head_to_pass(tmp_path, saved, wanted):
    path = tmp_path / "model.pt"
    save_checkpoint(SegmentationModel(dataclasses.replace(CFG, head=saved), [3]), path, {"classes_per_step": [3]})
    with pytest.raises(UserError) as caught:
        load_checkpoint(path, dataclasses.replace(CFG, head=wanted))
    message = str(caught.value)
    assert str(path) in message and f"pass model.head={saved}" in message and "\n" not in message
    load_checkpoint(path, dataclasses.replace(CFG, head=saved))  # the head it was saved with loads


def test_a_checkpoint_of_another_width_names_the_options_it_needs(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(SegmentationModel(CFG, [3]), path, {"classes_per_step": [3]})
    with pytest.raises(UserError, match="model.head_channels=32.*pass the model options it was trained with"):
        load_checkpoint(path, dataclasses.replace(CFG, head_channels=32))
