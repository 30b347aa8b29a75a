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

    prepared = method.prepare(model, ctx)
    optimizer = torch.optim.SGD(prepared.parameters, lr=0.01)
    prepared.train_mode(model)
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
    frozen = prepared.frozen_encoder
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


# --- temperature != 1, against a pixel-by-pixel computation in float64 -------------------------------------------

def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _pixels(logits: torch.Tensor) -> list[list[float]]:
    """The logit vectors of every pixel of a [B, C, H, W] tensor, as float lists."""
    return logits.double().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).tolist()


def unbiased_distillation_by_hand(new: torch.Tensor, old: torch.Tensor, temperature: float) -> float:
    """MiB's UnbiasedKnowledgeDistillationLoss with alpha = 1 / temperature: the old model's softmax of
    logits / T against the new model's probabilities, whose background takes the new classes' share."""
    n_old, total = old.shape[1], 0.0
    for q, p in zip(map(_softmax, _pixels(new)), (_softmax([v / temperature for v in o]) for o in _pixels(old))):
        q_bg = q[0] + sum(q[n_old:])
        total += (p[0] * math.log(q_bg) + sum(p[k] * math.log(q[k]) for k in range(1, n_old))) / n_old
    return -total / len(_pixels(new))


def distillation_by_hand(new: torch.Tensor, old: torch.Tensor, temperature: float) -> float:
    """LwF/ILT (MiB's KnowledgeDistillationLoss): soft cross-entropy of softmax(old / T) against the new model's
    softmax over the old channels, averaged over channels and pixels."""
    n_old, total = old.shape[1], 0.0
    for q, o in zip(_pixels(new), _pixels(old)):
        log_q = [math.log(v) for v in _softmax(q[:n_old])]
        p = _softmax([v / temperature for v in o])
        total += sum(pk * lq for pk, lq in zip(p, log_q)) / n_old
    return -total / len(_pixels(new))


def _distillation_case() -> tuple[torch.Tensor, torch.Tensor]:
    """New logits (background, 2 old classes, 2 new ones) and the old model's (background, 2 old classes)."""
    gen = torch.Generator().manual_seed(3)
    return 2 * torch.randn(2, 5, 3, 3, generator=gen), 3 * torch.randn(2, 3, 3, 3, generator=gen)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
def test_distillation_losses_divide_the_old_logits_by_the_temperature(temperature):
    new, old = _distillation_case()
    assert unbiased_distillation(new, old, temperature).item() == \
        pytest.approx(unbiased_distillation_by_hand(new, old, temperature), rel=1e-5)
    assert knowledge_distillation(new, old, temperature).item() == \
        pytest.approx(distillation_by_hand(new, old, temperature), rel=1e-5)


class _Fixed(torch.nn.Module):
    """A previous model with the same outputs whatever the images."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, images):
        return {"out": self.out}


@pytest.mark.parametrize("name, by_hand", [("mib", unbiased_distillation_by_hand), ("lwf", distillation_by_hand)])
def test_the_methods_pass_their_temperature_to_the_distillation(name, by_hand):
    """MiB / LwF built with temperature 2 and kd_weight 1: loss - its cross-entropy term = the distillation at T=2."""
    new, old = _distillation_case()
    targets = torch.randint(0, 5, (2, 3, 3), generator=torch.Generator().manual_seed(4))
    ctx = StepContext(step=1, task=[[1, 2], [3, 4]], new_classes=[3, 4], old_classes=[1, 2], prev_model=_Fixed(old))
    method = build_method(name, kd_weight=1.0, temperature=2.0)
    cross_entropy = unbiased_cross_entropy(new, targets, num_old=2) if name == "mib" else \
        F.cross_entropy(new, targets, ignore_index=255)
    loss = method.loss({"out": new}, targets, torch.zeros(2, 3, 3, 3), ctx)
    assert (loss - cross_entropy).item() == pytest.approx(by_hand(new, old, 2.0), rel=1e-5)


def _method_conf(name: str) -> dict:
    """conf/method/<name>.yaml, the home of a method's defaults."""
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "method" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_code_defaults_are_the_config_defaults(name):
    """One home per default: what `build_method(name)` does without options is what conf/method/<name>.yaml says."""
    import inspect

    conf = _method_conf(name)
    defaults = {k: p.default for k, p in inspect.signature(METHODS[name]).parameters.items()}
    assert {k: v for k, v in conf.items() if k != "name"} == defaults


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_passes_its_base_options_on(name):
    method = build_method(name, freeze_encoder=True, classifier_init="background")
    assert (method.freeze_encoder, method.classifier_init) == (True, "background")
    assert method.options()["freeze_encoder"] is True


def test_the_encoder_is_frozen_only_in_incremental_steps_and_only_when_asked(previous_model):
    ctx = lambda step: StepContext(step=step, task=[[1, 2, 3], [4, 5]], new_classes=[], old_classes=[])  # noqa: E731
    frozen, free = build_method("ft", freeze_encoder=True), build_method("ft")
    assert [frozen.prepare(previous_model, ctx(s)).frozen_encoder for s in (0, 1, 2)] == [False, True, True]
    assert [free.prepare(previous_model, ctx(s)).frozen_encoder for s in (0, 1)] == [False, False]
    decoder = {id(p) for p in previous_model.decoder_parameters()}
    prepared = frozen.prepare(previous_model, ctx(1))
    assert {id(p) for p in prepared.parameters} == decoder
    assert not any(p.requires_grad for p in previous_model.encoder.parameters())  # no gradient: half the backward
    prepared.train_mode(previous_model)
    assert previous_model.training and not previous_model.encoder.training  # its batch-norm statistics stay
    assert len(frozen.prepare(previous_model, ctx(0)).parameters) == len(list(previous_model.parameters()))
    assert all(p.requires_grad for p in previous_model.encoder.parameters())
    previous_model.requires_grad_(False).eval()  # as the fixture made it


def test_options_leave_out_private_state():
    method = build_method("ft")
    method._cache = "internal"
    assert method.options() == {"freeze_encoder": False, "classifier_init": "random"}


def test_ilt_adds_its_weighted_feature_distillation(previous_model):
    from recall.methods.distillation import feature_distillation

    torch.manual_seed(3)
    model = copy.deepcopy(previous_model)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the features now differ from the old model's
    images = torch.randn(2, 3, 64, 64)
    targets = torch.randint(0, 4, (2, 64, 64))
    ctx = StepContext(step=1, task=[[1, 2, 3], [4]], new_classes=[4], old_classes=[1, 2, 3], prev_model=previous_model)
    outputs = model(images)
    features = feature_distillation(outputs["encoder"], previous_model(images)["encoder"])
    base = build_method("ilt", de_weight=0.0).loss(outputs, targets, images, ctx)
    for weight in (1.0, 3.0):
        with_features = build_method("ilt", de_weight=weight).loss(outputs, targets, images, ctx)
        assert with_features.item() == pytest.approx(base.item() + weight * features.item(), rel=1e-5)


def test_an_unknown_method_or_option_is_named_with_the_valid_ones():
    import re

    from recall.errors import UserError

    with pytest.raises(UserError, match="^" + re.escape("unknown method 'mibb'; available: " + ", ".join(sorted(METHODS)))):
        build_method("mibb")
    with pytest.raises(UserError, match=re.escape("; its options: kd_weight, temperature, freeze_encoder, classifier_init")):
        build_method("mib", kd=1.0)


@pytest.mark.parametrize("option, value, message", [
    ("labels", "gt", "method.labels='gt': expected one of evaluated, oracle"),
    ("label_space", "both", "method.label_space='both': all (the argmax over every output of the labelling model, "
                            "as the authors' code) or class (restricted to background and the image's class)"),
    ("replay_ratio", 1.0, "method.replay_ratio=1.0: must be in [0, 1) (share of replay samples per batch)"),
    ("replay_ratio", -0.1, "method.replay_ratio=-0.1: must be in [0, 1) (share of replay samples per batch)"),
    ("min_labelled", 1.0, "method.min_labelled=1.0: must be in [0, 1) (share of an image's pixels)"),
    ("helper_init", "head", "method.helper_init='head': random (the authors') or step0 (the step-0 head)"),
    ("helper_lr_factor", 0.0, "method.helper_lr_factor=0.0: must be > 0"),
])
def test_replay_options_out_of_range_are_named(option, value, message):
    import re

    from recall.errors import UserError

    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        build_method("recall", **{option: value})


def test_replay_options_are_kept_as_given():
    method = build_method("recall", replay_ratio=0.25, label_threshold=0.7, min_labelled=0.1, labels="oracle",
                          label_space="class", freeze_encoder=False)
    assert {k: method.options()[k] for k in ("replay_ratio", "label_threshold", "min_labelled", "labels",
                                             "label_space", "freeze_encoder")} == {
        "replay_ratio": 0.25, "label_threshold": 0.7, "min_labelled": 0.1, "labels": "oracle",
        "label_space": "class", "freeze_encoder": False}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_built_without_options_holds_the_config_defaults(name):
    """The same as the signature check, by behaviour: what the built object holds, not what its signature says."""
    conf = _method_conf(name)
    options = build_method(name).options()
    assert {k: options[k] for k in conf if k != "name"} == {k: v for k, v in conf.items() if k != "name"}
