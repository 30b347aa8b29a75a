"""Configuration: Hydra composition of conf/, typed views of its sections, and the committed params.yaml.

`compose(["protocol=15-1x5", "method=ft"])` composes conf/ like `recall run` does. Any task string of the
protocol grammar works, not only the files in conf/protocol/. With `params_file`, the values of params.yaml
(the file DVC tracks and `dvc exp run -S` edits) replace the composed defaults for every section whose
group was not chosen on the command line, so a DVC stage runs exactly what params.yaml says. An
`experiment=` profile (conf/experiment/, e.g. paper_voc) counts as choosing every section it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import TypeVar

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("dataset", "protocol", "setting", "method", "model", "train", "replay", "eval", "tune", "experiment")

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
        params = OmegaConf.load(params_file)
        chosen = set(groups) | (_changed_by_experiment(cfg, overrides) if "experiment" in groups else set())
        for key in params:
            if key not in chosen:
                cfg[key] = params[key]
        if rest:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    return cfg


def _changed_by_experiment(cfg: DictConfig, overrides: list[str]) -> set[str]:
    """The sections an `experiment=` profile changes (params.yaml must not replace them)."""
    without = compose([o for o in overrides if o.partition("=")[0] != "experiment"])
    return {key for key in cfg if cfg.get(key) != without.get(key)}


def default_params() -> dict:
    """What params.yaml must contain: the composed default configuration."""
    return OmegaConf.to_container(compose(), resolve=True)


def section(cfg: DictConfig, cls: type[T]) -> T:
    """A typed view of a config section: unknown keys and wrong types fail here, not deep in training."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg.keys()) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {sorted(unknown)}; valid: {sorted(known)}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))


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
