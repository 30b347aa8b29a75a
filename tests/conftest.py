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
    from recall.sim.toyworld import generate

    root = tmp_path_factory.mktemp("toy")
    generate(root, n_train=60, n_val=16, seed=3, progress=False)
    return root


def kill_when_written(args: list[str], path: Path, timeout: float, module: str = "recall.cli",
                      cwd: Path | None = None, env: dict | None = None) -> int:
    """Run `python -m MODULE ARGS` (default: the `recall` command; `module="dvc"` for `dvc repro`) in its own
    process group and SIGKILL the whole group (its children too) as soon as ``path`` exists (or the process ended,
    or ``timeout`` seconds passed): a run killed mid-way, as by `kill -9`. Returns the killed process's pid."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd, env=env)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.pid
