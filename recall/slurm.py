"""The SLURM executor of `python -m recall.stage_jobs --executor slurm`: each stale stage's command a SLURM job,
submitted through submitit (the only module that imports it) with `afterok` dependencies on the jobs of the stages
it reads, so that the whole pipeline is queued at once; the submitting side waits, checks each finished job's
outputs and `dvc commit`s its stage (recall/stage_jobs.py's scheduling core does that part for both executors).

The job ids are kept in `<dvc file dir>/logs/slurm/jobs.json` (written atomically): the same command, started again
after a crash, re-attaches to its jobs still queued or running instead of submitting them twice. The jobs' logs are
`<dvc file dir>/logs/slurm/<job id>_0_log.out`. There is no accounting store to rely on (`sacct`): a job's state
comes from `squeue` and its end from the result submitit writes beside its log.

What a job asks for (`Resources`) is the `launcher` section of the configuration the stage's own command composes
(`stage_resources`): conf/launcher/slurm.yaml, changed by an experiment profile (the paper profiles: one GPU) and by
the command's own `launcher.*` overrides; a `--slurm-*` option given on the command line wins over all of them.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from recall.atomic import write_json
from recall.errors import UserError

CLIENTS = ("sbatch", "squeue", "scancel", "srun", "sinfo")
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
        "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
STORES = ("tracking.uri", "tune.storage")  # what a stage's command opens: a sqlite file there is a shared one


@dataclass
class Resources:
    """What a job asks for: the config's `launcher` section (conf/launcher/slurm.yaml: the toy world's CPUs; a paper
    profile asks for one GPU), each field overridden by its `--slurm-*` option."""
    cpus: int = 1
    mem_gb: float = 4.0
    time_min: int = 240
    gpus: int = 0
    partition: str | None = None


LAUNCHER_KEYS = ("experiment", "launcher")  # the overrides that can change the launcher section


def commands_of(cmd, wdir: Path) -> list[tuple[list[str], Path]]:
    """A stage's command (a string or a list) as its simple commands, each the words and the directory it runs in:
    `cd DIR && ...` moves the ones after it (the study's stages run at the top: `cd .. && python -m ...`)."""
    found = []
    for command in [cmd] if isinstance(cmd, str) else list(cmd):
        where = wdir
        for part in command.split("&&"):
            words = shlex.split(part)
            if len(words) == 2 and words[0] == "cd":
                where = where / words[1]
            elif words:
                found.append((words, where))
    return found


def launcher_command(cmd, wdir: Path) -> tuple[str | None, tuple[str, ...]] | None:
    """Of a stage's command that composes recall's configuration (`python -m recall... [--params FILE] key=value
    ...`): the params file it reads and its overrides that can change the `launcher` section (`experiment=`,
    `launcher=`, `launcher.*`); None for any other command (the first recall command of a list counts)."""
    for words, where in commands_of(cmd, wdir):
        if not any(w == "-m" and m.split(".")[0] == "recall" for w, m in zip(words, words[1:])):
            continue
        params, overrides = None, []
        for i, word in enumerate(words):
            if word == "--params" and i + 1 < len(words):
                params = str((where / words[i + 1]).resolve())
            elif word.startswith("--params="):
                params = str((where / word.partition("=")[2]).resolve())
            elif "=" in word and not word.startswith("-") and \
                    word.lstrip("+").partition("=")[0].split(".")[0] in LAUNCHER_KEYS:
                overrides.append(word)
        return params, tuple(overrides)
    return None


@functools.lru_cache(maxsize=64)
def _launcher(params: str | None, overrides: tuple[str, ...]) -> Resources:
    """The launcher section composed from conf/ (with a params file and overrides): cached, one per distinct pair."""
    from recall.config import compose, config_error_message, section

    try:
        cfg = compose(list(overrides), params_file=params)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - Hydra's and OmegaConf's refusals: one line
        raise UserError(config_error_message(error)) from None
    known = [field.name for field in dataclasses.fields(Resources)]
    unknown = sorted(set(cfg.launcher) - set(known))
    if unknown:
        raise UserError(f"unknown launcher key(s) {', '.join(unknown)} (from {params or 'conf/'}); valid: "
                        f"{', '.join(known)} (conf/launcher/slurm.yaml)")
    resources = section(cfg.launcher, Resources)
    for key, least in (("cpus", 1), ("time_min", 1), ("gpus", 0)):
        if getattr(resources, key) < least:
            raise UserError(f"launcher.{key}={getattr(resources, key)}: must be at least {least}")
    if not resources.mem_gb > 0:
        raise UserError(f"launcher.mem_gb={resources.mem_gb}: must be more than 0")
    return resources


def stage_resources(addressing: str, cmd, wdir, options: dict | None = None) -> Resources:
    """What the job of a stage asks for: the `launcher` section its command composes (its params file, its
    `experiment=` profile, its `launcher.*` overrides; conf/launcher/slurm.yaml for a command that is not
    recall's), each field that `options` gives (the `--slurm-*` options; None: not given) replaced by it."""
    found = launcher_command(cmd, Path(wdir))
    try:
        resources = _launcher(*found) if found is not None else _launcher(None, ())
    except UserError as error:
        raise UserError(f"{addressing}: {error}") from None
    given = {key: value for key, value in (options or {}).items() if value is not None}
    return dataclasses.replace(resources, **given)


def run_stage(cmd: str, wdir: str, addressing: str, root: str) -> None:
    """What a job runs: the stage's command as `dvc repro` would (in its directory, DVC_ROOT and DVC_STAGE set)."""
    code = subprocess.run(cmd, shell=True, cwd=wdir, env={**os.environ, "DVC_ROOT": root, "DVC_STAGE": addressing,
                                                          "DVC_NO_ANALYTICS": "1"}).returncode
    if code:
        raise RuntimeError(f"{addressing}: exit {code}")


def _slurm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def partitions() -> list[str]:
    """The cluster's partitions (`sinfo`); a UserError when SLURM is not there or its controller does not answer."""
    missing = [name for name in CLIENTS if shutil.which(name) is None]
    if missing:
        raise UserError(f"no SLURM here: {', '.join(missing)} not found on PATH (run this on a SLURM login node, "
                        "or use --executor local)")
    try:
        answer = _slurm("sinfo", "-h", "-o", "%P")
    except subprocess.TimeoutExpired:
        raise UserError("SLURM's controller does not answer (`sinfo` timed out): is slurmctld up, and SLURM_CONF "
                        "right?") from None
    if answer.returncode:
        last = (answer.stderr.strip().splitlines() or ["exit %d" % answer.returncode])[-1]
        raise UserError(f"SLURM's controller does not answer (`sinfo`: {last}): is slurmctld up, and SLURM_CONF "
                        "right?")
    return [name.rstrip("*") for name in answer.stdout.split()]


def sqlite_stores(cmd: str, wdir: Path) -> list[str]:
    """The sqlite URIs a stage's command opens: `tracking.uri` and `tune.storage` of the params file it names
    (`--params FILE`), overridden by its own `key=value` arguments."""
    values = {}
    for words, where in commands_of(cmd, wdir):
        for i, word in enumerate(words[:-1]):
            if word == "--params" and (where / words[i + 1]).is_file():
                params = yaml.safe_load((where / words[i + 1]).read_text()) or {}
                for key in STORES:
                    section, _, name = key.partition(".")
                    value = (params.get(section) or {}).get(name)
                    if value:
                        values[key] = str(value)
        for word in words:
            key, eq, value = word.partition("=")
            if eq and key.lstrip("+") in STORES:
                values[key.lstrip("+")] = value
    return [value for value in values.values() if value.startswith("sqlite:")]


def _state(jobs: list[str]) -> dict[str, str] | None:
    """The SLURM state of each job `squeue` still lists (finished ones for a few minutes: MinJobAge); None when
    the controller does not answer (a job missing from the answer is gone, one missing from no answer is not)."""
    if not jobs:
        return {}
    try:
        answer = _slurm("squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(jobs))
    except subprocess.TimeoutExpired:
        return None
    if answer.returncode and "Invalid job id" not in answer.stderr:  # that one: none of them is known any more
        return None
    states = dict(line.split()[:2] for line in answer.stdout.splitlines() if len(line.split()) >= 2)
    return {job: states[job] for job in jobs if job in states}


class Slurm:
    """The executor of recall.stage_jobs' core for SLURM: every ready stage is submitted at once, each after the
    jobs of the stages it reads (`afterok`); `interval` seconds between two looks at the queue."""

    queues = True  # a stage is handed over once the stages it reads are finished *or queued*
    interval = 2.0

    def __init__(self, logs: Path, env: dict, options: dict, missing_outputs, commit, allow_sqlite: bool = False,
                 dvc_cli=lambda: "dvc"):
        """``options``: the `--slurm-*` options given (a Resources field -> value; None: from the stage's config).
        ``missing_outputs(addressing)`` lists a stage's outputs that are not there, ``commit(addressing, env)``
        `dvc commit`s it (True once done): recall.stage_jobs' own, the same for both executors; ``dvc_cli()``: the
        `dvc` command a message suggests (`dvc --cd study` for the study's project)."""
        self.partitions = partitions()
        partition = options.get("partition")
        if partition is not None and partition not in self.partitions:
            raise UserError(f"--slurm-partition {partition}: no such partition (SLURM has "
                            f"{', '.join(self.partitions) or 'none'})")
        import submitit

        self.folder = (logs / "slurm").resolve()
        self.state_file = self.folder / "jobs.json"
        self.env, self.options, self.allow_sqlite = env, options, allow_sqlite
        self.resources: dict[str, Resources] = {}  # each stage's, resolved by `check`
        self.missing_outputs, self.commit, self.dvc_cli = missing_outputs, commit, dvc_cli
        self.executor = submitit.SlurmExecutor(folder=self.folder)
        self.recorded = self._read_state()
        self.attached: set[str] = set()
        self.job_ids: list[str] = []  # submitted or re-attached by this call
        self.errors: list[str] = []

    def check(self, stages: list[tuple]) -> None:
        """Each stage's resources (`stage_resources`), its partition one the cluster has; refuse a stage that opens
        a sqlite file (MLflow's or Optuna's): the jobs run on other machines. Before anything is submitted."""
        for addressing, _, cmd, wdir in stages:
            resources = self.resources[addressing] = stage_resources(addressing, cmd, wdir, self.options)
            if resources.partition is not None and resources.partition not in self.partitions:
                raise UserError(f"{addressing}: launcher.partition={resources.partition}: no such partition (SLURM "
                                f"has {', '.join(self.partitions) or 'none'})")
        if self.allow_sqlite:
            return
        for addressing, _, cmd, wdir in stages:
            for uri in sqlite_stores(cmd, Path(wdir)):
                raise UserError(f"{addressing}: its command opens {uri}, a sqlite file; SLURM jobs on other "
                                "machines would share it over the network filesystem, which sqlite does not "
                                "support. Give it a server (tracking.uri=http://..., tune.storage=postgresql+"
                                "psycopg://...: docs/cluster.md), or pass --allow-sqlite if the filesystem is "
                                "local to one machine")

    def room(self, stage: tuple, running: list[tuple]) -> bool:
        return True  # SLURM decides what runs when

    # the jobs of an earlier call

    def _read_state(self) -> dict:
        try:
            return yaml.safe_load(self.state_file.read_text()) or {}
        except FileNotFoundError:
            return {}

    def _record(self, addressing: str, entry: dict | None) -> None:
        if entry is None:
            self.recorded.pop(addressing, None)
        else:
            self.recorded[addressing] = entry
        write_json(self.state_file, self.recorded)

    def _job(self, job_id: str):
        import submitit

        return submitit.SlurmJob(folder=self.folder, job_id=job_id)

    def attach(self, stage: tuple, after: list[str]):
        """The job an earlier call submitted for this stage, if it is still queued, running or finished well and
        waits on no job this call submitted anew; else None (and such a job is cancelled)."""
        addressing, _, cmd, _ = stage
        entry = self.recorded.get(addressing)
        if entry is None:
            return None
        job = self._job(entry["job"])
        states = _state([job.job_id])
        if states is None:
            raise UserError(f"SLURM's controller does not answer (`squeue`), so whether job {job.job_id} of "
                            f"{addressing} still runs is unknown: run the same command again later")
        state = states.get(job.job_id, "")
        alive = state in LIVE or self._result(job) == "success"
        if entry.get("cmd") == cmd and set(after) <= self.attached and alive:
            self.attached.add(addressing)
            self.job_ids.append(job.job_id)
            tqdm.write(f"{addressing}: re-attached to SLURM job {job.job_id} ({state or 'finished'})")
            return job
        if state in LIVE:
            self._cancel(job)
        self._record(addressing, None)
        return None

    # submitting, watching, cancelling

    def start(self, stage: tuple, after: list[str]):
        addressing, name, cmd, wdir = stage
        cmd = " && ".join(cmd) if isinstance(cmd, list) else cmd
        r = self.resources[addressing]
        extra, jobs = {}, [self.recorded[a]["job"] for a in after]
        known = _state(jobs)  # a re-attached job that ended long ago may be gone: afterok on it would be refused
        jobs = [job for job in jobs if known is None or job in known]
        if jobs:
            extra["dependency"] = "afterok:" + ":".join(jobs)
        self.executor.update_parameters(
            job_name=f"recall:{name}", cpus_per_task=r.cpus, mem=f"{int(r.mem_gb * 1024)}M", time=r.time_min,
            gpus_per_node=r.gpus or None, partition=r.partition, stderr_to_stdout=True, **extra)
        if not jobs:
            self.executor.parameters.pop("dependency", None)
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        try:
            job = self.executor.submit(run_stage, cmd, str(Path(wdir).resolve()), addressing, os.getcwd())
        except (FailedJobError, FailedSubmissionError) as error:  # sbatch said no (resources, partition, limits)
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise UserError(f"{addressing}: SLURM refused the job: {lines[-1] if lines else error}") from None
        self.job_ids.append(job.job_id)
        self._record(addressing, {"job": job.job_id, "cmd": stage[2]})
        tqdm.write(f"{addressing}: SLURM job {job.job_id}" + (f" (after {', '.join(after)})" if after else ""))
        return job

    @staticmethod
    def _result(job) -> str | None:
        """'success' or 'error' once submitit wrote the job's result; None before (or never: a killed job)."""
        from submitit.core.utils import pickle_load

        try:
            return pickle_load(job.paths.result_pickle)[0]
        except (FileNotFoundError, EOFError):
            return None

    def ended(self, running: dict) -> list[str]:
        """The stages of `running` whose job is no longer queued or running."""
        states = _state([job.job_id for job in running.values()])
        if states is None:
            tqdm.write("SLURM's controller does not answer (`squeue`); asking again")
            return []
        return [a for a, job in running.items() if states.get(job.job_id) not in LIVE]

    def finish(self, addressing: str, job) -> bool:
        """A job that ended: its stage's outputs checked and committed (True), or reported as failed."""
        try:
            if self._result(job) != "success":
                state = (_state([job.job_id]) or {}).get(job.job_id, "gone from the queue")
                tqdm.write(f"{addressing}: SLURM job {job.job_id} {state.lower()}; see {job.paths.stdout}")
                return False
            missing = self.missing_outputs(addressing)
            if missing:
                self.errors.append(f"{addressing}: SLURM job {job.job_id} ended well but did not write "
                                   f"{', '.join(missing)} (see {job.paths.stdout})")
                tqdm.write(self.errors[-1])
                return False
            if self.commit(addressing, self.env):
                return True
            tqdm.write(f"{addressing}: ran, but `dvc commit` failed (another DVC command holding the repository's "
                       f"lock?); run `{self.dvc_cli()} commit {addressing}` when it is free")
            return False
        finally:  # forgotten once handled (killed before: the next call re-attaches and commits it)
            self._record(addressing, None)

    def _cancel(self, job) -> None:
        _slurm("scancel", job.job_id)

    def cancel(self, addressing: str, job) -> None:
        """A job queued after one that failed: cancelled (SLURM would keep it pending for ever)."""
        self._cancel(job)
        self._record(addressing, None)
        tqdm.write(f"{addressing}: SLURM job {job.job_id} cancelled (downstream of a failure)")

    def stop(self, running: dict) -> None:
        """Interrupted (Ctrl-C, an error): the jobs still queued or running cancelled by id, nothing committed."""
        for addressing, job in running.items():
            self._cancel(job)
            self._record(addressing, None)
            tqdm.write(f"{addressing}: SLURM job {job.job_id} cancelled, not committed")

    def summary(self) -> str:
        return f"SLURM jobs: {' '.join(self.job_ids) or 'none'}; logs in {self.folder}"

