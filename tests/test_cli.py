"""End to end through the `recall` command on a tiny toy world, with a real sqlite MLflow store."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, kill_when_written
from mlflow.tracking import MlflowClient

from recall.cli import main
from recall.errors import UserError


def _run(tmp_path: Path, world: Path, *overrides: str) -> int:
    return main(["run", f"dataset.root={world}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST, *overrides])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_protocol_command_prints_steps_and_images(tiny_world, capsys):
    assert main(["protocol", "15-1x5", f"dataset.root={tiny_world}", "setting=disjoint"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["classes"] for s in out["steps"]] == [list(range(1, 16)), [16], [17], [18], [19], [20]]
    ids = [i for s in out["steps"] for i in s["images"]]
    assert len(ids) == len(set(ids)), "disjoint steps share no image"


def test_bad_protocol_is_a_clear_error(tiny_world, capsys):
    assert main(["protocol", "15-6", f"dataset.root={tiny_world}"]) == 2
    assert "15-6" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["run", f"dataset.root={tmp_path}/nowhere", "tracking.uri=", f"run_dir={tmp_path}/run"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_run_writes_the_output_contract_and_mlflow(tmp_path, tiny_world):
    run_dir = tmp_path / "run"
    assert _run(tmp_path, tiny_world, "protocol=10-5-5", f"run_dir={run_dir}") == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "10-5-5" and metrics["method"] == "ft" and metrics["convention"] == "recall"
    assert [s["step"] for s in metrics["steps"]] == [0, 1, 2]
    assert set(metrics["final"]["miou"]) == {"all", "old", "new", "all_no_bg", "old_no_bg"}
    assert len(metrics["final"]["iou"]) == 21 and "aeroplane" in metrics["final"]["forgetting"]
    for t in range(3):
        assert (run_dir / "steps" / str(t) / "model.pt").is_file()
    rows = list(csv.DictReader((run_dir / "curve.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {"protocol", "setting", "method", "replay", "seed", "git_commit"} <= set(parent.data.tags)
    history = client.get_metric_history(parent.info.run_id, "iou/aeroplane")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert parent.data.params["train.epochs"] == "1"


def test_shared_step0_is_adopted_and_checked(tmp_path, tiny_world, capsys):
    base = tmp_path / "step0"
    assert _run(tmp_path, tiny_world, "protocol=15-5", "last_step=0", f"run_dir={base}") == 0
    assert not (base / "steps" / "1").exists()
    run_dir = tmp_path / "run"
    assert _run(tmp_path, tiny_world, "protocol=15-1x5", f"step0={base}", f"run_dir={run_dir}", "last_step=1") == 0
    assert _sha(run_dir / "steps/0/model.pt") == _sha(base / "steps/0/model.pt")
    with pytest.raises(ValueError, match="task"):
        from recall.config import compose
        from recall.experiment import run_protocol
        cfg = compose([f"dataset.root={tiny_world}", "protocol=10-10", f"step0={base}",
                       f"run_dir={tmp_path}/bad", *FAST, "tracking.uri="])
        run_protocol(cfg)
    # a step 0 of another head: one line naming the checkpoint and the head it was saved with, nothing adopted
    other = tmp_path / "other_head"
    assert _run(tmp_path, tiny_world, "protocol=15-1x5", f"step0={base}", f"run_dir={other}", "last_step=1",
                "model.head=aspp") == 2
    err = capsys.readouterr().err
    assert f"{base}/steps/0/model.pt" in err and "pass model.head=deeplabv2" in err and "Traceback" not in err
    assert not (other / "steps" / "0" / "model.pt").exists()


def test_joint_method_trains_all_classes(tmp_path, tiny_world):
    run_dir = tmp_path / "joint"
    assert _run(tmp_path, tiny_world, "protocol=joint", "method=joint", f"run_dir={run_dir}") == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["steps"]) == 1 and metrics["final"]["miou"]["new"] is None


def test_changed_config_does_not_resume_silently(tmp_path, tiny_world):
    run_dir = tmp_path / "run"
    assert _run(tmp_path, tiny_world, "protocol=15-5", "last_step=0", f"run_dir={run_dir}") == 0
    assert _run(tmp_path, tiny_world, "protocol=15-5", "last_step=0", f"run_dir={run_dir}", "train.lr=0.2") == 2


def test_killed_run_resumes_at_last_finished_step(tmp_path, tiny_world):
    """Kill a real `recall run` process after step 1's checkpoint lands; the restart keeps steps 0-1."""
    run_dir = tmp_path / "run"
    args = ["run", f"dataset.root={tiny_world}", "protocol=15-1x5", f"run_dir={run_dir}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST]
    done = run_dir / "steps" / "1" / "model.pt"
    kill_when_written(args, done, timeout=240)
    assert done.exists(), "the run did not reach step 1 before the deadline"
    assert not (run_dir / "steps" / "5" / "model.pt").exists(), "the run finished before it was killed"
    kept = {t: _sha(run_dir / "steps" / str(t) / "model.pt") for t in (0, 1)}

    assert main(args) == 0  # the restart (in this process: only the killed run has to be a process of its own)
    assert {t: _sha(run_dir / "steps" / str(t) / "model.pt") for t in (0, 1)} == kept
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [0, 1, 2, 3, 4, 5]
    assert not list(run_dir.rglob("*.tmp"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(r.data.tags["step"]) for r in children) == [0, 1, 2, 3, 4, 5], "one child run per step"
    assert len(runs) - len(children) == 1, "the restart logs into the same parent run"


def test_recall_method_runs_with_a_generated_replay_pool(tmp_path, tiny_world):
    """RECALL end to end: pool from the toy generator, label evaluation (step-0 model and a helper decoder),
    inpainting, blending; labels are cached per step group and written in the full label space."""
    import numpy as np
    from PIL import Image

    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    pool = tmp_path / "pool"
    generator = ToyGenerator(mapping=ToyGenerator().lookalike_mapping())
    build_pool(generator, {c: f"c{c}" for c in range(1, 21)}, per_class=4, root=pool, progress=False)
    run_dir = tmp_path / "recall"
    assert _run(tmp_path, tiny_world, "protocol=18-1x2", "method=recall", "replay=toy_gan", f"replay.pool={pool}",
                f"run_dir={run_dir}") == 0
    assert (run_dir / "steps/1/helper.pt").is_file(), "helper decoder of step 1 (its class is replayed at step 2)"
    labels = run_dir / "steps" / "replay_labels"
    assert (labels / "step0.done").exists() and (labels / "step1.done").exists()
    helper_labelled = sorted(labels.glob("c019_*.png"))  # class 19 was added at step 1: labelled by the helper
    assert len(helper_labelled) == 4
    for png in helper_labelled:
        assert set(np.unique(np.array(Image.open(png)))) <= {0, 19}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "recall" and metrics["method_options"]["replay_ratio"] == 0.5


def test_recall_without_a_pool_is_a_clear_error_before_anything_is_made(tmp_path, tiny_world, capsys):
    assert _run(tmp_path, tiny_world, "protocol=19-1", "method=recall", f"run_dir={tmp_path}/r") == 2
    assert "replay" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "mlflow.db").exists()  # no run dir, no MLflow run
    pool = tmp_path / "empty_pool"  # a pool directory that was never built: refused before step 0 too
    pool.mkdir()
    assert _run(tmp_path, tiny_world, "protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={pool}",
                f"run_dir={tmp_path}/r") == 2
    assert "not built" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_replay_pool_holding_a_dataset_image_is_refused(tmp_path, tiny_world):
    """Privacy at training time: a pool that (by hand editing) contains a dataset image stops the run."""
    import shutil

    from recall.replay.pool import ReplayPool, build_pool
    from recall.sim.toy_gan import ToyGenerator

    pool = tmp_path / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=2, root=pool, progress=False)
    first = ReplayPool(pool).records()[0]
    stolen = sorted((tiny_world / "JPEGImages").glob("*.jpg"))[0]
    shutil.copyfile(stolen, pool / "images" / f"{first['id']}.jpg")
    manifest = pool / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[0])
    record["sha256"] = _sha(stolen)
    record.pop("pixel_sha256", None)
    manifest.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(RuntimeError, match="privacy"):
        _run(tmp_path, tiny_world, "protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={pool}",
             f"run_dir={tmp_path}/r")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in runs if r is not parent] == ["FINISHED"]  # step 0 finished before the error
    assert parent.info.status == "FAILED", "a run that stopped with an error is not left RUNNING"
    assert parent.info.run_name == "19-1 · recall · toy_gan · seed 0"


def test_disjoint_steps_never_reread_earlier_images(tmp_path, tiny_world):
    from recall.config import compose
    from recall.experiment import ProtocolRun

    run = ProtocolRun(compose([f"dataset.root={tiny_world}", "protocol=10-5-5", "setting=disjoint",
                               f"run_dir={tmp_path}/r"]))
    classes = run.classes_of("train")
    steps_ids = [set(run.train_loader(t, torch.Generator()).dataset.ids) for t in range(3)]
    assert not (steps_ids[0] & steps_ids[1]) and not ((steps_ids[0] | steps_ids[1]) & steps_ids[2])
    with pytest.raises(RuntimeError, match="privacy"):
        run.check_no_earlier_images(classes, 1, sorted(steps_ids[0]))


@pytest.mark.slow
def test_a_toy_run_in_the_partitioned_setting(tmp_path, tiny_world):
    """Every step trains on its share of the partition (the runner's privacy check passes at each step); on this
    60-image world seed 1 gives both steps of 19-1 images, seed 0 draws none for class 20."""
    from recall.config import compose
    from recall.experiment import ProtocolRun

    assert main(["run", f"dataset.root={tiny_world}", "protocol=19-1", "setting=partitioned", "seed=1",
                 f"run_dir={tmp_path}/run", "tracking.uri=", *FAST]) == 0
    metas = [torch.load(tmp_path / "run" / "steps" / str(t) / "model.pt", map_location="cpu", weights_only=True)["meta"]
             for t in range(2)]
    assert [(m["setting"], m["seed"]) for m in metas] == [("partitioned", 1)] * 2
    empty = ProtocolRun(compose([f"dataset.root={tiny_world}", "protocol=19-1", "setting=partitioned", "seed=0",
                                 f"run_dir={tmp_path}/empty"]))
    with pytest.raises(UserError, match=r"step 1 of 19-1 \(partitioned\) has no training image.*another seed"):
        empty.train_loader(1, torch.Generator())


def test_an_unparsable_override_is_a_clear_error(capsys):
    assert main(["run", "tune.trial_overrides=[train.epochs_incremental=3]", "tracking.uri="]) == 2
    err = capsys.readouterr().err
    assert "cannot parse an override" in err and "quote" in err


@pytest.mark.parametrize("source", ["none", "folder", "memory"])
def test_classmap_of_a_source_without_generator_classes_is_a_clear_error(source, capsys):
    assert main(["classmap", f"replay={source}", "tracking.uri="]) == 2
    err = capsys.readouterr().err
    assert f"replay={source} has no class map to make" in err and "replay=toy_gan" in err
    assert "Traceback" not in err
