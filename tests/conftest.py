"""Shared fixtures: a tiny toy world, fast training settings, the `recall tune` world (a step-0 run and a replay
pool) and its command line, and a helper that kills a command mid-way."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# `make test` runs the suite in two pytest-xdist workers, one per core: each computes on one thread (so do the
# commands the tests start, through FAST); alone, pytest uses both cores
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)

# a few seconds of training per step on 64x64 images
FAST = ["train.epochs=1", "train.epochs_incremental=1", "train.batch_size=8", "train.eval_batch_size=16",
        "model.head_channels=16", "model.pretrained_file=null",  # the tests do not pretrain (test_pretrain does)
        f"train.threads={THREADS}"]


# `make test` (pytest-xdist, --dist loadfile --no-loadscope-reorder): each test file on one worker, so that its
# module fixtures are built once, and the slowest files sent first: longest first keeps the two workers'
# finishing times close (xdist's own order, the files with most tests first, left the slow process tests for
# last). Not --dist loadgroup: with pytest 9.2 xdist 3.8 no longer puts a group into the test ids, and every test
# of a group went to either worker, each building the module fixtures again.
SLOWEST_FIRST = ["test_cluster", "test_tune", "test_dvc_resume", "test_cli", "test_distributed", "test_corruption",
                 "test_results", "test_replay_stages", "test_stage_jobs_slurm", "test_stage_jobs", "test_mlflow_runs",
                 "test_plots",
                 "test_dvc_deps", "test_replay_method", "test_replay_memory", "test_web",
                 "test_plan_matches_run"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from recall.sim.toyworld import generate

    root = tmp_path_factory.mktemp("toy")
    generate(root, n_train=60, n_val=16, seed=3, progress=False)
    return root


TUNE_PROTOCOL = "18-1x2"  # step 0 (18 classes) from the shared step-0 run, then two incremental steps


def tune_args(tmp: Path, world: Path, step0: Path, pool: Path, *extra: str, study: str = "shared",
              storage: str = "optuna.db", tracking: str | None = None) -> list[str]:
    """`recall tune` of RECALL on the tiny world with FAST as the trial budget. ``storage``: a file name in ``tmp``
    (sqlite) or a URL; ``tracking``: the MLflow tracking URI (default: sqlite in ``tmp``)."""
    storage = storage if "://" in storage else f"sqlite:///{tmp}/{storage}"
    tracking = f"sqlite:///{tmp}/mlflow.db" if tracking is None else tracking
    return ["tune", f"dataset.root={world}", f"protocol={TUNE_PROTOCOL}", "method=recall", "replay=toy_gan",
            f"replay.pool={pool}", f"tracking.uri={tracking}", *FAST, "tune=r_tau",
            f"tune.step0={step0}", f"tune.runs_dir={tmp}/tune", f"tune.storage={storage}",
            f"tune.study={study}", "tune.trial_overrides=[]", *extra]  # FAST is the budget here


@pytest.fixture(scope="session")
def tune_world(tmp_path_factory, tiny_world) -> SimpleNamespace:
    """What every `recall tune` test starts from: a step-0 run (trained a little longer than FAST, so that old
    classes are worth keeping) and a replay pool; ``args(*extra, study=, storage=, tracking=)`` is the command."""
    from recall.cli import main
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    tmp = tmp_path_factory.mktemp("tune")
    step0 = tmp / "step0"
    assert main(["run", f"dataset.root={tiny_world}", f"protocol={TUNE_PROTOCOL}", "last_step=0",
                 f"run_dir={step0}", "tracking.uri=", *FAST, "train.epochs=6"]) == 0
    pool = tmp / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=4, root=pool, progress=False)
    return SimpleNamespace(tmp=tmp, root=tiny_world, step0=step0, pool=pool,
                           args=lambda *extra, **kw: tune_args(tmp, tiny_world, step0, pool, *extra, **kw))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a rendezvous a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
