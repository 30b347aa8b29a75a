"""Several processes, one run: what `torchrun --nproc_per_node N -m recall run ...` needs.

torchrun starts N copies of the command with RANK / WORLD_SIZE / LOCAL_RANK in the environment. Each process
trains a DistributedDataParallel replica on its shard of every batch (gloo on CPU, nccl on GPUs); evaluation
sums the processes' confusion matrices, so the score is that of the whole validation set. Rank 0 alone writes
files (checkpoints, eval.json, labels, figures) and logs to MLflow; the others wait for it at barriers where
they read what it wrote. Without torchrun (WORLD_SIZE unset) every function here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# Rank 0 works alone between collectives for a while (label evaluation of a whole pool, diagnostics): the
# others wait longer than NCCL's default 10 minutes allow. RECALL_DIST_TIMEOUT_MINUTES changes it.
TIMEOUT_MINUTES = 180


def init_from_env(device_spec: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; True if this is a multi-process run.
    The backend follows the device the run trains on: nccl for CUDA, gloo for the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    on = device(device_spec)
    if on.type == "cuda":
        torch.cuda.set_device(on)
    minutes = float(os.environ.get("RECALL_DIST_TIMEOUT_MINUTES", TIMEOUT_MINUTES))
    dist.init_process_group("nccl" if on.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return True


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def device(spec: str = "auto") -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU; `cuda`: cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(spec)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec}: CUDA is not available on this machine; use train.device=auto or cpu")
    if chosen.type == "cuda" and chosen.index is None:  # each torchrun process its own GPU
        chosen = torch.device("cuda", local_rank())
    return chosen


_alone = 0  # > 0 inside `alone()`


def barrier() -> None:
    if active() and not _alone:
        dist.barrier()


@contextlib.contextmanager
def alone():
    """Code that rank 0 runs by itself (figures, diagnostics): the barriers inside are skipped, as the other
    processes are not there to meet them."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes, e.g., a cache or labels), the others after it (they find the
    files written). The block must therefore skip work whose result exists."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place (e.g. confusion matrices); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def per_process(total: int, what: str) -> int:
    """This process's share of a global batch: the paper's batch stays the batch, however many processes."""
    n = world_size()
    if total % n:
        raise ValueError(f"{what}={total} cannot be split over {n} processes; choose a multiple of {n}")
    return total // n


def train_sampler(data: Dataset, seed: int, drop_last: bool) -> DistributedSampler | None:
    """Each process draws a disjoint shard of a shuffle all processes agree on (None for one process)."""
    if not active():
        return None
    return DistributedSampler(data, shuffle=True, seed=seed, drop_last=drop_last)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + N, rank + 2N, ... of a dataset, without DistributedSampler's padding: every
    evaluation image is scored exactly once over all processes."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_sampler(data: Dataset) -> ShardSampler | None:
    return ShardSampler(len(data), rank(), world_size()) if active() else None


def wrap(model: nn.Module, on: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` in a multi-process run (gradients averaged across processes);
    the model itself otherwise. Call it after the method has chosen which parameters require gradients."""
    if not active():
        return model
    if on.type == "cuda":  # batch statistics over the global batch, as on one GPU (gloo has no SyncBatchNorm)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[on.index])
    return nn.parallel.DistributedDataParallel(model)
