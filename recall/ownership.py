"""What is ours: the marker on every directory recall makes, and the check that keeps a command out of any other.

A run directory, a replay pool and a toy world carry a marker, `owner.json` (a run directory keeps it in `steps/`,
the checkpoints DVC persists and restores, so a restored run directory holds it too)::

    {"kind": "pool", "made_by": "recall pool", "params": {"source": "toy_web", "source_params": {...}},
     "format_version": 1}

A command writes into a directory only when the directory

* does not exist, or holds no file (empty sub-directories and its own lock file, `.lock`, do not count);
* holds a marker of the same kind whose params the command accepts (each kind says which: a pool only its own source
  with the same source parameters; a run directory any run, whose configuration the run's resume check compares);
* or was made by recall before markers existed: it holds the file its kind always wrote (a run: steps/config.yaml;
  a pool: pool.json; a toy world: toyworld.json), and gets its marker.

Anything else is refused with one line naming the directory and what it holds (a UserError: exit 2), and so are `/`,
the home directory, a project root (this checkout, DVC's root, the git or DVC root of the working directory) and a
path that is a file, whatever they hold.

The marker says whose a directory is: it is written when a command claims the directory, before its work. Whether
the work is complete is said by what each kind writes last (a step's model.pt, a pool's pool.json) or, for a
directory built beside its place (`staged`), by the rename that puts it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recall.atomic import write_json
from recall.errors import UserError
from recall.locks import LOCK_NAME, DirectoryLock

FORMAT_VERSION = 1
MARKER = "owner.json"
RUN_PLACE = "steps"  # where a run directory keeps its marker (the other kinds: at their top)
SHOWN = 3  # files named in a refusal


@dataclass(frozen=True)
class Marker:
    """What made a directory: its kind ("run", "pool", "toyworld"), the command, and the parameters that define it."""

    kind: str
    made_by: str
    params: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"kind": self.kind, "made_by": self.made_by, "params": self.params, "format_version": FORMAT_VERSION}


# ------------------------------------------------------------------------------------------------ reading
def project_roots() -> set[Path]:
    """Directories no command ever writes into: this checkout, DVC's root (DVC_ROOT, set for a stage) and the git or
    DVC root above the working directory."""
    roots = {Path(__file__).resolve().parents[1]}
    if os.environ.get("DVC_ROOT"):
        roots.add(Path(os.environ["DVC_ROOT"]).resolve())
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".git").exists() or (folder / ".dvc").is_dir():
            roots.add(folder)
            break
    return roots


def forbidden(path: Path) -> str | None:
    """Why `path` can never be a directory a command writes into (whatever it holds), or None."""
    resolved = Path(path).resolve()
    if resolved == Path(resolved.anchor):
        return "the root directory"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    if resolved == home:
        return "your home directory"
    if resolved in project_roots():
        return "a project root"
    if Path(path).exists() and not Path(path).is_dir():
        return "a file"
    return None


def files_in(directory: Path, limit: int = SHOWN + 1) -> list[str]:
    """Up to `limit` files under `directory` (relative paths), its own lock file left out: [] for an empty one."""
    found: list[str] = []
    for folder, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            relative = Path(folder, name).relative_to(directory).as_posix()
            if relative != LOCK_NAME:
                found.append(relative)
                if len(found) >= limit:
                    return found
    return found


def read_marker(directory: Path) -> dict | None:
    """The marker in `directory` (None: absent, unreadable, or not one of ours)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and isinstance(marker.get("kind"), str) and str(marker.get("made_by", "")).startswith(
            "recall"):
        return marker
    return None


def find_marker(directory: Path, where: str = "") -> dict | None:
    """The marker of whatever kind `directory` is (it may be in `where`, at the top, or in a run's steps/)."""
    return read_marker(directory / where) or read_marker(directory) or read_marker(directory / RUN_PLACE)


def describe_marker(marker: dict) -> str:
    """E.g. `a pool made by `recall pool` (source=toy_web)`."""
    params = marker.get("params") or {}
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if isinstance(v, (str, int, float)) and not isinstance(
        v, bool))
    return f"a {marker['kind']} made by `{marker['made_by']}`" + (f" ({shown})" if shown else "")


def describe_files(files: list[str]) -> str:
    more = ", ..." if len(files) > SHOWN else ""
    return f"files ({', '.join(files[:SHOWN])}{more})"


# ------------------------------------------------------------------------------------------------ claiming
def claim(directory: Path, marker: Marker, option: str, *, where: str = "",
          accepts: Callable[[dict], str | None] = lambda found: None,
          legacy: Callable[[Path], dict | None] = lambda directory: None) -> dict | None:
    """Check, without writing anything, that a command may write `marker.kind` into `directory` (named `option` in
    messages, e.g. "run_dir"); the marker it holds is in `directory / where`. Returns the marker found (a legacy
    directory's, made from what it holds) or None for a new or empty directory; refuses anything else.
    `accepts(found)` says why a marker of the same kind does not fit (a message), or None when it does."""
    directory = Path(directory)
    reason = forbidden(directory)
    if reason is not None:
        raise UserError(f"{option}={directory} is {reason}: a {marker.kind} needs a directory of its own; "
                        f"pass {option}= a new or empty directory")
    if not directory.exists():
        return None
    found = find_marker(directory, where) or legacy(directory)
    if found is not None:
        if found.get("kind") != marker.kind:
            raise UserError(f"{option}={directory} holds {describe_marker(found)}, not a {marker.kind}; pass "
                            f"{option}= a new or empty directory")
        problem = accepts(found)
        if problem:
            raise UserError(f"{option}={directory} holds {describe_marker(found)}: {problem}")
        return found
    files = files_in(directory)
    if files:
        raise UserError(f"{option}={directory} holds {describe_files(files)} and no recall marker "
                        f"({Path(where, MARKER).as_posix()}): recall writes only into a new or empty directory or one "
                        f"it made; pass {option}= another directory")
    return None


def write_marker(directory: Path, marker: Marker) -> None:
    """Write `directory`'s marker (atomically; an identical one is left as it is)."""
    if read_marker(directory) != marker.as_json():
        write_json(Path(directory) / MARKER, marker.as_json())


def remove_ours(directory: Path, kind: str, legacy: Callable[[Path], dict | None] = lambda directory: None) -> None:
    """Delete a directory of ours that is no longer wanted (its marker, or what it holds from before markers
    (`legacy`), says `kind`; or it holds no file); refuse any other."""
    found = find_marker(directory) or legacy(directory)
    if found is None and files_in(directory):
        raise UserError(f"{directory} holds {describe_files(files_in(directory))}: recall does not delete it; move it "
                        "away")
    if found is not None and found.get("kind") != kind:
        raise UserError(f"{directory} holds {describe_marker(found)}, not a {kind}: recall does not delete it")
    shutil.rmtree(directory)


def partial_of(target: Path) -> Path:
    """Where a directory is built before it is put in place: `<parent>/.<name>.partial`."""
    return target.parent / f".{target.name}.partial"


@contextlib.contextmanager
def staged(target: Path, marker: Marker, option: str, *, fresh: bool, what: str,
           accepts: Callable[[dict], str | None] = lambda found: None) -> Iterator[Path]:
    """Build `target` beside it and put it in place when complete: yields `<parent>/.<name>.partial`, locked and
    marked. A partial of ours left by a killed build is started afresh (`fresh`) or handed over as it is, to be
    resumed. When the body returns, the partial is renamed onto `target` (an old `target` of ours is replaced); when
    it raises, the partial stays where it is and `target` is untouched. A half-built directory is never at `target`.
    The caller has checked `target` (`claim`)."""
    partial = partial_of(target)
    claim(partial, marker, option, accepts=accepts)
    with DirectoryLock(partial, what=what, option=option):
        for entry in partial.iterdir() if fresh else ():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        write_marker(partial, marker)
        yield partial
        old = target.parent / f".{target.name}.old"
        if old.exists():  # left by a replacement that was killed
            remove_ours(old, marker.kind)
        if target.exists() and files_in(target):  # ours (the caller's claim): marked, then moved aside
            write_marker(target, marker)
            os.replace(target, old)
        elif target.exists():
            shutil.rmtree(target)  # empty directories only
        os.replace(partial, target)
        (target / LOCK_NAME).unlink(missing_ok=True)  # complete: nobody builds in it any more (then released)
    if old.exists():
        shutil.rmtree(old)
