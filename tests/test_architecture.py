"""The shape of the code, checked: the product never imports the simulations, the runner knows no method's data
flow, and every DVC stage depends on all the code it runs (dvc.yaml's code deps are generated and current)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from recall.pipeline import DVC_FILES, ROOT, code_deps, stale_files
from recall.provenance import PACKAGE_DIR, import_closure

SIM = PACKAGE_DIR / "sim"


def imports_of(path: Path) -> set[str]:
    """Every module an `import` statement of `path` names (anywhere in the file: top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_product_never_imports_the_simulations():
    product = [p for p in PACKAGE_DIR.rglob("*.py") if SIM not in p.parents]
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith("recall.sim"))
                 for p in product}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(product) > 30 and any(SIM.glob("*.py"))  # the walk saw the package


def test_the_runner_holds_no_method_specific_code():
    """A method's data flow lives in its module (recall/methods/): the runner imports no replay code."""
    runner = imports_of(PACKAGE_DIR / "experiment.py")
    forbidden = ("recall.replay", "recall.labeling", "recall.methods.replay", "recall.methods.recall")
    assert not {m for m in runner if m.startswith(forbidden)}
    tree = ast.parse((PACKAGE_DIR / "experiment.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names.discard("replay")  # cfg.replay.name: the replay source is part of a run's name and output contract
    assert not {n for n in names if re.search(r"replay|helper|inpaint|label_pool|pool", n, re.IGNORECASE)}


def test_dvc_code_deps_are_generated_and_current():
    assert stale_files() == [], "run `python -m recall.pipeline` to regenerate the code deps"


def _stages(dvc_file: Path):
    for name, stage in (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).items():
        yield name, stage.get("do", stage)


def test_every_stage_depends_on_the_whole_closure_of_the_module_it_runs():
    checked = 0
    for dvc_file in (ROOT / name for name in DVC_FILES):
        if not dvc_file.is_file():
            continue
        for name, stage in _stages(dvc_file):
            entry = re.search(r"python -m ([\w.]+)", " ".join(str(stage["cmd"]).split()))
            assert entry, f"{dvc_file.name}: stage {name} does not run `python -m <module>`: its code is unknown"
            deps = [str(d) for d in stage.get("deps", [])]
            covered = lambda p: any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps)
            missing = [p.relative_to(ROOT).as_posix() for p in import_closure(entry[1])
                       if not covered(p.relative_to(ROOT).as_posix())]
            assert missing == [], f"{dvc_file.name}: stage {name} runs {entry[1]} but does not depend on {missing}"
            checked += 1
    assert checked >= 8


def test_the_closure_follows_lazy_imports_and_registry_names():
    closure = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("recall.stages.pool")}
    # the pool stage builds sources by name ("recall.sim.toy_gan:ToyGenerator"), imported only when chosen
    assert {"replay/sources.py", "sim/toy_gan.py", "sim/toy_web.py", "replay/web.py", "replay/gan.py"} <= closure
    # the report does not train: no model, no training loop in its closure
    report = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("recall.stages.report")}
    assert "report.py" in report and not {"model.py", "train.py", "experiment.py"} & report
    assert "recall/methods" in code_deps("recall.stages.run")  # a directory stands for all its files


def test_a_module_a_config_file_names_is_code_of_every_stage_that_composes_the_config():
    """replay.truth names recall.sim.truth in conf/replay/toy_gan.yaml: a run executes it, so editing it must make
    DVC re-run the runs (the closure follows config files as it follows registry strings)."""
    from recall.provenance import PACKAGE_DIR, configured_modules, import_closure

    named = configured_modules(PACKAGE_DIR.parent / "conf")
    assert "recall.sim.truth" in named
    closure = import_closure("recall.stages.run")
    assert PACKAGE_DIR / "sim" / "truth.py" in closure and PACKAGE_DIR / "sim" / "toy_web.py" in closure
