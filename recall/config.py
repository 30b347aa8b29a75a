"""Configuration: Hydra composition of conf/, typed views of its sections, and the committed params.yaml.

`compose(["protocol=15-1x5", "method=ft"])` composes conf/ like `recall run` does. Any task string of the
protocol grammar works, not only the files in conf/protocol/. With `params_file`, the values of params.yaml
(the file DVC tracks and `dvc exp run -S` edits) replace the composed defaults for every section whose
group was not chosen on the command line, so a DVC stage runs exactly what params.yaml says. An
`experiment=` profile (conf/experiment/, e.g. paper_voc) counts as choosing every section it changes.

Every composed value is checked before any command uses it (`check_values`): a number is finite, a value whose
default is a number, an integer or a boolean has that type, `seed` and `last_step` are not negative; a mistake is
one line naming the key and the value (a UserError).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from pathlib import Path
from typing import TypeVar

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("dataset", "protocol", "setting", "method", "model", "train", "replay", "eval", "tune", "launcher",
          "experiment")

T = TypeVar("T")


def _group_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    groups, rest = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in GROUPS:
            groups[key] = value
        else:
            rest.append(item)
    return groups, rest


def _protocol_override(value: str) -> str:
    """A task string with no file in conf/protocol/ becomes `protocol.name=...` (checked when the run starts)."""
    if (CONF_DIR / "protocol" / f"{value}.yaml").is_file():
        return f"protocol={value}"
    return f"protocol.name={value}"


def compose(overrides: list[str] | tuple[str, ...] = (), params_file: str | Path | None = None) -> DictConfig:
    overrides = list(overrides)
    groups, rest = _group_overrides(overrides)
    hydra_overrides = [f"{k}={v}" for k, v in groups.items() if k != "protocol"]
    if "protocol" in groups:
        hydra_overrides.append(_protocol_override(groups["protocol"]))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=hydra_overrides + rest)
    if params_file is not None:
        params = load_params(params_file)
        chosen = set(groups) | (_changed_by_experiment(cfg, overrides) if "experiment" in groups else set())
        for key in params:
            if key not in chosen:
                cfg[key] = params[key]
        if rest:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    check_values(cfg, _defaults(tuple(hydra_overrides)))
    return cfg


def load_params(path: str | Path) -> DictConfig:
    """A params.yaml (`--params`): a missing file, a directory, YAML that does not parse (with its line) or a file that
    is not a mapping of sections is a UserError naming the file."""
    import yaml

    from recall.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"--params {path}: no such file; give the params.yaml to read (e.g. --params params.yaml)")
    if path.is_dir():
        raise UserError(f"--params {path}: is a directory; give the params.yaml to read (e.g. --params params.yaml)")
    try:
        params = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"--params {path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--params {path}: cannot read it ({error})") from None
    if not isinstance(params, DictConfig):
        raise UserError(f"--params {path}: expected a mapping of sections (dataset:, train:, ... as params.yaml), got "
                        f"a {type(params).__name__}")
    return params


@functools.lru_cache(maxsize=32)
def _defaults(hydra_overrides: tuple[str, ...]) -> dict:
    """conf/ composed with only the group choices: the default of every key, whose type a value must have."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose(config_name="config", overrides=list(hydra_overrides)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def _default_of(defaults: dict, key: str):
    node = defaults
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def check_values(cfg: DictConfig, defaults: dict) -> None:
    """Refuse a value no command can use, naming the key and the value: a number that is not finite (nan, inf); a
    value whose default (`defaults`) is a number, an integer or a boolean and that is not one (null stays allowed:
    some keys take it); a negative `seed` or `last_step`."""
    from recall.errors import UserError

    values = OmegaConf.to_container(cfg, resolve=False)
    for key, value in _leaves(values):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value}: must be a finite number")
        default = _default_of(defaults, key)
        if value is None or default is None or isinstance(value, str) and value.startswith("${"):
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"{key}={value!r}: expected true or false")
        if isinstance(default, int) and not isinstance(default, bool) and not (
                isinstance(value, int) and not isinstance(value, bool)):
            raise UserError(f"{key}={value!r}: expected an integer (the default is {default})")
        if isinstance(default, float) and not _is_number(value):
            raise UserError(f"{key}={value!r}: expected a number (the default is {default})")
    for key in ("seed", "last_step"):
        value = values.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UserError(f"{key}={value!r}: must be an integer >= 0" + (" (or null: every step)"
                                                                          if key == "last_step" else ""))


def _changed_by_experiment(cfg: DictConfig, overrides: list[str]) -> set[str]:
    """The sections an `experiment=` profile changes (params.yaml must not replace them)."""
    without = compose([o for o in overrides if o.partition("=")[0] != "experiment"])
    return {key for key in cfg if cfg.get(key) != without.get(key)}


def default_params() -> dict:
    """What params.yaml must contain: the composed default configuration."""
    return OmegaConf.to_container(compose(), resolve=True)


def section(cfg: DictConfig, cls: type[T]) -> T:
    """A typed view of a config section: unknown keys and wrong types fail here, not deep in training."""
    from omegaconf.errors import OmegaConfBaseException

    from recall.errors import UserError

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg.keys()) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {sorted(unknown)}; valid: {sorted(known)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))
    except OmegaConfBaseException as error:  # a value of the wrong type: name the key, not "unknown key"
        prefix = cfg._get_full_key(None) if cfg._get_parent() is not None else ""
        key = ".".join(k for k in (prefix, str(getattr(error, "full_key", "") or "")) if k)
        message = str(getattr(error, "msg", None) or error).splitlines()[0]
        raise UserError(f"{key}={getattr(error, 'value', None)!r}: {message}") from None


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files of conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _unknown_key(key: str) -> str:
    """`train.epochz`: the message naming the key, the closest valid keys and where they are."""
    parent, _, leaf = key.rpartition(".")
    try:
        node = OmegaConf.select(compose(), parent) if parent else compose()
    except Exception:  # noqa: BLE001 - the message must not fail: without the valid keys, it still names the key
        node = None
    valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    where = f"valid keys of {parent}" if parent else "valid top-level keys"
    listing = f"; {where}: {', '.join(valid)}" if valid else ""
    return f"unknown config key {key!r}{_closest(leaf, valid)}{listing}"


def config_error_message(error: Exception) -> str:
    """One line for a configuration Hydra or OmegaConf refused: an unknown key or group option (with the closest
    valid names), or an override that does not parse."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(error)
    if isinstance(error, OverrideParseException):
        return (f"cannot parse an override: {text.splitlines()[0]} (quote values with spaces or '=', and list "
                "items: 'key=[\"a=1\"]')")
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if isinstance(error, MissingConfigException) and missing:
        group, option = missing.groups()
        options = group_options(group)
        return f"unknown {group} {option!r}{_closest(option, options)}; available: {', '.join(options)} (conf/{group}/)"
    key = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    if key:
        return _unknown_key(key.group(1))
    return text.splitlines()[0] if text else type(error).__name__


URL_PASSWORD = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")


def strip_password(text: str) -> str:
    """Any URL's password as *** (postgresql://user:***@host/db): what is logged, printed or written to a file."""
    return URL_PASSWORD.sub(r"\1:***@", text)


def without_passwords(value):
    """A config container (dicts, lists, strings) with every URL's password as ***: for config.yaml and MLflow."""
    if isinstance(value, dict):
        return {key: without_passwords(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_passwords(item) for item in value]
    return strip_password(value) if isinstance(value, str) else value


def write_params(path: str | Path = "params.yaml") -> None:
    """Regenerate params.yaml from conf/ (what `dvc exp run` does through DVC's Hydra integration)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(default_params(), sort_keys=False))


if __name__ == "__main__":
    write_params()
