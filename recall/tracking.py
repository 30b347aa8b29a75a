"""MLflow logging: the only module that imports mlflow.

One parent run per protocol run (tags: protocol, setting, method, replay, seed, git commit) with one child
run per step. Per-class IoU and the old/new/all means are logged as metrics with `step=t` on the parent
(so `mlflow ui` draws curves over steps) and on the step's child run. The parent run id is stored in the
run directory, so a resumed run keeps logging into the same parent and never duplicates a step.

`recall tune` (StudyTracker, TrialTracker): one parent run per Optuna study with one child run per trial, whose
final tag `optuna.state` is COMPLETE, PRUNED or FAIL (MLflow status FINISHED, KILLED, FAILED).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recall.atomic import write_json
from recall.config import strip_password

RUN_ID_FILE = "mlflow_run.json"
PARAMS_PER_BATCH = 100  # MLflow's limits for one log_batch call
METRICS_PER_BATCH = 1000
SECRET_MARKERS = ("key", "secret", "token", "password")


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → {"a.b": "value"} for mlflow params; keys that look like secrets are dropped, URLs' passwords
    replaced by ***."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = strip_password(str(value))[:500]
    return out


def _metric_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def step_metrics(result: dict) -> dict[str, float]:
    metrics = {f"miou/{k}": v for k, v in result["miou"].items() if v is not None}
    metrics.update({f"iou/{_metric_name(c)}": v for c, v in result["iou"].items() if v is not None})
    metrics.update({f"forgetting/{_metric_name(c)}": v for c, v in result["forgetting"].items() if v is not None})
    known = [v for v in result["forgetting"].values() if v is not None]
    if known:
        metrics["forgetting/mean"] = sum(known) / len(known)
    metrics.update(result.get("replay", {}))  # replay/pool_images, replay/labelled_share, replay/inpainted_share
    return metrics


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """A (nested) config as params, secrets dropped: one sqlite transaction per batch, not per value."""
    flat = [Param(key, value) for key, value in flatten(params).items()]
    for first in range(0, len(flat), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=flat[first:first + PARAMS_PER_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Metrics of one step, in batches."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for first in range(0, len(batch), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[first:first + METRICS_PER_BATCH])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed (another process may create it at the same moment)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another worker created it in the meantime
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """Logs a protocol run to MLflow; resumable through `<run_dir>/mlflow_run.json`."""

    def __init__(self, uri: str = "sqlite:///mlflow.db", experiment: str = "toy"):
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id(self.client, experiment)
        self.parent_id: str | None = None

    def start(self, run_dir: Path, name: str, tags: dict[str, str], params: dict) -> str:
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.parent_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, "git_commit": git_commit()})
        self.parent_id = run.info.run_id
        log_params(self.client, self.parent_id, params)
        write_json(id_file, {"run_id": self.parent_id, "tracking_uri": strip_password(self.client.tracking_uri)})
        return self.parent_id

    def _logged_steps(self) -> set[int]:
        children = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'")
        return {int(r.data.tags["step"]) for r in children if r.info.status == "FINISHED"}

    def log_step(self, result: dict) -> None:
        step = result["step"]
        if step in self._logged_steps():
            return
        metrics = step_metrics(result)
        parent = self.client.get_run(self.parent_id)
        child = self.client.create_run(self.experiment_id, run_name=f"{parent.info.run_name} · step {step}",
                                       tags={"mlflow.parentRunId": self.parent_id, "step": str(step),
                                             **{k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}})
        for run_id in (self.parent_id, child.info.run_id):
            log_metrics(self.client, run_id, metrics, step)
        self.client.log_param(child.info.run_id, "new_classes", ",".join(result["new_classes"]))
        self.client.set_terminated(child.info.run_id)

    def finish(self, artifacts: list[Path], status: str = "FINISHED", figures: list[Path] = ()) -> None:
        """Log the run's files (figures under `figures/`) and close the parent run with ``status``."""
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        for path in figures:
            self.client.log_artifact(self.parent_id, str(path), artifact_path="figures")
        self.client.set_terminated(self.parent_id, status=status)


# ---------------------------------------------------------------------------------------------- recall tune
TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # optuna state -> MLflow status


def close_trial_run(client: MlflowClient, run_id: str, state: str) -> None:
    """Mark a trial's run with its final Optuna state and the matching MLflow status."""
    client.set_tag(run_id, "optuna.state", state)
    client.set_terminated(run_id, status=TRIAL_STATUS.get(state, "FAILED"))


class StudyTracker:
    """The MLflow side of an Optuna study (`recall tune`): one parent run per study (`tune · <study>`), shared by
    every worker through its id (an Optuna study attribute), and one child run per trial."""

    def __init__(self, uri: str = "sqlite:///mlflow.db", experiment: str = "toy"):
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def open_parent(self, run_id: str | None, study: str, tags: dict[str, str], params: dict) -> str:
        """The study's parent run: `run_id` when a worker created it already (marked RUNNING again), else a new one."""
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:  # the study's run lives in another MLflow store (tracking.uri changed)
                pass
        run = self.client.create_run(self.experiment_id, run_name=f"tune · {study}",
                                     tags={**tags, "optuna.study": study, "git_commit": git_commit()})
        log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def trial(self, parent_id: str, study: str, number: int, params: dict, objective, on_step=None,
              on_start=None) -> TrialTracker:
        return TrialTracker(self.client, self.experiment_id, parent_id, study, number, params, objective, on_step,
                            on_start)

    def close_run(self, run_id: str, state: str) -> None:
        """Mark a trial's run with its final Optuna state (also for a killed worker's trial, found stale later)."""
        close_trial_run(self.client, run_id, state)

    def close_parent(self, parent_id: str, metrics: dict[str, float], artifacts: list[Path] = (),
                     figures: list[Path] = ()) -> None:
        """The end of one worker's invocation: study counts and best value, best.yaml and the study's figures."""
        if metrics:
            log_metrics(self.client, parent_id, metrics, step=0)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(parent_id, str(path))
        for path in figures:
            self.client.log_artifact(parent_id, str(path), artifact_path="figures")
        self.client.set_terminated(parent_id, status="FINISHED")


class TrialTracker:
    """What `run_protocol` calls for one Optuna trial (start / log_step / finish), logging to the trial's child run.

    After each step it logs the step's metrics and `objective` (``objective(result)``, None when the step has no
    value), then calls ``on_step(step, value)``, which may raise (Optuna's TrialPruned). The run stays open until
    `close(state)`: only the caller knows whether the trial completed, was pruned or failed.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str, study: str, number: int,
                 params: dict, objective, on_step=None, on_start=None):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.study, self.number, self.params = study, number, params
        self.objective, self.on_step, self.on_start = objective, on_step, on_start
        self.run_id: str | None = None

    def start(self, run_dir: Path, name: str, tags: dict[str, str], params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.study} · trial {self.number}",
                                     tags={**tags, "mlflow.parentRunId": self.parent_id, "optuna.study": self.study,
                                           "optuna.trial": str(self.number), "optuna.state": "RUNNING"})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, {**self.params, "trial": self.number})
        if self.on_start is not None:
            self.on_start(self.run_id)
        return self.run_id

    def log_step(self, result: dict) -> None:
        step = result["step"]
        metrics = step_metrics(result)
        value = self.objective(result)
        if value is not None:
            metrics["objective"] = value
        log_metrics(self.client, self.run_id, metrics, step)
        if self.on_step is not None:
            self.on_step(step, value)

    def finish(self, artifacts: list[Path], status: str = "FINISHED", figures: list[Path] = ()) -> None:
        if self.run_id is None:
            return
        for path in [*artifacts, *figures]:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, state: str) -> None:
        if self.run_id is not None:
            close_trial_run(self.client, self.run_id, state)
