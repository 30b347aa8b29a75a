"""Runs that cannot be corrupted: a failed run does not poison its resume, provenance comes from content, one
writer per run directory, bounded inputs, config errors as user errors, a dataset pre-flight."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image

from recall.cli import main
from recall.provenance import content_id


def run(world: Path, run_dir: Path, *overrides: str, tracking: str = "") -> int:
    return main(["run", f"dataset.root={world}", f"tracking.uri={tracking}", *FAST, f"run_dir={run_dir}",
                 *overrides])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    root = tmp_path_factory.mktemp("pool") / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=3, root=root, progress=False)
    return root


# ------------------------------------------------------------------ 1. a failed run does not poison its resume
def test_a_run_without_its_pool_fails_before_step_0_and_resumes_once_it_is_built(tmp_path, tiny_world, pool, capsys):
    run_dir, where = tmp_path / "run", tmp_path / "pools" / "p"
    args = ("protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={where}")
    assert run(tiny_world, run_dir, *args) == 2
    assert "not built" in capsys.readouterr().err
    assert not run_dir.exists(), "nothing trained, nothing marked done"
    shutil.copytree(pool, where)
    assert run(tiny_world, run_dir, *args) == 0  # the same command now runs through
    marker = json.loads((run_dir / "steps/replay_labels/step0.done").read_text())
    assert marker["pool"] == content_id(where) and marker["images"] == 19 * 3


# ------------------------------------------------------------------ 2. provenance from content
def test_the_run_records_the_pool_it_read_and_notices_another(tmp_path, tiny_world, pool, capsys):
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    run_dir, where = tmp_path / "run", tmp_path / "p"
    shutil.copytree(pool, where)
    args = ("protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={where}")
    assert run(tiny_world, run_dir, *args) == 0
    inputs = json.loads((run_dir / "steps/inputs.json").read_text())
    assert inputs["replay_pool"] == content_id(where) and inputs["replay_pool"].startswith("manifest:")
    assert inputs["dataset"] == content_id(tiny_world) and inputs["dataset"].startswith("sha256:")
    # the pool grows (one more image per class): another pool for this run, which then refuses to resume on it
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=4, root=where, progress=False)
    assert content_id(where) != inputs["replay_pool"]
    capsys.readouterr()
    assert run(tiny_world, run_dir, *args) == 2  # the finished run is not resumed on another pool
    assert "inputs.replay_pool" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. one writer per run directory
def test_a_second_writer_is_refused_and_a_killed_holder_frees_the_directory(tmp_path, tiny_world, capsys):
    from recall.locks import lock_file_of

    run_dir = tmp_path / "run"
    args = ["run", f"dataset.root={tiny_world}", "tracking.uri=", *FAST, "protocol=15-1x5",
            "train.epochs=5000", f"run_dir={run_dir}"]  # step 0 far longer than the test: killed while training
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "recall.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        holder = lock_file_of(run_dir)
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline and not (
                holder.exists() and holder.read_text().strip() == str(first.pid)):
            time.sleep(0.1)
        assert first.poll() is None, f"the first writer ended early: {log.read_text()[-2000:]}"
        assert holder.read_text().strip() == str(first.pid), "the first writer holds the run directory"
        capsys.readouterr()
        code = main(args)  # the second writer (in this process: the lock is the OS's, per open file)
        second = capsys.readouterr()
        assert first.poll() is None, f"the first writer ended early: {log.read_text()[-2000:]}"
        assert code == 2, second.out[-1000:] + second.err[-1000:]
        assert f"in use by process {first.pid}" in second.err and "Traceback" not in second.err
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    assert not (run_dir / "steps/0/model.pt").exists()
    # the OS released the killed holder's lock: the directory is usable again (here with a shorter step 0)
    assert run(tiny_world, run_dir, "protocol=15-1x5", "last_step=0", "on_config_change=restart") == 0


def test_two_processes_create_a_new_mlflow_store_one_after_the_other(tmp_path):
    code = "import sys; from recall.tracking import open_client; open_client(sys.argv[1])"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors


# ------------------------------------------------------------------ 4. bounded inputs in a folder source
def test_a_folder_source_skips_bombs_empty_files_and_links_out_of_its_root_with_reasons(tmp_path):
    from recall.replay.folder import FolderSource
    from recall.replay.pool import build_pool

    cat = tmp_path / "own" / "cat"
    cat.mkdir(parents=True)
    Image.new("1", (12000, 12000)).save(cat / "a_bomb.png")  # ~17 KB on disk, 144 megapixels decoded
    (cat / "b_empty.jpg").write_bytes(b"")
    (cat / "c_system.jpg").symlink_to("/etc/hostname")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(cat / "d_good.jpg")
    (cat / "e_inside.jpg").symlink_to(cat / "d_good.jpg")  # a link that stays inside the root is fine
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = build_pool(FolderSource(tmp_path / "own"), {8: "cat"}, 10, tmp_path / "pool", progress=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert summary["counts"] == {"cat": 1}  # d_good, and e_inside is the same image (a duplicate)
    assert summary["source_skipped"] == {"too_large": 1, "empty": 1, "outside_root": 1}
    reasons = {p["item"]: p["reason"].split(":")[0] for p in summary["source_problems"]}
    assert reasons == {"cat/a_bomb.png": "too_large", "cat/b_empty.jpg": "empty", "cat/c_system.jpg": "outside_root"}
    assert json.loads((tmp_path / "pool" / "pool.json").read_text())["source_problems"] == summary["source_problems"]
    assert grown_mb < 200, f"the bomb was decoded ({grown_mb:.0f} MB)"


# ------------------------------------------------------------------ 5. bad input: one line, exit 2, nothing made
@pytest.mark.parametrize("override,named", [
    ("train.epochz=3", "unknown config key 'train.epochz' (did you mean epochs?)"),
    ("method=nonexistent", "unknown method 'nonexistent'"),
    ("train.batch_size=0", "train.batch_size=0: must be an integer >= 1"),
    ("+method.bogus=1", "method=ft: "),
    ("train.lr=abc", "train.lr='abc': expected a number"),  # the key exists: its value has the wrong type
    ("model.head_channels=abc", "model.head_channels='abc': expected an integer"),
    ("train.epochs=1.5", "train.epochs=1.5: expected an integer"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),  # refused before steps/config.yaml is written
    ("train.lr=inf", "train.lr=inf: must be a finite number"),
    ("seed=-1", "seed=-1: must be an integer >= 0"),
])
def test_config_errors_are_one_line_and_create_nothing(tmp_path, tiny_world, capsys, override, named):
    assert run(tiny_world, tmp_path / "run", override, tracking=f"sqlite:///{tmp_path}/mlflow.db") == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and err.startswith("recall: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run dir, no MLflow store"


def test_a_missing_or_undecodable_image_fails_before_training(tmp_path, tiny_world, capsys):
    world = Path(shutil.copytree(tiny_world, tmp_path / "world"))
    ids = (world / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (world / "JPEGImages" / f"{ids[-1]}.jpg").unlink()  # a val image: only evaluation would have read it
    assert run(world, tmp_path / "run", "protocol=19-1") == 2
    assert f"{ids[-1]}.jpg" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("steps/*/model.pt")), "failed before any training"
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(world / "JPEGImages" / f"{ids[-1]}.jpg")  # wrong size
    assert run(world, tmp_path / "run", "protocol=19-1") == 2
    assert "differs from its image" in capsys.readouterr().err


# ================================================================== issue 26: never touch what is not ours
ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (the user's files, checked by hash)."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("recall: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def last_line(err: str) -> str:
    """The last line of a command's stderr (progress bars before it end in carriage returns)."""
    return re.split(r"[\r\n]", err.strip())[-1]


def pool_args(world: Path, pool: Path, *extra: str) -> list[str]:
    return ["pool", f"dataset.root={world}", "replay=toy_web", "replay.per_class=2", f"replay.pool={pool}", *extra]


# ------------------------------------------------------------------ 1. a pool build never deletes the user's images
def test_a_pool_build_leaves_a_directory_of_the_users_images_as_it_is(tmp_path, tiny_world, capsys):
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "b.jpg", "c001_000000.jpg")):  # the last one: the name of the pool's first id
        Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(photos / "images" / name)
    before = tree(tmp_path)
    assert main(pool_args(tiny_world, photos)) == 2
    err = one_line_error(capsys)
    assert f"replay.pool={photos} holds files" in err and "images/a.jpg" in err
    assert tree(tmp_path) == before, "nothing deleted, overwritten or added (no lock file, no partial build)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# ------------------------------------------------------------------ 2. pools know their source
@pytest.fixture(scope="module")
def web_pool(tmp_path_factory, tiny_world) -> Path:
    """A toy_web pool built by `recall pool` (2 images a class)."""
    where = tmp_path_factory.mktemp("web") / "pools" / "toy_web"
    assert main(pool_args(tiny_world, where)) == 0
    return where


def test_a_new_pool_is_built_beside_its_place_and_carries_its_source(web_pool):
    owner = json.loads((web_pool / "owner.json").read_text())
    assert owner["kind"] == "pool" and owner["params"]["source"] == "toy_web" and owner["format_version"] == 1
    assert (web_pool / "pool.json").is_file() and not (web_pool / ".lock").exists()
    assert sorted(p.name for p in web_pool.parent.iterdir()) == ["toy_web"], "no partial build left beside it"


@pytest.mark.parametrize("overrides,named", [
    (["replay=folder", "replay.source.root={root}"], "its images come from source toy_web, not folder"),
    (["replay.source.seed=7"], "other toy_web parameters (differ: seed)"),
])
def test_building_into_a_pool_of_another_source_or_parameters_is_refused(tmp_path, tiny_world, web_pool, capsys,
                                                                         overrides, named):
    copy = Path(shutil.copytree(web_pool, tmp_path / "pools" / "twc"))
    (tmp_path / "R" / "cat").mkdir(parents=True)
    Image.new("RGB", (30, 30), (9, 9, 9)).save(tmp_path / "R" / "cat" / "x.jpg")
    before = tree(copy)
    args = pool_args(tiny_world, copy, *[o.format(root=tmp_path / "R") for o in overrides])
    assert main(args) == 2
    assert named in one_line_error(capsys)
    assert tree(copy) == before


def test_a_run_refuses_a_pool_of_another_source_unless_told(tmp_path, tiny_world, web_pool, capsys):
    copy = Path(shutil.copytree(web_pool, tmp_path / "pools" / "twc"))
    args = ("protocol=19-1", "method=recall", "replay=folder", f"replay.pool={copy}")
    assert run(tiny_world, tmp_path / "run", *args) == 2
    assert "holds images of source toy_web, not folder" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    assert run(tiny_world, tmp_path / "run", *args, "+replay.any_source=true") == 0  # on purpose: replayed as it is


def test_a_run_refuses_a_pool_whose_build_has_not_finished(tmp_path, tiny_world, web_pool, capsys):
    copy = Path(shutil.copytree(web_pool, tmp_path / "pool"))
    (copy / "pool.json").unlink()  # as while a build grows it, or after one was killed
    assert run(tiny_world, tmp_path / "run", "protocol=19-1", "method=recall", "replay=toy_web",
               f"replay.pool={copy}") == 2
    assert "is not complete (no pool.json" in one_line_error(capsys)


# ------------------------------------------------------------------ 4. a run directory never overwrites the user's files
def test_a_run_leaves_a_directory_of_the_users_files_as_it_is(tmp_path, tiny_world, capsys):
    user = tmp_path / "U"
    (user / "figures").mkdir(parents=True)
    for name, text in (("metrics.json", "{}"), ("curve.csv", "mine"), ("figures/miou_curves.png", "mine")):
        (user / name).write_text(text)
    before = tree(tmp_path)
    for dry in ([], ["--dry-run"]):
        code = main(["run", *dry, f"dataset.root={tiny_world}", "tracking.uri=", *FAST, "protocol=19-1", f"run_dir={user}"])
        assert code == 2
        err = one_line_error(capsys)
        assert f"run_dir={user} holds files" in err and "metrics.json" in err and "steps/owner.json" in err
    assert tree(tmp_path) == before, "nothing overwritten, no lock file left"


@pytest.mark.parametrize("where,named", [("/", "the root directory"), ("~", "your home directory"),
                                         (".", "a project root"), ("README.md", "a file")])
def test_the_root_the_home_the_project_and_a_file_are_never_a_run_directory(tiny_world, capsys, monkeypatch, where,
                                                                           named):
    monkeypatch.chdir(ROOT)
    listing = sorted(p.name for p in ROOT.iterdir())
    path = str(Path(where).expanduser())
    for dry in (["--dry-run"], []):
        assert main(["run", *dry, f"dataset.root={tiny_world}", "tracking.uri=", *FAST, f"run_dir={path}"]) == 2
        assert f"run_dir={path} is {named}" in one_line_error(capsys)
    # other tests of the session may add their own files to the root meanwhile: only a run's leftovers count
    added = {p.name for p in ROOT.iterdir()} - set(listing)
    leftovers = {n for n in added if n.endswith(".lock") or n in {"metrics.json", "curve.csv", "steps", "figures"}}
    assert not leftovers, "no lock file, no metrics.json beside README.md"


def test_a_run_directory_holds_its_marker_and_its_lock_inside(tmp_path, tiny_world):
    run_dir = tmp_path / "runs" / "r"
    assert run(tiny_world, run_dir, "protocol=19-1") == 0
    owner = json.loads((run_dir / "steps" / "owner.json").read_text())
    assert owner["kind"] == "run" and owner["params"]["protocol"] == "19-1" and owner["params"]["method"] == "ft"
    assert (run_dir / ".lock").read_text() == "", "released: no stale pid"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"], "nothing beside the run directory"
    assert run(tiny_world, run_dir, "protocol=19-1") == 0  # its own directory: resumed (nothing left to do)


# ------------------------------------------------------------------ 5. kill -9 of `dvc repro` leaves nothing torn
KILL_DVC_YAML = """\
stages:
  toyworld:
    cmd: recall toyworld data/toy --params params.yaml
    params: [toyworld]
    outs: [data/toy]
  pool:
    cmd: recall pool --params params.yaml replay=toy_web replay.per_class=10
    deps: [data/toy]
    params: [dataset]
    outs: [pools/toy_web]
"""


def dvc_project(root: Path) -> Path:
    """A DVC project of two stages that write a directory: a tiny toy world (400 + 40 images) and a pool on it."""
    import yaml

    from recall.config import default_params

    root.mkdir(parents=True)
    params = default_params()
    params["toyworld"].update(n_train=400, n_val=40)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(KILL_DVC_YAML)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=dvc_env())
    return root


def dvc_env(shell: str = "/bin/bash") -> dict:
    """DVC runs a stage's command with $SHELL: bash execs it, sh (dash) keeps itself between DVC and the command."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "SHELL": shell,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def repro(project: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=dvc_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def kill_dvc_when(project: Path, shell: str, ready) -> None:
    """Start `dvc repro` and kill -9 the dvc process alone (not its group) once `ready()`: its stage's command dies
    with it (no orphan goes on writing)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=dvc_env(shell),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    below = descendants(proc.pid)
    assert proc.poll() is None and below, "dvc repro ended before it was killed"
    os.kill(proc.pid, 9)
    proc.wait()
    deadline = time.time() + 10
    while (alive := {p for p in below if Path(f"/proc/{p}").exists() and "Z" != Path(
            f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]}) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive, f"orphans of the killed dvc repro still run: {alive}"


def test_kill_9_of_dvc_repro_leaves_nothing_torn_and_a_rerun_matches_an_uninterrupted_one(tmp_path):
    reference = dvc_project(tmp_path / "reference")
    repro(reference)
    project = dvc_project(tmp_path / "killed")
    # 1. during the toy world (under sh, which stays between DVC and the command): half a world, beside its place
    kill_dvc_when(project, "/bin/sh", lambda: len(list((project / "data/.toy.partial/JPEGImages").glob("*.jpg"))) > 100)
    assert (project / "data/.toy.partial").is_dir() and not (project / "data/toy").exists(), \
        "the stage's command outlived dvc and finished the world"
    # 2. an immediate `dvc repro` starts the world afresh; killed again half way through the pool
    manifest = project / "pools/.toy_web.partial/manifest.jsonl"
    kill_dvc_when(project, "/bin/bash", lambda: manifest.is_file() and manifest.read_bytes().count(b"\n") >= 40)
    assert (project / "data/toy/toyworld.json").is_file() and not (project / "pools/toy_web").exists(), \
        "the stage's command outlived dvc and finished the pool"
    # 3. and the next one resumes the pool: every output as an uninterrupted `dvc repro` made it, byte for byte
    repro(project)
    for out in ("data/toy", "pools/toy_web"):
        assert tree(project / out) == tree(reference / out), out
    assert not list(project.glob("*/.*.partial")), "no partial build left"


# ------------------------------------------------------------------ 3. non-finite values stop the run
@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=inf", "train.lr_incremental=-inf"])
def test_the_dry_run_refuses_a_value_that_is_not_finite(tiny_world, tmp_path, capsys, override):
    assert main(["run", "--dry-run", f"dataset.root={tiny_world}", f"run_dir={tmp_path / 'run'}", override]) == 2
    assert f"{override}: must be a finite number" in one_line_error(capsys)


def test_an_exploding_loss_stops_the_run_and_nothing_looks_finished(tmp_path, tiny_world, capsys):
    from mlflow.tracking import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    code = run(tiny_world, run_dir, "protocol=19-1", "train.lr_incremental=1e30", "train.epochs_incremental=3",
               tracking=uri)  # step 0 trains as usual; step 1 explodes in its second epoch
    err = last_line(capsys.readouterr().err)
    assert code == 2 and re.match(r"recall: error: step 1 epoch [23]/3, batch \d+: (the loss \(\S+\)|a gradient) is not "
                                  r"finite \(training diverged\)", err), err
    assert "nothing of step 1 was saved" in err
    assert (run_dir / "steps/0/model.pt").is_file() and (run_dir / "steps/0/eval.json").is_file(), "the last good step"
    assert not (run_dir / "steps/1").exists()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "curve.csv").exists(), "nothing looks finished"
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"


def test_a_gradient_that_is_not_finite_is_never_applied():
    from recall.train import Precision

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    loss = torch.sqrt(weight).sum()  # finite (0), its gradient is not (inf)
    assert torch.isfinite(loss) and not Precision(None, torch.device("cpu")).backward_and_step(loss, optimizer)
    assert torch.equal(weight.detach(), torch.zeros(3)), "the step was not taken"
    assert Precision(None, torch.device("cpu")).backward_and_step((weight - 1).square().sum(), optimizer)
    assert torch.equal(weight.detach(), torch.full((3,), 0.2)), "a finite step is taken as before"


# ------------------------------------------------------------------ 6. clean messages
@pytest.mark.parametrize("content,named", [
    (None, "no such file"), ("dir", "is a directory"),
    ("a: 1\nb: [1, 2\nc: 3\n", "not valid YAML at line 3, column 2: expected ',' or ']'"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
])
def test_a_params_file_that_cannot_be_read_is_named(tmp_path, capsys, content, named):
    path = tmp_path / "params.yaml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert main(["run", "--dry-run", "--params", str(path)]) == 2
    assert f"--params {path}: {named}" in one_line_error(capsys)


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, tiny_world):
    import signal

    def as_from_a_terminal():
        """The child as a shell in a terminal starts it: SIGINT neither ignored nor blocked, whatever the test
        worker that starts it inherited (a process started in the background of a script ignores SIGINT, and so
        would everything it starts)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    run_dir = tmp_path / "run"
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err_out:  # a file, not a pipe: reading it never waits on a process that holds it
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "recall.cli", "run",
                                 f"dataset.root={tiny_world}", "tracking.uri=", *FAST, "protocol=19-1",
                                 "train.epochs=5000", f"run_dir={run_dir}"],
                                stdout=subprocess.DEVNULL, stderr=err_out, text=True, preexec_fn=as_from_a_terminal)
    deadline = time.time() + 120
    while not (run_dir / "steps" / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # still running: its threads' stacks (faulthandler, on SIGABRT) say where
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    err = err_file.read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert last_line(err) == "recall: interrupted (Ctrl-C); run the same command again to resume"


def test_a_paper_profile_refuses_a_random_backbone_unless_asked(tmp_path, capsys):
    args = ["run", "--dry-run", "experiment=paper_voc", "protocol=15-1x5", f"dataset.root={tmp_path / 'voc'}",
            f"run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "model.pretrained_file=resnet101.pth" in err and "timm.create_model('resnet101', pretrained=True)" in err
    assert main([*args, "model.pretrained_file=null"]) == 0  # on purpose
    assert "none (random init)" in capsys.readouterr().out
