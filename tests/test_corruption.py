"""Runs that cannot be corrupted: a failed run does not poison its resume, provenance comes from content, one
writer per run directory, bounded inputs, config errors as user errors, a dataset pre-flight."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

from recall.cli import main
from recall.provenance import content_id


def run(world: Path, run_dir: Path, *overrides: str, tracking: str = "") -> int:
    return main(["run", f"dataset.root={world}", f"tracking.uri={tracking}", *FAST, f"run_dir={run_dir}",
                 *overrides])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    root = tmp_path_factory.mktemp("pool") / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=3, root=root, progress=False)
    return root


# ------------------------------------------------------------------ 1. a failed run does not poison its resume
def test_a_run_without_its_pool_fails_before_step_0_and_resumes_once_it_is_built(tmp_path, tiny_world, pool, capsys):
    run_dir, where = tmp_path / "run", tmp_path / "pools" / "p"
    args = ("protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={where}")
    assert run(tiny_world, run_dir, *args) == 2
    assert "not built" in capsys.readouterr().err
    assert not run_dir.exists(), "nothing trained, nothing marked done"
    shutil.copytree(pool, where)
    assert run(tiny_world, run_dir, *args) == 0  # the same command now runs through
    marker = json.loads((run_dir / "steps/replay_labels/step0.done").read_text())
    assert marker["pool"] == content_id(where) and marker["images"] == 19 * 3


# ------------------------------------------------------------------ 2. provenance from content
def test_the_run_records_the_pool_it_read_and_notices_another(tmp_path, tiny_world, pool, capsys):
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    run_dir, where = tmp_path / "run", tmp_path / "p"
    shutil.copytree(pool, where)
    args = ("protocol=19-1", "method=recall", "replay=toy_gan", f"replay.pool={where}")
    assert run(tiny_world, run_dir, *args) == 0
    inputs = json.loads((run_dir / "steps/inputs.json").read_text())
    assert inputs["replay_pool"] == content_id(where) and inputs["replay_pool"].startswith("manifest:")
    assert inputs["dataset"] == content_id(tiny_world) and inputs["dataset"].startswith("sha256:")
    # the pool grows (one more image per class): another pool for this run, which then refuses to resume on it
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=4, root=where, progress=False)
    assert content_id(where) != inputs["replay_pool"]
    capsys.readouterr()
    assert run(tiny_world, run_dir, *args) == 2  # the finished run is not resumed on another pool
    assert "inputs.replay_pool" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. one writer per run directory
def test_a_second_writer_is_refused_and_a_killed_holder_frees_the_directory(tmp_path, tiny_world, capsys):
    from recall.locks import lock_file_of

    run_dir = tmp_path / "run"
    args = ["run", f"dataset.root={tiny_world}", "tracking.uri=", *FAST, "protocol=15-1x5",
            "train.epochs=5000", f"run_dir={run_dir}"]  # step 0 far longer than the test: killed while training
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "recall.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        holder = lock_file_of(run_dir)
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline and not (
                holder.exists() and holder.read_text().strip() == str(first.pid)):
            time.sleep(0.1)
        assert first.poll() is None, f"the first writer ended early: {log.read_text()[-2000:]}"
        assert holder.read_text().strip() == str(first.pid), "the first writer holds the run directory"
        capsys.readouterr()
        code = main(args)  # the second writer (in this process: the lock is the OS's, per open file)
        second = capsys.readouterr()
        assert first.poll() is None, f"the first writer ended early: {log.read_text()[-2000:]}"
        assert code == 2, second.out[-1000:] + second.err[-1000:]
        assert f"in use by process {first.pid}" in second.err and "Traceback" not in second.err
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    assert not (run_dir / "steps/0/model.pt").exists()
    # the OS released the killed holder's lock: the directory is usable again (here with a shorter step 0)
    assert run(tiny_world, run_dir, "protocol=15-1x5", "last_step=0", "on_config_change=restart") == 0


def test_two_processes_create_a_new_mlflow_store_one_after_the_other(tmp_path):
    code = "import sys; from recall.tracking import open_client; open_client(sys.argv[1])"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors


# ------------------------------------------------------------------ 4. bounded inputs in a folder source
def test_a_folder_source_skips_bombs_empty_files_and_links_out_of_its_root_with_reasons(tmp_path):
    from recall.replay.folder import FolderSource
    from recall.replay.pool import build_pool

    cat = tmp_path / "own" / "cat"
    cat.mkdir(parents=True)
    Image.new("1", (12000, 12000)).save(cat / "a_bomb.png")  # ~17 KB on disk, 144 megapixels decoded
    (cat / "b_empty.jpg").write_bytes(b"")
    (cat / "c_system.jpg").symlink_to("/etc/hostname")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(cat / "d_good.jpg")
    (cat / "e_inside.jpg").symlink_to(cat / "d_good.jpg")  # a link that stays inside the root is fine
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = build_pool(FolderSource(tmp_path / "own"), {8: "cat"}, 10, tmp_path / "pool", progress=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert summary["counts"] == {"cat": 1}  # d_good, and e_inside is the same image (a duplicate)
    assert summary["source_skipped"] == {"too_large": 1, "empty": 1, "outside_root": 1}
    reasons = {p["item"]: p["reason"].split(":")[0] for p in summary["source_problems"]}
    assert reasons == {"cat/a_bomb.png": "too_large", "cat/b_empty.jpg": "empty", "cat/c_system.jpg": "outside_root"}
    assert json.loads((tmp_path / "pool" / "pool.json").read_text())["source_problems"] == summary["source_problems"]
    assert grown_mb < 200, f"the bomb was decoded ({grown_mb:.0f} MB)"


# ------------------------------------------------------------------ 5. bad input: one line, exit 2, nothing made
@pytest.mark.parametrize("override,named", [
    ("train.epochz=3", "unknown config key 'train.epochz' (did you mean epochs?)"),
    ("method=nonexistent", "unknown method 'nonexistent'"),
    ("train.batch_size=0", "train.batch_size=0: must be an integer >= 1"),
    ("+method.bogus=1", "method=ft: "),
])
def test_config_errors_are_one_line_and_create_nothing(tmp_path, tiny_world, capsys, override, named):
    assert run(tiny_world, tmp_path / "run", override, tracking=f"sqlite:///{tmp_path}/mlflow.db") == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and err.startswith("recall: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run dir, no MLflow store"


def test_a_missing_or_undecodable_image_fails_before_training(tmp_path, tiny_world, capsys):
    world = Path(shutil.copytree(tiny_world, tmp_path / "world"))
    ids = (world / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (world / "JPEGImages" / f"{ids[-1]}.jpg").unlink()  # a val image: only evaluation would have read it
    assert run(world, tmp_path / "run", "protocol=19-1") == 2
    assert f"{ids[-1]}.jpg" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("steps/*/model.pt")), "failed before any training"
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(world / "JPEGImages" / f"{ids[-1]}.jpg")  # wrong size
    assert run(world, tmp_path / "run", "protocol=19-1") == 2
    assert "differs from its image" in capsys.readouterr().err
