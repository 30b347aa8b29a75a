"""Run the out-of-date stages of a DVC pipeline several at a time, then `dvc commit` each one that finished.

    python -m recall.stage_jobs study/dvc.yaml --jobs 2 --order step0 run joint

`dvc repro` runs one stage at a time. On a 2-core machine two one-thread runs finish sooner than one two-thread
run after the other (the study's runs use `train.threads=1` for this). This runs each stale stage's own command
(DVC resolves it; nothing is rewritten) in its working directory, `--jobs` at a time, group after group
(`--order`: stage-name prefixes; a group starts when the one before it has finished: the runs need their step-0
models), and records each finished stage with `dvc commit` (the DVC workflow for commands run outside `dvc
repro`). A failed command is reported with its log (`<dvc file dir>/logs/<stage>.log`) and not committed; the
others go on. Afterwards `dvc repro <dvc file>` runs what is left (the report) and finds the rest up to date.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm


def stale_stages(dvc_file: Path, prefix: str) -> list[tuple]:
    """The stages of `dvc_file` named `prefix` (a foreach's items: `prefix@key`) that `dvc status` finds stale, as
    (addressing, name, cmd, wdir)."""
    from dvc.repo import Repo

    with Repo(".") as repo, repo.lock:
        return [(stage.addressing, stage.name, stage.cmd, stage.wdir) for stage in repo.index.stages
                if Path(stage.path).resolve() == dvc_file.resolve() and stage.name.split("@")[0] == prefix
                and stage.status()]


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


def run_group(stages: list, jobs: int, logs: Path, env: dict) -> tuple[list, list]:
    """Run `stages` (addressing, name, cmd, wdir) `jobs` at a time; `dvc commit` each success. Returns (done,
    failed) addressings."""
    pending, running, done, failed = list(stages), {}, [], []
    bar = tqdm(total=len(stages), desc="stages", unit="stage")
    while pending or running:
        while pending and len(running) < jobs:
            addressing, name, cmd, wdir = pending.pop(0)
            log = logs / f"{name.replace('@', '_')}.log"
            handle = log.open("w")
            running[addressing] = (subprocess.Popen(cmd, shell=True, cwd=wdir, env=env, stdout=handle,
                                                    stderr=subprocess.STDOUT), handle, log)
        time.sleep(2)
        for addressing, (process, handle, log) in list(running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del running[addressing]
            if process.returncode != 0:
                failed.append(addressing)
                tqdm.write(f"{addressing}: exit {process.returncode}; see {log}")
            elif commit(addressing, env):
                done.append(addressing)
            else:
                failed.append(addressing)
                tqdm.write(f"{addressing}: ran, but `dvc commit` failed {COMMIT_TRIES} times (another DVC command "
                           f"holding the repository's lock?); run `dvc commit {addressing}` when it is free")
            bar.update(1)
    bar.close()
    return done, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.stage_jobs", description=__doc__.splitlines()[0])
    parser.add_argument("dvc_file", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--order", nargs="+", required=True, help="stage-name prefixes, one group each, in order")
    args = parser.parse_args(argv)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    logs = args.dvc_file.parent / "logs"
    logs.mkdir(exist_ok=True)
    started, all_done, all_failed = time.perf_counter(), [], []
    for prefix in args.order:
        group = stale_stages(args.dvc_file, prefix)
        print(f"{prefix}: {len(group)} stale stage(s), {args.jobs} at a time", flush=True)
        done, failed = run_group(group, args.jobs, logs, env)
        all_done += done
        all_failed += failed
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(all_done)} stage(s) run and committed, {len(all_failed)} failed, in {minutes:.0f} min"
          + (f": {', '.join(all_failed)}" if all_failed else ""))
    return 1 if all_failed else 0


if __name__ == "__main__":
    sys.exit(main())
