"""Metric names are defined once, in recall.metrics: a step's numbers (`SUMMARIES`: name, table label, MLflow key,
Optuna direction, and for a derived number the function computing it) and the groups the outputs show them in
(HEADLINE, CURVE_METRICS, ...; the report's columns: each Summary's `report`). Adding a derived number is one
function and one registry line; no other module of the package spells a registered name."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from recall import metrics
from recall.provenance import PACKAGE_DIR

REGISTRY = PACKAGE_DIR / "metrics.py"
WORDS = {"all", "old", "new"}  # registered names that are also plain words: flagged only where the registry is read
# (module, string) pairs that may stay, each with its reason
ALLOWED = {
    # docs/papers.json's columns: the published tables' old/new/all (their own class sets), not the testbed's numbers
    ("recall/papers.py", "old"), ("recall/papers.py", "new"), ("recall/papers.py", "all"),
}


def registered_strings() -> set[str]:
    """Every string the registry defines: names, labels, MLflow keys and their Optuna names, objectives, the
    replay labels' quality keys and columns."""
    found = set(metrics.MULTI_OBJECTIVES) | set(metrics.LABEL_QUALITY) | set(metrics.LABEL_QUALITY.values())
    for s in metrics.SUMMARIES.values():
        found |= {s.name, s.label, s.figure_label, s.mlflow, s.mlflow.replace("/", "_")}
    return found


def docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def reads_the_registry(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "recall.metrics" for node in ast.walk(tree))


def spelled_names(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """The string constants of `path`'s code (docstrings and comments aside) that are registered names; the plain
    words among them only where the module reads the registry (elsewhere "all" means every class, every file, ...)."""
    tree = ast.parse(path.read_text())
    skip, words = docstrings(tree), WORDS if reads_the_registry(tree) else set()
    return sorted({(node.lineno, node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                   and node.value in names and (node.value not in WORDS or node.value in words)})


def test_no_module_but_the_registry_spells_a_metric_name():
    names = registered_strings()
    assert {"old_no_bg", "all", "old (no bg)", "miou/hmean", "forgetting/mean", "old_new"} <= names
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = path.relative_to(PACKAGE_DIR.parent).as_posix()
        if path == REGISTRY:
            continue
        spelled = [(line, name) for line, name in spelled_names(path, names) if (module, name) not in ALLOWED]
        if spelled:
            found[module] = spelled
    assert found == {}, "read these names from recall.metrics (SUMMARIES and its groups)"


def test_the_scan_finds_a_spelled_name(tmp_path: Path):
    """The check sees a name in code (a key, an f-string's part), not in a docstring; a plain word only where the
    module reads the registry."""
    source = tmp_path / "m.py"
    source.write_text('"""old_no_bg in a docstring"""\nfrom recall.metrics import SUMMARIES\n'
                      'x = r["old_no_bg"]\ny = f"{1}" + "all"\n')
    assert spelled_names(source, registered_strings()) == [(3, "old_no_bg"), (4, "all")]
    source.write_text('x = "all"\ny = "miou/all"\n')
    assert spelled_names(source, registered_strings()) == [(2, "miou/all")]


def gap(result):  # the toy derived number: one function ...
    miou = result["miou"]
    return None if miou.get("old_no_bg") is None or miou.get("new") is None else miou["old_no_bg"] - miou["new"]


@pytest.fixture
def with_gap(monkeypatch):
    monkeypatch.setitem(metrics.SUMMARIES, "gap",  # ... and one registry line
                        metrics.Summary("gap", "old − new", "miou/gap", "minimize", gap))


def _run(tmp: Path, name: str, old: float, new: float) -> Path:
    d = tmp / name
    d.mkdir()
    miou = {"all": 0.5, "all_no_bg": 0.45, "old": old, "old_no_bg": old, "new": new}
    (d / "metrics.json").write_text(json.dumps({
        "protocol": "15-5", "setting": "overlapped", "method": "mib", "replay": "none", "seed": int(name[-1]),
        "steps": [{"step": 0, "miou": {**miou, "new": None}}, {"step": 1, "miou": miou}], "final": {"miou": miou}}))
    return d


def test_a_registered_number_reaches_the_logged_metrics_the_study_and_tune(with_gap, tmp_path: Path):
    from recall import study_report, tracking, tune
    from recall.config import compose

    result = {"step": 1, "miou": {"all": 0.5, "old_no_bg": 0.6, "new": 0.2}, "iou": {}, "forgetting": {},
              "old_classes": []}
    assert metrics.derived(result)["gap"] == pytest.approx(0.4)
    logged = tracking.step_metrics(result)  # the dict recall logs to MLflow after each step
    assert logged["miou/gap"] == pytest.approx(0.4) and list(logged)[-1] == "miou/gap"
    assert study_report.study_metrics()[-1] == "gap" and study_report.table_metrics()[-1] == "gap"
    assert study_report.study_metrics().count("gap") == 1  # a report column too, named once
    # tune: an objective of its own, in its own direction
    (tmp_path / "steps" / "0").mkdir(parents=True)
    (tmp_path / "steps" / "0" / "model.pt").write_bytes(b"")
    settings = tune.read_settings(compose(["method=recall", "tune.objective=gap", f"tune.step0={tmp_path}"]))
    assert settings.objective == "gap" and not settings.multi
    assert tune.directions("gap") == ("minimize",) and tune.objective_names("gap") == ["miou_gap"]
    assert tune.step_value(result, "gap") == pytest.approx(0.4)
    assert tune.final_values(result, "gap") == [pytest.approx(0.4)]


DEMO_COLUMNS = ("old_no_bg", "new", "all", "all_no_bg")  # the demo's report (reports/summary.json), in this order


def test_the_report_shows_the_demos_columns():
    """The registry chooses the report's columns (`report`, in registry order): the demo's four, so that
    reports/summary.* keep their bytes; old (with bg), hmean and forgetting stay out."""
    assert metrics.report_metrics() == DEMO_COLUMNS


def test_a_registered_number_is_a_column_of_the_report(with_gap, tmp_path: Path):
    """The function and its registry line (the fixture) are all it takes: the report's rows, its markdown, CSV and
    JSON show the new number after the demo's columns, computed from each run's record by the Summary."""
    from recall import report

    assert metrics.report_metrics() == (*DEMO_COLUMNS, "gap")
    table = report.write_report([_run(tmp_path, "r0", 0.6, 0.2), _run(tmp_path, "r1", 0.7, 0.2)], tmp_path / "out")
    assert table[0]["gap"] == pytest.approx(0.45) and table[0]["gap_std"] == pytest.approx(0.0707, abs=1e-4)
    lines = (tmp_path / "out" / "summary.md").read_text().splitlines()
    header = lines.index("| " + " | ".join(report.columns()) + " |")
    assert lines[header].endswith("| all_no_bg | gap |") and lines[header + 2].endswith("| 0.450 ± 0.071 |")
    with (tmp_path / "out" / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        first = next(reader)
    assert reader.fieldnames == [*report.KEY, "options", "seeds", "steps", *DEMO_COLUMNS, "gap",
                                 *(f"{m}_std" for m in (*DEMO_COLUMNS, "gap"))]
    assert float(first["gap"]) == pytest.approx(0.45) and float(first["gap_std"]) == pytest.approx(0.0707, abs=1e-4)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["r1"]) == [*DEMO_COLUMNS, "gap"] and summary["r1"]["gap"] == pytest.approx(0.5)
    assert summary["r0"]["gap"] == pytest.approx(0.4)


def test_the_groups_name_registered_numbers():
    groups = (metrics.HEADLINE, metrics.report_metrics(), metrics.CURVE_METRICS, metrics.OLD_AND_ALL, metrics.OLD_NEW,
              (metrics.OLD, metrics.ALL, metrics.DEFAULT_OBJECTIVE), *metrics.MULTI_OBJECTIVES.values())
    assert all(name in metrics.SUMMARIES for group in groups for name in group)
    assert set(metrics.CURVE_METRICS) == set(metrics.summarize([0.5, 0.5], [1], []))  # curve.csv: every mIoU
