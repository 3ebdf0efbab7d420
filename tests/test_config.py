from dataclasses import dataclass, field
from typing import Literal

import pytest

from internlm2.config import ConfigError, from_dict, load_config, save_yaml, to_dict


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


@dataclass
class Stage:
    seq_len: int
    steps: int = 10
    name: str | None = None


@dataclass
class Cfg:
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=list)
    kernels: Literal["fused", "reference"] = "fused"
    tags: dict[str, int] = field(default_factory=dict)


def test_yaml_with_overrides_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1.0e-3}\nstages:\n  - {seq_len: 4096}\n  - {seq_len: 32768, steps: 5}\n")
    cfg = load_config(Cfg, path, ["optim.lr=2e-4", "stages.1.steps=7", "kernels=reference", "tags.a=3"])
    assert cfg.optim.lr == 2e-4 and cfg.stages[1].steps == 7 and cfg.stages[0].steps == 10
    assert cfg.kernels == "reference" and cfg.tags == {"a": 3} and cfg.optim.betas == (0.9, 0.95)
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(Cfg, tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["stages"][1] == {"seq_len": 32768, "steps": 7, "name": None}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lrr": 1.0}}, r"optim\.lrr: unknown key \(did you mean lr\?\)"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got str 'fast'"),
        ({"optim": {"lr": -1.0}}, r"optim\.lr: must be > 0"),
        ({"stages": [{"seq_len": 8}, {"steps": 3}]}, r"stages\.1\.seq_len: required key is missing"),
        ({"stages": [{"seq_len": 8.5}]}, r"stages\.0\.seq_len: expected an integer"),
        ({"kernels": "fast"}, r"kernels: 'fast' is not one of 'fused', 'reference'"),
        ({"stages": {"seq_len": 8}}, r"stages: expected a list"),
        ({"tags": {"a": True}}, r"tags\.a: expected an integer"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Cfg, data)


def test_bad_overrides_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(Cfg, None, ["optim.lr"])
    one_stage = tmp_path / "one.yaml"
    one_stage.write_text("stages: [{seq_len: 8}]\n")
    with pytest.raises(ConfigError, match=r"stages\.3: index '3' is not within the list of 1 entries"):
        load_config(Cfg, one_stage, ["stages.3.steps=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
