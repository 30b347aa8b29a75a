"""Where the demo's time goes: `make demo` on a fresh copy of the project, stage by stage.

    python benchmarks/demo_profile.py [--fresh-venv] [--adopt] [--keep DIR] [--out docs/demo_profile.json]

Copies the project (the files git tracks) into a temporary directory and runs the demo's pipeline there as
`make demo` does (`make pipeline`: the stages two at a time with `recall.stage_jobs`; `dvc repro` if one failed), with a
`sitecustomize` hook on PYTHONPATH that records each stage's process when it exits (dvc.yaml is not touched, so
the copy's dvc.lock is the one the pipeline makes; `--adopt` copies it and reports/summary.json back). With
`--fresh-venv` it first installs the project as `make demo` does (`make .venv/.installed`: a new virtualenv, uv,
`uv pip install -e .`, timed; uv's cache is whatever this machine has, and the profile says whether it was there)
and runs the pipeline with that venv. The machine's load average before the run is recorded too: a profile taken
beside other work is slower, and says so.
Per stage: wall seconds, CPU seconds (user + system of the command's processes) and peak RSS; for the run stages, how the wall time splits into what the run itself tallies
(`timing.json`: pre-flight, train, method, evaluate, figures, tracking) and the rest (process start, imports,
building the model and data, checkpoints). Stages run two at a time, so their wall times add up to more than
the pipeline's; DVC's own bookkeeping is the pipeline's wall time when no stage command was running (DVC's
start, status checks, `dvc commit`s, `dvc repro` at the end). A second `dvc repro` with nothing changed is timed too (it must be a no-op). The table is printed and,
with --out, written as JSON (docs/benchmarks.md shows it: `python -m recall.docs`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported by every Python process of the profiled `dvc repro` (its directory is put on PYTHONPATH): the first
# process of each stage (DVC sets DVC_STAGE) records its wall time since the process started, its CPU time with
# its children's, and the peak RSS, when it exits
SITECUSTOMIZE = """\
import atexit, json, os, resource, sys, time

def _record(out=os.environ.get("RECALL_PROFILE_OUT")):
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {"stage": os.environ["DVC_STAGE"], "wall": uptime - started, "argv": sys.argv, "end": time.time(),
              "cpu": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
              "rss_mb": max(own.ru_maxrss, children.ru_maxrss) / 1024}
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\\n")

if os.environ.get("DVC_STAGE") and os.environ.get("RECALL_PROFILE_OUT") and not os.environ.get("RECALL_PROFILED"):
    os.environ["RECALL_PROFILED"] = "1"  # its child processes are counted in its CPU time, not again
    atexit.register(_record)
"""
PHASES = ("pre-flight", "train", "method", "evaluate", "figures", "tracking")


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        target = dest / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name.decode(), target)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=profile", "-c", "user.email=p@p", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=dest, check=True)


def run_timing(project: Path, command: list[str]) -> dict:
    """A run stage's `timing.json` (its run_dir from the command line)."""
    run_dir = next((a.split("=", 1)[1] for a in command if a.startswith("run_dir=")), None)
    path = project / run_dir / "timing.json" if run_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def install(project: Path) -> tuple[str, float]:
    """`make .venv/.installed` in the copy (what `make demo` does before `dvc repro`): its python and the seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    start = time.perf_counter()
    subprocess.run(["make", ".venv/.installed"], cwd=project, env=env, check=True, stdout=subprocess.DEVNULL)
    return str(project / ".venv" / "bin" / "python"), time.perf_counter() - start


def profile(project: Path, hooks: Path, python: str = sys.executable) -> dict:
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    records = hooks / "stages.jsonl"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "RECALL_PROFILE_OUT": str(records),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(python).parent), os.environ.get("PATH", "")])}
    start = time.perf_counter()
    subprocess.run(["make", "--no-print-directory", "pipeline"], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    start = time.perf_counter()
    again = subprocess.run([python, "-m", "dvc", "repro"], cwd=project, env=env, check=True,
                           capture_output=True, text=True)
    noop = time.perf_counter() - start
    stages = [json.loads(line) for line in records.read_text().splitlines()]
    rows = []
    for s in stages:
        phases = run_timing(project, s["argv"])
        rest = s["wall"] - sum(phases.values()) if phases else None
        rows.append({"stage": s["stage"], "wall": s["wall"], "cpu": s["cpu"], "rss_mb": s["rss_mb"],
                     **{p: phases.get(p) for p in PHASES}, "start, imports, setup": rest})
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "total_wall": total, "total_cpu": sum(s["cpu"] for s in stages),
            "dvc_bookkeeping": total - covered([(s["end"] - s["wall"], s["end"]) for s in stages]),
            "stage_seconds": sum(s["wall"] for s in stages),
            "peak_rss_mb": max(s["rss_mb"] for s in stages), "noop_repro": noop,
            "noop_ran_nothing": "Running stage" not in again.stdout, "stages": rows}


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the (start, end) intervals was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def table(result: dict) -> dict:
    """The profile as a {columns, rows} table (seconds rounded), with a total row."""
    columns = ["stage", "wall s", "CPU s", "peak RSS MB", *(f"{p} s" for p in PHASES), "start, imports, setup s"]
    fmt = lambda v, d=0: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = [[r["stage"], fmt(r["wall"]), fmt(r["cpu"]), fmt(r["rss_mb"]),
             *(fmt(r[p], 1) for p in PHASES), fmt(r["start, imports, setup"], 1)] for r in result["stages"]]
    sums = {p: sum(r[p] or 0 for r in result["stages"]) for p in (*PHASES, "start, imports, setup")}
    rows.append(["all stages", fmt(sum(r["wall"] for r in result["stages"])), fmt(result["total_cpu"]),
                 fmt(result["peak_rss_mb"]), *(fmt(sums[p], 0) for p in PHASES), fmt(sums["start, imports, setup"], 0)])
    rows.append(["no stage running (DVC's bookkeeping)", fmt(result["dvc_bookkeeping"]), "", "", *[""] * len(PHASES),
                 ""])
    return {"columns": columns, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="profile in this (new) directory and keep it")
    parser.add_argument("--out", type=Path, help="write the profile as JSON here (e.g. docs/demo_profile.json)")
    parser.add_argument("--fresh-venv", action="store_true", help="install into a new venv first, timed")
    parser.add_argument("--adopt", action="store_true",
                        help="copy the fresh run's dvc.lock and reports/summary.json into this repository (what "
                             "`dvc repro` of this tree made)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recall-profile-") as scratch:
        project = args.keep or Path(scratch) / "project"
        project.mkdir(parents=True)
        copy_project(project)
        hooks = Path(scratch) / "hooks"
        hooks.mkdir()
        load_before = os.getloadavg()[0]
        uv_cache = Path(os.environ.get("UV_CACHE_DIR") or Path.home() / ".cache" / "uv").is_dir()
        python, install_seconds = install(project) if args.fresh_venv else (sys.executable, None)
        result = profile(project, hooks, python)
        result["install_seconds"] = install_seconds
        result["uv_cache_was_there"] = uv_cache if args.fresh_venv else None
        result["load_average_before"] = load_before
        if install_seconds is not None:
            result["make_demo_minutes"] = (install_seconds + result["total_wall"]) / 60
        if args.adopt:
            for name in ("dvc.lock", "reports/summary.json"):
                shutil.copyfile(project / name, ROOT / name)
    result["table"] = table(result)
    width = [max(len(str(c)) for c in col) for col in zip(result["table"]["columns"], *result["table"]["rows"])]
    for row in [result["table"]["columns"], *result["table"]["rows"]]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, width))))
    if result["install_seconds"] is not None:
        print(f"\ninstalls (make .venv/.installed): {result['install_seconds']:.0f} s; make demo in all: "
              f"{result['make_demo_minutes']:.1f} min")
    print(f"\nload average before the run: {result['load_average_before']:.2f}")
    print(f"\n{result['machine']}: the pipeline {result['total_wall']:.0f} s wall, {result['total_cpu']:.0f} s CPU, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB; a second dvc repro: {result['noop_repro']:.1f} s "
          f"({'nothing ran' if result['noop_ran_nothing'] else 'STAGES RAN AGAIN'})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
