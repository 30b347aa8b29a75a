"""`make plots`: DVC's own plot specs rendered with no network (vl-convert bundles Vega), each line labelled by run.

A tiny DVC project in a tmp dir holds the repository's real `plots:` section (dvc.yaml) and one stage that writes
a curve.csv per run it names; the stage runs twice (committed, then changed in the workspace), so the plots
compare two revisions, as `python -m recall.plots HEAD` does.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from recall.plots import main as plots_main
from recall.plots import run_labels

ROOT = Path(__file__).resolve().parents[1]

WRITE_CURVES = """\
import csv, sys
from pathlib import Path
import yaml
drop = yaml.safe_load(open("params.yaml"))["drop"]
for i, path in enumerate(sys.argv[1:]):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "all", "old", "new", "all_no_bg", "old_no_bg"])
        for step in range(3):
            v = round(0.7 - drop * step * (1 + i / 4), 4)
            w.writerow([step, v, v, v, v, v])
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("plots") / "project"
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]  # the repository's plot definitions
    files = sorted({f for plot in plots for spec in plot.values() for f in spec["y"]})
    (root / "write_curves.py").write_text(WRITE_CURVES)
    (root / "params.yaml").write_text("drop: 0.1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({  # the first curve is also a stage's plot, as in dvc.yaml
        "stages": {"curves": {"cmd": f"python write_curves.py {' '.join(files)}", "deps": ["write_curves.py"],
                              "params": ["drop"], "outs": [{f: {"cache": False}} for f in files[1:]],
                              "plots": [{files[0]: {"cache": False, "x": "step", "y": "old_no_bg"}}]}},
        "plots": plots}, sort_keys=False))
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "curves"], root, env)
    (root / "params.yaml").write_text("drop: 0.05\n")  # the workspace differs from HEAD
    _run([sys.executable, "-m", "dvc", "repro", "-q"], root, env)
    return root, files


def test_run_labels():
    assert run_labels(["15-5_ft/curve.csv", "15-5_mib/curve.csv"]) == {"15-5_ft/curve.csv": "15-5_ft",
                                                                       "15-5_mib/curve.csv": "15-5_mib"}
    assert run_labels(["a.csv", "b/c.csv"]) == {"a.csv": "a", "b/c.csv": "b/c"}
    assert run_labels(["runs/r/curve.csv"]) == {"runs/r/curve.csv": "runs/r"}


def test_plots_render_offline_labelled_by_run_and_revision(project, capsys):
    root, files = project
    out = root / "dvc_plots" / "offline"
    assert plots_main(["HEAD", "--project", str(root), "--out", str(out)]) == 0
    runs = sorted(Path(f).parent.name for f in files)  # runs/15-5_ft/curve.csv -> 15-5_ft
    pngs = sorted(out.glob("*.png"))
    single = re.sub(r"[^a-z0-9]+", "_", files[0].lower())  # the first run's curve.csv's own plot
    assert [p.stem for p in pngs] == ["miou_of_all_classes_after_each_step",
                                      "miou_of_old_classes_no_bg_after_each_step", single]
    for png in pngs[:2]:
        image = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
        assert image.shape[0] > 500 and image.shape[1] > 1000, image.shape  # scale 2
        colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
        assert len(colours) > 50 and image.std() > 10, f"{png.name} looks blank"
        svg = png.with_suffix(".svg").read_text()
        texts = set(re.findall(r"<text[^>]*>([^<]+)</text>", svg))
        assert set(runs) <= texts, f"every run is labelled in the legend: {sorted(set(runs) - texts)}"
        assert {"run", "revision", "workspace", "HEAD"} <= texts
    texts = set(re.findall(r"<text[^>]*>([^<]+)</text>", pngs[2].with_suffix(".svg").read_text()))
    assert {str(Path(files[0]).parent), "workspace", "HEAD"} <= texts, "a single file's plot: its run and revisions"
    html = (out / "index.html").read_text()
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert len(scripts) == 1 and not scripts[0].startswith(("http:", "https:", "//")), "no CDN"
    assert (out / scripts[0]).stat().st_size > 300_000, "Vega, Vega-Lite and vega-embed, bundled"
    assert html.count("vegaEmbed(") == 3 and all(r in html for r in runs)
