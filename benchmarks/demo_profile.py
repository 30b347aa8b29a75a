"""Where the demo's time goes: `dvc repro` of a fresh copy of the project, stage by stage.

    python benchmarks/demo_profile.py [--keep DIR] [--out docs/demo_profile.json]

Copies the committed project (git ls-files) into a temporary directory, prefixes every stage's command with a
timer (in the copy only) and runs `dvc repro` there. Per stage: wall seconds, CPU seconds (user + system of the
command's processes) and peak RSS; for the run stages, how the wall time splits into what the run itself tallies
(`timing.json`: pre-flight, train, method, evaluate, figures, tracking) and the rest (process start, imports,
building the model and data, checkpoints). DVC's own bookkeeping is the wall time of `dvc repro` outside every
command. A second `dvc repro` with nothing changed is timed too (it must be a no-op). The table is printed and,
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMER = '''\
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
record = {"stage": os.environ.get("DVC_STAGE", "?"), "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
          "rss_mb": usage.ru_maxrss / 1024, "cmd": sys.argv[1:], "exit": code}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stages.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
sys.exit(code)
'''
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


def wrap_commands(project: Path) -> None:
    """Prefix every stage's cmd with the timer (only in the copy; DVC re-runs nothing else because of it)."""
    (project / ".profile").mkdir()
    (project / ".profile" / "timer.py").write_text(TIMER)
    dvc_file = project / "dvc.yaml"
    spec = yaml.safe_load(dvc_file.read_text())
    for stage in spec["stages"].values():
        body = stage.get("do", stage)
        body["cmd"] = f"python {project / '.profile' / 'timer.py'} {body['cmd']}"
    dvc_file.write_text(yaml.safe_dump(spec, sort_keys=False))


def run_timing(project: Path, command: list[str]) -> dict:
    """A run stage's `timing.json` (its run_dir from the command line)."""
    run_dir = next((a.split("=", 1)[1] for a in command if a.startswith("run_dir=")), None)
    path = project / run_dir / "timing.json" if run_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def profile(project: Path) -> dict:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    start = time.perf_counter()
    again = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, check=True,
                           capture_output=True, text=True)
    noop = time.perf_counter() - start
    stages = [json.loads(line) for line in (project / ".profile" / "stages.jsonl").read_text().splitlines()]
    rows = []
    for s in stages:
        phases = run_timing(project, s["cmd"])
        rest = s["wall"] - sum(phases.values()) if phases else None
        rows.append({"stage": s["stage"], "wall": s["wall"], "cpu": s["cpu"], "rss_mb": s["rss_mb"],
                     **{p: phases.get(p) for p in PHASES}, "start, imports, setup": rest})
    inside = sum(s["wall"] for s in stages)
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "total_wall": total, "total_cpu": sum(s["cpu"] for s in stages), "dvc_bookkeeping": total - inside,
            "peak_rss_mb": max(s["rss_mb"] for s in stages), "noop_repro": noop,
            "noop_ran_nothing": "Running stage" not in again.stdout, "stages": rows}


def table(result: dict) -> dict:
    """The profile as a {columns, rows} table (seconds rounded), with a total row."""
    columns = ["stage", "wall s", "CPU s", "peak RSS MB", *(f"{p} s" for p in PHASES), "start, imports, setup s"]
    fmt = lambda v, d=0: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = [[r["stage"], fmt(r["wall"]), fmt(r["cpu"]), fmt(r["rss_mb"]),
             *(fmt(r[p], 1) for p in PHASES), fmt(r["start, imports, setup"], 1)] for r in result["stages"]]
    sums = {p: sum(r[p] or 0 for r in result["stages"]) for p in (*PHASES, "start, imports, setup")}
    rows.append(["all stages", fmt(sum(r["wall"] for r in result["stages"])), fmt(result["total_cpu"]),
                 fmt(result["peak_rss_mb"]), *(fmt(sums[p], 0) for p in PHASES), fmt(sums["start, imports, setup"], 0)])
    rows.append(["DVC's own bookkeeping", fmt(result["dvc_bookkeeping"]), "", "", *[""] * len(PHASES), ""])
    return {"columns": columns, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="profile in this (new) directory and keep it")
    parser.add_argument("--out", type=Path, help="write the profile as JSON here (e.g. docs/demo_profile.json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recall-profile-") as scratch:
        project = args.keep or Path(scratch) / "project"
        project.mkdir(parents=True)
        copy_project(project)
        wrap_commands(project)
        result = profile(project)
    result["table"] = table(result)
    width = [max(len(str(c)) for c in col) for col in zip(result["table"]["columns"], *result["table"]["rows"])]
    for row in [result["table"]["columns"], *result["table"]["rows"]]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, width))))
    print(f"\n{result['machine']}: dvc repro {result['total_wall']:.0f} s wall, {result['total_cpu']:.0f} s CPU, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB; a second dvc repro: {result['noop_repro']:.1f} s "
          f"({'nothing ran' if result['noop_ran_nothing'] else 'STAGES RAN AGAIN'})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
