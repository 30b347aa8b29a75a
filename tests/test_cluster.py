"""The path past one machine, run for real (docs/cluster.md): a throwaway PostgreSQL server (the pgserver wheel's
binaries) on 127.0.0.1 holds an Optuna study that several `recall tune` workers share, and, in a database of its
own, the store of a real `mlflow server` that `recall run` and `recall tune` log to over HTTP, its artifacts
uploaded through the server (--artifacts-destination, mlflow-artifacts:/).

The tune workers get the password in their storage URL (where it could leak: it must not reach tags, params,
output or any file); the MLflow server gets it from a pgpass file (PGPASSFILE). Both servers run on free ports for
the module and are stopped by their own pid at its end. PostgreSQL refuses to run as root: as root, initdb and
postgres run as the user `nobody` (subprocess's user=/group=), their files outside pytest's root-only tmp dirs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import optuna
import psycopg
import pytest
import yaml
from conftest import FAST, TUNE_PROTOCOL, free_port, kill_when_written
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from recall.cli import main

pytestmark = pytest.mark.slow

USER = "recall"
PASSWORD = "pw-7Qf@:/%x"  # '@', ':', '/' and '%' must be escaped in a URL (and ':' in a pgpass file)
SECRETS = (PASSWORD, quote(PASSWORD, safe=""))  # as typed, as written in a URL
SERVER_START = 120  # seconds: the bound of each wait for a server
GRACE = 5  # tune.grace_period of the killed-worker test (heartbeats every second)


# ---------------------------------------------------------------------------------------------- processes
def wait_for(ready, what: str, proc: subprocess.Popen, log: Path, timeout: float = SERVER_START) -> float:
    """Poll ``ready()`` until it is true (returns the seconds it took); fail with ``log`` if ``proc`` exits first
    or ``timeout`` passes."""
    started = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not ready after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return time.monotonic() - started


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False, timeout: float = 30) -> None:
    """Stop a server this module started, by its pid (``group``: its process group, led by that pid); SIGKILL if
    it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def outputs_of(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """The outputs of processes that run at the same time; any still running after ``timeout`` s is killed."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def connects(**dsn) -> bool:
    try:
        psycopg.connect(**dsn, connect_timeout=5).close()
        return True
    except psycopg.OperationalError:
        return False


# ---------------------------------------------------------------------------------------------- PostgreSQL
def postgres_bin(home: Path) -> Path:
    """The server binaries the pgserver wheel ships (found without importing pgserver, which sets up its own); as
    root, a copy in ``home``: `nobody` may not reach the virtualenv (e.g. a clone under /root)."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None, "pgserver is missing: pip install -e '.[dev]'"
    site = Path(spec.submodule_search_locations[0]).parent
    if os.geteuid() == 0:  # the same layout: the binaries find libpq at $ORIGIN/../../../pgserver.libs
        shutil.copytree(site / "pgserver" / "pginstall", home / "site" / "pgserver" / "pginstall",
                        ignore=shutil.ignore_patterns("include"))
        shutil.copytree(site / "pgserver.libs", home / "site" / "pgserver.libs")
        site = home / "site"
    return site / "pgserver" / "pginstall" / "bin"


def as_server_user(home: Path) -> dict:
    """Popen arguments that run PostgreSQL as `nobody` when we are root (it refuses root), owning ``home``."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def sql(port: int, socket_dir: Path, *statements: str) -> None:
    """Run statements as the superuser `postgres` over the server's Unix socket (trusted; TCP needs passwords)."""
    with psycopg.connect(host=str(socket_dir), port=port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:  # CREATE DATABASE runs outside a transaction
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL 16 server on 127.0.0.1:<free port> with one role (`recall`, password PASSWORD, SCRAM) and two
    databases: `optuna` (the studies) and `mlflow` (the MLflow server's store): never one database for both."""
    home = Path(tempfile.mkdtemp(prefix="recall-pg-"))  # /tmp/recall-pg-*: pytest's tmp is root-only
    data, log, port, proc = home / "data", home / "postgres.log", free_port(), None
    try:
        owner, bin_dir = as_server_user(home), postgres_bin(home)
        with log.open("w") as out:
            subprocess.run([bin_dir / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8", "--no-locale",
                            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
                           stdout=out, stderr=subprocess.STDOUT, check=True, timeout=SERVER_START, **owner)
            proc = subprocess.Popen([bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port),
                                     "-k", home, "-c", "fsync=off"], stdout=out, stderr=subprocess.STDOUT, **owner)
        seconds = wait_for(lambda: connects(host=str(home), port=port, user="postgres", dbname="postgres"),
                           "postgres", proc, log)
        sql(port, home, f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'", f"CREATE DATABASE optuna OWNER {USER}",
            f"CREATE DATABASE mlflow OWNER {USER}")
        assert connects(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="optuna")
        assert not connects(host="127.0.0.1", port=port, user=USER, password="wrong", dbname="optuna")
        yield SimpleNamespace(port=port, data=data, log=log, pid=proc.pid, seconds=seconds,
                              url=lambda db, password=True: postgres_url(port, db, password))
    finally:
        if proc is not None:
            stop(proc, signal.SIGINT)  # fast shutdown: clients (the tests' own Optuna engines) are disconnected
        shutil.rmtree(home, ignore_errors=True)


def postgres_url(port: int, db: str, password: bool = True) -> str:
    auth = f"{USER}:{quote(PASSWORD, safe='')}" if password else USER
    return f"postgresql+psycopg://{auth}@127.0.0.1:{port}/{db}"  # psycopg 3 (SQLAlchemy < 2.1 means psycopg2)


# ---------------------------------------------------------------------------------------------- mlflow server
def pgpass_line(port: int, db: str) -> str:
    """host:port:database:user:password, with ':' and '\\' escaped."""
    escaped = PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    return f"127.0.0.1:{port}:{db}:{USER}:{escaped}\n"


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with the `mlflow` database as its store and a local artifact root that it serves
    (mlflow-artifacts:/); the database password in a pgpass file, not on its command line."""
    root = tmp_path_factory.mktemp("mlflow_server")
    secrets = root / "secrets"  # the one place where the password is meant to be
    secrets.mkdir(mode=0o700)
    pgpass = secrets / "pgpass"
    pgpass.write_text(pgpass_line(postgres.port, "mlflow"))
    pgpass.chmod(0o600)  # libpq ignores a pgpass file that others can read
    port, log = free_port(), root / "server.log"
    env = {**os.environ, "PGPASSFILE": str(pgpass), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.url("mlflow", password=False),
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with log.open("w") as out:  # its own process group: its uvicorn worker stops with it
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_for(lambda: answers(f"{uri}/health"), "mlflow server", proc, log)
        yield SimpleNamespace(uri=uri, root=root, artifacts=root / "artifacts", log=log, pid=proc.pid,
                              seconds=seconds, client=MlflowClient(uri))
    finally:
        stop(proc, group=True)


# ---------------------------------------------------------------------------------------------- secrets
def files_under(*roots: Path):
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and "secrets" not in path.parts:
                yield path


def bytes_of(path: Path) -> bytes:
    """A file's bytes, or none if it vanished since it was listed (a live server's temp file, e.g. pg_wal/xlogtemp.*)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def assert_no_password(*roots: Path, texts: tuple[str, ...] = ()) -> None:
    """Neither form of the password in ``texts`` (outputs) nor in any file under ``roots``."""
    for text in texts:
        assert not any(secret in text for secret in SECRETS), "the password is in a command's output"
    needles = [secret.encode() for secret in SECRETS]
    leaks = [path for path in files_under(*roots) if any(needle in bytes_of(path) for needle in needles)]
    assert not leaks, f"the password is written in {leaks}"


def assert_no_password_in_mlflow(client: MlflowClient) -> int:
    """No run of any experiment has the password in a tag or param; returns the number of runs read."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for run in runs:
        values = [*run.data.tags.values(), *run.data.params.values()]
        assert not any(secret in value for secret in SECRETS for value in values), run.info.run_name
    return len(runs)


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def world(tune_world):
    return tune_world


def worker(world, storage: str, tracking: str, *extra: str, study: str) -> list[str]:
    """A `recall tune` process's command (one training thread: two workers share two cores)."""
    return [sys.executable, "-m", "recall.cli",
            *world.args("train.threads=1", *extra, study=study, storage=storage, tracking=tracking)]


def trial_runs(client: MlflowClient, study: str) -> dict[str, tuple[str, str]]:
    """{run name: (MLflow status, optuna.state tag)} of a study's trial runs."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`optuna.study` = '{study}'")
    return {r.info.run_name: (r.info.status, r.data.tags.get("optuna.state")) for r in runs
            if "optuna.trial" in r.data.tags}


def test_two_workers_share_a_new_postgresql_study_and_a_third_call_resumes_it(world, postgres, mlflow_server,
                                                                              capfd):
    """Two workers started at the same instant on a database without a table yet (the study's file lock lets one
    create the schema and the study), then a third call adds a trial: 3 trials, one study."""
    storage = postgres.url("optuna")
    cmd = worker(world, storage, mlflow_server.uri, "tune.n_trials=1", study="pg")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = outputs_of(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert main(world.args("tune.n_trials=1", study="pg", storage=storage, tracking=mlflow_server.uri)) == 0
    resumed = capfd.readouterr()

    study = optuna.load_study(study_name="pg", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.user_attrs["workers_started"] == 3
    assert study.trials[0].params == {"method.replay_ratio": 0.5, "method.inpaint_threshold": 0.0}, "reference"
    assert study.trials[0].params != study.trials[1].params != study.trials[2].params
    assert sorted(study.trials[2].intermediate_values) == [1, 2]
    best = yaml.safe_load((world.tmp / "tune" / "pg" / "best.yaml").read_text())
    assert best["trials"] == {"total": 3, "complete": 3, "pruned": 0, "failed": 0}
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert best["storage"] == f"postgresql+psycopg://{USER}:***@127.0.0.1:{postgres.port}/optuna"
    assert f"tune: study pg in {best['storage']} (2 trials so far)" in resumed.out

    client = mlflow_server.client
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string="tags.`optuna.study` = 'pg' and tags.kind = 'tune'")
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.storage"] == parent.data.params["tune.storage"] == best["storage"]
    assert trial_runs(client, "pg") == {f"pg · trial {n}": ("FINISHED", "COMPLETE") for n in range(3)}
    assert_no_password(world.tmp / "tune" / "pg", mlflow_server.artifacts, mlflow_server.log, postgres.data,
                       postgres.log, texts=(*outputs, resumed.out, resumed.err))
    assert assert_no_password_in_mlflow(client) >= 4


def test_a_killed_workers_trial_fails_and_the_other_worker_retries_it(world, postgres, mlflow_server, capfd):
    """The study created once first (tune.n_trials=0, what workers on several machines need), then SIGKILL one of
    two workers mid-trial: the other one goes on, finds the trial silent (heartbeats) when it starts its next
    trial, marks it FAIL (its MLflow run FAILED) and runs it again with the same parameters.

    The other worker is paused (SIGSTOP) from the kill until the killed trial is stale, so that its next trial
    certainly starts after that (else timing decides whether it or a later call retries the trial). The grace
    period is short for a test but not 2 s: on a busy machine a live worker's heartbeat can lag that much."""
    storage = postgres.url("optuna")
    study_dir = world.tmp / "tune" / "pgkill"
    cmd = worker(world, storage, mlflow_server.uri, "tune.heartbeat_interval=1", f"tune.grace_period={GRACE}",
                 study="pgkill")
    assert main([*cmd[3:], "tune.n_trials=0"]) == 0
    creation = capfd.readouterr()
    created = optuna.load_study(study_name="pgkill", storage=storage)
    assert [t.state for t in created.trials] == [TrialState.WAITING], "only the reference trial, queued"
    step1 = study_dir / "trial_0" / "steps" / "1" / "model.pt"
    with ThreadPoolExecutor(1) as pool:  # the first worker takes trial 0 and is killed once its step 1 is trained
        killed = pool.submit(kill_when_written, [*cmd[3:], "tune.n_trials=1"], step1, 240)
        deadline = time.monotonic() + 120
        while not (study_dir / "trial_0").exists() and not killed.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        other = subprocess.Popen([*cmd, "tune.n_trials=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            killed.result(timeout=300)
            other.send_signal(signal.SIGSTOP)
            assert step1.exists() and not (step1.parent.parent / "2").exists(), "not killed mid-trial"
            assert not (study_dir / "trial_2").exists(), "the other worker finished its first trial already"
            time.sleep(GRACE + 1.5)  # > the grace period since the killed worker's last heartbeat
        finally:
            other.send_signal(signal.SIGCONT)
            (output,) = outputs_of([other])
    assert other.returncode == 0, output
    assert "tune: trial 0: its worker went silent (killed?): FAIL, queued again with the same parameters" in output

    study = optuna.load_study(study_name="pgkill", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], output
    (retry,) = [t for t in study.trials if t.system_attrs.get("retry_history") == [0]]
    assert retry.params == study.trials[0].params
    assert trial_runs(mlflow_server.client, "pgkill") == {
        "pgkill · trial 0": ("FAILED", "FAIL"), "pgkill · trial 1": ("FINISHED", "COMPLETE"),
        "pgkill · trial 2": ("FINISHED", "COMPLETE")}
    assert_no_password(study_dir, mlflow_server.artifacts, mlflow_server.log, postgres.data, postgres.log,
                       texts=(output, creation.out, creation.err))


def test_recall_run_logs_through_the_mlflow_server(world, mlflow_server, tmp_path, monkeypatch):
    """A run's parent and per-step child runs, metrics by step and figures reach the server; the artifacts are
    uploaded through it into its artifact root, not written to a path the client worked out for itself."""
    client_dir = tmp_path / "elsewhere"  # not the server's directory
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={world.root}", f"protocol={TUNE_PROTOCOL}", "method=ft",
                 f"step0={world.step0}", f"run_dir={run_dir}", f"tracking.uri={mlflow_server.uri}",
                 "tracking.experiment=cluster", *FAST]) == 0
    assert sorted(p.name for p in client_dir.iterdir()) == [], "the client wrote no MLflow files of its own"

    client = mlflow_server.client
    experiment = client.get_experiment_by_name("cluster")
    assert experiment.artifact_location == f"mlflow-artifacts:/{experiment.experiment_id}"
    saved = json.loads((run_dir / "steps" / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == mlflow_server.uri
    parent = client.get_run(saved["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["protocol"] == TUNE_PROTOCOL
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["step"]) for r in children) == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "miou/all")] == [0, 1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "miou/all")] == pytest.approx(
        [s["miou"]["all"] for s in metrics["steps"]])

    figures = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert "miou_curves.png" in figures and [a.path for a in client.list_artifacts(parent.info.run_id, "figures")] \
        == [f"figures/{name}" for name in figures]
    stored = mlflow_server.artifacts / experiment.experiment_id / parent.info.run_id / "artifacts"
    for name in figures:  # on the server's disk, byte for byte
        assert (stored / "figures" / name).read_bytes() == (run_dir / "figures" / name).read_bytes()
    assert (stored / "metrics.json").read_bytes() == (run_dir / "metrics.json").read_bytes()
    downloaded = Path(client.download_artifacts(parent.info.run_id, "figures/miou_curves.png", str(tmp_path)))
    assert downloaded.read_bytes() == (run_dir / "figures" / "miou_curves.png").read_bytes()


def test_the_scan_finds_a_password_that_postgresql_holds(postgres):
    """The scans above are no formality: a value written to a table is found in PostgreSQL's files (its WAL)."""
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user=USER, password=PASSWORD, dbname="optuna",
                         autocommit=True) as conn:
        conn.execute("CREATE TABLE canary (value text)")
        conn.execute("INSERT INTO canary VALUES (%s)", (quote(PASSWORD, safe=""),))
    with pytest.raises(AssertionError, match="the password is written in"):
        assert_no_password(postgres.data)
