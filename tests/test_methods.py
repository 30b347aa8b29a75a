from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from recall.methods import METHODS, StepContext, build_method
from recall.methods.distillation import (
    feature_distillation,
    knowledge_distillation,
    unbiased_cross_entropy,
    unbiased_distillation,
)
from recall.model import ModelConfig, SegmentationModel

CFG = ModelConfig(head_channels=16)


# --- the loss functions on hand-made tensors ------------------------------------------------------------------

def test_unbiased_cross_entropy_is_cross_entropy_without_old_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 4)
    targets = torch.randint(0, 5, (2, 4, 4))
    targets[0, 0, 0] = 255
    expected = F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(unbiased_cross_entropy(logits, targets, num_old=0), expected)


def test_unbiased_cross_entropy_by_hand():
    # channels: background, one old class, two new classes; one pixel each
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    s = sum(math.exp(v) for v in (1, 2, 3, 4))
    p_bg = (math.exp(1) + math.exp(2)) / s
    for label, expected in [(0, -math.log(p_bg)), (1, -math.log(p_bg)), (3, -(4 - math.log(s)))]:
        loss = unbiased_cross_entropy(logits, torch.tensor([[[label]]]), num_old=1)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_unbiased_cross_entropy_leaves_inputs_alone():
    logits, targets = torch.randn(1, 4, 2, 2), torch.tensor([[[0, 1], [3, 255]]])
    logits_copy, targets_copy = logits.clone(), targets.clone()
    unbiased_cross_entropy(logits, targets, num_old=1)
    assert torch.equal(logits, logits_copy) and torch.equal(targets, targets_copy)


def test_knowledge_distillation_by_hand():
    new = torch.tensor([1.0, 3.0, 7.0]).view(1, 3, 1, 1)  # the new class' channel (7.0) is not distilled
    old = torch.zeros(1, 2, 1, 1)
    log_p = torch.log_softmax(torch.tensor([1.0, 3.0]), 0)
    expected = -(0.5 * log_p).sum() / 2  # MiB averages over the old channels
    assert knowledge_distillation(new, old).item() == pytest.approx(expected.item(), rel=1e-5)


def test_knowledge_distillation_is_minimal_when_new_matches_old():
    torch.manual_seed(0)
    old = torch.randn(2, 3, 4, 4)
    new = torch.cat([old, torch.randn(2, 2, 4, 4)], dim=1)
    p_old = old.softmax(1)
    entropy = -(p_old * p_old.log()).mean(1).mean()  # soft cross-entropy = entropy of the targets (KL = 0)
    assert torch.allclose(knowledge_distillation(new, old), entropy, atol=1e-6)
    assert knowledge_distillation(new + 0.5 * torch.randn_like(new), old) > entropy


def test_unbiased_distillation_by_hand():
    # one pixel: new model has background, one old class, one new class, all equally likely
    new = torch.zeros(1, 3, 1, 1)
    old = torch.zeros(1, 2, 1, 1)  # old model: background and the old class at 1/2 each
    # new model's background = p(bg) + p(new class) = 2/3; old class = 1/3; averaged over 2 old channels
    expected = -(0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3)) / 2
    assert unbiased_distillation(new, old).item() == pytest.approx(expected, rel=1e-5)


def test_unbiased_distillation_without_new_classes_is_distillation():
    torch.manual_seed(0)
    new, old = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(unbiased_distillation(new, old), knowledge_distillation(new, old), atol=1e-6)


def test_feature_distillation():
    f = torch.randn(2, 8, 4, 4)
    assert feature_distillation(f, f.clone()).item() == 0
    assert feature_distillation(f + 1, f).item() == pytest.approx(1.0)


# --- every registered method on a tiny incremental step -------------------------------------------------------

@pytest.fixture(scope="module")
def previous_model():
    torch.manual_seed(0)
    prev = SegmentationModel(CFG, [3]).eval()
    for p in prev.parameters():
        p.requires_grad_(False)
    return prev


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_an_incremental_step(name, previous_model):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    method = build_method(name)
    model = copy.deepcopy(previous_model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.add_classes(2, init=method.classifier_init)
    ctx = StepContext(step=1, task=[[1, 2, 3], [4, 5]], new_classes=[4, 5], old_classes=[1, 2, 3],
                      prev_model=previous_model if method.needs_previous_model else None)
    images = torch.randn(4, 3, 64, 64)
    targets = torch.tensor([0, 4, 5, 255])[torch.randint(0, 4, (4, 64, 64))]

    method.on_step_start(model, ctx)
    optimizer = torch.optim.SGD(method.trainable_parameters(model, ctx), lr=0.01)
    method.set_train_mode(model, ctx)
    losses = []
    for _ in range(8):
        rewritten = method.rewrite_targets(images, targets, ctx)
        loss = method.loss(model(images), rewritten, images, ctx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    frozen = method.encoder_frozen(ctx)
    assert all((p.grad is None) == frozen for p in model.encoder.parameters()), "a frozen encoder gets no gradient"
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), previous_model.encoder.parameters())) \
        or not frozen


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_at_step_zero_is_cross_entropy(name):
    torch.manual_seed(2)
    method = build_method(name)
    ctx = StepContext(step=0, task=[[1, 2, 3]], new_classes=[1, 2, 3], old_classes=[], prev_model=None)
    logits = torch.randn(2, 4, 8, 8)
    targets = torch.randint(0, 4, (2, 8, 8))
    outputs = {"out": logits, "features": torch.randn(2, 16, 1, 1), "encoder": torch.randn(2, 8, 1, 1)}
    loss = method.loss(outputs, targets, torch.randn(2, 3, 8, 8), ctx)
    assert torch.allclose(loss, F.cross_entropy(logits, targets, ignore_index=255))


@pytest.mark.parametrize("name", ["lwf", "ilt", "mib"])
def test_distillation_methods_ask_for_the_previous_model(name):
    method = build_method(name)
    assert method.needs_previous_model
    assert "kd_weight" in method.options()
