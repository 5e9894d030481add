"""XGBLoRAConfig's presets and its fields' metadata (help and group); FinetuneConfig's too."""

import dataclasses

import pytest

from xgblora_fast.boosting.config import GROUPS, PRESETS, XGBLoRAConfig
from xgblora_fast.cli.finetune import FinetuneConfig

# The paper's recipe (arXiv 2410.19694), where it differs from the measured defaults.
PAPER = dict(booster_init="random", layers_per_round=0.35, select="uniform", kappa_growth=1.0)
# Every default as it was before the fields carried metadata: the defaults must not move.
DEFAULTS = dict(
    target_modules="all-linear",
    alpha=1.0,
    dropout=0.0,
    kappa=10,
    kappa_growth=1.5,
    layers_per_round=1.0,
    sample_by="block",
    total_steps=None,
    rounds=None,
    merge_step=1.0,
    rounding="nearest",
    init="kaiming",
    booster_init="carry",
    booster_keep=None,
    gradient_init_rounds=None,
    select="gradient",
    power_iters=4,
    weight_decay=0.3,
    optimizer_reset="all",
    rewarm_steps=0,
    verify_replicas=True,
    seed=0,
    record=True,
)
# The fields that matter most to a run; every other field is "advanced".
CORE = {
    XGBLoRAConfig: {
        "target_modules",
        "alpha",
        "kappa",
        "kappa_growth",
        "total_steps",
        "booster_init",
    },
    FinetuneConfig: {"model", "data", "method", "steps", "lr", "xgblora"},
}


def test_defaults_are_unchanged():
    assert XGBLoRAConfig().to_dict() == DEFAULTS
    assert XGBLoRAConfig.preset("default") == XGBLoRAConfig()


def test_paper_is_the_papers_recipe_and_defaults_elsewhere():
    paper = XGBLoRAConfig.paper()
    assert paper.to_dict() == DEFAULTS | PAPER
    assert XGBLoRAConfig.preset("paper") == paper
    assert PRESETS == ("default", "paper")
    # Restarts from b = 0 keep nothing: a booster_keep does not fit the recipe.
    with pytest.raises(ValueError, match="booster_keep needs booster_init"):
        XGBLoRAConfig.paper(booster_keep=0.5)


def test_overrides_apply_on_top_of_a_preset():
    overrides = dict(kappa=7, layers_per_round=2, target_modules=["q_proj"])
    assert XGBLoRAConfig.paper(**overrides).to_dict() == DEFAULTS | PAPER | overrides
    # An override may undo a preset's own value.
    assert XGBLoRAConfig.preset("paper", kappa_growth=1.5).kappa_growth == 1.5
    default = XGBLoRAConfig.preset("default", select="uniform")
    assert default.to_dict() == DEFAULTS | {"select": "uniform"}
    with pytest.raises(ValueError, match="kappa must be >= 1"):  # still checked
        XGBLoRAConfig.paper(kappa=0)


def test_an_unknown_preset_is_a_one_line_value_error():
    with pytest.raises(ValueError) as info:
        XGBLoRAConfig.preset("lora", kappa=3)
    message = str(info.value)
    assert "\n" not in message
    assert "'lora'" in message and "('default', 'paper')" in message


@pytest.mark.parametrize("config", [XGBLoRAConfig, FinetuneConfig], ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_help_and_a_group(config):
    for field in dataclasses.fields(config):
        help_text = field.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), field.name
        assert "\n" not in help_text, field.name
        # argparse %-formats each help: a lone % would break --help.
        assert "%" not in help_text, field.name
        assert field.metadata.get("group") in GROUPS, field.name
    core = {f.name for f in dataclasses.fields(config) if f.metadata["group"] == "core"}
    assert core == CORE[config]


@pytest.mark.parametrize("init", ["orthogonal", "orthogonal-gradient"])
def test_orthogonal_boosters_need_the_merge_records(init):
    assert XGBLoRAConfig(booster_init=init).record
    with pytest.raises(ValueError, match=f"booster_init='{init}' needs record=True"):
        XGBLoRAConfig(booster_init=init, record=False)
