"""`make plots`: DVC's comparison plots (dvc.yaml's `plots:`) rendered with no network.

    python -m recall.plots                      # the workspace's plots -> dvc_plots/offline/
    python -m recall.plots HEAD~1 main          # compare revisions (dvc plots diff), the workspace included
    python -m recall.plots --out DIR --project PATH

`dvc plots show` writes an HTML page that loads Vega from a CDN. Here DVC's own Vega-Lite specs (`dvc plots
show --json`, data inlined) are rendered by vl-convert, which bundles Vega: one PNG and one SVG per plot, and
index.html, which loads Vega from a local bundle beside it (interactive, e.g. DVC's smoothing slider; offline).

DVC colours lines by revision; the runs of one revision then differ only by dash. Each line is labelled here by
its run instead (the run directory of its file, e.g. `15-5_recall_web` for runs/15-5_recall_web/curve.csv): colour
and legend by run, dash by revision when several revisions are compared.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

DEFAULT_OUT = Path("dvc_plots") / "offline"
DASHES = [[1, 0], [8, 4], [2, 2], [8, 4, 2, 4], [12, 2], [4, 6]]
WIDTH, HEIGHT = 560, 340


def dvc_plots_json(project: Path, revisions: list[str]) -> dict:
    """`dvc plots show --json` (or `dvc plots diff REV... --json`): {plot id: [{type, revisions, content}]}."""
    args = ["plots", "diff", *revisions] if revisions else ["plots", "show"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} --json failed in {project}:\n{done.stderr[-2000:]}")
    payload = json.loads(done.stdout)
    errors = payload.get("errors")
    if errors:
        print(f"dvc plots: {json.dumps(errors)[:1000]}", file=sys.stderr)
    return payload.get("data", payload)


def run_labels(filenames: list[str]) -> dict[str, str]:
    """A label per plotted file: its directory when the files share one name (runs/<run>/curve.csv), else the
    file's path without its extension."""
    paths = [PurePosixPath(f) for f in filenames]
    same_name = len({p.name for p in paths}) == 1 and all(str(p.parent) != "." for p in paths)
    return {f: str(p.parent) if same_name else (str(p.with_suffix("")) if p.name else f or "data")
            for f, p in zip(filenames, paths)}


def _walk(node, visit) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _is_int(value) -> bool:
    try:
        return float(value).is_integer()
    except (TypeError, ValueError):
        return False


def label_by_run(spec: dict, revisions: list[str], source: str = "") -> dict:
    """DVC's spec with a `run` field per row: colour (and legend) by run, dash by revision when there are several,
    a static size for a picture. `source`: the file of a single-file plot (its rows name none). Returns a copy."""
    spec = copy.deepcopy(spec)
    rows = spec.get("data", {}).get("values", [])
    filenames = sorted({str(r.get("filename") or source) for r in rows})
    labels = run_labels(filenames)
    fields = {r.get("field") for r in rows if r.get("field")}
    for row in rows:
        label = labels[str(row.get("filename") or source)]
        row["run"] = label + (f" · {row['field']}" if len(fields) > 1 else "")
    runs = sorted({r["run"] for r in rows})
    scheme = "tableau10" if len(runs) <= 10 else "tableau20"

    x_field = (spec.get("encoding", {}).get("x") or {}).get("field")
    whole_x = sorted({int(float(r[x_field])) for r in rows}) if rows and all(_is_int(r.get(x_field)) for r in rows) \
        else None
    x_axis = {"values": whole_x, "format": "d"} if whole_x and len(whole_x) <= 25 else {"tickMinStep": 1, "format": "d"}

    def visit(node: dict) -> None:
        encoding = node.get("encoding")
        if isinstance(encoding, dict) and "color" in encoding:
            encoding["color"] = {"field": "run", "type": "nominal"}
        if isinstance(encoding, dict) and whole_x and (encoding.get("x") or {}).get("field") == x_field:
            encoding["x"]["axis"] = x_axis  # steps 0, 1, 2, not 0.2, 0.4, ...
        if node.get("mark") == "line":
            node["mark"] = {"type": "line", "point": True}
        if "loess" in node and "run" not in node.get("groupby", []):
            node["groupby"] = [*node.get("groupby", []), "run"]

    _walk(spec, visit)
    encoding = spec.setdefault("encoding", {})
    encoding["color"] = {"field": "run", "type": "nominal", "title": "run",
                         "scale": {"domain": runs, "scheme": scheme}, "legend": {"labelLimit": 400}}
    if len(revisions) > 1:
        encoding["strokeDash"] = {"field": "rev", "type": "nominal", "title": "revision",
                                  "scale": {"domain": revisions, "range": [DASHES[i % len(DASHES)]
                                                                           for i in range(len(revisions))]},
                                  "legend": {"symbolStrokeColor": "grey", "symbolFillColor": "transparent"}}
    else:
        encoding.pop("strokeDash", None)
    spec["width"], spec["height"] = WIDTH, HEIGHT
    return spec


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "plot"


def vega_script(out: Path) -> Path:
    """Vega, Vega-Lite and vega-embed bundled by vl-convert into one local script (made once per version: it takes
    seconds)."""
    import vl_convert as vlc

    versions = f"vega{vlc.get_vega_version()}-embed{vlc.get_vega_embed_version()}"
    script = out / f"vega-bundle-{re.sub(r'[^0-9A-Za-z.]+', '', versions)}.js"
    if not script.is_file():
        for old in out.glob("vega-bundle-*.js"):
            old.unlink()
        tmp = script.with_suffix(".tmp")
        tmp.write_text(vlc.javascript_bundle())
        os.replace(tmp, script)
    return script


def page(charts: list[tuple[str, dict]], script: str) -> str:
    """One HTML page with every chart; `script`: the local Vega bundle, beside the page (no network)."""
    divs, calls = [], []
    for i, (title, spec) in enumerate(charts):
        divs.append(f"<section id=\"{html.escape(slug(title))}\"><div id=\"chart{i}\"></div></section>")
        calls.append(f"vegaEmbed('#chart{i}', {json.dumps(spec)}, {{actions: false}});")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DVC plots (offline)</title>\n"
            "<style>body{font-family:sans-serif;margin:2em} section{margin-bottom:2em}</style>\n"
            f"<script src=\"{html.escape(script)}\"></script></head>\n<body><h1>DVC plots</h1>\n" + "\n".join(divs)
            + "\n<script>\n" + "\n".join(calls) + "\n</script></body></html>\n")


def render(project: Path, out: Path, revisions: list[str] = ()) -> list[Path]:
    """Render every Vega plot of `project` (at `revisions`, else its workspace) to out/<plot>.png and .svg, and
    out/index.html; returns the files written."""
    import vl_convert as vlc

    plots = dvc_plots_json(project, list(revisions))
    out.mkdir(parents=True, exist_ok=True)
    written, charts = [], []
    for plot_id, items in plots.items():
        for n, item in enumerate(items):
            if item.get("type") != "vega":
                print(f"dvc plots: {plot_id}: {item.get('type')} plots are not rendered here", file=sys.stderr)
                continue
            spec = label_by_run(item["content"], list(item.get("revisions") or []), source=plot_id)
            name = slug(plot_id) + (f"_{n}" if len(items) > 1 else "")
            png, svg = out / f"{name}.png", out / f"{name}.svg"
            png.write_bytes(vlc.vegalite_to_png(spec, scale=2))
            svg.write_text(vlc.vegalite_to_svg(spec))
            written += [png, svg]
            charts.append((plot_id, spec))
    if not charts:
        raise RuntimeError(f"no Vega plot in {project} (dvc.yaml `plots:`, and do their files exist?)")
    index = out / "index.html"
    script = vega_script(out)
    index.write_text(page(charts, script.name))
    return [*written, index, script]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="*", help="git revisions to compare (dvc plots diff); none: workspace")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default %(default)s)")
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project (default: here)")
    args = parser.parse_args(argv)
    try:
        files = render(args.project, args.out, args.revisions)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print("\n".join(str(f) for f in files))
    print(f"open {args.out / 'index.html'} (no network needed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
