"""No stale results: editing any module a stage imports makes `dvc status` report that stage (in a scratch copy of
the pipeline, whose dvc.lock is made by `dvc commit` over placeholder outputs: no training needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([*DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def changed_stages(repo: Path, path: str) -> set[str]:
    """The stages `dvc status --json` reports with `path`, or a directory holding it, among their modified deps."""
    status = json.loads(dvc(repo, "status", "--json"))
    holds = lambda dep: path == dep or path.startswith(dep.rstrip("/") + "/")
    return {stage for stage, changes in status.items() for change in changes if isinstance(change, dict)
            for dep, state in change.get("changed deps", {}).items() if state == "modified" and holds(dep)}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The pipeline (dvc.yaml, params.yaml, conf/, recall/) in a fresh repository, every stage committed."""
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "conf", repo / "conf")
    shutil.copytree(ROOT / "recall", repo / "recall", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    from dvc.repo import Repo

    with Repo(str(repo)) as project:
        stages = list(project.index.stages)
        outs = [Path(str(out.fs_path)) for stage in stages for out in stage.outs]
        deps = [Path(str(dep.fs_path)) for stage in stages for dep in stage.deps]
    # placeholders for every output, and for the files stages read inside another stage's output directory
    for path in [*outs, *(d for d in deps if not d.exists())]:
        if path.suffix:  # a file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "placeholder").write_text("placeholder\n")
    dvc(repo, "commit", "-f", "-q")
    assert json.loads(dvc(repo, "status", "--json")) == {}
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("module,expected", [
    # the pool's on-disk format: the pool stages and every RECALL run, which reads pools through it
    ("recall/replay/pool.py", {"replay_pool@toy_gan", "replay_pool@web", "replay_pool@gan",
                               "replay_pool@toy_diffusion", "replay_run@15-5_recall_toy_diffusion",
                               "replay_run@15-5_recall_toy_gan", "replay_run@15-1x5_recall_toy_gan",
                               "replay_select@web"}),
    # the configuration: every stage that composes one (all but the stand-in weights, which take no config... and do)
    ("recall/config.py", {"toyworld", "step0@15-overlapped", "run@15-5_mib", "replay_run@15-5_recall_web",
                          "classmap@toy_gan", "replay_pool@web", "joint", "report"}),
    ("recall/methods/distillation.py", {"step0@15-overlapped", "run@15-5_mib", "run@15-1x5_mib", "joint"}),
    # the class mapping: its stages and the pools built from its maps, not the pretraining ...
    ("recall/replay/classmap.py", {"classmap@toy_gan", "classmap@gan", "replay_pool@toy_gan", "replay_pool@gan"}),
    # ... which shares only the classifier (its preprocessing, its file) with it
    ("recall/replay/classifier.py", {"pretrain", "standin_weights", "classmap@toy_gan", "classmap@gan"}),
])
def test_an_edited_module_changes_the_stages_that_import_it(scratch, module, expected):
    path = scratch / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        reported = changed_stages(scratch, module)
    finally:
        path.write_text(original)
    assert expected <= reported, f"{module}: dvc status misses {sorted(expected - reported)}"
    assert "standin_weights" not in reported or module != "recall/methods/distillation.py"
    if module == "recall/methods/distillation.py":
        assert not {s for s in reported if s.startswith(("replay_pool", "classmap", "toyworld", "report"))}
    if module in ("recall/replay/pool.py", "recall/replay/classmap.py"):  # editing them leaves the pretraining done
        assert "pretrain" not in reported


DATASET_READERS = ("recall.stages.run", "recall.stages.classmap", "recall.stages.pool", "recall.stages.select")


def test_the_stages_that_read_the_dataset_depend_on_its_id_and_only_dataset_id_on_the_directory():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = body.get("deps", [])
        if name == "dataset_id":
            assert deps[0] == "${dataset.root}" and body["outs"] == ["${dataset.root}.id.json"]
            continue
        assert "${dataset.root}" not in deps, f"{name} depends on the dataset directory: depend on its id"
        if any(reader in body["cmd"] for reader in DATASET_READERS):
            assert "${dataset.root}.id.json" in deps, f"{name} reads the dataset but not its id"


def test_the_id_changes_with_any_file_of_the_dataset(tmp_path):
    from recall.stages.dataset_id import dataset_id

    root = tmp_path / "world"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "a.jpg").write_bytes(b"aaa")
    (root / "list.txt").write_text("a\n")
    first = dataset_id(root)
    assert first["files"] == 2 and first["bytes"] == 5
    assert dataset_id(root) == first  # the content, not the time: made again, the same id
    (root / "JPEGImages" / "a.jpg").write_bytes(b"aab")
    edited = dataset_id(root)
    assert edited["sha256"] != first["sha256"]
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "b.jpg")
    assert dataset_id(root)["sha256"] not in (first["sha256"], edited["sha256"])  # a rename is a change too


@pytest.mark.slow
def test_an_edited_dataset_file_reaches_every_stage_that_reads_it_through_the_id(scratch):
    """dvc status: an edit in the dataset makes `dataset_id` stale; once it has run, every stage reading the dataset
    is (the toy world's generating stage would first put a generated dataset back: toyworld's outs changed)."""
    import yaml

    root = yaml.safe_load((scratch / "params.yaml").read_text())["dataset"]["root"]
    placeholder = scratch / root / "placeholder"
    original = placeholder.read_text()
    try:
        placeholder.write_text("an edited image\n")
        assert "dataset_id" in changed_stages(scratch, f"{root}/placeholder")
        subprocess.run([sys.executable, "-m", "recall.stages.dataset_id", root], cwd=scratch, check=True,
                       env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True)
        reached = changed_stages(scratch, f"{root}.id.json")
        assert {"step0@15-overlapped", "run@15-5_mib", "replay_run@15-5_recall_web", "classmap@toy_gan",
                "replay_pool@web", "replay_select@web", "joint"} <= reached
        assert not {s for s in reached if s.startswith(("pretrain", "standin", "report"))}
    finally:
        placeholder.write_text(original)
