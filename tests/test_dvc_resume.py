"""A `dvc repro` killed with -9 mid-protocol resumes after the last finished step (its run stages persist steps/),
a run stage re-run after a params change moves the stale steps/ aside and starts afresh, and the outputs pushed
to a DVC remote come back byte for byte in a fresh clone (docs/cluster.md).

Each test project is a real DVC project in a tmp dir: a tiny toy world stage and one `recall run` stage of
15-1x5 (6 steps). It runs a snapshot of the package (recall/ and conf/), so edits to the source tree while the
test runs cannot change the code hash the resumed run compares (steps/inputs.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import kill_when_written
from omegaconf import OmegaConf

from recall.config import compose, default_params
from recall.experiment import ProtocolRun, check_same_config

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_STEPS = 6  # 15-1x5

DVC_YAML = """\
stages:
  toyworld:
    cmd: recall toyworld data/toy --params params.yaml
    params: [toyworld]
    outs: [data/toy]
  run:
    cmd: recall run --params params.yaml run_dir=runs/r on_config_change=restart
    deps: [data/toy]
    params: [dataset, protocol, model, train, eval, seed]
    outs:
      - runs/r/steps:
          persist: true
      - runs/r/figures
      - runs/r/metrics.json:
          cache: false
"""


def project_params() -> dict:
    params = default_params()
    params["toyworld"].update(n_train=200, n_val=60, size=64)
    params["protocol"] = {"name": "15-1x5"}
    params["train"].update(epochs=1, epochs_incremental=1, batch_size=8, eval_batch_size=30, threads=1)
    params["model"].update(head_channels=16, pretrained_file=None)  # the from-scratch world: no pretrain stage
    params["tracking"]["uri"] = None
    return params


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "recall", src / "recall", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", src / "conf")
    return {**os.environ, "PYTHONPATH": str(src), "DVC_NO_ANALYTICS": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def make_project(root: Path, env: dict) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, env, "init", "-q")
    (root / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    (root / "dvc.yaml").write_text(DVC_YAML)
    return root


def dvc(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, check=False,
                          text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=recall tests", "-c", "user.email=tests@recall.invalid", *args],
                   cwd=project, check=True, capture_output=True, timeout=60)


def copy_project(project: Path, dest: Path) -> Path:
    """A copy of a finished project (its DVC cache too, not DVC's tmp/ with its locks)."""
    return Path(shutil.copytree(project, dest,
                                ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else []))


def digests(project: Path, *outs: str) -> dict[str, str]:
    """{path in the project: sha256} of every file under the outputs ``outs``."""
    return {path.relative_to(project).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for out in outs for path in sorted((project / out).rglob("*")) if path.is_file()}


def identity(path: Path) -> tuple[int, int, int]:
    """Same inode, mtime and size: the file was neither rewritten nor replaced."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def assert_same_checkpoint(a: Path, b: Path) -> None:
    one, two = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert one["meta"] == two["meta"]  # with the losses of every epoch
    assert one["state_dict"].keys() == two["state_dict"].keys()
    for key, tensor in one["state_dict"].items():
        assert torch.equal(tensor, two["state_dict"][key]), key


class Reference:
    """An uninterrupted `dvc repro` of the project, started in the background (the tests' own `dvc repro` runs
    alongside it: each trains with one thread); `project()` waits for it."""

    def __init__(self, root: Path, env: dict):
        self.root = make_project(root, env)
        self.proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=self.root, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def project(self) -> Path:
        output, _ = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"the reference dvc repro failed:\n{output[-3000:]}"
        return self.root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    ref = Reference(tmp_path_factory.mktemp("reference") / "project", env)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def test_killed_dvc_repro_resumes_after_the_last_finished_step(tmp_path, env, reference):
    project = make_project(tmp_path / "project", env)
    steps = project / "runs" / "r" / "steps"
    pid = kill_when_written(["repro"], steps / "2" / "model.pt", timeout=180, module="dvc", cwd=project, env=env)
    assert (steps / "2" / "model.pt").exists(), "dvc repro did not reach step 2 before the deadline"
    assert not (steps / str(PROTOCOL_STEPS - 1) / "model.pt").exists(), "the protocol finished before the kill"
    assert not (project / "runs" / "r" / "metrics.json").exists()
    stale_lock = json.loads((project / ".dvc" / "tmp" / "rwlock").read_text())
    assert pid in {holder["pid"] for holder in stale_lock["write"].values()}, "kill -9 leaves DVC's write lock"
    kept = {t: identity(steps / str(t) / "model.pt") for t in range(3)}

    resumed = dvc(project, env, "repro")  # no file to delete by hand: DVC drops the dead pid's lock itself
    output = resumed.stdout + resumed.stderr
    assert "had been killed" in output and "Auto removed it from the lock file" in output
    assert "moved its steps/" not in output, "the resumed run was restarted"
    assert {t: identity(steps / str(t) / "model.pt") for t in range(3)} == kept, "finished steps were retrained"
    after = json.loads((project / ".dvc" / "tmp" / "rwlock").read_text())
    assert pid not in {holder["pid"] for holder in after.get("write", {}).values()}

    reference = reference.project()
    metrics = json.loads((project / "runs" / "r" / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == list(range(PROTOCOL_STEPS))
    assert metrics == json.loads((reference / "runs" / "r" / "metrics.json").read_text())  # every IoU, every digit
    for t in range(PROTOCOL_STEPS):
        assert_same_checkpoint(steps / str(t) / "model.pt", reference / "runs" / "r" / "steps" / str(t) / "model.pt")
    assert "up to date" in dvc(project, env, "status").stdout
    assert not list(project.rglob("*.tmp"))


def test_changed_params_move_the_stale_run_aside_and_start_afresh(tmp_path, env, reference):
    project = copy_project(reference.project(), tmp_path / "project")
    steps = project / "runs" / "r" / "steps"
    before = identity(steps / "0" / "model.pt")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr_incremental"] = 0.02  # a change of what is computed that costs no more to compute
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = dvc(project, env, "repro")
    output = done.stdout + done.stderr
    stale = sorted((project / "runs" / ".stale").iterdir())
    assert len(stale) == 1 and re.fullmatch(r"r-\d{8}T\d{6}Z", stale[0].name), stale
    assert f"moved its steps/ (checkpoints, MLflow run id) to {Path('runs/.stale') / stale[0].name}" in output
    assert "differs: train)" in output, "the message names what changed (only the train section)"
    old = stale[0] / "steps"
    assert identity(old / "0" / "model.pt") == before, "moved, not copied or retrained"
    assert all((old / str(t) / "model.pt").exists() for t in range(PROTOCOL_STEPS)), "finished work is kept"
    assert OmegaConf.load(old / "config.yaml").train.lr_incremental == project_params()["train"]["lr_incremental"]
    assert OmegaConf.load(steps / "config.yaml").train.lr_incremental == 0.02
    assert identity(steps / "0" / "model.pt") != before
    metrics = json.loads((project / "runs" / "r" / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == list(range(PROTOCOL_STEPS))
    assert "up to date" in dvc(project, env, "status").stdout


def test_outputs_pushed_to_a_remote_come_back_in_a_fresh_clone(tmp_path, env, reference):
    """How a team shares what a pipeline made: `dvc push` to a remote (a local directory here, a shared mount or
    ssh:// / s3:// for a team), the repository cloned afresh elsewhere, `dvc pull`: every DVC-tracked output is back
    byte for byte and nothing needs reproducing."""
    project = copy_project(reference.project(), tmp_path / "project")
    remote = tmp_path / "remote"
    dvc(project, env, "remote", "add", "-d", "team", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a finished pipeline")
    dvc(project, env, "push")
    assert list((remote / "files" / "md5").rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, timeout=60)
    assert not (clone / "data" / "toy").exists() and not (clone / "runs" / "r" / "steps").exists()
    dvc(clone, env, "pull")
    pulled = digests(clone, "data/toy", "runs/r/steps", "runs/r/figures")
    assert pulled == digests(project, "data/toy", "runs/r/steps", "runs/r/figures")
    assert {f"runs/r/steps/{t}/model.pt" for t in range(PROTOCOL_STEPS)} <= set(pulled), "the checkpoints too"
    assert "up to date" in dvc(clone, env, "status").stdout
    assert "in sync" in dvc(clone, env, "status", "--cloud").stdout


def test_restart_policy_in_process(tmp_path, capsys):
    """check_same_config: error (default) refuses another configuration; restart moves steps/ aside with the
    MLflow run id in it (the new run gets a new parent run). Changed data or step-0 inputs count under both;
    code edits only under restart; execution-only options (threads, device, ...) never."""
    run_dir = tmp_path / "runs" / "r"
    config = run_dir / "steps" / "config.yaml"
    base = [f"run_dir={run_dir}", "tracking.uri=", "train.epochs=1"]
    check_same_config(config, ProtocolRun(compose(base)))
    (config.parent / "mlflow_run.json").write_text('{"run_id": "old"}')

    check_same_config(config, ProtocolRun(compose([*base, "on_config_change=restart"])))  # same config and inputs: resume
    assert not (run_dir.parent / ".stale").exists()
    check_same_config(config, ProtocolRun(compose([*base, "train.threads=1", "train.num_workers=2"])))  # how, not what
    with pytest.raises(ValueError, match="differ: train.*on_config_change=restart"):
        check_same_config(config, ProtocolRun(compose([*base, "train.epochs=2"])))
    with pytest.raises(ValueError, match="on_config_change='later'"):
        check_same_config(config, ProtocolRun(compose([*base, "on_config_change=later"])))

    inputs = json.loads((config.parent / "inputs.json").read_text())
    (config.parent / "inputs.json").write_text(json.dumps({**inputs, "code": "another commit"}))
    check_same_config(config, ProtocolRun(compose(base)))  # interactive: a code edit resumes
    (config.parent / "inputs.json").write_text(json.dumps({**inputs, "dataset": "another md5"}))
    with pytest.raises(ValueError, match="differ: inputs.dataset"):  # ... other data does not
        check_same_config(config, ProtocolRun(compose(base)))
    check_same_config(config, ProtocolRun(compose([*base, "train.epochs=2", "on_config_change=restart"])))
    (stale,) = (run_dir.parent / ".stale").iterdir()
    out = capsys.readouterr().out
    assert "differs: train, inputs.dataset" in out and str(stale) in out
    assert json.loads((stale / "steps" / "mlflow_run.json").read_text()) == {"run_id": "old"}
    assert not (config.parent / "mlflow_run.json").exists(), "the new run starts a new MLflow parent run"
    assert OmegaConf.load(config).train.epochs == 2
    assert json.loads((config.parent / "inputs.json").read_text()) == inputs


def test_dvc_yaml_run_stages_persist_their_checkpoints():
    """Every stage (of the demo and of the study) that runs `recall run` keeps its checkpoints (persist) and restarts
    on a change."""
    checked = 0
    from recall.pipeline import DVC_FILES  # each file's prefix of a path from the top (the study's: ../)

    for dvc_file in ("dvc.yaml", "study/dvc.yaml"):
        stages = yaml.safe_load((ROOT / dvc_file).read_text())["stages"]
        checked += _check_persisted(stages, DVC_FILES[dvc_file])
    assert checked >= 7  # step0, run, replay_run, joint; the study's step0, run, joint


def _check_persisted(stages: dict, top: str) -> int:
    """``top``: what the file puts before a path from the top (the study, a DVC project of its own, runs its
    commands at the top, `cd .. && ...`, and names its outputs `../<path>`)."""
    checked = 0
    for name, stage in stages.items():
        body = stage.get("do", stage)
        cmd = " ".join(body["cmd"].split()).removeprefix("cd .. && " if top else "")
        if not cmd.startswith("python -m recall.stages.run "):
            continue
        assert "on_config_change=restart" in cmd, name
        run_dir = re.search(r"run_dir=(\S+)", cmd).group(1)
        persisted = {path.removeprefix(top) for out in body["outs"] if isinstance(out, dict)
                     for path, opts in out.items() if opts.get("persist")}
        assert persisted & {run_dir, f"{run_dir}/steps"}, f"{name}: {run_dir}/steps is not persist: true"
        checked += 1
    return checked


def test_a_run_saved_before_new_train_options_resumes(tmp_path):
    """A run directory from before train.lr_end / iters_per_class / ... existed (and without inputs.json) resumes
    interactively: missing train options count as their defaults."""
    run_dir = tmp_path / "runs" / "old"
    config = run_dir / "steps" / "config.yaml"
    cfg = compose([f"run_dir={run_dir}", "tracking.uri="])
    saved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("lr_end", "iters_per_class", "amp", "compile", "device", "pin_memory"):
        del saved["train"][key]
    config.parent.mkdir(parents=True)
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    check_same_config(config, ProtocolRun(cfg))
    with pytest.raises(ValueError, match="differ: train"):
        check_same_config(config, ProtocolRun(compose([f"run_dir={run_dir}", "tracking.uri=", "train.lr_end=0.001"])))
