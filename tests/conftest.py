"""Shared fixtures: a tiny toy world and fast training settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(2)

# a few seconds of training per step on 64x64 images
FAST = ["train.epochs=1", "train.epochs_incremental=1", "train.batch_size=8", "train.eval_batch_size=16",
        "model.head_channels=16"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from recall.data.toyworld import generate

    root = tmp_path_factory.mktemp("toy")
    generate(root, n_train=60, n_val=16, seed=3, progress=False)
    return root
