"""`python -m recall.stage_jobs --executor slurm` against a real one-node SLURM (tests/slurm_cluster.py: Debian's
slurmctld, slurmd and munge, started here as root): every stage a SLURM job, DVC up to date afterwards and the
outputs byte-identical to the local executor's, for a toy pipeline and for a small study of recall's own stages
(a tiny toy world, a step-0 model, two runs from it and their report); a job killed with scancel fails its downstream and the rerun
completes; a call killed while its jobs are queued is re-attached to, nothing submitted twice; bad input (no SLURM,
an unknown partition, a sqlite store, a job that did not write its output) is one line and exit 2."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, TUNE_PROTOCOL
from slurm_cluster import Slurm, why_not

ROOT = Path(__file__).resolve().parents[1]

# a real toy step (a tiny toy world, under a second) and, reading it, trivial stages that write their outputs
DVC_YAML = {
    "stages": {
        "world": {"cmd": "python -m recall.sim.toyworld out/world toyworld.n_train=8 toyworld.n_val=4 "
                         "launcher.time_min=30",  # what its job asks for: its own launcher section
                  "outs": ["out/world"]},
        "base": {"foreach": ["a", "b"], "do": {"cmd": "python make.py base ${item}", "deps": ["make.py", "out/world"],
                                               "outs": ["out/base_${item}.txt"]}},
        "run": {"foreach": ["a", "b"], "do": {"cmd": "python make.py run ${item}",
                                              "deps": ["make.py", "out/base_a.txt"],
                                              "outs": ["out/run_${item}.txt"]}},
        "report": {"cmd": "python make.py report all", "deps": ["make.py", "out/run_a.txt", "out/run_b.txt"],
                   "outs": ["out/report_all.txt"]},
    }
}
STAGES = ["base@a", "base@b", "report", "run@a", "run@b", "world"]
MAKE = """\
import os, sys, time
kind, item = sys.argv[1:]
if kind == "run" and not os.path.exists("out/base_a.txt"):
    sys.exit("started before base@a made its output")
if os.path.exists(f"slow_{kind}_{item}"):  # the tests' handle on a job: it runs that many seconds
    time.sleep(float(open(f"slow_{kind}_{item}").read()))
open(f"out/{kind}_{item}.txt", "w").write(f"{kind} {item} {os.environ.get('DVC_STAGE')}\\n")
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Slurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _project(path: Path, slurm_env: dict, dvc_yaml: dict = DVC_YAML) -> tuple[Path, dict]:
    env = {**slurm_env, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), slurm_env["PATH"]])}
    (path / "out").mkdir(parents=True)
    (path / "make.py").write_text(MAKE)
    (path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=path, env=env, check=True)
    return path, env


def _stage_jobs(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def _stale(project: Path, env: dict) -> set[str]:
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True, check=True)
    return set(yaml.safe_load(status.stdout))


def _jobs(slurm: Slurm, project: Path) -> dict[str, tuple[str, str]]:
    """The jobs of `project` the controller knows: job id -> (name, state)."""
    return {job: (name, state) for job, (name, state, workdir) in slurm.jobs().items()
            if Path(workdir).resolve() == project.resolve()}


def _wait(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_every_stage_runs_as_a_slurm_job_like_the_local_executor(slurm, tmp_path):
    local, env = _project(tmp_path / "local", slurm.env)
    done = _stage_jobs(local, env, "--executor", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    project, env = _project(tmp_path / "slurm", slurm.env)
    started = time.monotonic()
    done = _stage_jobs(project, env, "--executor", "slurm", "--slurm-mem", "1")
    print(f"the pipeline on SLURM: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 stage(s) run and committed, 0 failed" in done.stdout
    jobs = _jobs(slurm, project)
    assert sorted(name for name, _ in jobs.values()) == [f"recall:{s}" for s in STAGES]  # each stage one job
    assert {state for _, state in jobs.values()} == {"COMPLETED"}
    asked = {name: _asked(slurm, job) for job, (name, _) in jobs.items()}  # conf/launcher, the stage's, the option's
    assert asked == {f"recall:{s}": ("1", "00:30:00" if s == "world" else "04:00:00", "1G") for s in STAGES}, asked
    assert all((project / "logs" / "slurm" / f"{job}_0_log.out").is_file() for job in jobs)
    assert "afterok" not in done.stdout and "run@a: SLURM job" in done.stdout and "(after " in done.stdout
    assert _stale(project, env) == set()  # every stage committed
    compared = filecmp.dircmp(local / "out", project / "out", ignore=[".gitignore"])  # DVC's, in commit order
    assert _identical(compared) and len(compared.common) == 6  # world, 2 base, 2 run, report
    assert _outs(local) == _outs(project)  # and dvc.lock records the same hashes
    assert json.loads((project / "logs" / "slurm" / "jobs.json").read_text()) == {}  # nothing left to attach to
    again = _stage_jobs(project, env, "--executor", "slurm")
    assert again.returncode == 0 and "0 stage(s) run and committed, 0 failed" in again.stdout
    assert _jobs(slurm, project).keys() == jobs.keys()  # nothing submitted


def _asked(slurm: Slurm, job: str) -> tuple[str, str, str]:
    """What a job asked for: its CPUs, time limit and memory per node (`scontrol show job`)."""
    out = slurm.run("scontrol", "-o", "show", "job", job).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields["NumCPUs"], fields["TimeLimit"], fields["MinMemoryNode"]


def _outs(project: Path) -> dict[str, list]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: [(out["path"], out["md5"]) for out in stage["outs"]] for name, stage in lock.items()}


def _identical(compared: filecmp.dircmp) -> bool:
    """Every file of both trees the same bytes (filecmp's shallow check off)."""
    _, mismatch, errors = filecmp.cmpfiles(compared.left, compared.right, compared.common_files, shallow=False)
    return not (mismatch or errors or compared.left_only or compared.right_only) and \
        all(_identical(sub) for sub in compared.subdirs.values())


# a small study of the real stages on the tiny toy world (conftest's `tiny_world`): a step-0 model, two runs from it
# (fine-tuning and MiB) and their report, with conftest's FAST training. One thread each under both executors (SLURM
# gives each job one CPU, the local executor runs the two runs at once): the same arithmetic, the same bytes.
STUDY_TRAIN = [o for o in FAST if not o.startswith("train.threads=")] + ["train.threads=1", "tracking.uri="]
STUDY_RUN = (f"python -m recall.stages.run dataset.root=out/world protocol={TUNE_PROTOCOL} on_config_change=restart "
             + " ".join(STUDY_TRAIN))  # no MLflow (tracking.uri empty): nothing shared between the jobs but files
STUDY_YAML = {
    "stages": {
        "world": {"cmd": "python -m recall.sim.toyworld out/world toyworld.n_train=60 toyworld.n_val=16 "
                         "toyworld.seed=3", "outs": ["out/world"]},
        "step0": {"cmd": f"{STUDY_RUN} method=ft last_step=0 run_dir=out/step0", "deps": ["out/world"],
                  "outs": [{"out/step0": {"persist": True}}]},
        "run": {"foreach": ["ft", "mib"],
                "do": {"cmd": f"{STUDY_RUN} method=${{item}} step0=out/step0 run_dir=out/runs/${{item}}",
                       "deps": ["out/world", "out/step0"],  # as dvc.yaml's run stages: steps/ kept, metrics in git
                       "outs": [{"out/runs/${item}/steps": {"persist": True}},
                                {"out/runs/${item}/metrics.json": {"cache": False}}]}},
        "report": {"cmd": "python -m recall.stages.report out/runs/ft out/runs/mib --out out/report",
                   "deps": ["out/runs/ft/metrics.json", "out/runs/mib/metrics.json"], "outs": ["out/report"]},
    }
}
STUDY_STAGES = ["report", "run@ft", "run@mib", "step0", "world"]
# what must be the same bytes: every run's results (per step: IoU per class, mIoU, forgetting) and its curve, and
# the report's tables. Not compared: timing.json (seconds), the figures (matplotlib's PNGs), the checkpoints.
STUDY_RESULTS = ["step0/metrics.json", "step0/curve.csv", "runs/ft/metrics.json", "runs/ft/curve.csv",
                 "runs/mib/metrics.json", "runs/mib/curve.csv", "report/summary.json", "report/summary.csv",
                 "report/summary.md"]


@pytest.mark.slow
def test_a_small_study_of_real_stages_runs_on_slurm_like_the_local_executor(slurm, tmp_path):
    local, env = _project(tmp_path / "local", slurm.env, STUDY_YAML)
    project, env = _project(tmp_path / "slurm", slurm.env, STUDY_YAML)
    started = time.monotonic()  # both at once: most of a stage is imports and DVC's bookkeeping, not arithmetic
    beside = subprocess.Popen([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--executor", "local",
                               "--jobs", "2"], cwd=local, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        done = _stage_jobs(project, env, "--executor", "slurm", "--slurm-mem", "1")
        print(f"the study on SLURM: {time.monotonic() - started:.1f} s")
        out, _ = beside.communicate(timeout=300)
    finally:
        beside.kill()
    print(f"both executors: {time.monotonic() - started:.1f} s")
    assert beside.returncode == 0, out
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 stage(s) run and committed, 0 failed" in done.stdout
    jobs = _jobs(slurm, project)
    assert sorted(name for name, _ in jobs.values()) == [f"recall:{s}" for s in STUDY_STAGES]  # each stage one job
    assert {state for _, state in jobs.values()} == {"COMPLETED"}
    assert all((project / "logs" / "slurm" / f"{job}_0_log.out").is_file() for job in jobs)
    assert _stale(local, env) == _stale(project, env) == set()  # every stage committed
    for name in STUDY_RESULTS:
        assert (local / "out" / name).read_bytes() == (project / "out" / name).read_bytes(), name
    summary = json.loads((project / "out" / "report" / "summary.json").read_text())
    assert sorted(summary) == ["ft", "mib"] and all(0 <= run["all"] <= 1 for run in summary.values())
    metrics = {stage: hashes for stage, hashes in _outs(project).items() if stage.startswith("run@")}
    assert metrics == {stage: hashes for stage, hashes in _outs(local).items() if stage.startswith("run@")}


@pytest.mark.slow
def test_a_job_cancelled_with_scancel_fails_its_downstream_and_the_rerun_completes(slurm, tmp_path):
    project, env = _project(tmp_path / "p", slurm.env)
    (project / "slow_run_a").write_text("120")
    call = subprocess.Popen([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--executor", "slurm"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = lambda: [j for j, (name, state) in _jobs(slurm, project).items()  # noqa: E731
                           if name == "recall:run@a" and state == "RUNNING"]
        _wait(running, what="run@a's job to run")
        job = running()[0]
        slurm.run("scancel", job)
        out, err = call.communicate(timeout=120)
    finally:
        call.kill()
    assert call.returncode == 1, out + err
    assert re.search(rf"run@a: SLURM job {job} cancelled; see \S+/logs/slurm/{job}_0_log.out", out + err), out + err
    assert re.search(r"report: SLURM job \d+ cancelled \(downstream of a failure\)", out + err)
    assert "4 stage(s) run and committed, 1 failed" in out and "not started (downstream of a failure): report" in out
    states = {name: state for name, state in _jobs(slurm, project).values()}
    assert states["recall:run@a"] == states["recall:report"] == "CANCELLED"
    assert _stale(project, env) == {"run@a", "report"}
    (project / "slow_run_a").unlink()
    again = _stage_jobs(project, env, "--executor", "slurm")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 stage(s) run and committed, 0 failed" in again.stdout
    assert _stale(project, env) == set()


@pytest.mark.slow
def test_a_call_killed_while_its_jobs_are_queued_is_re_attached_to_and_nothing_is_submitted_twice(slurm, tmp_path):
    project, env = _project(tmp_path / "p", slurm.env)
    (project / "slow_base_a").write_text("6")  # the runs and the report queue behind it
    first = subprocess.Popen([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--executor", "slurm"],
                             cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = project / "logs" / "slurm" / "jobs.json"
    try:
        _wait(lambda: state.is_file() and len(json.loads(state.read_text())) == len(STAGES), what="6 jobs")
        assert any(s == "PENDING" for _, s in _jobs(slurm, project).values())
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no chance to cancel anything
        first.wait()
    second = _stage_jobs(project, env, "--executor", "slurm")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "re-attached to SLURM job" in second.stdout
    assert not re.search(r": SLURM job \d+( \(after .*\))?$", second.stdout, re.MULTILINE), second.stdout
    assert sorted(name for name, _ in _jobs(slurm, project).values()) == [f"recall:{s}" for s in STAGES]
    assert {s for _, s in _jobs(slurm, project).values()} == {"COMPLETED"}
    assert _stale(project, env) == set()


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs_it_submitted(slurm, tmp_path):
    project, env = _project(tmp_path / "p", slurm.env)
    (project / "slow_base_a").write_text("120")
    call = subprocess.Popen([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--executor", "slurm"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = project / "logs" / "slurm" / "jobs.json"
    try:
        _wait(lambda: state.is_file() and len(json.loads(state.read_text())) == len(STAGES), what="6 jobs")
        call.send_signal(signal.SIGINT)
        out, _ = call.communicate(timeout=60)
    finally:
        call.kill()
    assert call.returncode != 0
    assert re.search(r"run@a: SLURM job \d+ cancelled, not committed", out), out
    _wait(lambda: not {s for _, s in _jobs(slurm, project).values()} & {"PENDING", "RUNNING", "COMPLETING"},
          timeout=30, what="the jobs to be cancelled")
    states = {name: s for name, s in _jobs(slurm, project).values()}
    assert states["recall:base@a"] == states["recall:run@a"] == states["recall:report"] == "CANCELLED"
    assert json.loads(state.read_text()) == {}  # nothing to re-attach to
    assert {"base@a", "run@a", "run@b", "report"} <= _stale(project, env)


@pytest.mark.slow
def test_bad_input_under_slurm_is_one_line_and_exit_2(slurm, tmp_path):
    project, env = _project(tmp_path / "p", slurm.env)
    wrong = _stage_jobs(project, env, "--executor", "slurm", "--slurm-partition", "gpu-a100")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "--slurm-partition gpu-a100: no such partition (SLURM has debug)" in wrong.stderr
    gpu = _stage_jobs(project, env, "--executor", "slurm", "--slurm-gpus", "1")  # this node has none
    assert gpu.returncode == 2 and "Traceback" not in gpu.stderr, gpu.stderr
    assert re.search(r"error: world: SLURM refused the job: .*(gres|generic resource)", gpu.stderr, re.I), gpu.stderr
    assert _jobs(slurm, project) == {}
    order = _stage_jobs(project, env, "--executor", "slurm", "--order", "base")
    assert order.returncode == 2 and "--order" in order.stderr and "Traceback" not in order.stderr

    (project / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": "python -m recall.stages.run --params params.yaml", "outs": ["out/run"]}}}))
    sqlite = _stage_jobs(project, env, "--executor", "slurm")
    assert sqlite.returncode == 2 and "Traceback" not in sqlite.stderr, sqlite.stderr
    assert "train: its command opens sqlite:///mlflow.db, a sqlite file" in sqlite.stderr
    assert "--allow-sqlite if the filesystem is local" in sqlite.stderr
    assert _jobs(slurm, project) == {}  # refused before anything was submitted

    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "nothing": {"cmd": "python -c pass", "outs": ["out/nothing.txt"]}}}))
    missing = _stage_jobs(project, env, "--executor", "slurm")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stdout + missing.stderr
    assert re.search(r"error: nothing: SLURM job \d+ ended well but did not write out/nothing.txt", missing.stderr)
    assert _stale(project, env) == {"nothing"}  # not committed


@pytest.mark.slow
def test_a_controller_that_does_not_answer_is_one_line_and_exit_2(tmp_path):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    conf = tmp_path / "slurm.conf"  # a controller on a port nobody listens on
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\nAuthType=auth/none\n"
                    "NodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost Default=YES\n")
    project, env = _project(tmp_path / "p", {**os.environ, "SLURM_CONF": str(conf)})
    done = _stage_jobs(project, env, "--executor", "slurm")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "SLURM's controller does not answer" in done.stderr


def test_no_slurm_on_the_path_is_one_line_and_exit_2(tmp_path):
    project, env = _project(tmp_path / "p", dict(os.environ))
    env["PATH"] = str(Path(sys.executable).parent)  # python, git and dvc's venv; no sbatch
    done = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--executor", "slurm"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "no SLURM here" in done.stderr and "sbatch" in done.stderr and "--executor local" in done.stderr


def test_a_sqlite_store_is_found_in_the_params_file_and_the_overrides(tmp_path):
    from recall.slurm import sqlite_stores

    (tmp_path / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\ntune:\n  storage: null\n")
    assert sqlite_stores("python -m recall.stages.run --params params.yaml", tmp_path) == ["sqlite:///mlflow.db"]
    assert sqlite_stores("python -m recall.stages.run --params params.yaml tracking.uri=http://m:5000", tmp_path) \
        == []
    assert sqlite_stores("python -m recall tune tune.storage=sqlite:///optuna.db", tmp_path) == ["sqlite:///optuna.db"]
    assert sqlite_stores("python make.py base a", tmp_path) == []
    (tmp_path / "study").mkdir()  # a stage of the study's DVC project, run at the top
    (tmp_path / "study" / "params.yaml").write_text("tracking:\n  uri: null\n")
    assert sqlite_stores("cd .. && python -m recall.stages.run --params params.yaml", tmp_path / "study") == \
        ["sqlite:///mlflow.db"]


def test_a_controller_that_stops_answering_mid_way_fails_no_job(monkeypatch):
    """`squeue` without an answer: every job is still running as far as the call knows (it asks again); `squeue`
    knowing none of the ids: they are gone (ended)."""
    from types import SimpleNamespace

    from recall import slurm

    answers = {"down": subprocess.CompletedProcess([], 1, "", "squeue: error: Unable to contact slurm controller"),
               "gone": subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Invalid job id specified")}
    executor = slurm.Slurm.__new__(slurm.Slurm)
    running = {"run@a": SimpleNamespace(job_id="7")}
    monkeypatch.setattr(slurm, "_slurm", lambda *argv, **kw: answers["down"])
    assert slurm._state(["7"]) is None and executor.ended(running) == []
    monkeypatch.setattr(slurm, "_slurm", lambda *argv, **kw: answers["gone"])
    assert slurm._state(["7"]) == {} and executor.ended(running) == ["run@a"]
