"""What each SLURM job asks for (recall.slurm.stage_resources): the `launcher` section the stage's own command
composes, conf/launcher/slurm.yaml for any other command; precedence: a `--slurm-*` option > the stage's composed
launcher section (its params file, its experiment profile, its launcher.* overrides) > conf/launcher/slurm.yaml.
A bad launcher key or value is one line and exit 2, before anything is submitted. No SLURM needed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recall.errors import UserError
from recall.slurm import Resources, _launcher, launcher_command, stage_resources

ROOT = Path(__file__).resolve().parents[1]
RUN = "python -m recall.stages.run --params params.yaml protocol=15-5 method=ft run_dir=runs/{} train.threads=1"
DEFAULT = Resources(**yaml.safe_load((ROOT / "conf" / "launcher" / "slurm.yaml").read_text()))


def test_the_toy_world_asks_for_cpus_only():
    assert DEFAULT.gpus == 0 and DEFAULT.cpus >= 1
    assert stage_resources("base@a", "python make.py base a", ROOT) == DEFAULT  # not recall's: the defaults
    assert stage_resources("run@a", RUN.format("a"), ROOT) == DEFAULT  # the toy params.yaml
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["launcher"] == dataclasses.asdict(DEFAULT)


@pytest.mark.parametrize("profile", ["paper_voc", "paper_ade"])
def test_a_paper_profile_asks_for_one_gpu_and_more_time(profile):
    resources = stage_resources("run@a", RUN.format("a") + f" experiment={profile}", ROOT)
    assert resources.gpus == 1 and resources.time_min > DEFAULT.time_min and resources.cpus > DEFAULT.cpus


def test_the_command_line_wins_over_the_stage_which_wins_over_the_profile():
    cmd = RUN.format("a") + " experiment=paper_voc launcher.time_min=30 launcher.partition=gpu"
    stage = stage_resources("run@a", cmd, ROOT)
    assert (stage.gpus, stage.time_min, stage.partition) == (1, 30, "gpu")  # profile's GPU, the stage's time
    cli = stage_resources("run@a", cmd, ROOT, {"gpus": 2, "time_min": None, "partition": "big", "cpus": None})
    assert (cli.gpus, cli.time_min, cli.partition, cli.cpus) == (2, 30, "big", stage.cpus)  # None: not given
    assert stage_resources("base@a", "python make.py base a", ROOT, {"cpus": 3}) == \
        dataclasses.replace(DEFAULT, cpus=3)


def test_the_params_file_the_stage_reads_counts(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["launcher"]["gpus"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert stage_resources("run@a", RUN.format("a"), tmp_path).gpus == 2
    assert stage_resources("run@a", RUN.format("a") + " launcher.gpus=0", tmp_path).gpus == 0


def test_only_the_overrides_that_can_change_the_launcher_are_composed_once_each():
    assert launcher_command("python make.py base a", ROOT) is None
    assert launcher_command(RUN.format("a") + " experiment=paper_voc +launcher.cpus=2", ROOT) == \
        (str(ROOT / "params.yaml"), ("experiment=paper_voc", "+launcher.cpus=2"))
    assert launcher_command(["echo hi", "python -m recall.sim.toyworld out launcher.gpus=0"], ROOT) == \
        (None, ("launcher.gpus=0",))
    # the study's stages run at the top (`cd ..` from study/, their DVC project): the top's params.yaml, not the
    # study's tables beside its dvc.yaml
    assert launcher_command("cd .. && " + RUN.format("a"), ROOT / "study") == (str(ROOT / "params.yaml"), ())
    _launcher.cache_clear()
    for key in "abcdef":  # a study's runs differ in run_dir, seed, ...: one composition
        stage_resources(f"run@{key}", RUN.format(key) + f" seed={len(key)}", ROOT)
    assert _launcher.cache_info().misses == 1


@pytest.mark.parametrize("override,message", [
    ("launcher.gpu=1", "unknown config key 'launcher.gpu' (did you mean gpus?)"),
    ("launcher=big", "unknown launcher 'big'"),
    ("launcher.cpus=0", "launcher.cpus=0: must be at least 1"),
    ("launcher.time_min=ten", "launcher.time_min='ten': expected an integer"),
])
def test_a_bad_launcher_value_is_one_line(override, message):
    with pytest.raises(UserError, match=r"^run@a: ") as error:
        stage_resources("run@a", RUN.format("a") + " " + override, ROOT)
    assert message in str(error.value)


def test_an_unknown_key_in_the_params_file_is_named(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["launcher"]["gpu"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"run@a: unknown launcher key\(s\) gpu .*valid: cpus, mem_gb"):
        stage_resources("run@a", RUN.format("a"), tmp_path)


def _project(path: Path, cmd: str) -> Path:
    path.mkdir()
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": cmd, "outs": ["out"]}}}))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=path, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return path


@pytest.mark.parametrize("override,message", [
    ("launcher.gpu=1", "error: train: unknown config key 'launcher.gpu'"),
    ("launcher.partition=gpu", "error: train: launcher.partition=gpu: no such partition (SLURM has debug)"),
])
def test_the_executor_refuses_a_bad_launcher_before_submitting_anything(tmp_path, monkeypatch, capsys, override,
                                                                        message):
    from recall import slurm, stage_jobs

    project = _project(tmp_path / "p", f"python -m recall.stages.run --params {ROOT / 'params.yaml'} {override}")
    monkeypatch.chdir(project)
    monkeypatch.setattr(slurm, "partitions", lambda: ["debug"])  # a cluster with one partition
    monkeypatch.setattr(slurm.Slurm, "start", lambda *a: pytest.fail("submitted"))
    assert stage_jobs.main(["dvc.yaml", "--executor", "slurm", "--allow-sqlite"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_resumes_whatever_its_job_asked_for():
    """A run stopped by its job's time limit resumes when queued again with more time (or another launcher), and a
    run saved before the launcher section existed resumes too."""
    from omegaconf import OmegaConf

    from recall.config import compose
    from recall.experiment import _comparable

    saved = OmegaConf.to_container(compose(["launcher.time_min=30"]), resolve=True)
    again = OmegaConf.to_container(compose(["launcher.time_min=600", "launcher.gpus=1"]), resolve=True)
    assert _comparable(saved) == _comparable(again)
    assert _comparable({k: v for k, v in saved.items() if k != "launcher"}) == _comparable(again)


@pytest.mark.parametrize("option", [["--slurm-mem", "0"], ["--slurm-mem", "-2"], ["--slurm-mem", "lots"],
                                    ["--slurm-cpus", "0"], ["--slurm-time", "1.5"]])
def test_resource_options_out_of_range_are_refused_by_the_command_line(tmp_path, capsys, option):
    from recall import stage_jobs

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(SystemExit) as exit_:
        stage_jobs.main([str(tmp_path / "dvc.yaml"), "--executor", "slurm", *option])
    assert exit_.value.code == 2
    assert option[1] in capsys.readouterr().err
