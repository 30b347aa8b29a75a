"""Run by tests/test_distributed.py under torchrun: each rank trains the same tiny model on a *different*
shard of data through recall.train.train_step, then saves its replica's weights (the test, not the code,
writes per-rank files). DistributedDataParallel must keep the replicas' parameters identical (batch-norm
statistics are per process, as without SyncBatchNorm; rank 0's are the ones saved)."""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from recall import distributed
from recall.methods import StepContext
from recall.methods.finetune import FineTuning
from recall.model import ModelConfig, SegmentationModel
from recall.train import TrainConfig, train_step

torch.set_num_threads(1)
distributed.init_from_env()
out = Path(sys.argv[1])
torch.manual_seed(100 + distributed.rank())  # different initial weights: DDP must copy rank 0's to everyone
model = SegmentationModel(ModelConfig(head_channels=8), [3])
generator = torch.Generator().manual_seed(distributed.rank())  # different data on every rank
images = torch.randn(8, 3, 32, 32, generator=generator)
targets = torch.randint(0, 4, (8, 32, 32), generator=generator)
loader = DataLoader(TensorDataset(images, targets), batch_size=4)
ctx = StepContext(step=0, task=[[1, 2, 3]], new_classes=[1, 2, 3], old_classes=[])
cfg = TrainConfig(epochs=2, lr=0.05, amp=sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "none" else None)
losses = train_step(model, FineTuning(), loader, ctx, cfg)
torch.save({"parameters": {n: p.detach() for n, p in model.named_parameters()}, "losses": losses, "world": distributed.world_size()},
           out / f"rank{distributed.rank()}.pt")
distributed.shutdown()
