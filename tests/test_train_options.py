"""The training loop's scale options: iterations per class, the lr floor, mixed precision, the device."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from recall.distributed import device
from recall.methods import StepContext
from recall.methods.finetune import FineTuning
from recall.model import ModelConfig, SegmentationModel
from recall.train import Precision, TrainConfig, evaluate, make_optimizer, train_step


def tiny_step(cfg: TrainConfig, batches: int = 3, new_classes=(1, 2)):
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(head_channels=8), [len(new_classes)])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * batches, 3, 32, 32, generator=g),
                         torch.randint(0, len(new_classes) + 1, (4 * batches, 32, 32), generator=g))
    loader = DataLoader(data, batch_size=4)
    ctx = StepContext(step=0, task=[list(new_classes)], new_classes=list(new_classes), old_classes=[])
    return model, loader, ctx


def test_poly_schedule_decays_to_lr_end():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = make_optimizer([param], 5e-4, TrainConfig(lr_end=5e-6, poly_power=0.9), total_iters=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(5e-4) and rates[-1] == pytest.approx(5e-6)
    assert rates[5] == pytest.approx((5e-4 - 5e-6) * 0.5 ** 0.9 + 5e-6)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_iters_per_class_sets_the_step_length():
    model, loader, ctx = tiny_step(TrainConfig())
    calls = []
    method = FineTuning()
    original = method.loss
    method.loss = lambda *a: calls.append(1) or original(*a)
    # 2 new classes x 4 iterations = 8 iterations over a loader of 3 batches: passes of 3, 3 and 2
    losses = train_step(model, method, loader, ctx, TrainConfig(iters_per_class=4, epochs=100))
    assert len(calls) == 8 and len(losses) == 3


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_evaluates(amp):
    model, loader, ctx = tiny_step(TrainConfig())
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_step(model, FineTuning(), loader, ctx, TrainConfig(epochs=2, amp=amp))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32
    matrix = evaluate(model, loader, num_classes=3, amp=amp)
    assert int(matrix.mat.sum()) == 12 * 32 * 32
    assert Precision(amp, torch.device("cpu")).scaler.is_enabled() == (amp == "fp16")


def test_bad_amp_and_missing_cuda_are_named():
    with pytest.raises(ValueError, match="train.amp='fp8'"):
        Precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device=cuda: CUDA is not available"):
            device("cuda")
    assert device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
