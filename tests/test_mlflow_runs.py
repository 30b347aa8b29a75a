"""MLflow as its users know it: the runs table's standard columns filled (Source, Version, Dataset, Description),
the shared step-0 run named and tagged for what it is, distinct run names, and `make ui`'s address.

One tiny pipeline per module: the shared step-0 run (`last_step=0`, as DVC's step0 stage runs it), then a RECALL
run that starts from it and replays a toy-generator pool, both logging to a fresh sqlite store.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import FAST
from mlflow.tracking import MlflowClient

from recall.cli import main
from recall.provenance import content_id

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "19-1"  # step 0 (19 classes) and one incremental step: the smallest protocol with replay


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_world):
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    tmp = tmp_path_factory.mktemp("mlflow_runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    step0, run_dir, pool = tmp / "step0", tmp / "recall", tmp / "pool"
    common = ["run", f"dataset.root={tiny_world}", f"tracking.uri={uri}", *FAST, f"protocol={PROTOCOL}"]
    assert main([*common, "last_step=0", f"run_dir={step0}"]) == 0
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=2, root=pool, progress=False)
    assert main([*common, f"step0={step0}", "method=recall", "replay=toy_gan", f"replay.pool={pool}",
                 f"run_dir={run_dir}"]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.data.tags["run_dir"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    return SimpleNamespace(uri=uri, tmp=tmp, world=tiny_world, pool=pool, client=client, experiment=experiment,
                           runs=runs, step0=parents[str(step0)], recall=parents[str(run_dir)],
                           step0_dir=step0, recall_dir=run_dir)


def test_source_and_version_columns(pipeline):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    for run in (pipeline.step0, pipeline.recall):
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "recall run"
        if head:  # a git checkout (CI's is one)
            assert tags["mlflow.source.git.commit"] == head
            assert tags["git_commit"].removesuffix("-dirty") == head, "the existing tag stays"
            assert tags["mlflow.source.git.dirty"] == str(tags["git_commit"].endswith("-dirty")).lower()
    children = [r for r in pipeline.runs if r.data.tags.get("mlflow.parentRunId") == pipeline.recall.info.run_id]
    assert len(children) == 2 and all(c.data.tags["mlflow.source.name"] == "recall run" for c in children)


def test_dataset_column_holds_the_splits_and_the_pool_with_content_ids(pipeline):
    from recall.replay.pool import ReplayPool

    def inputs(run):
        return {i.dataset.name: i for i in run.inputs.dataset_inputs}

    world_id, pool_id = content_id(pipeline.world), content_id(pipeline.pool)
    recall = inputs(pipeline.recall)
    assert {name: i.tags[0].value for name, i in recall.items()} == \
        {"toy/train": "train", "toy/val": "val", "toy_gan pool": "replay"}
    assert all(i.tags[0].key == "mlflow.data.context" for i in recall.values())
    assert recall["toy/train"].dataset.digest == world_id[:36] and recall["toy_gan pool"].dataset.digest == pool_id[:36]
    assert json.loads(recall["toy/train"].dataset.source) == {"uri": str(pipeline.world)}
    profile = json.loads(recall["toy/val"].dataset.profile)
    assert profile == {"content_id": world_id, "split": "val", "images": 16}
    built = ReplayPool(pipeline.pool).summary()["total"]
    assert json.loads(recall["toy_gan pool"].dataset.profile) == {"content_id": pool_id, "images": built} and built > 0
    assert set(inputs(pipeline.step0)) == {"toy/train", "toy/val"}, "step 0 replays nothing"


def test_the_shared_step0_run_is_named_and_tagged_for_what_it_is(pipeline):
    step0, recall = pipeline.step0, pipeline.recall
    assert step0.info.run_name == "step 0 · 19 classes · overlapped · seed 0"
    assert step0.data.tags["role"] == "step0" and recall.data.tags["role"] == "protocol"
    assert recall.info.run_name == f"{PROTOCOL} · recall · toy_gan · seed 0"
    assert recall.data.tags["step0"] == str(pipeline.step0_dir)
    for tag in ("protocol", "method", "replay", "seed", "dvc.dataset", "git_commit"):
        assert tag in recall.data.tags, "the existing tags stay"
    assert recall.data.tags["dvc.replay_pool"]
    names = [r.info.run_name for r in pipeline.runs]
    assert len(names) == len(set(names)), names


def test_run_descriptions_say_what_ran_and_how_it_ended(pipeline):
    final = json.loads((pipeline.recall_dir / "metrics.json").read_text())["final"]["miou"]
    note = pipeline.recall.data.tags["mlflow.note.content"]
    assert f"{PROTOCOL} overlapped · recall" in note and "Replay: `toy_gan`" in note
    assert (f"old (no bg) {final['old_no_bg']:.3f} · new {final['new']:.3f} · all {final['all']:.3f}") in note
    assert f"`{pipeline.recall_dir / 'figures'}/`" in note and "replay_labels.png" in note
    step0_note = pipeline.step0.data.tags["mlflow.note.content"]
    assert step0_note.startswith("**Step 0**") and "new –" in step0_note


def test_the_experiment_describes_itself_and_opens_on_its_runs(pipeline):
    tags = pipeline.experiment.tags
    assert "step 0 · …" in tags["mlflow.note.content"] and "Dataset column" in tags["mlflow.note.content"]
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_prints_the_runs_table_in_the_model_training_view(pipeline, capsys, tmp_path):
    from recall.ui import main as ui

    assert ui(["--uri", pipeline.uri, "--port", "5000", "--experiment", "toy", "--print"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    url = f"http://127.0.0.1:5000/#/experiments/{pipeline.experiment.experiment_id}/runs?workflowType=machine_learning"
    assert first.startswith(url) and "'toy'" in first
    missing = tmp_path / "none.db"
    assert ui(["--uri", f"sqlite:///{missing}", "--print"]) == 0
    assert "make demo" in capsys.readouterr().out and not missing.exists(), "read-only: never creates a store"


def test_dvc_stage_is_the_source_under_dvc_repro(monkeypatch, tmp_path):
    from recall.tracking import source_tags

    monkeypatch.setenv("DVC_STAGE", "step0@15-overlapped")  # what `dvc repro` sets for a stage's command
    assert source_tags("recall run")["mlflow.source.name"] == "dvc.yaml:step0@15-overlapped"
    monkeypatch.chdir(tmp_path)  # a stage of the study's DVC project, whose commands run at the top
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "study"))
    monkeypatch.setenv("DVC_STAGE", "run@pretrained_15-5_mib_s0")
    assert source_tags("recall run")["mlflow.source.name"] == "study/dvc.yaml:run@pretrained_15-5_mib_s0"
    monkeypatch.delenv("DVC_STAGE")
    assert source_tags("recall tune")["mlflow.source.name"] == "recall tune"


def test_every_stage_of_the_demo_has_a_run_name_of_its_own():
    """The run names of the real dvc.yaml's run stages (`python -m recall.stages.run`, DVC resolves its foreach),
    composed as the stages compose them."""
    from dvc.repo import Repo

    from recall.config import compose
    from recall.experiment import run_name

    names = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            args = shlex.split(stage.cmd or "")
            if Path(stage.path) != ROOT / "dvc.yaml":  # the demo's, not the study's or the tuner's
                continue
            if args[:3] != ["python", "-m", "recall.stages.run"]:
                continue
            overrides = [a for a in args[3:] if "=" in a]
            names[stage.addressing] = run_name(compose(overrides, params_file=ROOT / "params.yaml"))
    assert names["step0@15-overlapped"] == "step 0 · 15 classes · overlapped · seed 0"
    assert names["run@15-5_ft"] == "15-5 · ft · seed 0"
    pipeline = yaml.safe_load((ROOT / "params.yaml").read_text())["pipeline"]
    expected = len(pipeline["step0"]) + len(pipeline["runs"]) + len(pipeline["replay_runs"]) + 1  # + joint
    assert len(names) == expected and len(set(names.values())) == len(names), names


def test_an_interrupted_runs_description_says_how_it_ended():
    from recall.tracking import run_note

    tags = {"protocol": "15-1x5", "setting": "overlapped", "method": "mib", "replay": "none", "seed": "1",
            "dataset": "toy", "role": "protocol"}
    note = run_note(tags, {"step": 2, "miou": {"old_no_bg": 0.5, "new": 0.25, "all": None}}, "FAILED", Path("runs/r"))
    assert "mIoU of the last finished step (step 2): old (no bg) 0.500 · new 0.250 · all –" in note
    assert "Ended FAILED" in note and "resumes" in note and "Figures" not in note


def test_a_run_resumed_against_another_store_is_logged_there_afresh(pipeline, tmp_path, capsys):
    """The MLflow run recorded in a run directory is not in the store of the resumed command (tracking.uri changed,
    or the database was removed): the run is logged as a new MLflow run there, its finished steps included, with
    one line saying so (no traceback)."""
    import shutil

    run_dir = tmp_path / "step0"
    shutil.copytree(pipeline.step0_dir, run_dir)
    recorded = json.loads((run_dir / "steps" / "mlflow_run.json").read_text())["run_id"]
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["run", f"dataset.root={pipeline.world}", f"tracking.uri={uri}", *FAST, f"protocol={PROTOCOL}",
                 "last_step=0", f"run_dir={run_dir}"]) == 0
    err = capsys.readouterr().err
    assert f"the MLflow run {recorded}" in err and "logged as a new MLflow run" in err and "Traceback" not in err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert child.data.tags["step"] == "0" and parent.info.status == "FINISHED"
    assert parent.data.metrics == pipeline.step0.data.metrics
    saved = json.loads((run_dir / "steps" / "mlflow_run.json").read_text())
    assert saved["run_id"] == parent.info.run_id and saved["tracking_uri"] == uri


def test_a_sqlite_stores_artifacts_sit_beside_it_whatever_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    from recall.tracking import StageTracker
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "note.txt").write_text("a file the run logs")
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    run_id = StageTracker(f"sqlite:///{store}", "toy").log("classmap · toy_gan", "classmap", "recall classmap",
                                                          {"k": 1}, {"m": 0.5}, [tmp_path / "note.txt"])
    run = MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run_id)
    assert Path(run.info.artifact_uri).is_relative_to(store.parent / "mlruns")
    assert (Path(run.info.artifact_uri) / "note.txt").read_text() == "a file the run logs"
    assert list(elsewhere.iterdir()) == []  # MLflow's default would have made ./mlruns here
