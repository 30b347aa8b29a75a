"""Training with several processes (torchrun, DistributedDataParallel, gloo on CPU).

Two gloo processes on 2 cores: the confusion matrices they sum equal the single-process one on the same
checkpoint and data; DDP keeps the replicas identical; rank 0 alone writes checkpoints and logs to MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import FAST, free_port

from recall.config import compose
from recall.distributed import ShardSampler
from recall.experiment import ProtocolRun
from recall.metrics import ConfusionMatrix
from recall.model import load_checkpoint
from recall.train import evaluate

HERE = Path(__file__).parent


ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}  # gloo on lo


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS` on 127.0.0.1 (a free port; gloo kept on the loopback interface)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={nproc}",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=HERE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def two_nodes(args: list[str], timeout: float = 300) -> None:
    """Two `torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d ARGS` agents, as on two machines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "recall-test", *args]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                               cwd=HERE.parent, start_new_session=True) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:  # the agent and its worker
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    assert [agent.returncode for agent in agents] == [0, 0], [output[-3000:] for output in outputs]


def test_shard_sampler_scores_every_image_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.parametrize("nodes,amp", [(1, "bf16"), (2, "none")])
def test_ddp_keeps_replicas_identical(tmp_path, nodes, amp):
    """2 processes: of one torchrun, or of two torchrun agents (--nnodes 2, one process each) that meet at a c10d
    rendezvous endpoint as docs/cluster.md's two machines do (both "machines" on 127.0.0.1 here)."""
    worker = [str(HERE / "ddp_worker.py"), str(tmp_path), amp]
    if nodes == 1:
        torchrun(worker)
    else:
        two_nodes(worker)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    a, b = ranks[0]["parameters"], ranks[1]["parameters"]
    for key in a:  # started from different weights, trained on different data: DDP synchronised them
        assert torch.equal(a[key], b[key]), key
    assert ranks[0]["losses"] != ranks[1]["losses"]  # ... and each rank did see its own data
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def test_two_processes_run_a_protocol_like_one(tiny_world, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [f"dataset.root={tiny_world}", "protocol=15-5", "method=ft", f"run_dir={run_dir}",
                 f"tracking.uri=sqlite:///{db}", *FAST, "train.threads=1"]
    result = torchrun(["-m", "recall", "run", *overrides])
    assert result.stdout.count("final: ") == 1  # rank 0 alone reports

    cfg = compose([o for o in overrides if not o.startswith("tracking")])
    run = ProtocolRun(cfg)
    for step in (0, 1):  # the summed matrices of 2 processes == 1 process scoring the same checkpoint
        saved = json.loads((run.step_dir(step) / "eval.json").read_text())["confusion_matrix"]
        model, _ = load_checkpoint(run.step_dir(step) / "model.pt", run.model_cfg)
        single = evaluate(model, run.eval_loader(step), num_classes=len(saved["mat"]))
        assert int(single.mat.sum()) > 0
        assert single.mat.tolist() == saved["mat"]
        assert ConfusionMatrix.from_dict(saved).mat.sum() == single.mat.sum()
    assert not list(run_dir.rglob("*.tmp"))
    assert json.loads((run_dir / "metrics.json").read_text())["final"]["step"] == 1

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["toy"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3  # one parent + one child per step, from rank 0 only
    assert parents[0].info.status == "FINISHED"

