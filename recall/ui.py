"""`make ui`: MLflow's UI on the project's runs, opened where its users expect them.

    python -m recall.ui                      # mlflow ui on 127.0.0.1:5000, then prints the runs table's address
    python -m recall.ui --print              # only print the address(es)

MLflow 3 opens an experiment on its GenAI overview (traces) unless told otherwise; the address printed here is
the experiment's runs table in the "Model training" view: http://127.0.0.1:5000/#/experiments/<id>/runs?
workflowType=machine_learning. The experiment id is read from the sqlite store (read-only: this never creates or
migrates a database). The server is started on 127.0.0.1 only, and stopped by its own PID on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"
STARTUP_SECONDS = 300  # mlflow ui takes 10-20 s here (minutes on a loaded machine or a first start, which sets the db up)


def runs_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The runs table of an experiment in MLflow's "Model training" view, not the GenAI overview."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///relative` or `sqlite:////absolute` tracking URI; None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def experiments(db: Path) -> list[tuple[str, str, int]]:
    """(id, name, number of runs) of every active experiment in an MLflow sqlite store, most runs first."""
    if not db.is_file():
        return []
    with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT e.experiment_id, e.name, COUNT(r.run_uuid) FROM experiments e "
            "LEFT JOIN runs r ON r.experiment_id = e.experiment_id AND r.lifecycle_stage = 'active' "
            "WHERE e.lifecycle_stage = 'active' GROUP BY e.experiment_id, e.name").fetchall()
    return sorted(((str(i), str(n), int(c)) for i, n, c in rows), key=lambda row: (-row[2], row[1]))


def default_experiment(params_file: Path = Path("params.yaml")) -> str | None:
    """The experiment `recall run` logs to with params.yaml: tracking.experiment, else the dataset's name."""
    if not params_file.is_file():
        return None
    import yaml

    params = yaml.safe_load(params_file.read_text()) or {}
    return (params.get("tracking") or {}).get("experiment") or (params.get("dataset") or {}).get("name")


def addresses(uri: str, base: str, experiment: str | None) -> list[str]:
    """Lines to print: the chosen experiment's runs first, then every other experiment that holds runs."""
    db = sqlite_path(uri)
    if db is None:
        return [f"{base}  (not a sqlite store: pick the experiment, then the 'Model training' view)"]
    found = experiments(db)
    if not found:
        return [f"{base}  ({db} holds no experiment yet: run `make demo` or `recall run` first)"]
    chosen = [row for row in found if row[1] == experiment] + [row for row in found if row[1] != experiment]
    return [f"{runs_url(i, base)}   experiment {name!r}, {runs} runs" for i, name, runs in chosen
            if runs or name == experiment]


def wait_until_up(proc: subprocess.Popen, base: str, timeout: float = STARTUP_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server started with start_new_session=True: its process group (id = its PID), SIGTERM then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=DEFAULT_URI, help="MLflow backend store (default %(default)s)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default=None, help="listed first (default: from params.yaml)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the address(es) and exit")
    args = parser.parse_args(argv)
    base = f"http://127.0.0.1:{args.port}"
    lines = addresses(args.uri, base, args.experiment or default_experiment())
    if args.print_only:
        print("\n".join(lines))
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group: mlflow ui runs uvicorn as a child
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill <pid>` of this process stops the server too (the finally)
        signal.signal(sig, _exit_on_signal)
    try:
        if not wait_until_up(proc, base):
            print(f"mlflow ui did not answer on {base} within {STARTUP_SECONDS} s", file=sys.stderr)
            return 1
        lines = addresses(args.uri, base, args.experiment or default_experiment())  # a first start creates the db
        print("\nMLflow runs (Model training view):\n  " + "\n  ".join(lines) + "\nCtrl-C stops the server.\n",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
