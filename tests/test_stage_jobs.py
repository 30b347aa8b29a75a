"""`python -m recall.stage_jobs` runs a pipeline's stale stages several at a time and `dvc commit`s them: afterwards
`dvc status` is clean and `dvc repro` runs nothing, a failed command is reported and not committed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

DVC_YAML = {
    "stages": {
        "base": {"foreach": ["a", "b"], "do": {"cmd": "python make.py base ${item}", "deps": ["make.py"],
                                               "outs": ["out/base_${item}.txt"]}},
        "run": {"foreach": ["a", "b", "bad"], "do": {"cmd": "python make.py run ${item}",
                                                     "deps": ["make.py", "out/base_a.txt"],
                                                     "outs": ["out/run_${item}.txt"]}},
    }
}
MAKE = """\
import sys, time
kind, item = sys.argv[1:]
if item == "bad":
    sys.exit("no such item")
time.sleep(0.5)
open(f"out/{kind}_{item}.txt", "w").write(f"{kind} {item}\\n")
"""


def _project(tmp_path: Path) -> tuple[Path, dict]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)
    (project / "make.py").write_text(MAKE)
    (project / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, env=env, check=True)
    return project, env


def test_stale_stages_run_in_parallel_groups_and_are_committed(tmp_path):
    project, env = _project(tmp_path)
    done = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--jobs", "2", "--order", "base",
                           "run"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr  # run@bad failed
    assert "run@bad: exit 1" in done.stderr + done.stdout
    assert "4 stage(s) run and committed, 1 failed" in done.stdout
    assert (project / "out" / "run_b.txt").read_text() == "run b\n"
    assert (project / "logs" / "run_bad.log").read_text().strip().endswith("no such item")
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True, check=True)
    assert set(yaml.safe_load(status.stdout)) == {"run@bad"}  # every other stage is recorded in dvc.lock
    again = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--order", "base", "run"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert "base: 0 stale stage(s)" in again.stdout and "run: 1 stale stage(s)" in again.stdout


def test_a_commit_waits_out_another_dvc_process_holding_the_lock(tmp_path, monkeypatch):
    import threading
    import time

    from dvc.repo import Repo

    from recall.stage_jobs import commit

    project, env = _project(tmp_path)
    (project / "out" / "base_a.txt").write_text("base a\n")  # the stage's command ran
    monkeypatch.chdir(project)
    held, release = threading.Event(), threading.Event()

    def hold():
        with Repo(str(project)) as repo, repo.lock:  # another DVC process, busy for a while
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    threading.Timer(4.0, release.set).start()
    started = time.monotonic()
    try:
        assert commit("base@a", env, tries=8, wait=1.0)
    finally:
        release.set()
        holder.join()
    assert time.monotonic() - started > 3.5  # it did wait for the lock
    assert "base@a" not in yaml.safe_load(subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True,
        check=True).stdout)
