"""Wiring tests: what the real loop and the real run hand to the model, on hand-made data small enough to count by
hand. Each test pins a behaviour that a one-line bug in the wiring would change while every unit test of the
pieces still passes (docs/testing.md lists the bugs and the test that catches each).

The hand-made world (tests/hand_world.py) has 4 classes, 16x16 training images, 8x8 validation images and a replay
pool of 16x16 images whose evaluated labels are written by hand. Spies wrap a real method's hooks (they record,
then call the real hook); the only stand-ins are models with fixed outputs, so that the numbers can be worked out
by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hand_world import (POOL_SHARES, SIDE, VAL, labelled_pixels, make_world, protocol_run, replay_run, save_step0,
                        spy)
from recall.data.classes import IGNORE_INDEX, PADDING
from recall.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from recall.errors import Diverged
from recall.methods import StepContext, build_method
from recall.model import ModelConfig, SegmentationModel
from recall.train import TrainConfig, make_optimizer, train_one_epoch, train_step


# --------------------------------------------------------------------------------------------- stand-ins
class FixedLogits(nn.Module):
    """A previous model whose logits are the same hand-made [1, C, H, W] tensor for every image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.logits.expand(len(images), -1, -1, -1)}


class ColourModel(nn.Module):
    """A fixed 'model': the prediction of VAL image i, found from the image's colour, as one-hot logits."""

    def __init__(self, num_outputs: int):
        super().__init__()
        self.num_outputs = num_outputs
        self.predictions = torch.stack([torch.from_numpy(pred).long() for _, pred in VAL.values()])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        red = images[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
        index = torch.round((red - 40) / 50).long()
        one_hot = nn.functional.one_hot(self.predictions[index], self.num_outputs)
        return {"out": one_hot.permute(0, 3, 1, 2).float()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    return make_world(tmp_path_factory.mktemp("hand_world"))


# --------------------------------------------------------------------------------------------- RECALL's targets
# Columns of the hand-made step (two each): the current ground truth, the previous model's logits over
# (background, class 1, class 2), and the target the step must train on with tau = 0.5.
COLUMNS = [
    (0, (0.0, 6.0, 0.0), 1),  # background, previous model confident of class 1: inpainted
    (0, (0.0, 0.0, 6.0), 2),  # ... of class 2
    (0, (-1000.0, 0.0, 0.0), 1),  # confidence exactly tau (0.5 for class 1): "at least tau", inpainted
    (0, (0.0, 0.5, 0.0), 0),  # class 1 at 0.45 < tau: stays background
    (0, (6.0, 0.0, 0.0), 0),  # the previous model says background
    (3, (0.0, 6.0, 0.0), 3),  # the current class is never rewritten
    (IGNORE_INDEX, (0.0, 0.0, 6.0), 2),  # the image's own void: inpainted (inpaint_ignore, the authors')
    (PADDING, (0.0, 6.0, 0.0), IGNORE_INDEX),  # crop padding: never inpainted, never trained on
]


def recall_step_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [2, 16, 16], previous logits [1, 3, 16, 16], expected trained-on targets [2, 16, 16])."""
    columns = [c for c in COLUMNS for _ in range(2)]
    row = lambda values: torch.tensor(values).expand(SIDE, -1)  # noqa: E731
    targets = row([t for t, _, _ in columns]).expand(2, -1, -1).long()
    logits = torch.stack([row([lg[k] for _, lg, _ in columns]) for k in range(3)]).float()[None]
    expected = row([e for _, _, e in columns]).expand(2, -1, -1).long()
    return targets, logits, expected


@pytest.mark.parametrize("inpaint_padding", [False, True])
def test_a_recall_step_trains_on_inpainted_targets_where_the_previous_model_is_confident(inpaint_padding):
    """The real loop (train_step) with RECALL at tau = 0.5: the targets the loss receives hold the previous
    model's class on background and void pixels where its confidence is at least tau (one column exactly at tau),
    keep the current class, and ignore crop padding; inpaint_padding=True (the ablation) inpaints padding too."""
    targets, logits, expected = recall_step_inputs()
    assert logits.softmax(1).max(1).values[0, 0, 4] == 0.5, "the threshold column sits exactly on tau"
    if inpaint_padding:
        expected = torch.where(expected == IGNORE_INDEX, 1, expected)  # the padding columns take class 1 too
    method = build_method("recall", replay_ratio=0.0, inpaint_threshold=0.5, inpaint_padding=inpaint_padding)
    trained_on = spy(method, "loss")
    ctx = StepContext(step=1, task=[[1, 2], [3]], new_classes=[3], old_classes=[1, 2],
                      prev_model=FixedLogits(logits), setting="overlapped")
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(head_channels=16), [2, 1])
    loader = DataLoader(TensorDataset(torch.randn(2, 3, SIDE, SIDE), targets), batch_size=2)
    train_step(model, method, loader, ctx, TrainConfig(batch_size=2, epochs_incremental=1, device="cpu"))
    assert len(trained_on) == 1
    assert torch.equal(trained_on[0][1], expected)


# --------------------------------------------------------------------------------------------- the replay stream
def test_each_training_batch_of_a_recall_step_holds_the_configured_replay_samples(world, tmp_path):
    """ProtocolRun.train at step 1 with a batch of 4 and replay_ratio 0.75: every batch the loss sees holds 1 image
    of the step (what rewrite_targets sees) and 3 replay samples, whose targets are the pool's evaluated labels."""
    run = replay_run(world, tmp_path, "method.replay_ratio=0.75")
    current = spy(run.method, "rewrite_targets")
    blended = spy(run.method, "loss")
    run.train(1, run.plan()[1])
    assert [len(images) for images, _, _ in current] == [1, 1, 1]  # t2, t3, t4: the images of classes 3 and 4
    replay = [targets[len(images):] for (_, targets, *_), (images, *_) in zip(blended, current)]
    assert [len(r) for r in replay] == [3, 3, 3]
    expected = {round(s * SIDE * SIDE) for shares in POOL_SHARES.values() for s in shares}
    assert all(set(labelled_pixels(r)) <= expected and set(torch.unique(r).tolist()) <= {0, 1, 2} for r in replay)


@pytest.mark.parametrize("min_labelled, kept", [(0.0, {0, 64, 96, 128, 192}), (0.25, {64, 96, 128, 192}),
                                                (0.5, {128, 192})])
def test_min_labelled_drops_exactly_the_replay_images_below_the_share(world, tmp_path, min_labelled, kept):
    """The replay stream of a step (one sample a batch) holds exactly the pool images whose evaluated label covers
    at least `min_labelled` of the image: a share equal to it is kept (0.25 = 64 of 256 pixels, 0.5 = 128)."""
    run = replay_run(world, tmp_path, "method.replay_ratio=0.25", f"method.min_labelled={min_labelled}")
    stream = run.method.stream(run).batches(1, torch.Generator().manual_seed(0))
    seen = [n for _ in range(25) for n in labelled_pixels(next(stream)[1])]  # 5 passes over the kept images
    assert set(seen) == kept


# --------------------------------------------------------------------------------------------- evaluation
EXPECTED_IOU = {  # after step 0 of 2-1-1; worked out from VAL by hand (rows: ground truth, columns: prediction)
    # every image; future pixels ignored: bg row [96, 32, 16], class-1 row [0, 64, 0]; class 2 predicted but absent: 0
    "recall": {"0": 2 / 3, "1": 2 / 3, "2": 0.0},
    # images a and c only (a seen class); future ignored: bg row [32, 0, 16], class 1 [0, 64, 0]; absent: None
    "mib": {"0": 2 / 3, "1": 1.0, "2": None},
    # images a and c; c's future class 3 is background: bg row [32, 16, 16], class 1 [0, 64, 0]; absent: None
    "plop": {"0": 0.5, "1": 0.8, "2": None},
}


@pytest.mark.parametrize("convention", sorted(EXPECTED_IOU))
def test_evaluation_gives_the_numbers_each_convention_defines(world, tmp_path, monkeypatch, convention):
    """ProtocolRun.evaluate under eval.convention: which images are scored, what a future class counts as, and
    what a class that is predicted but absent scores, on four hand-made validation images."""
    monkeypatch.setattr("recall.experiment.load_checkpoint", lambda path, cfg: (ColourModel(3), {}))
    run = protocol_run(world, tmp_path, "protocol=2-1-1", f"eval.convention={convention}")
    iou = run.evaluate(0, [])["iou"]
    expected = EXPECTED_IOU[convention]
    assert iou.keys() == expected.keys()
    for name, value in expected.items():
        assert iou[name] == (None if value is None else pytest.approx(value)), name


# --------------------------------------------------------------------------------------------- classifier init
def splits_background(model: SegmentationModel, prev: SegmentationModel, new: int) -> bool:
    """Whether the new classes start as MiB's init makes them: each as likely as background, and background plus
    the new classes as likely as background was before."""
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = prev(x)["out"].softmax(1)[:, 0], model.eval()(x)["out"].softmax(1)
    return torch.allclose(after[:, 0] + after[:, -new:].sum(1), before, atol=1e-5) and \
        all(torch.allclose(after[:, -k], after[:, 0], atol=1e-5) for k in range(1, new + 1))


@pytest.mark.parametrize("method, background_aware", [("mib", True), ("ft", False), ("lwf", False)])
def test_the_method_s_classifier_init_reaches_the_next_step_s_model(world, tmp_path, method, background_aware):
    """ProtocolRun.model_for(1) grows the classifier with the configured method's init: MiB's new classes split the
    background's probability; the others start at random."""
    run = protocol_run(world, tmp_path, "protocol=2-2", f"method={method}")
    save_step0(run)
    model, prev = run.model_for(1)
    assert splits_background(model, prev, new=2) == background_aware


def test_mib_s_own_default_init_is_background_aware(world, tmp_path):
    """MiB built without a classifier_init option (its class default) still starts new classes from background."""
    run = protocol_run(world, tmp_path, "protocol=2-2", "method=mib")
    run.method = build_method("mib")
    assert run.method.classifier_init == "background"
    save_step0(run)
    model, prev = run.model_for(1)
    assert splits_background(model, prev, new=2)


# ------------------------------------------------------------------------------------------------- step results
def test_a_step_result_scores_old_and_new_classes_by_the_steps_that_brought_them(world, tmp_path):
    """ProtocolRun.result of 2-1-1 at step 2 on a hand-made confusion matrix: old = background and step 0's
    classes, new = the classes of steps 1 and 2 (not step 2's alone), forgetting from the best earlier IoU."""
    import numpy as np

    from recall.metrics import ConfusionMatrix

    run = protocol_run(world, tmp_path, "protocol=2-1-1")
    assert run.task == [[1, 2], [3], [4]]
    matrix = ConfusionMatrix(5)
    matrix.mat[:] = torch.tensor([[4, 0, 0, 0, 0],   # rows: ground truth; IoU 1, 3/4, 2/3, 1/2, 4/5
                                  [0, 3, 1, 0, 0],
                                  [0, 0, 2, 0, 0],
                                  [0, 0, 0, 1, 1],
                                  [0, 0, 0, 0, 4]])
    iou = {0: 1.0, 1: 3 / 4, 2: 2 / 3, 3: 1 / 2, 4: 4 / 5}
    history = [np.array([1.0, 0.9, 0.5]), np.array([1.0, 0.8, 0.7, 0.6])]
    result = run.result(2, matrix, history)
    mean = lambda classes: pytest.approx(sum(iou[c] for c in classes) / len(classes))  # noqa: E731
    assert result["miou"] == {"all": mean([0, 1, 2, 3, 4]), "all_no_bg": mean([1, 2, 3, 4]), "old": mean([0, 1, 2]),
                              "old_no_bg": mean([1, 2]), "new": mean([3, 4])}
    assert result["new_classes"] == [run.class_names[4]]
    names = run.class_names
    assert result["forgetting"][names[1]] == pytest.approx(0.9 - 3 / 4)  # the best earlier IoU, not the first
    assert result["forgetting"][names[3]] == pytest.approx(0.6 - 1 / 2)
    assert result["forgetting"].get(names[4]) is None  # learnt at this step: nothing to forget yet
    assert run.result(1, ConfusionMatrix.from_dict(ConfusionMatrix(4).to_dict()), history[:1])["miou"]["new"] is None
    assert ConfusionMatrix.from_dict(result["confusion_matrix"]).mat.tolist() == matrix.mat.tolist()


# ------------------------------------------------------------------------------------------------- the loaders
@pytest.mark.parametrize("convention, border", [("recall", 0), ("mib", 0), ("plop", IGNORE_INDEX)])
def test_the_training_targets_map_the_void_border_as_the_convention_says(world, tmp_path, convention, border):
    """eval.convention's border_in_training reaches the step's label map (incremental and joint): the dataset's
    255 border becomes background (RECALL, MiB) or stays ignored (PLOP)."""
    for method in ("ft", "joint"):
        run = protocol_run(world, tmp_path / method, "protocol=2-2", f"method={method}",
                           f"eval.convention={convention}")
        lut = run.train_loader(1, torch.Generator()).dataset.label_map
        assert lut[IGNORE_INDEX] == border and lut[3] == 3, method


def test_the_training_loader_shuffles_with_the_run_s_generator(world, tmp_path):
    """A step's images come in an order drawn from the generator it is given: the same seed, the same order; other
    seeds, other orders (not the dataset's)."""
    run = protocol_run(world, tmp_path, "protocol=2-2")
    order = lambda seed: list(run.train_loader(1, torch.Generator().manual_seed(seed)).sampler)  # noqa: E731
    orders = [order(seed) for seed in range(10)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert order(3) == orders[3] and len({tuple(o) for o in orders}) > 1


def test_the_loaders_take_the_configured_workers(world, tmp_path):
    run = protocol_run(world, tmp_path, "protocol=2-2", "train.num_workers=2")
    assert run.train_loader(1, torch.Generator()).num_workers == 2 and run.eval_loader(1).num_workers == 2


def test_one_epoch_called_alone_trains_the_model_itself_in_full_precision():
    """train_one_epoch without `net` or `precision` (as a method's own loop may call it): the model itself runs
    the forward pass in fp32 on the CPU, one optimiser step per batch, and the mean loss per image comes back."""
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(head_channels=16), [3])
    method = build_method("ft")
    ctx = StepContext(step=0, task=[[1, 2]], new_classes=[1, 2], old_classes=[], prev_model=None,
                      setting="overlapped")
    targets = torch.randint(0, 3, (4, SIDE, SIDE))
    loader = DataLoader(TensorDataset(torch.randn(4, 3, SIDE, SIDE), targets), batch_size=2)
    optimizer, scheduler = make_optimizer(list(model.parameters()), 0.01, TrainConfig(), total_iters=2)
    losses = spy(method, "loss")
    before = [p.detach().clone() for p in model.parameters()]
    mean = train_one_epoch(model, method, loader, optimizer, scheduler, ctx)
    assert len(losses) == 2 and all(outputs["out"].dtype == torch.float32 for outputs, *_ in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(mean, float) and mean > 0


def test_one_epoch_alone_prepares_the_step_stops_after_its_iterations_and_names_the_step_it_diverged_in():
    """train_one_epoch without `prepared`: the method's `prepare` sees the step (a frozen encoder stays in eval mode
    after step 0); with `iterations` it stops after that many batches (a budget in iterations: a partial pass); a
    gradient that is not finite stops it with the error that names the step."""
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(head_channels=16), [1, 2])
    method = build_method("ft", freeze_encoder=True)
    ctx = StepContext(step=1, task=[[1], [2, 3]], new_classes=[2, 3], old_classes=[1], prev_model=None,
                      setting="overlapped")
    loader = DataLoader(TensorDataset(torch.randn(6, 3, SIDE, SIDE), torch.randint(0, 4, (6, SIDE, SIDE))),
                        batch_size=2)  # three batches
    optimizer, scheduler = make_optimizer(list(model.decoder_parameters()), 0.01, TrainConfig(), total_iters=3)
    losses = spy(method, "loss")
    train_one_epoch(model, method, loader, optimizer, scheduler, ctx, iterations=1)
    assert len(losses) == 1 and scheduler.last_epoch == 1
    assert model.training and not model.encoder.training

    class GradientNaN(type(method)):
        """A finite loss whose gradient is not: sqrt at 0 (its derivative there is infinite, times 0)."""

        def loss(self, outputs, targets, images, ctx):
            return super().loss(outputs, targets, images, ctx) + torch.sqrt((outputs["out"].sum() * 0).abs())

    with pytest.raises(Diverged, match=r"^step 1 pass, batch 1: a gradient is not finite .* nothing of step 1 was "
                                       r"saved"):
        train_one_epoch(model, GradientNaN(freeze_encoder=True), loader, optimizer, scheduler, ctx,
                        desc="step 1 pass")


@pytest.mark.parametrize("method, keeps_previous", [("ft", False), ("mib", True)])
def test_a_step_s_context_names_the_classes_before_it_and_now(world, tmp_path, method, keeps_previous):
    """What a method's hooks are told at step 2 of 2-1-1: the classes learnt before (for a method's own use: no
    built-in one reads them), the step's new ones, and the previous model only if the method asks for it."""
    run = protocol_run(world, tmp_path, "protocol=2-1-1", f"method={method}")
    prev = SegmentationModel(ModelConfig(head_channels=16), [2, 1])
    ctx = run.context(2, prev)
    assert (ctx.step, ctx.task, ctx.old_classes, ctx.new_classes) == (2, [[1, 2], [3], [4]], [1, 2, 3], [4])
    assert (ctx.prev_model is prev) == keeps_previous and ctx.setting == "overlapped"
