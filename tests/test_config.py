"""The config loader is strict: typos and wrong types fail at load, naming the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from feedrank.config import ConfigError, from_dict, load_yaml, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optim: Optim = field(default_factory=Optim)
    limit: int | None = None

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def test_defaults_and_nested_values():
    cfg = from_dict(Run, {"steps": 5, "optim": {"lr": "2e-4"}})
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.betas == [0.9, 0.999]
    assert to_dict(cfg)["optim"]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 3}, "unknown key(s) 'stepz'"),
        ({"optim": {"lrr": 1}}, "optim: unknown key(s) 'lrr'"),
        ({"steps": "ten"}, "steps: expected int, got str 'ten'"),
        ({"steps": 2.5}, "steps: expected int"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected float"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected float"),
        ({"precision": "fp8"}, "precision: expected one of ['fp32', 'bf16', 'fp16']"),
        ({"optim": 3}, "optim: expected a mapping"),
        ({"steps": 0}, "steps must be positive"),
        ({"steps": True}, "steps: expected int, got bool"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Run, data)
    assert message in str(err.value)


def test_optional_accepts_none_and_value():
    assert from_dict(Run, {"limit": None}).limit is None
    assert from_dict(Run, {"limit": 4}).limit == 4


def test_load_yaml_sections_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 7\n  optim:\n    lr: 0.1\n")
    assert load_yaml(Run, path, section="run").steps == 7
    with pytest.raises(ConfigError, match="missing section 'other'"):
        load_yaml(Run, path, section="other")
    path.write_text("run:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: run: unknown key\(s\) 'stepz'"):
        load_yaml(Run, path, section="run")
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(Run, tmp_path / "missing.yaml")
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Run, path)


def test_train_config_setting_epochs_unsets_the_steps_default(tmp_path):
    from feedrank.train.trainer import DEFAULT_STEPS, TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n")
    cfg = load_yaml(TrainConfig, path, section="train")
    assert (cfg.steps, cfg.epochs) == (None, 3)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg  # a saved config loads back the same
    assert (from_dict(TrainConfig, {}).steps, from_dict(TrainConfig, {}).epochs) == (DEFAULT_STEPS, None)
    assert (from_dict(TrainConfig, {"steps": 5}).steps, from_dict(TrainConfig, {"steps": 5}).epochs) == (5, None)
    with pytest.raises(ConfigError, match="exactly one of 'steps' and 'epochs'"):
        from_dict(TrainConfig, {"steps": 5, "epochs": 1})
