"""Every shipped training YAML parses; bad values fail before any work with the key, expected and got."""

from pathlib import Path

import pytest

from bagel_ft.config import ConfigError
from training.config import Config, describe, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "psir_bagel7b_8xh100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data.sources


def test_paper_recipe_values():
    cfg = load_config(Path(CONFIGS[0]).parent / "psir_bagel7b_8xh100.yaml")
    assert cfg.train.steps == 10000 and cfg.optim.lr == 2e-5 and cfg.optim.schedule == "cosine"
    assert cfg.train.sharding == "fsdp" and cfg.train.dtype == "bf16" and cfg.train.activation_checkpointing
    assert 32000 <= cfg.data.expected_num_tokens <= cfg.data.max_num_tokens


def test_overrides_and_types():
    cfg = load_config(
        CONFIGS[-1], ["optim.lr=3e-3", "train.steps=7", "freeze.vit=true", "data.loss_roles={critique: {plan: false}}"]
    )
    assert cfg.optim.lr == 3e-3 and cfg.train.steps == 7 and cfg.freeze.vit
    assert cfg.data.loss_roles == {"critique": {"plan": False}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
        ("train.sharding=ddp", "train.sharding: expected one of"),
        ("optim.lr=-1", "optim.lr: expected > 0"),
        ("optim.nope=1", "optim.nope: unknown key; expected one of ['beta1'"),
        ("train.lr=1e-3", "train.lr: unknown key; did you mean optim.lr?"),
        ("optim.lrr=1e-3", "optim.lrr: unknown key; did you mean optim.lr?"),
        ("freeze.vit=maybe", "freeze.vit: expected true/false"),
        ("data.loss_roles={critique: {sketch: true}}", "data.loss_roles.critique.sketch"),
        ("data.text_cond_dropout_prob=1.5", "data.text_cond_dropout_prob: expected a probability"),
        ("trainsteps", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[-1], [override])
    assert message in str(e.value)


def test_pretrained_without_path_is_refused():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(CONFIGS[-1], ["model.init=pretrained", "model.path="])


def test_every_field_has_a_doc():
    lines = describe()
    assert all("# " in line and line.split("# ", 1)[1].strip() for line in lines)
    assert any("optim.lr" in line for line in lines)
