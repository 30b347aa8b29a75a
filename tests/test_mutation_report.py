"""docs/mutation_survivors.yaml explains the survivors of `make mutants` by mutmut's names
(`module.x_function__mutmut_N`, `module.xǁClassǁmethod__mutmut_N`): each name it holds must be a mutant of a
function the code still has, in the scope benchmarks/mutation_report.py reads, or its entry can never match a
survivor again and explains nothing."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("mutation_report", ROOT / "benchmarks" / "mutation_report.py")
mutation_report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(mutation_report)


def explained() -> list[str]:
    """Every mutant name docs/mutation_survivors.yaml explains."""
    return [name for group in yaml.safe_load(mutation_report.EXPLANATIONS.read_text()) for name in group["mutants"]]


def _module(name: str):
    """The module `name`, or None when it (or a package above it) does not exist; a missing dependency raises."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if name == error.name or name.startswith(f"{error.name}."):
            return None
        raise


def exists(mutant: str) -> bool:
    """Whether mutmut's `mutant` belongs to a function the current code defines: the module's own function
    (`x_` + its name) or a method of the module's own class (`xǁ` + class + `ǁ` + method), the mutant's number cut."""
    module_name, _, mangled = mutant.rsplit("__mutmut_", 1)[0].rpartition(".")
    module = _module(module_name)
    if module is None:
        return False
    if mangled.startswith("xǁ"):
        class_name, _, method = mangled.removeprefix("xǁ").partition("ǁ")
        cls = vars(module).get(class_name)
        return inspect.isclass(cls) and cls.__module__ == module_name and method in vars(cls)
    function = vars(module).get(mangled.removeprefix("x_")) if mangled.startswith("x_") else None
    return inspect.isfunction(function) and function.__module__ == module_name


def test_every_explained_mutant_is_of_a_function_the_code_has():
    stale = [name for name in explained() if not exists(name)]
    assert not stale, (f"{mutation_report.EXPLANATIONS.relative_to(ROOT)} explains mutants of functions that are gone "
                       f"(remove their entries; `make mutants` reports a new survivor as UNEXPLAINED): {stale}")


def test_every_explained_mutant_is_in_the_reports_scope():
    outside = [name for name in explained() if not mutation_report.in_scope(name)]
    assert not outside, f"outside benchmarks/mutation_report.py's SCOPE, never reported: {outside}"


def test_the_check_tells_a_gone_function_from_a_present_one():
    assert exists("recall.metrics.xǁConfusionMatrixǁupdate__mutmut_1")
    assert exists("recall.metrics.x_mean_iou__mutmut_12")
    assert exists("recall.metrics.x__hmean_old_new__mutmut_1")  # a private function: x_ + _hmean_old_new
    assert not exists("recall.metrics.x_no_such_function__mutmut_1")
    assert not exists("recall.metrics.xǁConfusionMatrixǁno_such_method__mutmut_1")
    assert not exists("recall.metrics.xǁNoSuchClassǁupdate__mutmut_1")
    assert not exists("recall.metrics.x_ConfusionMatrix__mutmut_1")  # a class, not a function
    assert not exists("recall.report.x_write_json__mutmut_1")  # imported there, defined (and mutated) elsewhere
    assert not exists("recall.no_such_module.x_spread__mutmut_1")
