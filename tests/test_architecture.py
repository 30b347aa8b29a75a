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
    for dvc_file, top in ((ROOT / name, top) for name, top in DVC_FILES.items()):
        if not dvc_file.is_file():
            continue
        for name, stage in _stages(dvc_file):
            entry = re.search(r"python -m ([\w.]+)", " ".join(str(stage["cmd"]).split()))
            assert entry, f"{dvc_file.name}: stage {name} does not run `python -m <module>`: its code is unknown"
            deps = [str(d).removeprefix(top) for d in stage.get("deps", [])]  # the study's: ../<path from the top>
            covered = lambda p: any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps)
            missing = [p.relative_to(ROOT).as_posix() for p in import_closure(entry[1])
                       if not covered(p.relative_to(ROOT).as_posix())]
            assert missing == [], f"{dvc_file.name}: stage {name} runs {entry[1]} but does not depend on {missing}"
            checked += 1
    assert checked >= 8


def test_the_closure_follows_lazy_imports_and_registry_names():
    closure = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("recall.stages.pool")}
    # the pool stage builds sources by name ("recall.sim.toy_gan:ToyGenerator"), imported only when chosen
    assert {"replay/sources.py", "sim/toy_gan.py", "sim/toy_web.py", "replay/web.py", "replay/gan.py",
            "replay/diffusion.py", "sim/toy_diffusion.py"} <= closure
    # the report does not train: no model, no training loop in its closure
    report = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("recall.stages.report")}
    assert "report.py" in report and not {"model.py", "train.py", "experiment.py"} & report
    assert "recall/methods" in code_deps("recall.stages.run")  # a directory stands for all its files


def test_a_module_a_config_file_names_is_code_of_every_stage_that_calls_it():
    """replay.truth names recall.sim.truth in conf/replay/toy_gan.yaml: a run executes it, so editing it must make
    DVC re-run the runs (the closure follows config files as it follows registry strings), but not the
    pretraining, which composes a config and never calls a replay scorer."""
    from recall.provenance import PACKAGE_DIR, configured_modules, import_closure

    named = configured_modules(PACKAGE_DIR.parent / "conf")
    assert "recall.sim.truth" in named
    closure = import_closure("recall.stages.run")
    assert PACKAGE_DIR / "sim" / "truth.py" in closure and PACKAGE_DIR / "sim" / "toy_web.py" in closure
    assert PACKAGE_DIR / "sim" / "truth.py" not in import_closure("recall.stages.pretrain")


def test_only_the_config_readers_resolve_names_that_are_not_their_own_registrys():
    """`resolve(x)` runs the module a "module:attribute" string names. Where x is a module-level constant (or an
    entry of one: SOURCES[name]) the closure sees the string in that module; any other x comes from a config file,
    and its module must be a CONFIG_READER, whose closure holds every module conf/ names."""
    from recall.provenance import CONFIG_READERS

    readers, checked = set(), 0
    for path in PACKAGE_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                     for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "resolve" and node.args:
                arg = node.args[0]
                base = arg.value if isinstance(arg, ast.Subscript) else arg
                checked += 1
                if not (isinstance(base, ast.Name) and base.id in constants):
                    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
                    readers.add(".".join(parts))
    assert checked >= 5 and readers == set(CONFIG_READERS), readers


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules its import statements name (anywhere in its source, lazy ones included):
    the most specific module of each name (`from recall.methods import Method`: recall.methods, the package)."""
    from recall.provenance import _package_of, module_file

    graph = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = _package_of(name, path).split(".")
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                while imported and module_file(imported) is None:
                    imported = imported.rpartition(".")[0]
                if imported and imported != name:
                    targets.add(imported)
        graph[name] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_module_of_the_package_imports_itself_back():
    """No import circle in recall/, lazy imports (inside functions) included: a method asks the run to train its
    extra model (`Method.extra_model`: data, not a call into the loop), the pool's hashing lives in the leakage guard, ReplayError in errors.py."""
    graph = import_graph()
    assert len(graph) > 60 and "recall.replay.leakage" in graph["recall.replay.pool"]
    assert import_circles(graph) == []
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds


def test_editing_the_pool_leaves_the_pretraining_up_to_date():
    """The pretraining shares only the classifier (replay/classifier.py: the module, its preprocessing, its file)
    with the class mapping: neither the mapping nor the pool code is in its closure or in the `pretrain` stage's
    generated deps of any dvc.yaml, so editing them leaves that stage up to date."""
    closure = {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure("recall.stages.pretrain")}
    pool_code = {"replay/classmap.py", "replay/pool.py", "replay/leakage.py", "replay/sources.py"}
    assert "replay/classifier.py" in closure and not pool_code & closure
    checked = 0
    for dvc_file, top in ((ROOT / name, top) for name, top in DVC_FILES.items()):
        for name, stage in _stages(dvc_file) if dvc_file.is_file() else ():
            if "python -m recall.stages.pretrain " in " ".join(str(stage["cmd"]).split()) + " ":
                deps = [str(d).removeprefix(top).rstrip("/") for d in stage.get("deps", [])]
                covered = {p for p in pool_code for d in deps
                           if f"recall/{p}" == d or f"recall/{p}".startswith(d + "/")}
                assert covered == set(), f"{dvc_file.name}: stage {name} depends on {sorted(covered)}"
                checked += 1
    assert checked >= 2  # dvc.yaml's and study/dvc.yaml's


def test_adding_a_pool_source_touches_its_module_its_registry_line_its_config_and_its_test():
    """replay=diffusion, added as a contributor would add a source: recall/replay/diffusion.py, one line of
    recall/replay/sources.py, conf/replay/diffusion.yaml and tests/test_diffusion.py. Nothing else of the code names
    it, but the generated dependency lists of the DVC files, the simulation that imitates it (recall/sim/) and this
    file's closure checks."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "recall", "conf", "tests",
                            "benchmarks"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = ("recall.replay.diffusion", "replay/diffusion.py", "DiffusionSource")
    naming = {f for f in files if (ROOT / f).is_file() and f.endswith(".py") and not f.startswith("recall/sim/")
              and f != "tests/test_architecture.py" and any(n in (ROOT / f).read_text(errors="ignore") for n in names)}
    assert naming == {"recall/replay/diffusion.py", "recall/replay/sources.py", "tests/test_diffusion.py"}
    registry = (ROOT / "recall" / "replay" / "sources.py").read_text().splitlines()
    assert sum("recall.replay.diffusion" in line for line in registry) == 1
    assert "name: diffusion" in (ROOT / "conf" / "replay" / "diffusion.yaml").read_text()


def test_a_real_dataset_is_its_module_its_registry_line_and_its_config():
    """A real dataset is recall/data/datasets/<name>.py (its class names, its archive and how to prepare it), one line
    of the registry (recall/data/datasets/__init__.py) and conf/dataset/<name>.yaml: no other module of the product
    names it (no string "<name>", no import of its module: nothing branches on a dataset's name). The toy world's entry
    points at VOC's module (VOC's names): the product never imports the simulation that makes it. A dataset in VOC
    layout needs its config file only (tests/test_datasets.py)."""
    from recall.data.datasets import DATASETS
    from recall.provenance import module_file

    package = PACKAGE_DIR / "data" / "datasets"
    registry = (package / "__init__.py").read_text().splitlines()
    modules = {}
    for name, reference in DATASETS.items():
        path = module_file(reference.partition(":")[0])
        assert path is not None and path.parent == package, reference
        assert sum(f'"{name}": "{reference}"' in line for line in registry) == 1
        assert f"name: {name}\n" in (ROOT / "conf" / "dataset" / f"{name}.yaml").read_text()
        modules[name] = path.stem
    assert modules == {"voc": "voc", "ade20k": "ade20k", "toy": "voc"}
    for name in (name for name, module in modules.items() if module == name):
        own = {package / f"{name}.py", package / "__init__.py"}
        naming = set()
        for path in PACKAGE_DIR.rglob("*.py"):
            if path in own or SIM in path.parents:
                continue
            strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
            if name in strings or any(m.startswith(f"recall.data.datasets.{name}") for m in imports_of(path)):
                naming.add(path.relative_to(ROOT).as_posix())
        assert naming == set(), f"{name} is named outside its module and its registry line"


# ---------------------------------------------------------------------------------------------- the core's shape
RUNNER = ("experiment.py", "step_plan.py", "train.py", "plan.py", "tune.py", "run_figures.py")  # what calls a method's hooks
METHOD_ATTRIBUTES = ("name", "data", "needs_previous_model", "classifier_init")  # what the runner reads, not calls


def _is_method(node: ast.AST) -> bool:
    """`method`, `self.method`, `run.method`, `self.base.method`: the run's method."""
    return (isinstance(node, ast.Name) and node.id == "method") or \
        (isinstance(node, ast.Attribute) and node.attr == "method")


def test_the_runner_calls_at_most_ten_hooks_of_a_method():
    """The interface between the core and a method is `recall.methods.base.HOOKS`: describe, inputs, stream, prepare,
    before_step, extra_model, rewrite_targets, loss. The runner, the loop, the dry-run, the tuner and the
    figures call nothing else of a method (its stream's interface is `Stream`'s), and `Method` has no other public
    method than these and `options` (what `describe` reports)."""
    from recall.methods.base import HOOKS, Method
    from recall.replay.stream import Stream

    assert len(HOOKS) <= 10
    public = {name for name, value in vars(Method).items() if callable(value) and not name.startswith("_")}
    assert public == {*HOOKS, "options"}
    called, read, on_stream = set(), set(), set()
    for module in RUNNER:
        tree = ast.parse((PACKAGE_DIR / module).read_text())
        streams = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                   and node.value.func.attr == "stream" and _is_method(node.value.func.value)
                   for t in node.targets if isinstance(t, ast.Name)}
        calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_method(node.value):
                (called if id(node) in calls else read).add(node.attr)
            if isinstance(node, ast.Attribute) and id(node) in calls and (
                    (isinstance(node.value, ast.Name) and node.value.id in streams) or
                    (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) and
                     node.value.func.attr == "stream")):
                on_stream.add(node.attr)
    assert called == set(HOOKS), called
    assert read <= set(METHOD_ATTRIBUTES), read
    assert on_stream == {"split", "batches", "statistics", "figures", "remember", "facts", "plan_inputs"}, on_stream
    assert all(callable(getattr(Stream, name)) for name in on_stream)


def test_a_replay_method_holds_its_policy_and_its_stream_the_data_flow():
    """recall/replay/ (the pool, its checks, label evaluation, the loaders, the replay streams) imports no method;
    a replay method's module imports no I/O: no file, no hashing, no loader, no checkpoint; it says which classes,
    which labeller, which ratio, and hands them to its stream (recall/replay/stream.py)."""
    graph = import_graph()
    replay = {m: sorted(t for t in targets if t.startswith("recall.methods"))
              for m, targets in graph.items() if m.startswith("recall.replay")}
    assert {m: t for m, t in replay.items() if t} == {}
    assert graph["recall.methods.replay"] == {"recall.errors", "recall.methods.base", "recall.replay.stream"}
    assert "recall.replay.stream" in graph["recall.methods.base"]  # a method returns its stream
    source = (PACKAGE_DIR / "methods" / "replay.py").read_text() + (PACKAGE_DIR / "methods" / "recall.py").read_text()
    for io in ("open(", "read_text", "write_text", "write_json", "write_bytes", "DataLoader", "load_checkpoint", "sha256",
               "content_id", "mkdir", "torch.save"):
        assert io not in source, io
