"""MLflow logging: the only module that imports mlflow, inside the functions that talk to the store (importing
mlflow costs about as much as importing torch: a run with tracking off, or a `--dry-run`, never pays it).

One parent run per protocol run (tags: protocol, setting, method, replay, seed, git commit) with one child
run per step. Per-class IoU and the old/new/all means are logged as metrics with `step=t` on the parent
(so `mlflow ui` draws curves over steps) and on the step's child run. The parent run id is stored in the
run directory, so a resumed run keeps logging into the same parent and never duplicates a step.

`recall tune` (StudyTracker, TrialTracker): one parent run per Optuna study with one child run per trial, whose
final tag `optuna.state` is COMPLETE, PRUNED or FAIL (MLflow status FINISHED, KILLED, FAILED).

MLflow's own conventions fill the runs table's standard columns: `mlflow.source.*` tags (Source, Version), the
dataset splits and the replay pool as dataset inputs (Dataset: name, content hash as digest, role as
`mlflow.data.context`), a run description (`mlflow.note.content`) written when the run ends, and an experiment
description (recall/ui.py prints the address of the runs table in MLflow's "Model training" view).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recall.atomic import write_json
from recall.config import strip_password
from recall.locks import exclusive
from recall.metrics import HEADLINE, SUMMARIES, derived_summaries
from recall.provenance import content_id

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.tracking import MlflowClient

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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def source_tags(command: str) -> dict[str, str]:
    """MLflow's source tags (the runs table's Source and Version columns) and our `git_commit` (with -dirty).
    Under `dvc repro` the source is the stage (DVC sets DVC_STAGE), e.g. `dvc.yaml:step0@15-overlapped`, which
    `dvc repro` accepts as is, or `study/dvc.yaml:run@...` for the study's DVC project (from its root, DVC_ROOT, and
    the top, where the command runs; `dvc --cd study repro run@...` runs it again); else the command, e.g.
    `recall run`. The remote URL is left out (it may hold a
    token)."""
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY, MLFLOW_SOURCE_NAME,
                                          MLFLOW_SOURCE_TYPE)

    stage = os.environ.get("DVC_STAGE")
    if stage and ":" not in stage:  # a stage of the dvc.yaml at its project's root: DVC names it alone
        root = os.environ.get("DVC_ROOT")
        name = f"{os.path.relpath(os.path.join(root, 'dvc.yaml')) if root else 'dvc.yaml'}:{stage}"
    else:
        name = stage or command
    commit = git_commit()
    tags = {MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_SOURCE_NAME: name, "git_commit": commit}
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags[MLFLOW_GIT_DIRTY] = str(commit.endswith("-dirty")).lower()
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[MLFLOW_GIT_BRANCH] = branch
    return tags


MAX_DIGEST = 36  # MLflow's limit for a dataset digest: a DVC md5 + `.dir` fits; longer ids are cut (whole in profile)


def _dataset_input(name: str, path: str, context: str, profile: dict) -> DatasetInput:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    cid = content_id(path)
    dataset = Dataset(name=name, digest=cid[:MAX_DIGEST], source_type="local", source=json.dumps({"uri": str(path)}),
                      profile=json.dumps({"content_id": cid, **profile}))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def dataset_inputs(config: dict) -> list[DatasetInput]:
    """A run's data as MLflow dataset inputs: `<dataset>/<split>` for the train and val splits (context train,
    val) and `<source> pool` for the replay pool (context replay), each with its content id as digest."""
    from recall.data.voc import split_file

    data = config.get("dataset") or {}
    inputs = []
    if data.get("root"):
        for key, context in (("train_split", "train"), ("val_split", "val")):
            split = data.get(key)
            if not split:
                continue
            listing = split_file(data["root"], split)
            images = sum(1 for line in listing.read_text().splitlines() if line.strip()) if listing.is_file() else None
            inputs.append(_dataset_input(f"{data.get('name', 'dataset')}/{split}", data["root"], context,
                                         {"split": split, "images": images}))
    replay = config.get("replay") or {}
    if replay.get("pool"):
        built = config.get("pool_built") or {}
        inputs.append(_dataset_input(f"{replay.get('name', 'replay')} pool", replay["pool"], "replay",
                                     {"images": built.get("total")}))
    return inputs


def log_dataset_inputs(client: MlflowClient, run_id: str, config: dict) -> None:
    inputs = dataset_inputs(config)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _mean(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def run_note(tags: dict[str, str], result: dict | None, status: str, run_dir: Path | None,
             figures: list[Path] = ()) -> str:
    """The run description (markdown) MLflow shows above a run: what ran, on what, the final mIoU, where the
    figures are."""
    method, replay = tags.get("method", "?"), tags.get("replay", "none")
    what = f"**{tags.get('protocol', '?')} {tags.get('setting', '')} · {method}**".replace("  ", " ")
    if tags.get("role") == "step0":
        what = (f"**Step 0** of {tags.get('protocol', '?')} ({tags.get('setting', '')}, {method}): the shared model "
                "the incremental runs start from (their `step0=`)")
    lines = [f"{what}, seed {tags.get('seed', '?')}, dataset `{tags.get('dataset', '?')}`."]
    if tags.get("replay.stored_data") == "true":  # e.g. replay=memory: no pool, and not privacy-preserving
        lines.append(f"Replay: `{replay}`: **stored data**, training images of earlier steps kept in the run "
                     "directory (tag `replay.stored_data`).")
    else:
        lines.append(f"Replay: `{replay}`" + (" (pool and its hash: the Dataset column)." if replay != "none" else "."))
    if result is not None:
        miou = result.get("miou", {})
        when = "Final mIoU" if status == "FINISHED" else "mIoU of the last finished step"
        lines.append(f"{when} (step {result.get('step')}): "
                     + " · ".join(f"{SUMMARIES[m].label} {_mean(miou.get(m))}" for m in HEADLINE) + ".")
    if status != "FINISHED":
        lines.append(f"Ended {status}: restarting the same command resumes this run.")
    if figures:
        lines.append("Figures: artifacts `figures/` (" + ", ".join(Path(f).name for f in figures) + ")"
                     + (f", and `{run_dir / 'figures'}/`." if run_dir is not None else "."))
    if run_dir is not None:
        lines.append(f"Run directory: `{run_dir}` (metrics.json, curve.csv, steps/).")
    return "\n\n".join(lines)


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
    """A step's result record as MLflow metrics: miou/*, iou/<class>, forgetting/<class>, the derived numbers
    (miou/hmean, forgetting/mean) and the method's statistics (RECALL: replay/*)."""
    metrics = {f"miou/{k}": v for k, v in result["miou"].items() if v is not None}
    metrics.update({f"iou/{_metric_name(c)}": v for c, v in result["iou"].items() if v is not None})
    metrics.update({f"forgetting/{_metric_name(c)}": v for c, v in result["forgetting"].items() if v is not None})
    for summary in derived_summaries():  # miou/hmean, forgetting/mean, ...
        if (value := summary.compute(result)) is not None:
            metrics[summary.mlflow] = value
    metrics.update(result.get("statistics", {}))  # e.g. replay/pool_images, replay/labelled_share, ...
    return metrics


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """A (nested) config as params, secrets dropped: one sqlite transaction per batch, not per value."""
    from mlflow.entities import Param

    flat = [Param(key, value) for key, value in flatten(params).items()]
    for first in range(0, len(flat), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=flat[first:first + PARAMS_PER_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Metrics of one step, in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for first in range(0, len(batch), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[first:first + METRICS_PER_BATCH])


def open_client(uri: str) -> MlflowClient:
    """A client of the tracking store at `uri`. A new sqlite store creates its tables on first use, which two
    processes must not do at once (`duplicate column name`): that first use runs under a lock next to the file."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with exclusive(Path(uri.removeprefix("sqlite:///") + ".lock")):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates or migrates the tables
    return client


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of the store at `uri` keeps its artifacts: for a sqlite file, `mlruns/` beside the
    file (MLflow's own default is `./mlruns` of whichever directory the first run started in); for a server, its
    own default (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns")


EXPERIMENT_KIND = "mlflow.experimentKind"  # the experiment type MLflow 3's UI lets a person choose


def experiment_note(name: str) -> str:
    return (f"Runs of **recall** (RECALL, ICCV 2021: continual semantic segmentation with replay) on the `{name}` "
            "dataset.\n\n"
            "- One parent run per protocol run, named `<protocol> · <method> · <replay source> · seed <n>`, with a "
            "child run per step; `step 0 · …` runs are the shared step-0 models the others start from "
            "(tag `role`: protocol, step0); `tune · <study>` runs are Optuna studies with a child run per trial.\n"
            "- Metrics over steps: `miou/old_no_bg`, `miou/new`, `miou/all`, `iou/<class>`, `forgetting/<class>`, "
            "and `replay/*` for replay runs.\n"
            "- Dataset column: the train and val splits and the replay pool, with their content hash as digest (the "
            "DVC md5 when DVC tracks the data). Source column: the DVC stage or command; Version: the git commit.\n"
            "- Filter e.g. `tags.method = 'recall' and tags.replay = 'web'`; each run's description says its final "
            "mIoU and where its figures are.")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed (another process may create it at the same moment), with
    a description and MLflow's "model training" kind when it has none yet (a person's edits are kept)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
        except MlflowException:  # another worker created it in the meantime
            pass
        found = client.get_experiment_by_name(name)
    for key, value in ((MLFLOW_RUN_NOTE, experiment_note(name)), (EXPERIMENT_KIND, "custom_model_development")):
        if key not in found.tags:
            try:
                client.set_experiment_tag(found.experiment_id, key, value)
            except MlflowException:  # another worker set it at the same moment: a description never fails a run
                pass
    return found.experiment_id


class Tracker:
    """Logs a protocol run to MLflow; resumable through `<run_dir>/mlflow_run.json`. Nothing touches the tracking
    store before `start` (a run refused by its checks leaves no trace there)."""

    def __init__(self, uri: str = "sqlite:///mlflow.db", experiment: str = "toy"):
        self.uri, self.experiment = uri, experiment
        self.client: MlflowClient | None = None  # opening a sqlite store creates the database: at start, not here
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.tags: dict[str, str] = {}
        self.run_dir: Path | None = None
        self.last_result: dict | None = None

    def start(self, run_dir: Path, name: str, tags: dict[str, str], params: dict) -> str:
        """`run_dir`: the run's steps/ directory (holds the MLflow run id)."""
        from mlflow.exceptions import MlflowException

        self.tags, self.run_dir = dict(tags), Path(run_dir).parent
        self.client = open_client(self.uri)
        self.experiment_id = experiment_id(self.client, self.experiment)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            recorded = json.loads(id_file.read_text())
            try:
                self.client.update_run(recorded["run_id"], status="RUNNING")
                self.parent_id = recorded["run_id"]
                return self.parent_id
            except MlflowException:  # another store (tracking.uri changed, or its database removed): a new MLflow
                # run, into which the finished steps are logged again (`log_step`); the run directory keeps them
                print(f"recall: the MLflow run {recorded['run_id']} of {id_file} is not in "
                      f"{strip_password(self.client.tracking_uri)} (it was logged to "
                      f"{recorded.get('tracking_uri', 'another store')}): this run is logged as a new MLflow run",
                      file=sys.stderr)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, **source_tags("recall run")})
        self.parent_id = run.info.run_id
        log_params(self.client, self.parent_id, params)
        log_dataset_inputs(self.client, self.parent_id, params)
        write_json(id_file, {"run_id": self.parent_id, "tracking_uri": strip_password(self.client.tracking_uri)})
        return self.parent_id

    def _logged_steps(self) -> set[int]:
        children = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'")
        return {int(r.data.tags["step"]) for r in children if r.info.status == "FINISHED"}

    def log_step(self, result: dict) -> None:
        step = result["step"]
        self.last_result = result
        if step in self._logged_steps():
            return
        metrics = step_metrics(result)
        parent = self.client.get_run(self.parent_id)
        child = self.client.create_run(self.experiment_id, run_name=f"{parent.info.run_name} · step {step}",
                                       tags={"mlflow.parentRunId": self.parent_id, "step": str(step),
                                             **{k: v for k, v in parent.data.tags.items()
                                                if not k.startswith("mlflow.") or k.startswith("mlflow.source.")}})
        for run_id in (self.parent_id, child.info.run_id):
            log_metrics(self.client, run_id, metrics, step)
        self.client.log_param(child.info.run_id, "new_classes", ",".join(result["new_classes"]))
        self.client.set_terminated(child.info.run_id)

    def finish(self, artifacts: list[Path], status: str = "FINISHED", figures: list[Path] = ()) -> None:
        """Log the run's files (figures under `figures/`) and close the parent run with ``status``."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        for path in figures:
            self.client.log_artifact(self.parent_id, str(path), artifact_path="figures")
        self.client.set_tag(self.parent_id, MLFLOW_RUN_NOTE,
                            run_note(self.tags, self.last_result, status, self.run_dir, figures))
        self.client.set_terminated(self.parent_id, status=status)


class StageTracker:
    """The MLflow run of a stage that is not a protocol run (`recall pretrain`, `recall classmap`): its settings, its
    metrics (with an optional per-epoch series) and files."""

    def __init__(self, uri: str = "sqlite:///mlflow.db", experiment: str = "toy"):
        self.uri, self.experiment = uri, experiment

    def log(self, name: str, role: str, command: str, params: dict, metrics: dict[str, float],
            artifacts: list[Path] = (), series: dict[str, list[float]] | None = None) -> str:
        client = open_client(self.uri)
        run = client.create_run(experiment_id(client, self.experiment), run_name=name,
                                tags={"role": role, **source_tags(command)})
        run_id = run.info.run_id
        log_params(client, run_id, params)
        last = 0
        for key, values in (series or {}).items():
            for step, value in enumerate(values):
                log_metrics(client, run_id, {key: value}, step=step)
            last = max(last, len(values))
        log_metrics(client, run_id, {k: float(v) for k, v in metrics.items()}, step=last)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
        return run_id

    def log_pretraining(self, params: dict, metrics: dict, train_accuracy: list[float], artifacts: list[Path]) -> str:
        return self.log(f"pretrain · {params['backbone']} · {params['dataset']}", "pretrain", "recall pretrain",
                        params, {f"pretrain/{k}": v for k, v in metrics.items()}, artifacts,
                        {"pretrain/train_top1": train_accuracy})


# ---------------------------------------------------------------------------------------------- recall tune
TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # optuna state -> MLflow status


def close_trial_run(client: MlflowClient, run_id: str, state: str) -> None:
    """Mark a trial's run with its final Optuna state and the matching MLflow status."""
    client.set_tag(run_id, "optuna.state", state)
    client.set_terminated(run_id, status=TRIAL_STATUS.get(state, "FAILED"))


def study_note(tags: dict[str, str], metrics: dict[str, float]) -> str:
    """The description of a study's parent run: what was tuned, the trial counts, where to look next."""
    counts = ", ".join(f"{int(v)} {k.removeprefix('trials/')}" for k, v in sorted(metrics.items())
                       if k.startswith("trials/"))
    best = f" Best value: {metrics['best_value']:.3f}." if "best_value" in metrics else ""
    storage = tags.get("optuna.storage", "sqlite:///optuna.db")
    return (f"**Optuna study `{tags.get('optuna.study', '?')}`**: {tags.get('protocol', '?')} · "
            f"{tags.get('method', '?')} · replay `{tags.get('replay', '?')}`, "
            f"objective `{tags.get('objective', '?')}`."
            f"\n\nTrials: {counts or 'none'} (one child run each).{best}\n\n"
            f"Artifacts: `best.yaml` (the best trial as a `recall run` command) and `figures/`. "
            f"Optuna's own dashboard: `optuna-dashboard {storage}`.")


class StudyTracker:
    """The MLflow side of an Optuna study (`recall tune`): one parent run per study (`tune · <study>`), shared by
    every worker through its id (an Optuna study attribute), and one child run per trial."""

    def __init__(self, uri: str = "sqlite:///mlflow.db", experiment: str = "toy"):
        self.client = open_client(uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def open_parent(self, run_id: str | None, study: str, tags: dict[str, str], params: dict) -> str:
        """The study's parent run: `run_id` when a worker created it already (marked RUNNING again), else a new one."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException:  # the study's run lives in another MLflow store (tracking.uri changed)
                pass
        run = self.client.create_run(self.experiment_id, run_name=f"tune · {study}",
                                     tags={**tags, "optuna.study": study, "role": "study",
                                           **source_tags("recall tune")})
        log_params(self.client, run.info.run_id, params)
        log_dataset_inputs(self.client, run.info.run_id, params)
        return run.info.run_id

    def trial(self, parent_id: str, study: str, number: int, params: dict, objective,
              on_start=None) -> TrialTracker:
        return TrialTracker(self.client, self.experiment_id, parent_id, study, number, params, objective, on_start)

    def close_run(self, run_id: str, state: str) -> None:
        """Mark a trial's run with its final Optuna state (also for a killed worker's trial, found stale later)."""
        close_trial_run(self.client, run_id, state)

    def close_parent(self, parent_id: str, metrics: dict[str, float], artifacts: list[Path] = (),
                     figures: list[Path] = ()) -> None:
        """The end of one worker's invocation: study counts and best value, best.yaml and the study's figures."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        if metrics:
            log_metrics(self.client, parent_id, metrics, step=0)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(parent_id, str(path))
        for path in figures:
            self.client.log_artifact(parent_id, str(path), artifact_path="figures")
        self.client.set_tag(parent_id, MLFLOW_RUN_NOTE, study_note(self.client.get_run(parent_id).data.tags, metrics))
        self.client.set_terminated(parent_id, status="FINISHED")


class TrialTracker:
    """What `run_protocol` calls for one Optuna trial (start / log_step / finish), logging to the trial's child run.

    After each step it logs the step's metrics and `objective` (``objective(result)``, None when the step has no
    value). The run stays open until `close(state)`: only the caller knows whether the trial completed, was pruned
    or failed. (Pruning is not its business: `run_protocol`'s `on_step` callback reports to Optuna.)
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str, study: str, number: int,
                 params: dict, objective, on_start=None):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.study, self.number, self.params = study, number, params
        self.objective, self.on_start = objective, on_start
        self.run_id: str | None = None

    def start(self, run_dir: Path, name: str, tags: dict[str, str], params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.study} · trial {self.number}",
                                     tags={**tags, "mlflow.parentRunId": self.parent_id, "optuna.study": self.study,
                                           "optuna.trial": str(self.number), "optuna.state": "RUNNING",
                                           "role": "trial", **source_tags("recall tune")})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, {**self.params, "trial": self.number})
        log_dataset_inputs(self.client, self.run_id, params)
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

    def finish(self, artifacts: list[Path], status: str = "FINISHED", figures: list[Path] = ()) -> None:
        if self.run_id is None:
            return
        for path in [*artifacts, *figures]:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, state: str) -> None:
        if self.run_id is not None:
            close_trial_run(self.client, self.run_id, state)
