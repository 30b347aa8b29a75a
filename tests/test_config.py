"""params.yaml stays what conf/ composes; every config of every group composes and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from recall.config import (
    CONF_DIR,
    GROUPS,
    compose,
    default_params,
    section,
    strip_password,
    without_passwords,
)
from recall.data.protocol import steps
from recall.methods import build_method
from recall.model import ModelConfig
from recall.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_equals_composed_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == default_params(), "params.yaml is stale: regenerate it with `python -m recall.config`"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ADE20K's protocols need its 150 classes, and ADE20K needs one of them (the default 15-5 adds up to 20)
ADE20K_PROTOCOLS = ("100-50", "100-10", "50-50")
COMPANIONS = {("dataset", "ade20k"): ["protocol=100-50"],
              **{("protocol", p): ["dataset=ade20k"] for p in ADE20K_PROTOCOLS}}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}", *COMPANIONS.get((group, option), [])])
    steps(str(cfg.protocol.name), int(cfg.dataset.num_classes))
    section(cfg.model, ModelConfig)
    section(cfg.train, TrainConfig)
    opts = OmegaConf.to_container(cfg.method)
    build_method(opts.pop("name"), **opts)


def test_any_task_string_is_a_protocol():
    assert compose(["protocol=5-5x3"]).protocol.name == "5-5x3"
    assert compose(["protocol=15-1x5"]).protocol.name == "15-1x5"


def test_params_file_values_win_over_defaults(tmp_path):
    params = default_params()
    params["train"]["epochs"] = 3
    params["method"]["freeze_encoder"] = True
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = compose(["train.lr=0.5"], params_file=path)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5 and cfg.method.freeze_encoder is True
    # a group chosen on the command line comes from conf/, not from params.yaml's default section
    assert compose(["method=joint"], params_file=path).method.freeze_encoder is False


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="bogus"):
        section(OmegaConf.create({"bogus": 1}), TrainConfig)


def test_pipeline_lists_match_dvc_yaml():
    """The report stage's deps are spelled out in dvc.yaml; they must follow params.yaml's run list."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline = default_params()["pipeline"]
    runs = {**pipeline["runs"], **pipeline["replay_runs"]}
    deps = {d for d in dvc["stages"]["report"]["deps"] if d.startswith("runs/")}
    assert deps == {f"runs/{k}/metrics.json" for k in runs} | {"runs/joint/metrics.json"}
    for run in runs.values():
        assert run["step0"] in pipeline["step0"]
    for run in pipeline["replay_runs"].values():
        assert run["replay"] in dvc["stages"]["replay_pool"]["foreach"], f"no stage builds pools/{run['replay']}"
        assert (ROOT / "conf" / "replay" / f"{run['replay']}.yaml").is_file()


def test_dvc_plots_draw_every_run():
    """The top-level plots give one line per run of the pipeline: they must follow params.yaml's run list."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline = default_params()["pipeline"]
    expected = {f"runs/{k}/curve.csv" for k in [*pipeline["runs"], *pipeline["replay_runs"]]}
    assert len(dvc["plots"]) == 2
    for plot in dvc["plots"]:
        (definition,) = plot.values()
        assert set(definition["y"]) == expected and definition["x"] == "step"


def test_passwords_of_urls_are_replaced_wherever_they_are():
    assert strip_password("postgresql+psycopg://recall:pw-7Qf%40%3A%2F%25x@db:5432/optuna") == \
        "postgresql+psycopg://recall:***@db:5432/optuna"
    assert strip_password("postgresql://recall@db/optuna") == "postgresql://recall@db/optuna", "no password"
    assert strip_password("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert strip_password("https://u:p@h/x, postgresql://:p2@h/y") == "https://u:***@h/x, postgresql://:***@h/y"
    cfg = {"tune": {"storage": "postgresql://u:secret@h/db"}, "list": ["http://u:secret@h"], "n": 3, "none": None}
    assert without_passwords(cfg) == {"tune": {"storage": "postgresql://u:***@h/db"}, "list": ["http://u:***@h"],
                                      "n": 3, "none": None}


def test_every_training_stage_of_the_demo_takes_the_demos_budget():
    """The demo trains shorter than the defaults (the study's): its pretraining and every run stage (step 0, the
    runs that start from it, joint) pass pipeline.budget, so a run's params name the step 0 it started from."""
    budget = default_params()["pipeline"]["budget"]
    assert budget["epochs"] < default_params()["train"]["epochs"]
    assert budget["epochs_incremental"] <= default_params()["train"]["epochs_incremental"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {name: stage.get("do", stage)["cmd"] for name, stage in stages.items()}
    runs = [name for name, cmd in commands.items() if cmd.startswith("python -m recall.stages.run ")]
    assert sorted(runs) == ["joint", "replay_run", "run", "step0"]
    for name in runs:
        assert commands[name].endswith(" train.epochs=${pipeline.budget.epochs}"
                                       " train.epochs_incremental=${pipeline.budget.epochs_incremental}"), name
    assert commands["pretrain"].endswith(" pretrain.epochs=${pipeline.budget.pretrain_epochs}")
