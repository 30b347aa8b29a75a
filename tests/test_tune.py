"""`recall tune`: the Optuna study of RECALL's hyper-parameters on a tiny toy world (18-1x2, a few seconds a trial).

One study is built once per module (2 trials, resumed with 1 more, then 1 trial with a diverging learning rate that
the pruner must stop after step 1); the tests read it through Optuna, MLflow and its files.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import free_port, kill_when_written
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from recall.cli import main
from recall.tune import CurrentValuePruner, directions, final_values, step_value

BAD_LR = "++tune.space.train.lr_incremental={type:float,low:1000.0,high:1000.0}"  # SGD diverges: mIoU collapses


@pytest.fixture(scope="module")
def world(tune_world):
    """A step-0 run and a replay pool (conftest's tune_world, shared with test_cluster)."""
    return tune_world


@pytest.fixture(scope="module")
def study(world):
    """2 trials, then a resumed invocation adding 1, then one trial with a diverging lr (pruned after step 1)."""
    storage = f"sqlite:///{world.tmp}/optuna.db"
    sizes, ids = [], []
    for extra in (["tune.n_trials=2"], ["tune.n_trials=1"],
                  ["tune.n_trials=1", "tune.pruner.n_startup_trials=2", BAD_LR]):
        assert main(world.args(*extra)) == 0
        loaded = optuna.load_study(study_name="shared", storage=storage)
        sizes.append(len(loaded.trials))
        ids.append(loaded._study_id)
    return SimpleNamespace(optuna=loaded, sizes=sizes, ids=ids, dir=world.tmp / "tune" / "shared")


def test_resume_adds_trials_to_the_same_study(study):
    assert study.sizes[:2] == [2, 3] and len(set(study.ids)) == 1
    assert [t.state for t in study.optuna.trials[:3]] == [TrialState.COMPLETE] * 3
    complete = study.optuna.trials[0]
    assert sorted(complete.intermediate_values) == [1, 2], "reported after every incremental step, not step 0"
    assert set(complete.params) == {"method.replay_ratio", "method.inpaint_threshold"}
    assert complete.params == {"method.replay_ratio": 0.5, "method.inpaint_threshold": 0.0}, \
        "trial 0 is the reference: the configured values (RECALL's defaults)"


def test_a_collapsing_trial_is_pruned_after_its_first_incremental_step(study):
    bad = study.optuna.trials[3]
    assert bad.params["train.lr_incremental"] == 1000.0
    assert bad.state == TrialState.PRUNED and bad.last_step == 1
    good = [t.intermediate_values[1] for t in study.optuna.trials[:3]]
    assert bad.intermediate_values[1] < min(good)
    run_dir = study.dir / "trial_3"
    assert (run_dir / "steps/1/eval.json").is_file() and not (run_dir / "steps/2").exists(), "step 2 never ran"
    assert not list(run_dir.glob("steps/*/model.pt")), "a finished trial keeps results, not checkpoints"


def test_mlflow_holds_the_study_with_one_child_per_trial(study, world):
    client = MlflowClient(f"sqlite:///{world.tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune · shared"]
    assert parent.info.run_id == study.optuna.user_attrs["mlflow_parent_run_id"]
    assert parent.data.tags["optuna.study"] == "shared" and parent.data.tags["objective"] == "all"
    assert parent.data.tags["optuna.storage"].endswith("optuna.db") and parent.data.tags["replay"] == "toy_gan"
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/pruned"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/optimization_history.png" in artifacts
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["optuna.trial"]))
    assert [r.info.run_name for r in children] == [f"shared · trial {n}" for n in range(4)]
    assert [r.data.tags["optuna.state"] for r in children] == ["COMPLETE"] * 3 + ["PRUNED"]
    assert [r.info.status for r in children] == ["FINISHED"] * 3 + ["KILLED"]
    first = children[0]
    assert set(first.data.params) == {"method.replay_ratio", "method.inpaint_threshold", "trial"}
    assert [m.step for m in client.get_metric_history(first.info.run_id, "objective")] == [1, 2]
    assert [m.step for m in client.get_metric_history(first.info.run_id, "miou/new")] == [1, 2]
    assert [m.step for m in client.get_metric_history(first.info.run_id, "miou/old_no_bg")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(children[3].info.run_id, "objective")] == [1]


def test_best_yaml_and_figures(study):
    from recall.config import compose

    best = yaml.safe_load((study.dir / "best.yaml").read_text())
    top = study.optuna.best_trial
    assert best["trial"] == top.number and best["value"] == pytest.approx(top.value)
    assert best["trials"] == {"total": 4, "complete": 3, "pruned": 1, "failed": 0}
    cfg = compose(["method=recall", *best["overrides"]])
    assert cfg.method.replay_ratio == pytest.approx(top.params["method.replay_ratio"])
    assert cfg.method.inpaint_threshold == pytest.approx(top.params["method.inpaint_threshold"])
    assert best["command"].startswith("recall run ") and "method=recall" in best["command"]
    assert not [o for o in best["command"].split() if o.startswith(("tune", "run_dir", "step0"))], "study settings"
    figures = {p.name for p in (study.dir / "figures").glob("*.png")}
    assert {"optimization_history.png", "intermediate_values.png", "param_importances.png", "slice.png"} <= figures


def test_two_workers_share_one_new_sqlite_study(world):
    """Two `recall tune` processes started at the same instant on a database that does not exist yet."""
    cmd = [sys.executable, "-m", "recall.cli",
           *world.args("tune.n_trials=1", "train.threads=1", study="parallel", storage="parallel.db")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    loaded = optuna.load_study(study_name="parallel", storage=f"sqlite:///{world.tmp}/parallel.db")
    assert [t.state for t in loaded.trials] == [TrialState.COMPLETE] * 2
    assert loaded.trials[0].params != loaded.trials[1].params, "each worker samples with a seed of its own"
    client = MlflowClient(f"sqlite:///{world.tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune · parallel"]
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 2


def test_a_killed_workers_trial_fails_and_is_retried_once(world):
    """SIGKILL a worker mid-trial: the next worker finds its trial silent (heartbeats), marks it FAIL, closes its
    MLflow run, drops its checkpoints and runs it again with the same parameters."""
    args = world.args("tune.n_trials=1", "tune.heartbeat_interval=1", "tune.grace_period=2", study="killed",
                      storage="killed.db")
    step1 = world.tmp / "tune" / "killed" / "trial_0" / "steps" / "1" / "model.pt"
    kill_when_written([*args, "train.epochs_incremental=15"], step1, timeout=120)
    assert step1.exists(), "the worker did not reach step 1 before the deadline"
    time.sleep(3)  # > grace_period since its last heartbeat
    assert main(args) == 0
    loaded = optuna.load_study(study_name="killed", storage=f"sqlite:///{world.tmp}/killed.db")
    assert [t.state for t in loaded.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert loaded.trials[1].params == loaded.trials[0].params and loaded.trials[1].system_attrs["retry_history"] == [0]
    assert not list(step1.parent.parent.glob("*/model.pt")), "the killed trial's checkpoints are dropped on its retry"
    assert (step1.parent.parent / "0" / "eval.json").is_file(), "its results stay"
    client = MlflowClient(f"sqlite:///{world.tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id],
                              filter_string="tags.`optuna.study` = 'killed'")
    states = {r.info.run_name: (r.info.status, r.data.tags.get("optuna.state")) for r in runs}
    assert states["killed · trial 0"] == ("FAILED", "FAIL") and states["killed · trial 1"] == ("FINISHED", "COMPLETE")


@pytest.mark.parametrize("override,message", [
    ("++tune.space.method.bogus={type:float,low:0.0,high:1.0}", "tune.space.method.bogus"),
    ("tune.space.method.replay_ratio.low=0.95", "tune.space.method.replay_ratio: low=0.95 > high=0.9"),
    ("++tune.space.train.lr_incremental={type:float,low:0.0,high:0.1,log:true}", "log=true needs low > 0"),
    ("tune.space.method.inpaint_threshold.type=gaussian", "type='gaussian'; allowed: float, int, categorical"),
    ("tune.space.method.replay_ratio.high=1.0", "method.replay_ratio=1.0: must be in [0, 1)"),
    ("tune.objective=best", "tune.objective='best'; allowed: old_no_bg, new, all, all_no_bg, old, hmean, "
                            "forgetting_mean, old_new"),
    ("tune.pruner.name=hyperband", "tune.pruner.name='hyperband'; allowed"),
    ("tune.sampler.name=cmaes", "tune.sampler.name='cmaes'; allowed: tpe, random"),
    ("method=ft", "`method.replay_ratio` is not in the composed configuration"),  # ft has nothing to tune here
])
def test_bad_settings_are_clear_errors(world, capsys, override, message):
    assert main(world.args(override, study="bad", storage="bad.db")) == 2
    assert message in capsys.readouterr().err
    assert not (world.tmp / "bad.db").exists(), "nothing is created before the settings are checked"


def test_multi_objective_study_is_not_pruned(world, capsys):
    assert main(world.args("tune.n_trials=1", "tune.objective=old_new", "tracking.uri=", study="pareto")) == 0
    assert "cannot prune multi-objective trials" in capsys.readouterr().out
    best = yaml.safe_load((world.tmp / "tune" / "pareto" / "best.yaml").read_text())
    assert best["directions"] == ["maximize", "maximize"] and len(best["best_trials"][0]["values"]) == 2
    assert (world.tmp / "tune" / "pareto" / "figures" / "pareto_front.png").is_file()


# ---------------------------------------------------------------------------------------------- pure parts
def _finished(study: optuna.Study, values: dict[int, float], state=TrialState.COMPLETE) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=state, value=values[max(values)] if state == TrialState.COMPLETE else None,
        params={"r": 0.5}, distributions={"r": optuna.distributions.FloatDistribution(0.0, 0.9)},
        intermediate_values=values))


def test_current_value_pruner_compares_trials_at_the_same_step():
    pruner = CurrentValuePruner(percentile=50.0, n_startup_trials=2, n_warmup_steps=1)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    _finished(study, {1: 0.60, 2: 0.50})
    _finished(study, {1: 0.70, 2: 0.55})

    trial = study.ask()
    trial.report(0.95, 0)
    assert not trial.should_prune(), "step 0 is within the warm-up"
    trial.report(0.50, 1)
    assert trial.should_prune(), "0.50 at step 1 is below the others' median at step 1 (0.65)"
    median = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    assert not median.prune(study, study.trials[-1]), "best-so-far (0.95) hides the fall"

    trial = study.ask()
    trial.report(0.68, 1)
    assert not trial.should_prune()
    trial.report(0.53, 2)
    assert not trial.should_prune(), "0.53 at step 2 is above the others' median at step 2 (0.525)"
    trial.report(0.40, 3)
    assert not trial.should_prune(), "no other trial reported step 3: nothing to compare with"


def test_current_value_pruner_counts_pruned_trials_and_startup():
    study = optuna.create_study(direction="maximize",
                                pruner=CurrentValuePruner(percentile=25.0, n_startup_trials=3, n_warmup_steps=1))
    _finished(study, {1: 0.6})
    _finished(study, {1: 0.2}, state=TrialState.PRUNED)
    trial = study.ask()
    trial.report(0.1, 1)
    assert not trial.should_prune(), "2 trials reported step 1, fewer than n_startup_trials=3"
    _finished(study, {1: 0.7})
    assert trial.should_prune(), "below the 25th percentile of (0.2, 0.6, 0.7), the pruned trial included"
    nan = study.ask()
    nan.report(math.nan, 1)
    assert nan.should_prune()
    with pytest.raises(ValueError, match="percentile"):
        CurrentValuePruner(percentile=120)


def test_objective_values():
    result = {"step": 1, "miou": {"all": 0.5, "old_no_bg": 0.6, "new": 0.2}}
    assert step_value(result, "all") == 0.5
    assert step_value(result, "hmean") == pytest.approx(2 * 0.6 * 0.2 / 0.8)
    assert step_value(result, "old_new") is None
    assert step_value({**result, "step": 0}, "all") is None, "step 0 is the same model in every trial"
    assert final_values(result, "old_new") == [0.6, 0.2]
    assert final_values({"miou": {**result["miou"], "new": 0.0, "old_no_bg": 0.0}}, "hmean") == [0.0]
    # any registered number is an objective, in its own direction: forgetting is minimized
    forgetting = {**result, "old_classes": ["a", "b"], "forgetting": {"a": 0.1, "b": 0.3, "background": 0.9}}
    assert step_value(forgetting, "forgetting_mean") == pytest.approx(0.2)
    assert directions("forgetting_mean") == ("minimize",) and directions("old_new") == ("maximize", "maximize")


def _get_json(url: str, timeout: float = 5.0) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200, url
        return json.loads(response.read())


def test_optuna_dashboard_serves_the_study(study, world):
    """`optuna-dashboard <tune.storage>` (the `dashboard` extra), as the docs say, on 127.0.0.1 and a free port:
    its HTTP API lists the study with its trials; stopped by its PID (its process group), also on failure."""
    import os
    import signal
    import urllib.error

    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    assert dashboard.is_file(), "optuna-dashboard is missing: pip install -e '.[dashboard]' (dev pulls it in)"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(dashboard), f"sqlite:///{world.tmp}/optuna.db", "--host", "127.0.0.1",
                             "--port", str(port), "--server", "wsgiref"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, listed = time.monotonic() + 60, None
        while listed is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                listed = _get_json(f"{base}/api/studies")
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        assert listed is not None, f"optuna-dashboard did not answer on {base}: {proc.poll()=}"
        (summary,) = [s for s in listed["study_summaries"] if s["study_name"] == "shared"]
        assert summary["directions"] == ["maximize"]
        detail = _get_json(f"{base}/api/studies/{summary['study_id']}")
        states = [t["state"] for t in sorted(detail["trials"], key=lambda t: t["number"])]
        assert states == ["Complete"] * 3 + ["Pruned"]
        assert {p["name"] for p in detail["trials"][0]["params"]} == {"method.replay_ratio", "method.inpaint_threshold"}
        (best,) = detail["best_trials"]
        assert best["number"] == study.optuna.best_trial.number
        assert best["values"][0] == pytest.approx(study.optuna.best_value)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_study_runs_follow_mlflow_conventions(study, world):
    """The study's parent and trial runs carry MLflow's source tags, the dataset and the replay pool as dataset
    inputs, a role, and the parent a description naming optuna-dashboard."""
    client = MlflowClient(f"sqlite:///{world.tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune · shared"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["role"] == "study" and {r.data.tags["role"] for r in trials} == {"trial"}
    for run in [parent, *trials]:
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.name"] == "recall tune"
        contexts = {i.dataset.name: i.tags[0].value for i in run.inputs.dataset_inputs}
        assert contexts == {"toy/train": "train", "toy/val": "val", "toy_gan pool": "replay"}
    note = parent.data.tags["mlflow.note.content"]
    assert "optuna-dashboard sqlite:///" in note and "3 complete" in note and "1 pruned" in note
