"""Run the out-of-date stages of a DVC pipeline several at a time, then `dvc commit` each one that finished.

    python -m recall.stage_jobs dvc.yaml --jobs 2 --alone pretrain     # every stage once its inputs are made
    python -m recall.stage_jobs study/dvc.yaml --jobs 2 --order step0 run joint

`dvc repro` runs one stage at a time. On a 2-core machine two one-thread runs finish sooner than one two-thread
run after the other (the demo's and the study's runs use `train.threads=1` for this). This runs each stale
stage's own command (DVC resolves it; nothing is rewritten) in its working directory with the environment `dvc
repro` gives it (DVC_ROOT, DVC_STAGE), `--jobs` at a time, and records each finished stage with `dvc commit`
(the DVC workflow for commands run outside `dvc repro`). Without `--order` a stage starts once every stage of
the file whose outputs it reads has finished, and is run only if DVC then finds it stale (as `dvc repro` would,
removing its outputs first except the persisted ones); among the stages ready to start, the one with the most
stages downstream goes first, and a stage named in `--alone` (one that uses every core itself, such as the
demo's two-thread pretraining) runs with no other. With `--order` (stage-name prefixes) the stale stages of each
prefix run as a group, a group after the one before it has finished. A failed command is reported with its log
(`<dvc file dir>/logs/<stage, @ as _>.log`) and not committed; without `--order` the stages downstream of it are
not started (with `--order` the next group starts anyway); the others go on. Stages of other DVC files that a
stage reads must be up to date (`dvc repro` them first). DVC works from the root of the project that holds the
file: the study (study/.dvc) is a DVC project of its own, and a file it reads from the top project that is not
there (the demo's data/toy) is named before anything starts. Afterwards `dvc repro <dvc file>` (for the study:
`dvc --cd study repro`) finds the rest up to date (or runs what failed, with its error in the terminal).
Interrupted, it stops the commands it started.

    python -m recall.stage_jobs study/dvc.yaml --executor slurm --slurm-gpus 1 --slurm-time 600

`--executor slurm` hands the same DAG of ready stages to SLURM instead (recall/slurm.py): every stale stage a job,
queued at once, each after the jobs of the stages it reads (`afterok`); the outputs of each are removed before it
is queued, and when its job ends its outputs are checked (one missing: an error naming it, exit 2) and the stage
`dvc commit`ted here; a failed job's downstream jobs are cancelled and its log printed. `--jobs`, `--alone` and
`--order` are this machine's (SLURM decides what runs when). Interrupted, it cancels its jobs; killed, the same
command re-attaches to its jobs still queued or running (their ids: `<dvc file dir>/logs/slurm/jobs.json`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from recall.errors import UserError

# where the command was started: DVC works from the project's root (main), paths and the `dvc` commands that
# messages suggest are shown from here
INVOKED_FROM = Path.cwd()


def shown(path) -> str:
    """A path as the user, in the directory the command was started from, types it (whole when it lies elsewhere)."""
    relative = os.path.relpath(path, INVOKED_FROM)
    return str(Path(path).resolve()) if relative.startswith("..") else relative


def dvc_cli() -> str:
    """`dvc`, or `dvc --cd <project>` when the project DVC works from is not where the command was started (the
    study's: `dvc --cd study`)."""
    project = Path.cwd()
    return "dvc" if project == INVOKED_FROM.resolve() else f"dvc --cd {shown(project)}"


def project_of(dvc_file: Path) -> Path:
    """The DVC project `dvc_file` belongs to: the nearest directory above it holding `.dvc` (the study, study/.dvc,
    is a project of its own, so that the demo's `dvc repro` does not load its stages and its large dvc.lock)."""
    dvc_file = dvc_file.resolve()
    if not dvc_file.is_file():
        what = "a directory" if dvc_file.is_dir() else "no such file"
        raise UserError(f"{shown(dvc_file)}: {what} (give a pipeline's dvc.yaml, e.g. dvc.yaml or study/dvc.yaml)")
    if dvc_file.name != "dvc.yaml":
        raise UserError(f"{shown(dvc_file)}: not a dvc.yaml (DVC reads a pipeline's stages only from files of that "
                        "name; e.g. dvc.yaml or study/dvc.yaml)")
    project = next((d for d in dvc_file.parents if (d / ".dvc").is_dir()), None)
    if project is None:
        raise UserError(f"{shown(dvc_file)}: not inside a DVC project (no .dvc directory above it): `dvc init` one "
                        "first")
    return project


def check_inputs(repo, dvc_file: Path, stages: list) -> None:
    """Refuses `stages` (DVC's) when they read a file from outside their project that is not there and that no stage
    of the project makes (the study's report reads ../docs/dose_response.json, which its dose_response stage
    makes): DVC cannot make it from this project (the study reads the demo's data/toy, which the demo's `toyworld`
    stage makes)."""
    made = [Path(out.fs_path) for stage in repo.index.stages for out in stage.outs]
    made_here = lambda path: any(path == out or out in path.parents for out in made)  # noqa: E731
    missing = sorted({shown(dep.fs_path) for stage in stages for dep in stage.deps
                      if not dep.is_in_repo and dep.protocol == "local" and not dep.exists
                      and not made_here(Path(dep.fs_path))})
    if missing:
        raise UserError(f"{shown(dvc_file)}: its stages read files outside their DVC project ({shown(Path.cwd())}) "
                        f"that are not there: {', '.join(missing)}; make them first with the project that makes them "
                        "(the demo's data/toy: `dvc repro toyworld` at the top)")


def _stages_of(repo, dvc_file: Path) -> list:
    """The stages `dvc_file` defines (a foreach's items one by one), in the file's order."""
    return [stage for stage in repo.index.stages if Path(stage.path).resolve() == dvc_file.resolve() and stage.cmd]


def _command(stage) -> tuple:
    """What `start` needs of a stage: (addressing, name, cmd, wdir)."""
    return stage.addressing, stage.name, stage.cmd, stage.wdir


def stale_stages(dvc_file: Path, prefix: str) -> list[tuple]:
    """The stages of `dvc_file` named `prefix` (a foreach's items: `prefix@key`) that `dvc status` finds stale, as
    (addressing, name, cmd, wdir)."""
    from dvc.repo import Repo

    with Repo(".") as repo, repo.lock:
        stages = [stage for stage in _stages_of(repo, dvc_file) if stage.name.split("@")[0] == prefix]
        check_inputs(repo, dvc_file, stages)
        return [_command(stage) for stage in stages if stage.status()]


def pipeline(dvc_file: Path, targets: tuple[str, ...] = ()) -> tuple[list[tuple], dict[str, set[str]], dict[str, int]]:
    """The stages of `dvc_file` as (addressing, name, cmd, wdir) in the file's order; for each, the stages of the
    file whose outputs it reads, directly or not (upstream); and how many stages read its outputs (downstream).
    ``targets`` (stage names, `name@key` or a foreach's `name`): only those and the stages they read, as `dvc repro
    TARGET` would run."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(".") as repo, repo.lock:
        graph = repo.index.graph  # an edge goes from a stage to a stage whose outputs it reads
        stages = _stages_of(repo, dvc_file)
        names = {stage.addressing for stage in stages}
        upstream = {stage.addressing: {s.addressing for s in nx.descendants(graph, stage)} & names for stage in stages}
        downstream = {stage.addressing: len({s.addressing for s in nx.ancestors(graph, stage)} & names)
                      for stage in stages}
        if targets:
            unknown = [t for t in targets if not any(t in (s.name, s.name.split("@")[0]) for s in stages)]
            if unknown:
                raise UserError(f"--targets {' '.join(unknown)}: no such stage in {shown(dvc_file)} (give a stage's "
                                f"name, `name@key`, or a foreach's name; `{dvc_cli()} stage list` lists them)")
            wanted = {s.addressing for s in stages if s.name in targets or s.name.split("@")[0] in targets}
            wanted |= set().union(*(upstream[a] for a in wanted))
            stages = [s for s in stages if s.addressing in wanted]
        check_inputs(repo, dvc_file, stages)
        return [_command(stage) for stage in stages], upstream, downstream


def prepare(addressing: str, tries: int = 30, wait: float = 2.0, stale: bool = False) -> bool:
    """Whether DVC finds the stage out of date now (its upstream stages committed); if it does, its outputs are
    removed as `dvc repro` removes them before a run (persisted ones kept, unprotected), so that no file of an
    earlier run is committed with the new ones. Waits out another DVC process holding the repository's lock (a
    `dvc commit` of a finished stage). ``stale``: a stage it reads is queued to run, so it is out of date."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    for attempt in range(tries):
        try:
            with Repo(".") as repo, repo.lock:
                (stage,) = repo.stage.collect(addressing)
                if not stale and not stage.status():
                    return False
                stage.remove_outs(ignore_remove=False, force=False)
                return True
        except LockError:
            if attempt + 1 == tries:
                raise
            time.sleep(wait)
    return True


def missing_outputs(addressing: str) -> list[str]:
    """The outputs of a stage that are not there (paths from the working directory)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        (stage,) = repo.stage.collect(addressing)
        return [shown(out.fs_path) for out in stage.outs if not out.exists]


COMMIT_TRIES = 5


def commit(addressing: str, env: dict, tries: int = COMMIT_TRIES, wait: float = 10.0) -> bool:
    """`dvc commit` one finished stage; a failure (e.g. another `dvc` process holding the repository's lock) is
    retried `tries` times, `wait` seconds apart. True once committed."""
    for attempt in range(tries):
        result = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", addressing], env=env,
                                capture_output=True, text=True)
        if result.returncode == 0:
            return True
        tqdm.write(f"{addressing}: `dvc commit` failed (try {attempt + 1} of {tries}): "
                   f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
        if attempt + 1 < tries:
            time.sleep(wait)
    return False


def start(stage: tuple, logs: Path, env: dict) -> tuple:
    """Start a stage's command as `dvc repro` would: in its directory, with DVC_ROOT and DVC_STAGE set."""
    addressing, name, cmd, wdir = stage
    cmd = " && ".join(cmd) if isinstance(cmd, list) else cmd  # a list of commands runs one after the other
    log = logs / f"{name.replace('@', '_')}.log"
    handle = log.open("w")
    process = subprocess.Popen(cmd, shell=True, cwd=wdir, stdout=handle, stderr=subprocess.STDOUT,
                               env={**env, "DVC_ROOT": os.getcwd(), "DVC_STAGE": addressing})
    return process, handle, log


def finish(addressing: str, running: dict, env: dict) -> bool:
    """A finished command: committed (True) or reported as failed (False)."""
    process, handle, log = running.pop(addressing)
    handle.close()
    if process.returncode != 0:
        tqdm.write(f"{addressing}: exit {process.returncode}; see {log}")
        return False
    if commit(addressing, env):
        return True
    tqdm.write(f"{addressing}: ran, but `dvc commit` failed {COMMIT_TRIES} times (another DVC command holding the "
               f"repository's lock?); run `{dvc_cli()} commit {addressing}` when it is free")
    return False


class Local:
    """The executor of this machine: each stage's command a process here, `jobs` at a time; a stage named with a
    prefix in `alone` (one that uses every core itself) runs with no other."""

    queues = False  # a stage is started once the stages it reads have finished
    interval = 1.0

    def __init__(self, jobs: int, logs: Path, env: dict, alone: tuple[str, ...] = ()):
        self.jobs, self.logs, self.env, self.alone = jobs, logs, env, alone

    def check(self, stages: list) -> None:
        pass

    def room(self, stage: tuple, running: list[tuple]) -> bool:
        by_itself = lambda s: s[1].split("@")[0] in self.alone  # noqa: E731
        return not (len(running) >= self.jobs or any(map(by_itself, running)) or (running and by_itself(stage)))

    def attach(self, stage: tuple, after: list):
        return None  # a process of an earlier call does not outlive it

    def start(self, stage: tuple, after: list) -> tuple:
        return start(stage, self.logs, self.env)

    def ended(self, running: dict) -> list[str]:
        return [a for a, (process, _, _) in running.items() if process.poll() is not None]

    def finish(self, addressing: str, handle: tuple) -> bool:
        return finish(addressing, {addressing: handle}, self.env)

    def cancel(self, addressing: str, handle: tuple) -> None:
        stop({addressing: handle}, report_finished=False)  # downstream of a failure: never to be committed

    def stop(self, running: dict) -> None:
        stop(running)


def run_dag(dvc_file: Path, jobs: int, logs: Path, env: dict, alone: tuple[str, ...] = (),
            executor=None, targets: tuple[str, ...] = ()) -> tuple[list, list, list]:
    """Every stage of `dvc_file` once the stages upstream of it have finished (or, for an executor that queues,
    such as SLURM's, are queued), if DVC then finds it stale, handed to `executor` (default: `jobs` at a time on
    this machine), the ready stage with most stages downstream first; a stage queued behind one that failed is
    cancelled; ``targets``: only those stages and the stages they read. Returns the addressings run, failed, and not
    started (downstream of a failure)."""
    executor = executor or Local(jobs, logs, env, alone)
    stages, upstream, downstream = pipeline(dvc_file, targets)
    executor.check(stages)
    by_name = {stage[0]: stage for stage in stages}
    pending = sorted(by_name, key=lambda a: -downstream[a])  # stable: the file's order among equals
    running, finished, done, failed, cancelled = {}, set(), [], [], []
    ready = lambda a: upstream[a] <= finished | (set(running) if executor.queues else set())  # noqa: E731
    bar = tqdm(total=len(stages), desc="stages", unit="stage")

    def launch(free: tuple[str, ...] = ()) -> None:
        """Start (or find up to date) the ready stages there is room for (the stages in `free` have ended and hold
        no slot); an executor that queues takes a stage and then the stages that read it, in one pass."""
        for addressing in list(pending) if executor.queues else [a for a in pending if ready(a)]:
            if not ready(addressing):
                continue
            if not executor.room(by_name[addressing], [by_name[a] for a in running if a not in free]):
                break
            pending.remove(addressing)
            after = [a for a in running if a in upstream[addressing]]
            handle = executor.attach(by_name[addressing], after)
            if handle is None and prepare(addressing, stale=bool(after)):
                handle = executor.start(by_name[addressing], after)
            if handle is None:
                finished.add(addressing)
                bar.update(1)
            else:
                running[addressing] = handle

    def settle(addressing: str) -> None:
        """An ended stage: committed (done) or failed; it leaves `running` only now, so that an interruption before
        stops (and reports) it."""
        if executor.finish(addressing, running[addressing]):
            done.append(addressing)
            finished.add(addressing)
        else:
            failed.append(addressing)
        del running[addressing]
        bar.update(1)

    try:
        while running or any(map(ready, pending)):
            launch()
            time.sleep(executor.interval)
            ended = executor.ended(running)
            # a `dvc commit` rewrites dvc.lock (a second or two): a stage that a pending stage reads is committed
            # first, so that its readers can start; the slots of the others are filled before their commits
            waited_for = [a for a in ended if executor.queues or any(a in upstream[p] for p in pending)]
            for addressing in waited_for:
                settle(addressing)
            others = tuple(a for a in ended if a not in waited_for)
            if others:
                launch(free=others)
            for addressing in others:
                settle(addressing)
            for addressing in [a for a in running if upstream[a] & set(failed)]:
                executor.cancel(addressing, running.pop(addressing))
                cancelled.append(addressing)
                bar.update(1)
    finally:
        executor.stop(running)
        bar.close()
    return done, failed, cancelled + pending


def stop(running: dict, report_finished: bool = True) -> None:
    """Interrupted (Ctrl-C, an error): stop the commands still running; nothing of theirs is committed (one that had
    finished is said so: `dvc commit` records it, or the next run makes it again)."""
    for addressing, (process, handle, _) in running.items():
        if process.poll() is None:
            process.terminate()
            process.wait()
            tqdm.write(f"{addressing}: stopped, not committed")
        elif process.returncode == 0 and report_finished:
            tqdm.write(f"{addressing}: finished, not committed: `{dvc_cli()} commit {addressing}` records it")
        handle.close()


def run_group(stages: list, jobs: int, logs: Path, env: dict) -> tuple[list, list]:
    """Run `stages` (addressing, name, cmd, wdir) `jobs` at a time; `dvc commit` each success. Returns (done,
    failed) addressings."""
    pending, running, done, failed = list(stages), {}, [], []
    bar = tqdm(total=len(stages), desc="stages", unit="stage")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                stage = pending.pop(0)
                running[stage[0]] = start(stage, logs, env)
            time.sleep(2)
            for addressing in [a for a, (process, _, _) in running.items() if process.poll() is not None]:
                (done if finish(addressing, running, env) else failed).append(addressing)
                bar.update(1)
    finally:
        stop(running)
        bar.close()
    return done, failed


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, at least 1")
    return int(text)


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the memory in GB, more than 0 (e.g. 4 or 0.5)")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, at least 0")
    return int(text)


def _executor(args, logs: Path, env: dict):
    """`--executor`: this machine's (None, run_dag's default) or SLURM's, with the `--slurm-*` resources."""
    if args.executor == "local":
        return None
    if args.order is not None:
        raise UserError("--order groups stages on this machine: use it with --executor local (SLURM queues every "
                        "stage after the stages it reads)")
    from recall.slurm import Slurm

    options = {"cpus": args.slurm_cpus, "mem_gb": args.slurm_mem, "time_min": args.slurm_time,
               "gpus": args.slurm_gpus, "partition": args.slurm_partition}  # None: the stage's launcher section
    return Slurm(logs, env, options, missing_outputs, commit, allow_sqlite=args.allow_sqlite, dvc_cli=dvc_cli)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.stage_jobs", description=__doc__.splitlines()[0])
    parser.add_argument("dvc_file", type=Path)
    parser.add_argument("--jobs", type=_positive, default=2)
    parser.add_argument("--order", nargs="+", help="stage-name prefixes, one group each, in order (default: every "
                                                   "stage once its inputs are made)")
    parser.add_argument("--targets", nargs="+", default=[], help="without --order: only these stages (names, "
                                                                 "`name@key`) and the stages they read, as `dvc "
                                                                 "repro TARGET ...` (default: every stage)")
    parser.add_argument("--alone", nargs="+", default=[], help="without --order: stage-name prefixes of stages that "
                                                               "use every core themselves, run with no other")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: the stages' commands here, --jobs at a time; slurm: each a SLURM job (submitit), "
                             "queued at once with afterok dependencies (docs/cluster.md)")
    slurm = parser.add_argument_group(
        "--executor slurm: what each job asks for", "each option given wins over the stage's own `launcher` section "
        "(conf/launcher/slurm.yaml, the experiment profile, the stage's launcher.* overrides)")
    slurm.add_argument("--slurm-cpus", type=_positive, help="CPUs per job (default: launcher.cpus)")
    slurm.add_argument("--slurm-mem", type=_gigabytes, help="memory per job, GB (default: launcher.mem_gb)")
    slurm.add_argument("--slurm-time", type=_positive, help="time limit per job, minutes (default: launcher.time_min)")
    slurm.add_argument("--slurm-gpus", type=_count, help="GPUs per job (default: launcher.gpus: 0 for the toy world, "
                                                        "1 for a paper profile's runs)")
    slurm.add_argument("--slurm-partition", help="default: launcher.partition (null: the cluster's default)")
    slurm.add_argument("--allow-sqlite", action="store_true",
                       help="let jobs open sqlite files (tracking.uri, tune.storage): only on a local filesystem")
    args = parser.parse_args(argv)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    global INVOKED_FROM
    INVOKED_FROM = Path.cwd()
    try:
        return _main(args, parser.prog, env, started)
    finally:
        os.chdir(INVOKED_FROM)  # an in-process caller keeps its working directory


def _main(args, prog: str, env: dict, started: float) -> int:
    all_done, all_failed, not_started, executor = [], [], [], None
    try:
        # DVC works from the root of the project that holds the file (as `dvc --cd <root>`): its stages' addressing,
        # `dvc commit`, DVC_ROOT
        dvc_file = args.dvc_file.resolve()
        os.chdir(project_of(dvc_file))
        logs = dvc_file.parent / "logs"
        logs.mkdir(exist_ok=True)
        executor = _executor(args, logs, env)
        if args.order is None:
            all_done, all_failed, not_started = run_dag(dvc_file, args.jobs, logs, env, tuple(args.alone),
                                                        executor, tuple(args.targets))
        elif args.targets:
            raise UserError("--targets picks stages of the DAG: give it without --order")
        for prefix in args.order or []:
            group = stale_stages(dvc_file, prefix)
            print(f"{prefix}: {len(group)} stale stage(s), {args.jobs} at a time", flush=True)
            done, failed = run_group(group, args.jobs, logs, env)
            all_done += done
            all_failed += failed
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(all_done)} stage(s) run and committed, {len(all_failed)} failed, in {minutes:.0f} min"
          + (f": {', '.join(all_failed)}" if all_failed else "")
          + (f"; not started (downstream of a failure): {', '.join(not_started)}" if not_started else ""))
    if executor is not None:
        print(executor.summary())
        if executor.errors:
            print(f"{prog}: error: " + "; ".join(executor.errors), file=sys.stderr)
            return 2
    return 1 if all_failed else 0


if __name__ == "__main__":
    sys.exit(main())
