"""`recall tune`: an Optuna study of RECALL's hyper-parameters (replay ratio r, inpainting threshold tau, label
threshold, incremental lr), pruned per step, resumable and parallel. The only module that imports optuna.

    recall tune protocol=15-1x5 method=recall replay=toy_gan tune=r_tau tune.step0=models/step0/15-overlapped

A trial = one protocol run from the shared step-0 model (`tune.step0`, never retrained) with the sampled values;
its config = the command's overrides + `tune.trial_overrides` (the trial budget) + the sampled values. After every
incremental step the trial's MLflow run logs the step and the objective is reported to Optuna, which may prune it
(CurrentValuePruner: mIoU falls over incremental steps, so compare trials at the same step, not best-so-far).

Files: <runs_dir>/<study>/trial_<n>/ (run dirs), best.yaml, figures/*.png, .lock (study creation). The study lives
in `tune.storage` (sqlite or PostgreSQL): re-running the command continues it; several workers may share it.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from recall.atomic import write_text
from recall.config import compose, strip_password
from recall.locks import exclusive
from recall.metrics import DEFAULT_OBJECTIVE, MULTI_OBJECTIVES, SUMMARIES
from recall.ownership import remove_ours

# tune.objective: any number of recall.metrics.SUMMARIES by its name (its direction is Optuna's), or one of its
# MULTI_OBJECTIVES (old_new: the multi-objective (old_no_bg, new))
def objective_metrics() -> dict[str, tuple[str, ...]]:
    """tune.objective -> the SUMMARIES it optimizes."""
    return {**{name: (name,) for name in SUMMARIES}, **MULTI_OBJECTIVES}


def directions(objective: str) -> tuple[str, ...]:
    return tuple(SUMMARIES[m].direction for m in objective_metrics()[objective])


def objective_names(objective: str) -> list[str]:
    """Optuna's names of the objective's values (its figures' axes): the MLflow keys, "/" -> "_"."""
    return [SUMMARIES[m].mlflow.replace("/", "_") for m in objective_metrics()[objective]]
PRUNERS = ("current_value", "median", "none")
SAMPLERS = ("tpe", "random")
TYPES = ("float", "int", "categorical")
SETTINGS = ("study", "storage", "n_trials", "timeout", "objective", "pruner", "sampler", "step0", "trial_overrides",
            "runs_dir", "keep_checkpoints", "heartbeat_interval", "grace_period", "space", "reference_first")
CREATE_RACES = ("UNIQUE constraint failed", "database is locked", "already exists")  # sqlite, workers at one instant
_MISSING = object()


# ---------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config path and its distribution."""

    path: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial):
        if self.type == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.path, list(self.choices))

    def corners(self) -> tuple:
        """The extreme values of the dimension (checked before the study starts)."""
        return (self.low, self.high) if self.type != "categorical" else (self.choices[0], self.choices[-1])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_param(path: str, spec: dict) -> Param:
    key = f"tune.space.{path}"
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {sorted(unknown)}; allowed: type, low, high, log, step, choices")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ValueError(f"{key}: type={kind!r}; allowed: {', '.join(TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{key}: a categorical parameter needs a non-empty list `choices`")
        return Param(path, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    if not (_number(low) and _number(high)):
        raise ValueError(f"{key}: a {kind} parameter needs numbers `low` and `high` (got low={low!r}, high={high!r})")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"{key}: an int parameter needs integer bounds (got low={low}, high={high})")
    if low > high:
        raise ValueError(f"{key}: low={low} > high={high}")
    if log and low <= 0:
        raise ValueError(f"{key}: log=true needs low > 0 (got low={low})")
    if step is not None and (not _number(step) or step <= 0):
        raise ValueError(f"{key}: step={step!r} must be a positive number")
    if log and step is not None and step != 1:
        raise ValueError(f"{key}: log=true and step={step} cannot be combined (Optuna samples one or the other)")
    if kind == "int":
        return Param(path, kind, int(low), int(high), log, int(step) if step else None)
    return Param(path, kind, float(low), float(high), log, float(step) if step else None)


def parse_space(space: dict | None) -> list[Param]:
    """`tune.space` (nested like the config: method: {replay_ratio: {type: float, ...}}, or with dotted keys) ->
    parameters; an entry set to null is left out."""
    params: list[Param] = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if value is None:
                continue
            if isinstance(value, dict) and "type" in value:
                params.append(parse_param(path, value))
            elif isinstance(value, dict) and value:
                walk(value, path + ".")
            else:
                raise ValueError(f"tune.space.{path}: expected {{type: float|int|categorical, low, high, log, step, "
                                 f"choices}} (or null to leave it out), got {value!r}")

    walk(space or {}, "")
    if not params:
        raise ValueError("tune.space is empty: give at least one parameter, e.g. "
                         "method: {replay_ratio: {type: float, low: 0.0, high: 0.9}}")
    return params


def check_paths(params: list[Param], cfg: DictConfig) -> None:
    """Every parameter names a value of the composed configuration (a typo would otherwise be tuned for nothing)."""
    for p in params:
        found = OmegaConf.select(cfg, p.path, default=_MISSING)
        if found is _MISSING:
            section = p.path.split(".")[0]
            known = ", ".join(f"{section}.{k}" for k in cfg[section]) if section in cfg and isinstance(
                cfg[section], DictConfig) else ", ".join(str(k) for k in cfg)
            raise ValueError(f"tune.space.{p.path}: `{p.path}` is not in the composed configuration; "
                             f"known here: {known}")
        if isinstance(found, DictConfig):
            raise ValueError(f"tune.space.{p.path}: `{p.path}` is a config section, not a value to tune")


def format_value(value) -> str:
    """A value as Hydra override text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in ("true", "false", "null", "none"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def as_overrides(params: dict) -> list[str]:
    return [f"{path}={format_value(value)}" for path, value in params.items()]


# ---------------------------------------------------------------------------------------------- objective
def step_value(result: dict, objective: str) -> float | None:
    """The value reported to Optuna after an incremental step (None at step 0, identical for every trial, and for
    a multi-objective study such as `old_new`, which Optuna cannot prune)."""
    metrics = objective_metrics()[objective]
    if result["step"] == 0 or len(metrics) > 1:
        return None
    return SUMMARIES[metrics[0]].value(result)


def final_values(result: dict, objective: str) -> list[float | None]:
    """The objective's values of a run's final step record (metrics.json `final`)."""
    return [SUMMARIES[m].value(result) for m in objective_metrics()[objective]]


class CurrentValuePruner(optuna.pruners.BasePruner):
    """Prune a trial whose value at the current step is below the `percentile` of the other finished (complete or
    pruned) trials' values *at the same step*. Optuna's Median/Percentile pruners compare a trial's best value so
    far; mIoU falls over incremental steps, so that is its first step and they (almost) never prune here.

    It judges a step once `n_startup_trials` other trials have reported it, and from step `n_warmup_steps` on.
    """

    def __init__(self, percentile: float = 25.0, n_startup_trials: int = 4, n_warmup_steps: int = 1):
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"tune.pruner.percentile={percentile}: must be in [0, 100]")
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError(f"tune.pruner: n_startup_trials={n_startup_trials} and n_warmup_steps={n_warmup_steps} "
                             "must be >= 0")
        self.percentile = float(percentile)
        self.n_startup_trials = int(n_startup_trials)
        self.n_warmup_steps = int(n_warmup_steps)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        others = [t.intermediate_values[step]
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                  if t.number != trial.number and step in t.intermediate_values]
        others = [v for v in others if not math.isnan(v)]
        if len(others) < max(self.n_startup_trials, 1):
            return False
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return value < float(np.percentile(others, self.percentile))
        return value > float(np.percentile(others, 100.0 - self.percentile))


def build_pruner(spec: dict, objective: str) -> optuna.pruners.BasePruner:
    name = spec.get("name", "current_value")
    if name not in PRUNERS:
        raise ValueError(f"tune.pruner.name={name!r}; allowed: {', '.join(PRUNERS)}")
    unknown = set(spec) - {"name", "n_startup_trials", "n_warmup_steps", "percentile"}
    if unknown:
        raise ValueError(f"tune.pruner: unknown field(s) {sorted(unknown)}; "
                         "allowed: name, n_startup_trials, n_warmup_steps, percentile")
    if len(directions(objective)) > 1 or name == "none":
        return optuna.pruners.NopPruner()
    startup, warmup = int(spec.get("n_startup_trials", 4)), int(spec.get("n_warmup_steps", 1))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    return CurrentValuePruner(float(spec.get("percentile", 25.0)), startup, warmup)


def build_sampler(spec: dict, seed: int | None) -> optuna.samplers.BaseSampler:
    name = spec.get("name", "tpe")
    if name not in SAMPLERS:
        raise ValueError(f"tune.sampler.name={name!r}; allowed: {', '.join(SAMPLERS)}")
    unknown = set(spec) - {"name", "seed", "n_startup_trials"}
    if unknown:
        raise ValueError(f"tune.sampler: unknown field(s) {sorted(unknown)}; allowed: name, seed, n_startup_trials")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a bad result, so concurrent workers do not sample the same point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(spec.get("n_startup_trials", 10)),
                                      constant_liar=True)


# ---------------------------------------------------------------------------------------------- storage


def open_storage(url: str, heartbeat_interval: int | None, grace_period: int | None, on_stale=None):
    """An RDB storage whose workers send heartbeats: a trial of a killed worker becomes FAIL (and is retried once,
    with the same parameters) when another worker, or the next invocation, notices its silence."""
    from sqlalchemy.exc import ArgumentError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period if heartbeat_interval else None,
                                          heartbeat_stale_trial_callback=on_stale if heartbeat_interval else None)
    except (ArgumentError, ImportError) as error:
        raise ValueError(f"tune.storage={strip_password(url)}: cannot open it ({error}); e.g. sqlite:///optuna.db or "
                         "postgresql+psycopg://user@host:5432/optuna (pip install -e '.[cluster]'; docs/cluster.md)"
                         ) from error


def create_study(name: str, url: str, make_storage, directions: tuple[str, ...], attempts: int = 6) -> optuna.Study:
    """create_study(load_if_exists=True), retried on the sqlite races of a fresh database."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.create_study(study_name=name, storage=make_storage(), directions=list(directions),
                                       load_if_exists=True)
        except SQLAlchemyError as error:  # IntegrityError / OperationalError
            if attempt < attempts - 1 and any(marker in str(error) for marker in CREATE_RACES):
                time.sleep(0.3 * (attempt + 1))
                continue
            raise ValueError(f"tune.storage={strip_password(url)}: {str(error).splitlines()[0]}") from error
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- the study
@dataclass
class Settings:
    study: str
    storage: str
    n_trials: int | None
    timeout: float | None
    objective: str
    pruner: dict
    sampler: dict
    step0: Path
    trial_overrides: list[str]
    runs_dir: Path
    keep_checkpoints: bool
    heartbeat_interval: int | None
    grace_period: int | None
    space: list[Param]
    reference_first: bool = True

    @property
    def study_dir(self) -> Path:
        return self.runs_dir / self.study

    @property
    def multi(self) -> bool:
        return len(directions(self.objective)) > 1


def read_settings(cfg: DictConfig) -> Settings:
    """The `tune` section, checked: every mistake is a ValueError naming the key and what is allowed."""
    if "tune" not in cfg:
        raise ValueError("the configuration has no `tune` section (conf/config.yaml's defaults list: tune: default)")
    t = OmegaConf.to_container(cfg.tune, resolve=True)
    unknown = set(t) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown tune option(s) {sorted(unknown)}; valid: {', '.join(SETTINGS)}")
    objective = t.get("objective", DEFAULT_OBJECTIVE)
    if objective not in objective_metrics():
        raise ValueError(f"tune.objective={objective!r}; allowed: {', '.join(objective_metrics())}")
    n_trials = t.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 0):
        raise ValueError(f"tune.n_trials={n_trials!r}: a number of trials to add (>= 0), or null with tune.timeout")
    timeout = t.get("timeout")
    if timeout is not None and (not _number(timeout) or timeout <= 0):
        raise ValueError(f"tune.timeout={timeout!r}: seconds (> 0) or null")
    if n_trials is None and timeout is None:
        raise ValueError("tune.n_trials and tune.timeout are both null: the study would never stop")
    step0 = t.get("step0") or cfg.get("step0")
    if not step0:
        raise ValueError("tune.step0: give a finished step-0 run directory every trial starts from, e.g. "
                         "tune.step0=models/step0/15-overlapped (`dvc repro step0` or `recall run last_step=0 ...`); "
                         "trials never retrain step 0")
    if not (Path(step0) / "steps" / "0" / "model.pt").is_file():
        raise ValueError(f"tune.step0={step0}: no finished step 0 there (steps/0/model.pt is missing)")
    overrides = t.get("trial_overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ValueError(f"tune.trial_overrides={overrides!r}: a list of overrides, e.g. [train.epochs_incremental=3]")
    for key in ("heartbeat_interval", "grace_period"):
        value = t.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"tune.{key}={value!r}: seconds (a positive integer) or null")
    for key in ("pruner", "sampler"):
        if not isinstance(t.get(key) or {}, dict):
            example = PRUNERS[0] if key == "pruner" else SAMPLERS[0]
            raise ValueError(f"tune.{key}: a mapping with a `name`, e.g. {{name: {example}}}")
    study = t.get("study") or f"{cfg.protocol.name}_{cfg.method.name}_{cfg.replay.name}"
    if not re.fullmatch(r"[\w.+-]+", str(study)):
        raise ValueError(f"tune.study={study!r}: letters, digits and _ . + - only (it names a directory)")
    return Settings(study=str(study), storage=str(t.get("storage") or "sqlite:///optuna.db"), n_trials=n_trials,
                    timeout=timeout, objective=objective, pruner=dict(t.get("pruner") or {}),
                    sampler=dict(t.get("sampler") or {}), step0=Path(step0), trial_overrides=list(overrides),
                    runs_dir=Path(t.get("runs_dir") or "tune"), keep_checkpoints=bool(t.get("keep_checkpoints")),
                    heartbeat_interval=t.get("heartbeat_interval"), grace_period=t.get("grace_period"),
                    space=parse_space(t.get("space")), reference_first=bool(t.get("reference_first", True)))


class Tuner:
    """One worker's invocation of a study: creates or joins it, runs `n_trials` trials, writes the summary."""

    def __init__(self, overrides: list[str], params_file: str | Path | None = None):
        from recall.experiment import ProtocolRun

        self.overrides, self.params_file = list(overrides), params_file
        self.cfg = compose(self.overrides, params_file=params_file)
        self.s = read_settings(self.cfg)
        self.pruner = build_pruner(self.s.pruner, self.s.objective)
        build_sampler(self.s.sampler, None)  # check its settings before anything is created
        self.base = ProtocolRun(self.cfg)
        check_paths(self.s.space, self.cfg)  # e.g. method.replay_ratio: only a method that has it can be tuned on it
        self.base.method.inputs(self.base, check=True)  # e.g. the replay pool: before the study, not in trial 0
        for corner, values in (("low", 0), ("high", 1)):  # e.g. replay_ratio high=1 is refused here, not in trial 7
            try:
                ProtocolRun(self.trial_config({p.path: p.corners()[values] for p in self.s.space}, Path("unused")))
            except ValueError as error:
                raise ValueError(f"tune.space: a trial at the {corner} end of the search space would fail: {error}") \
                    from error
        self.tracker = None
        self.parent_id: str | None = None
        self.mine: list[int] = []

    # ------------------------------------------------------------------ configs
    def trial_config(self, params: dict, run_dir: Path) -> DictConfig:
        return compose([*self.overrides, *self.s.trial_overrides, *as_overrides(params), f"run_dir={run_dir}",
                        f"step0={self.s.step0}"], params_file=self.params_file)

    def run_overrides(self) -> list[str]:
        """The command's overrides that make a run (not the study settings): for best.yaml's `recall run` line."""
        return [o for o in self.overrides
                if not re.match(r"~?\+{0,2}(tune[.=]|run_dir=|step0=|last_step=)", o)]

    # ------------------------------------------------------------------ study
    def open_study(self) -> optuna.Study:
        s = self.s
        with exclusive(s.study_dir / ".lock"):
            study = create_study(s.study, s.storage, lambda: open_storage(s.storage, s.heartbeat_interval,
                                                                          s.grace_period, self.on_stale),
                                 directions(s.objective))
            created = study.user_attrs.get("objective")
            if created is None:
                reference = self.reference_params() if s.reference_first else None
                if reference is not None:  # trial 0 = the configured values (RECALL's defaults): the one to beat
                    study.enqueue_trial(reference)
                study.set_user_attr("objective", s.objective)
                study.set_user_attr("protocol", str(self.cfg.protocol.name))
                study.set_user_attr("search_space", [p.path for p in s.space])
            elif created != s.objective:
                raise ValueError(f"tune.objective={s.objective}: study {s.study} in {strip_password(s.storage)} was "
                                 f"created with objective={created}; keep it, or pass another tune.study=")
            workers = int(study.user_attrs.get("workers_started", 0))
            study.set_user_attr("workers_started", workers + 1)
            if self.cfg.tracking.uri:
                from recall.tracking import StudyTracker
                self.tracker = StudyTracker(self.cfg.tracking.uri,
                                            self.cfg.tracking.experiment or str(self.cfg.dataset.name))
                self.parent_id = self.tracker.open_parent(study.user_attrs.get("mlflow_parent_run_id"), s.study,
                                                          self.parent_tags(), OmegaConf.to_container(self.cfg,
                                                                                                     resolve=True))
                study.set_user_attr("mlflow_parent_run_id", self.parent_id)
        # the worker that creates the study samples with tune.sampler.seed (a sequential study is reproducible);
        # resumed and concurrent workers get seeds of their own instead of replaying the same points
        seed = self.s.sampler.get("seed")
        seed = None if seed is None else int(seed) + 1000 * workers
        study.sampler = build_sampler(s.sampler, seed)
        study.pruner = self.pruner
        return study

    def reference_params(self) -> dict | None:
        """The searched parameters' values in the composed configuration (e.g. r = 0.5, tau = 0), or None (with a
        note) when one lies outside the search space."""
        reference = {}
        for p in self.s.space:
            value = OmegaConf.select(self.cfg, p.path)
            outside = (value not in p.choices) if p.type == "categorical" else not p.low <= value <= p.high
            if outside:
                print(f"tune: no reference trial: {p.path}={value} of the configuration is outside the search space",
                      flush=True)
                return None
            reference[p.path] = value
        return reference

    def parent_tags(self) -> dict[str, str]:
        c = self.cfg
        return {"optuna.storage": strip_password(self.s.storage), "protocol": str(c.protocol.name),
                "setting": str(c.setting.name), "method": str(c.method.name), "replay": str(c.replay.name),
                "objective": self.s.objective, "step0": str(self.s.step0), "kind": "tune"}

    def on_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial whose worker stopped sending heartbeats: Optuna marks it FAIL; retry it once; close its MLflow
        run."""
        retried = len(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)) < 1
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
        if trial.user_attrs.get("run_dir") and not self.s.keep_checkpoints:  # its checkpoints: nobody resumes them
            drop_checkpoints(Path(trial.user_attrs["run_dir"]))
        print(f"tune: trial {trial.number}: its worker went silent (killed?): FAIL"
              + (", queued again with the same parameters" if retried else ", not retried again"), flush=True)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.tracker is not None and run_id:
            self.tracker.close_run(run_id, "FAIL")

    # ------------------------------------------------------------------ one trial
    def objective(self, trial: optuna.Trial):
        from recall.experiment import check_run_dir, legacy_run, mark_run_dir, run_protocol

        s = self.s
        params = {p.path: p.suggest(trial) for p in s.space}
        run_dir = s.study_dir / f"trial_{trial.number}"
        cfg = self.trial_config(params, run_dir)
        if run_dir.exists():  # left by an earlier study of the same name (trial numbers are unique in a study)
            remove_ours(run_dir, "run", legacy=legacy_run)
        check_run_dir(run_dir, cfg)
        mark_run_dir(run_dir, cfg)  # a run directory of ours before anything is put in it
        for cache in s.step0.glob("image_classes_*.json"):  # the step-0 run's class index (checked by fingerprint)
            shutil.copyfile(cache, run_dir / cache.name)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", as_overrides(params))
        tracker = self.trial_tracker(trial, params)
        self.mine.append(trial.number)
        state = "FAIL"
        try:
            payload = run_protocol(cfg, tracker, figures=False, on_step=partial(self.report_step, trial))
            values = final_values(payload["final"], s.objective)
            if any(v is None or math.isnan(v) for v in values):
                raise RuntimeError(f"trial {trial.number}: the final mIoU is undefined ({values}); no objective value")
            state = "COMPLETE"
            return values if s.multi else values[0]
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
            raise
        finally:
            if tracker is not None:
                tracker.close(state)
            if not s.keep_checkpoints:
                drop_checkpoints(run_dir)

    def report_step(self, trial: optuna.Trial, result: dict) -> None:
        """`run_protocol`'s per-step callback: report the step's objective to Optuna, which may prune the trial
        (TrialPruned stops the run)."""
        value = step_value(result, self.s.objective)
        if value is None or self.s.multi:
            return
        trial.report(value, result["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after step {result['step']}: {self.s.objective}={value:.4f}")

    def trial_tracker(self, trial: optuna.Trial, params: dict):
        """The trial's MLflow child run (None without tracking.uri)."""
        if self.tracker is None:
            return None
        return self.tracker.trial(self.parent_id, self.s.study, trial.number, params,
                                  partial(step_value, objective=self.s.objective),
                                  on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))

    # ------------------------------------------------------------------ the invocation
    def run(self) -> int:
        s = self.s
        started = time.time()
        if s.multi:
            goal = " ".join(("/".join(dict.fromkeys(directions(s.objective))),
                             " and ".join(objective_metrics()[s.objective])))  # "maximize old_no_bg and new"
            print(f"tune: objective={s.objective} is multi-objective ({goal}): Optuna cannot "
                  f"prune multi-objective trials, so every trial runs all steps (tune.pruner is ignored)", flush=True)
        study = self.open_study()
        before = len(study.trials)
        queued = sum(t.state == optuna.trial.TrialState.WAITING for t in study.trials)
        print(f"tune: study {s.study} in {strip_password(s.storage)} ({plural(before - queued, 'trial')} so far"
              f"{', the reference trial queued first' if queued else ''}), adding "
              f"{s.n_trials if s.n_trials is not None else 'as many trials as fit'}"
              f"{f' within {s.timeout:g} s' if s.timeout else ''}; search space: "
              + ", ".join(describe(p) for p in s.space) + f"; trial runs in {s.study_dir}/", flush=True)
        try:
            # a ValueError in a trial is a configuration error (same for every trial): it stops the study;
            # RuntimeError & co. (a diverging trial) only fail that trial
            study.optimize(self.objective, n_trials=s.n_trials, timeout=s.timeout,
                           catch=(RuntimeError, ArithmeticError), callbacks=[self.progress], gc_after_trial=True)
        finally:
            self.summarize(study, started)
        trials = [t for t in study.get_trials(deepcopy=False) if t.number in self.mine]
        if trials and all(t.state == TrialState.FAIL for t in trials):
            reason = trials[0].user_attrs.get("error", "see the log above")
            print(f"recall: error: every trial of this invocation failed; the first: {reason}", file=sys.stderr)
            return 1
        return 0

    def progress(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seconds = trial.duration.total_seconds() if trial.duration else float("nan")
        params = " ".join(f"{k}={format_number(v)}" for k, v in trial.params.items())
        if trial.state == TrialState.COMPLETE:
            outcome = "value " + ", ".join(format_number(v) for v in trial.values)
        elif trial.state == TrialState.PRUNED:
            step = trial.last_step
            outcome = f"at step {step}: {format_number(trial.intermediate_values[step])}" if step is not None else ""
        else:
            outcome = trial.user_attrs.get("error", "")
        print(f"tune: trial {trial.number} {params} -> {trial.state.name} {outcome} ({seconds:.0f} s)", flush=True)

    def summarize(self, study: optuna.Study, started: float) -> None:
        s = self.s
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        mine = Counter(t.state.name for t in trials if t.number in self.mine)
        record = best_record(study, s, self.run_overrides(), self.params_file)
        with exclusive(s.study_dir / ".lock"):  # concurrent workers finish one at a time
            write_text(s.study_dir / "best.yaml", yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
            figures = write_study_figures(study, s.study_dir / "figures", objective_names(s.objective))
            if self.tracker is not None:
                metrics = {f"trials/{k.lower()}": v for k, v in counts.items()}
                if "value" in record:
                    metrics["best_value"] = record["value"]
                self.tracker.close_parent(self.parent_id, metrics, [s.study_dir / "best.yaml"], figures)
        wall = time.time() - started
        print(f"tune: this invocation: {mine['COMPLETE']} completed, {mine['PRUNED']} pruned, {mine['FAIL']} failed "
              f"in {wall:.0f} s; study {s.study}: {plural(len(trials), 'trial')} ({counts['COMPLETE']} completed, "
              f"{counts['PRUNED']} pruned, {counts['FAIL']} failed)", flush=True)
        if "value" in record:
            print(f"tune: best trial {record['trial']}: {s.objective}={format_number(record['value'])} with "
                  + " ".join(record["overrides"]), flush=True)
        for front in record.get("best_trials", []):
            values = " ".join(f"{name}={format_number(value)}"
                              for name, value in zip(objective_metrics()[s.objective], front["values"]))
            print(f"tune: Pareto-optimal trial {front['trial']}: {values} with " + " ".join(front["overrides"]),
                  flush=True)
        print(f"tune: {s.study_dir / 'best.yaml'}, figures in {s.study_dir / 'figures'}", flush=True)


def describe(p: Param) -> str:
    if p.type == "categorical":
        return f"{p.path} in {list(p.choices)}"
    text = f"{p.path} in [{p.low:g}, {p.high:g}]"
    return text + (" (log)" if p.log else "") + (f" step {p.step:g}" if p.step else "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def drop_checkpoints(run_dir: Path) -> None:
    """A finished trial keeps its results (eval.json, metrics.json, curve.csv, config.yaml), not its models."""
    steps = run_dir / "steps"
    for pattern in ("*/model.pt", "*/helper.pt"):
        for path in steps.glob(pattern):
            path.unlink(missing_ok=True)
    shutil.rmtree(steps / "replay_labels", ignore_errors=True)


def best_record(study: optuna.Study, s: Settings, run_overrides: list[str], params_file=None) -> dict:
    """best.yaml: the best trial (or the Pareto front) with ready-to-paste overrides."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    record = {"study": s.study, "storage": strip_password(s.storage), "objective": s.objective,
              "directions": list(directions(s.objective)),
              "trials": {"total": len(trials), "complete": counts["COMPLETE"], "pruned": counts["PRUNED"],
                         "failed": counts["FAIL"]}}
    if not counts["COMPLETE"]:
        record["best"] = None
        return record

    def entry(trial) -> dict:
        overrides = as_overrides(trial.params)
        return {"trial": trial.number, "params": dict(trial.params), "overrides": overrides,
                "run_dir": trial.user_attrs.get("run_dir"),
                "command": " ".join(["recall", "run", *(["--params", str(params_file)] if params_file else []),
                                     *map(shlex.quote, [*run_overrides, *overrides])])}

    if s.multi:
        record["best_trials"] = [{"values": list(t.values), **entry(t)} for t in study.best_trials]
        return record
    best = study.best_trial
    return {**record, "value": float(best.value), **entry(best)}


def _objective_value(trial: optuna.trial.FrozenTrial, index: int) -> float:
    return trial.values[index]


def write_study_figures(study: optuna.Study, out: Path, names: list[str]) -> list[Path]:
    """Optuna's matplotlib figures as PNGs: optimization history, intermediate values (what the pruner saw),
    parameter importances (>= 2 complete trials, > 1 parameter), slice plot; for old_new the Pareto front and
    history/slice/importances per objective."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    from recall.figures import save_figure

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("tune: no complete trial yet: no figures", flush=True)
        return []
    n_params = len({k for t in complete for k in t.params})
    importances = len(complete) >= 2 and n_params > 1
    plots = {}
    if len(names) == 1:
        plots["optimization_history"] = partial(vis.plot_optimization_history, study, target_name=names[0])
        plots["intermediate_values"] = partial(vis.plot_intermediate_values, study)
        if importances:
            plots["param_importances"] = partial(vis.plot_param_importances, study, target_name=names[0])
        plots["slice"] = partial(vis.plot_slice, study, target_name=names[0])
    else:
        plots["pareto_front"] = partial(vis.plot_pareto_front, study, target_names=names)
        for i, name in enumerate(names):
            target = partial(_objective_value, index=i)
            plots[f"optimization_history_{name}"] = partial(vis.plot_optimization_history, study, target=target,
                                                            target_name=name)
            if importances:
                plots[f"param_importances_{name}"] = partial(vis.plot_param_importances, study, target=target,
                                                             target_name=name)
            plots[f"slice_{name}"] = partial(vis.plot_slice, study, target=target, target_name=name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in plots.items():
        # rc_context: Optuna's plots switch matplotlib to its ggplot style for the whole process otherwise
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PED-ANOVA on a handful of trials: "rough importances"
            try:
                axes = plot()
            except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of constant values
                print(f"tune: figure {name} skipped: {error}", flush=True)
                continue
            path = out / f"{name}.png"
            save_figure(np.asarray(axes).ravel()[0].figure, path, dpi=100)
        written.append(path)
    return written


def tune(overrides: list[str], params_file: str | Path | None = None) -> int:
    """`recall tune [--params params.yaml] OVERRIDES...`: run (or continue) the configured study; 0 on success."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says it shorter
    with warnings.catch_warnings():  # heartbeats, constant_liar, the matplotlib figures: "experimental" since v2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Tuner(overrides, params_file).run()
