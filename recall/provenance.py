"""Where a run's inputs come from: the code it executes (the import closure of its entry module), and the data it
reads (a content id; the DVC hash of a path as `dvc.lock` records it, shown beside).

The import closure is the one rule for "the code of a stage": `python -m recall.pipeline` writes it into
dvc.yaml's deps, and a run directory records its hash (`steps/inputs.json`), so DVC and the run's own resume check
agree on when code changed.
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import cache
from pathlib import Path

import yaml

LOCK_FILE = "dvc.lock"
PACKAGE = "recall"
PACKAGE_DIR = Path(__file__).resolve().parent
# a lazy reference to a module of the package in a string (registries: "recall.sim.toy_gan:ToyGenerator")
MODULE_REFERENCE = re.compile(rf"^{PACKAGE}(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")
# the modules that call what config files name ("replay.truth.labels: recall.sim.truth:gan_label_quality"): those
# names are part of their closure (not of every module that composes a config: the pretraining never runs a replay
# scorer). A test holds every other `resolve(...)` of the package to a registry of its own module.
CONFIG_READERS = {f"{PACKAGE}.replay.stream": PACKAGE_DIR.parent / "conf",
                  f"{PACKAGE}.stages.classmap": PACKAGE_DIR.parent / "conf",
                  f"{PACKAGE}.stages.select": PACKAGE_DIR.parent / "conf"}


def module_file(name: str) -> Path | None:
    """The source file of module `name` of the package (a package's __init__.py), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(name: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in its source (at the top, inside functions,
    under TYPE_CHECKING) or names in a "module:attribute" string, with the packages whose __init__ they run."""
    path = module_file(name)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_REFERENCE.match(node.value):
            found.add(node.value.partition(":")[0])
    if name in CONFIG_READERS:
        found.update(configured_modules(CONFIG_READERS[name]))
    modules = set()
    for module in found:
        parts = module.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in modules if module_file(m) is not None}


def configured_modules(directory: Path) -> set[str]:
    """The package's modules that the YAML files under `directory` name in "module:attribute" strings."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and MODULE_REFERENCE.match(node.strip()):
            found.add(node.strip().partition(":")[0])

    for path in sorted(directory.rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return found


@cache
def import_closure(entry: str) -> tuple[Path, ...]:
    """Every source file of the package that running module `entry` may execute, sorted."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(name) - seen)
        parts = name.split(".")  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return tuple(sorted(module_file(m) for m in seen))


def code_id(entry: str) -> str:
    """A hash of the code that running module `entry` may execute (its import closure's paths and bytes)."""
    digest = hashlib.sha256()
    for path in import_closure(entry):
        digest.update(path.relative_to(PACKAGE_DIR.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def dvc_hash(path: str | Path, lock_file: str | Path = LOCK_FILE) -> str:
    """The md5 DVC recorded for ``path`` as a stage output (a directory's ends in ``.dir``).

    Returns ``"untracked"`` when no stage of ``lock_file`` outputs ``path`` (a run outside `dvc repro`
    on data DVC does not know) and ``"no dvc.lock"`` when the file is absent. When `dvc repro` runs a
    stage, the stages it depends on are already locked, so the hash is the one of the data it reads.
    """
    lock = Path(lock_file)
    if not lock.is_file():
        return "no dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return "unreadable dvc.lock"
    wanted = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out.get("path", "")).as_posix().rstrip("/") == wanted and out.get("md5"):
                return str(out["md5"])
    return "untracked"


POOL_MANIFEST = "manifest.jsonl"  # a replay pool's: one record per image, with the image's sha256
MAX_HASHED_BYTES = 1 << 30  # a larger directory (real VOC, ADE20K) is identified by its listing


def content_id(path: str | Path) -> str:
    """An identity of the data at ``path`` now, computed from what is there (never from a record of what was there,
    such as dvc.lock): a replay pool by its manifest (``manifest:<sha256>``; each record holds its image's sha256);
    a file or directory up to ``MAX_HASHED_BYTES`` by its files' names and bytes (``sha256:...``); a larger one by
    their names, sizes and modification times (``listing:...``)."""
    root = Path(path)
    if not root.exists():
        return "missing"
    if (root / POOL_MANIFEST).is_file():
        return "manifest:" + hashlib.sha256((root / POOL_MANIFEST).read_bytes()).hexdigest()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    by_bytes = sum(p.stat().st_size for p in files) <= MAX_HASHED_BYTES
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(root).as_posix() if file != root else file.name
        if by_bytes:
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
        else:
            stat = file.stat()
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return ("sha256:" if by_bytes else "listing:") + digest.hexdigest()
