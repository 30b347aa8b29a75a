"""`python -m recall.stage_jobs` runs a pipeline's stale stages several at a time and `dvc commit`s them: afterwards
`dvc status` is clean and `dvc repro` runs nothing, a failed command is reported and not committed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

DVC_YAML = {
    "stages": {
        "base": {"foreach": ["a", "b"], "do": {"cmd": "python make.py base ${item}", "deps": ["make.py"],
                                               "outs": ["out/base_${item}.txt"]}},
        "run": {"foreach": ["a", "b", "bad"], "do": {"cmd": "python make.py run ${item}",
                                                     "deps": ["make.py", "out/base_a.txt"],
                                                     "outs": ["out/run_${item}.txt"]}},
        "report": {"cmd": "python make.py report all", "deps": ["make.py", "out/run_bad.txt"],
                   "outs": ["out/report_all.txt"]},
    }
}
MAKE = """\
import os, sys, time
kind, item = sys.argv[1:]
if item == "bad":
    sys.exit("no such item")
if kind == "run" and not os.path.exists("out/base_a.txt"):
    sys.exit("started before base@a made its output")
started = time.time()
time.sleep(0.5)
open(f"out/{kind}_{item}.txt", "w").write(f"{kind} {item} {os.environ.get('DVC_STAGE')}\\n")
os.makedirs("times", exist_ok=True)
open(f"times/{kind}_{item}", "w").write(f"{started} {time.time()}")
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
    assert (project / "out" / "run_b.txt").read_text() == "run b run@b\n"  # DVC_STAGE, as `dvc repro` sets it
    assert (project / "logs" / "run_bad.log").read_text().strip().endswith("no such item")
    assert _stale(project, env) == {"run@bad", "report"}  # every other stage is recorded in dvc.lock
    again = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--order", "base", "run"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert "base: 0 stale stage(s)" in again.stdout and "run: 1 stale stage(s)" in again.stdout


def _stale(project: Path, env: dict) -> set[str]:
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True, check=True)
    return set(yaml.safe_load(status.stdout))


def test_without_an_order_each_stage_starts_when_the_stages_it_reads_have_finished(tmp_path):
    """The whole graph, 2 at a time: the runs wait for base@a (make.py fails a run started before), the base stages
    (--alone) run with no other, run@bad fails and the report that reads its output is not started; a second call
    finds only those two stale."""
    project, env = _project(tmp_path)
    done = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--jobs", "2", "--alone", "base"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "4 stage(s) run and committed, 1 failed" in done.stdout
    assert "not started (downstream of a failure): report" in done.stdout
    assert (project / "out" / "run_a.txt").read_text() == "run a run@a\n"
    assert _stale(project, env) == {"run@bad", "report"}
    times = {p.name: tuple(map(float, p.read_text().split())) for p in (project / "times").iterdir()}
    assert sorted(times) == ["base_a", "base_b", "run_a", "run_b"]
    overlap = lambda a, b: a[0] < b[1] and b[0] < a[1]  # noqa: E731
    assert not any(overlap(times[x], times[y]) for x in ("base_a", "base_b") for y in times if y != x), \
        "a stage named in --alone ran beside another"
    again = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=300)
    assert "0 stage(s) run and committed, 1 failed" in again.stdout, again.stdout + again.stderr


def test_targets_run_those_stages_and_what_they_read_only(tmp_path):
    """`--targets run@a` runs base@a (which it reads) and itself, as `dvc repro run@a` would; an unknown target is an
    error naming it, before anything runs."""
    project, env = _project(tmp_path)
    wrong = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--targets", "run@c"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--targets run@c: no such stage" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not (project / "dvc.lock").exists()
    done = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--jobs", "2", "--targets", "run@a"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (project / "out").glob("*.txt")) == ["base_a.txt", "run_a.txt"]
    assert _stale(project, env) == {"base@b", "run@b", "run@bad", "report"}


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


def test_a_stage_others_wait_for_is_committed_first_and_the_others_free_their_slot_before(monkeypatch, tmp_path):
    """A `dvc commit` takes seconds (it rewrites dvc.lock): a finished stage that a pending one reads is committed
    at once (its reader may start); a finished stage nobody waits for has its slot filled before its commit."""
    from recall import stage_jobs

    stages = [(name, name, "true", ".") for name in ("a", "b", "c")]
    upstream = {"a": set(), "b": set(), "c": {"a"}}
    monkeypatch.setattr(stage_jobs, "pipeline", lambda *_: (stages, upstream, {"a": 1, "b": 0, "c": 0}))
    monkeypatch.setattr(stage_jobs, "prepare", lambda addressing, stale=False: True)
    events = []

    class OneAtATime(stage_jobs.Local):
        interval = 0

        def start(self, stage, after):
            events.append(f"start {stage[0]}")
            return stage[0]

        def ended(self, running):
            return list(running)

        def finish(self, addressing, handle):
            events.append(f"commit {addressing}")
            return True

        def stop(self, running):
            events.append(f"stop {sorted(running)}")

    done, failed, left = stage_jobs.run_dag(Path("dvc.yaml"), 1, tmp_path, {}, executor=OneAtATime(1, tmp_path, {}))
    assert events == ["start a", "commit a", "start b", "start c", "commit b", "commit c", "stop []"]
    assert (done, failed, left) == (["a", "b", "c"], [], [])


def test_an_ended_stage_not_yet_committed_is_stopped_and_reported_when_interrupted(monkeypatch, tmp_path, capsys):
    """Ctrl-C between a stage's end and its commit: it is still among the running ones the interruption stops, and
    the message says it finished but is not recorded."""
    from recall import stage_jobs

    stages = [(name, name, "true", ".") for name in ("a", "b")]
    monkeypatch.setattr(stage_jobs, "pipeline", lambda *_: (stages, {"a": set(), "b": set()}, {"a": 0, "b": 0}))
    monkeypatch.setattr(stage_jobs, "prepare", lambda addressing, stale=False: True)
    log = tmp_path / "a.log"

    class Interrupted(stage_jobs.Local):
        interval = 0

        def start(self, stage, after):
            if stage[0] == "b":  # the second launch, after a ended and before its commit
                raise KeyboardInterrupt
            process = subprocess.Popen([sys.executable, "-c", "pass"])
            process.wait()
            return process, log.open("w"), log

        def ended(self, running):
            return list(running)

    with pytest.raises(KeyboardInterrupt):
        stage_jobs.run_dag(Path("dvc.yaml"), 1, tmp_path, {}, executor=Interrupted(1, tmp_path, {}))
    assert "a: finished, not committed: `dvc commit a` records it" in capsys.readouterr().out


def test_a_pipeline_in_a_dvc_project_of_its_own_reads_the_top_project_and_is_not_in_its_index(tmp_path):
    """As study/ is: a DVC project of its own (`dvc init --subdir`, the top cache) whose stage runs at the top
    (`cd .. && ...`) and names the top's output and code as `../<path>`. The top `dvc repro` does not load its
    stages; stage_jobs, called from the top, refuses it while that output is missing (naming it, exit 2), then runs
    and commits it there (DVC's run cache included, which refuses a working directory outside the project); an
    edit to the code it reads outside its project makes it stale, and plain `dvc --cd sub repro` runs it again."""
    from dvc.repo import Repo

    project, env = _project(tmp_path)
    sub = project / "sub"
    sub.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--subdir", "-q"], cwd=sub, env=env, check=True)
    (sub / ".dvc" / "config").write_text("[cache]\n    dir = ../../.dvc/cache\n")
    # a file outside the sub-project that one of its own stages makes is no missing input (the study's report reads
    # ../docs/dose_response.json, which its dose_response stage makes)
    note = {"cmd": "cd .. && mkdir -p shared && echo note > shared/note.txt",
            "outs": [{"../shared/note.txt": {"cache": False}}]}
    use = {"cmd": "cd .. && python make.py use a", "deps": ["../make.py", "../out/base_a.txt", "../shared/note.txt"],
           "outs": ["../sub/out/use_a.txt"]}
    (sub / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"note": note, "use": use}}, sort_keys=False))
    (project / "make.py").write_text(MAKE.replace('f"out/{kind}_{item}.txt"',
                                                  'f"sub/out/{kind}_{item}.txt" if kind == "use" else '
                                                  'f"out/{kind}_{item}.txt"'))
    (sub / "out").mkdir()
    with Repo(str(project)) as top:
        assert {stage.name for stage in top.index.stages if stage.cmd} == {
            "base@a", "base@b", "run@a", "run@b", "run@bad", "report"}, "the top project loads the sub-project"

    refused = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "sub/dvc.yaml"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "sub/dvc.yaml: its stages read files outside their DVC project (sub) that are not there: " \
        "out/base_a.txt; make them first" in refused.stderr, refused.stderr  # paths as typed where it was started
    assert "Traceback" not in refused.stderr and not (sub / "dvc.lock").exists()
    unknown = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "sub/dvc.yaml", "--targets", "nope"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "`dvc --cd sub stage list` lists them" in unknown.stderr, unknown.stderr

    subprocess.run([sys.executable, "-m", "recall.stage_jobs", "dvc.yaml", "--targets", "base@a"], cwd=project,
                   env=env, check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-m", "recall.stage_jobs", "sub/dvc.yaml"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 stage(s) run and committed, 0 failed" in done.stdout, done.stdout + done.stderr
    assert (sub / "out" / "use_a.txt").read_text() == "use a use\n"  # DVC_STAGE: the sub-project's addressing
    assert (sub / "logs" / "use.log").is_file() and _stale(sub, env) == set()
    assert {"note", "use"} <= set(yaml.safe_load((sub / "dvc.lock").read_text())["stages"])
    assert "use" not in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert not (sub / ".dvc" / "cache").exists(), "the sub-project commits to the top project's cache"
    (project / "make.py").write_text((project / "make.py").read_text() + "# edited\n")
    assert "use" in _stale(sub, env), "a code edit outside the sub-project leaves its stage up to date"
    again = subprocess.run([sys.executable, "-m", "dvc", "--cd", "sub", "repro"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Running stage 'use'" in again.stdout, again.stdout + again.stderr
    assert _stale(sub, env) == set()


def test_a_file_that_is_no_pipeline_of_a_dvc_project_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from recall.stage_jobs import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "study").mkdir()
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "study" / "params.yaml").write_text("runs: {}\n")
    for argv, said in ((["missing/dvc.yaml"], "missing/dvc.yaml: no such file"),
                       (["study"], "study: a directory"),
                       (["study/params.yaml"], "study/params.yaml: not a dvc.yaml"),
                       (["loose/dvc.yaml"], "loose/dvc.yaml: not inside a DVC project (no .dvc directory above it)")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.rglob("logs")], "a refusal writes nothing"
