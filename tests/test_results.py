"""What a researcher looks at after the demo: MLflow holds one parent per protocol run with a child per step and
per-class IoU series of the right length; each run's figures decode and show something; the notebook runs top
to bottom. With the demo's outputs present (`make demo` first) the checks run on them, otherwise on a small
pipeline built here that logs every kind of run the pipeline and `recall tune` log: the pretraining, a class map, a
shared step 0, protocol runs (ft, RECALL with toy-GAN replay, RECALL with Flickr-stand-in replay), joint, and a tune
study with its trial."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, tune_args
from mlflow.tracking import MlflowClient
from PIL import Image

from recall.cli import main
from recall.config import default_params

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("miou_curves.png", "class_iou.png", "forgetting.png", "predictions.png")


def _demo_outputs() -> tuple[str, list[Path]] | None:
    pipeline = default_params()["pipeline"]
    runs = [ROOT / "runs" / k for k in [*pipeline["runs"], *pipeline["replay_runs"], "joint"]]
    if (ROOT / "mlflow.db").is_file() and all((r / "metrics.json").is_file() for r in runs):
        return f"sqlite:///{ROOT / 'mlflow.db'}", runs
    return None


ROLES = {"pretrain", "classmap", "step0", "protocol", "study", "trial"}  # every kind of run the store holds


def _small_pipeline(tmp: Path, world: Path) -> tuple[str, list[Path]]:
    """The demo's stages in small, all logging to one store: pretraining, a class map made with its classifier, the
    toy-GAN and web pools, a shared step 0, three protocol runs from it, joint, and a tune study of one trial. (The
    toy-GAN pool maps each class to its look-alike: a classifier pretrained for one epoch maps too few.)"""
    from recall.sim.toy_gan import ToyGenerator

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    data, track = f"dataset.root={world}", f"tracking.uri={uri}"
    pretrained, mapping = tmp / "pretrain", tmp / "toy_gan_mapping.json"
    assert main(["pretrain", str(pretrained), "pretrain.train_per_class=2", "pretrain.val_per_class=1",
                 "pretrain.size=32", "pretrain.epochs=1", "pretrain.workers=1", track]) == 0
    assert main(["classmap", data, "replay=toy_gan", f"replay.mapping={tmp / 'classmap.json'}",
                 f"replay.classifier.weights={pretrained}/classifier.pth",
                 f"replay.classifier.names={pretrained}/classes.json", track]) == 0
    mapping.write_text(json.dumps({str(c): s for c, s in ToyGenerator().lookalike_mapping().items()}))
    gan = ["replay=toy_gan", f"replay.mapping={mapping}", f"replay.pool={tmp / 'pool_gan'}"]
    web = ["replay=web", f"replay.pool={tmp / 'pool_web'}"]
    for pool in (gan, web):
        assert main(["pool", data, *pool, "replay.per_class=4"]) == 0
    common = ["run", data, track, *FAST, "protocol=18-1x2"]
    assert main([*common, "last_step=0", f"run_dir={tmp / 'step0'}"]) == 0
    runs = {"ft": ["method=ft"], "recall_gan": ["method=recall", *gan], "recall_web": ["method=recall", *web]}
    for name, overrides in runs.items():
        assert main([*common, f"step0={tmp / 'step0'}", f"run_dir={tmp / name}", *overrides]) == 0
    assert main(["run", data, track, *FAST, "protocol=joint", "method=joint", f"run_dir={tmp / 'joint'}"]) == 0
    assert main(tune_args(tmp, world, tmp / "step0", tmp / "pool_gan", "tune.n_trials=1", *gan[1:2],
                          tracking=uri)) == 0
    return uri, [tmp / name for name in [*runs, "joint"]]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_world) -> tuple[str, list[Path]]:
    return _demo_outputs() or _small_pipeline(tmp_path_factory.mktemp("pipeline"), tiny_world)


def _parent(client: MlflowClient, run_dir: Path):
    """The newest finished parent run of ``run_dir`` (its `run_dir` tag is as given: relative to the project in
    DVC stages, absolute here)."""
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="attributes.status = 'FINISHED'")
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags and "run_dir" in r.data.tags
               and (ROOT / r.data.tags["run_dir"]).resolve() == run_dir.resolve()]
    assert parents, f"no finished MLflow parent run for {run_dir}"
    return max(parents, key=lambda r: r.info.start_time)


def test_every_run_has_a_parent_with_a_child_per_step_and_per_class_series(outputs) -> None:
    uri, run_dirs = outputs
    client = MlflowClient(uri)
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        steps = metrics["steps"]
        parent = _parent(client, run_dir)
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(int(c.data.tags["step"]) for c in children) == list(range(len(steps))), run_dir
        for name in metrics["classes"]:
            seen_from = next((s["step"] for s in steps if s["iou"].get(name) is not None), None)
            if seen_from is None:
                continue
            history = client.get_metric_history(parent.info.run_id, f"iou/{name}")
            assert sorted(m.step for m in history) == list(range(seen_from, len(steps))), (run_dir, name)
        tags = parent.data.tags
        assert {"protocol", "method", "replay", "seed", "git_commit", "dvc.dataset"} <= set(tags)
        if metrics["method"] == "recall":
            assert "dvc.replay_pool" in tags
            shares = client.get_metric_history(parent.info.run_id, "replay/labelled_share")
            inpainted = client.get_metric_history(parent.info.run_id, "replay/inpainted_share")
            assert len(shares) == len(inpainted) == len(steps) - 1
            assert all(0 <= m.value <= 1 for m in [*shares, *inpainted])
            assert int(parent.data.params["pool_built.total"]) > 0
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
        assert {f"figures/{f}" for f in FIGURES} <= artifacts


def test_figures_decode_and_are_not_blank(outputs) -> None:
    _, run_dirs = outputs
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        names = [*FIGURES, *(["replay_labels.png"] if metrics["method"] == "recall" else [])]
        for name in names:
            with Image.open(run_dir / "figures" / name) as image:
                pixels = np.asarray(image.convert("RGB"))
            assert min(pixels.shape[:2]) >= 150, (run_dir, name)
            colours = np.unique(pixels.reshape(-1, 3), axis=0)
            assert len(colours) > 20, f"{run_dir / 'figures' / name} looks blank ({len(colours)} colours)"
        table = (run_dir / "figures" / "class_iou.csv").read_text().splitlines()
        assert len(table) == 1 + len(metrics["classes"]) and table[0].count(",") == len(metrics["steps"])


def test_the_store_holds_every_kind_of_run(outputs) -> None:
    """What the notebook must tell apart (the demo's store: all but the tune study)."""
    uri, _ = outputs
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    roles = {r.data.tags.get("role") for r in runs}
    expected = ROLES if _demo_outputs() is None else ROLES - {"study", "trial"}
    assert expected <= roles, f"the store lacks runs of role {expected - roles}"


def test_notebook_is_stripped_and_runs_top_to_bottom(outputs, tmp_path) -> None:
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "compare_replay.ipynb"
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook with outputs stripped"
    uri, _ = outputs
    os.environ["RECALL_TRACKING_URI"] = uri
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["RECALL_TRACKING_URI"]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the notebook draws the per-protocol, per-class and per-step comparisons"
    nbformat.write(notebook, tmp_path / "executed.ipynb")
