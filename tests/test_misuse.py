"""What a Python user gets wrong, turned into clear errors or right defaults.

Task heads stay out of "all-linear" and stay trainable; export/unmerge keep working after eject
through the Booster; a Booster refuses a config its injected model contradicts; every config
field is validated; trainable base weights are warned about.
"""

import copy
import json
import math
import re
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import xgblora_fast as xf
from xgblora_fast.boosting.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS

VOCAB = 40
SMALL = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48}


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=24, num_labels=3, **SMALL
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama_classifier():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=2, num_key_value_heads=1, pad_token_id=0, **SMALL
    )
    return LlamaForSequenceClassification(cfg).eval()


def tiny_roberta():
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=40, **SMALL)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).eval()


def batch(g, n=8):
    ids = torch.randint(1, VOCAB, (n, 10), generator=g)
    return ids, ids[:, 0] % 2


def peft_all_linear(model, task_type):
    """The modules peft's LoRA adapts for ``target_modules="all-linear"`` (the oracle)."""
    config = peft.LoraConfig(r=1, target_modules="all-linear", task_type=task_type)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    return {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


FAST = {"kappa": 2, "kappa_growth": 1.0, "seed": 3}


# ------------------------------------------------------------------ 1. task heads
@pytest.mark.parametrize(
    ("build", "head"),
    [(tiny_bert, "classifier"), (tiny_llama_classifier, "score")],
    ids=["bert", "llama"],
)
def test_all_linear_leaves_the_head_out_and_trainable_as_peft(build, head):
    model = build()
    expected = peft_all_linear(model, "SEQ_CLS")
    booster = xf.Booster(model, xf.XGBLoRAConfig(**FAST))
    assert set(booster.layers) == expected  # the oracle: peft's all-linear for SEQ_CLS
    assert head not in booster.layers
    if build is tiny_bert:  # the pretrained pooler is body, boosted as peft's all-linear does
        assert "bert.pooler.dense" in booster.layers
    assert booster.modules_to_save == [head]
    head_params = list(model.get_submodule(head).parameters())
    assert [id(p) for p in booster.head_parameters()] == [id(p) for p in head_params]
    boosters = {id(p) for p in booster.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == boosters | {id(p) for p in head_params}


def test_the_fresh_head_trains_with_head_parameters_in_the_optimizer():
    model = tiny_bert()
    booster = xf.Booster(model, xf.XGBLoRAConfig(**FAST))
    before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.AdamW(
        [*booster.param_groups(lr=1e-2), {"params": booster.head_parameters(), "lr": 1e-2}]
    )
    booster.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(4):
        ids, labels = batch(g)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step()
    assert type(model.classifier) is nn.Linear  # not boosted: its change is the optimizer's
    assert (model.classifier.weight - before).abs().max() > 1e-3


def test_submodules_of_a_head_and_named_modules_to_save_are_not_boosted():
    model = tiny_roberta()  # classifier = RobertaClassificationHead(dense, out_proj)
    booster = xf.Booster(model, xf.XGBLoRAConfig(**FAST))
    assert not any(n.startswith("classifier") for n in booster.layers)
    assert booster.modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in model.classifier.parameters())
    # A checkpoint without BERT's pooler: the caller makes it a head as well.
    model = tiny_bert()
    booster = xf.Booster(model, xf.XGBLoRAConfig(**FAST), modules_to_save=["pooler"])
    assert "bert.pooler.dense" not in booster.layers
    assert booster.modules_to_save == ["bert.pooler", "classifier"]
    assert model.bert.pooler.dense.weight.requires_grad


def test_causal_lm_has_no_head_to_save_and_lm_head_stays_frozen():
    model = tiny_gpt2()
    booster = xf.Booster(model, xf.XGBLoRAConfig(**FAST))
    assert "lm_head" not in booster.layers and booster.modules_to_save == []
    assert booster.head_parameters() == []
    assert not model.lm_head.weight.requires_grad


# ------------------------------------------------------------------ 2. export after eject
def boosted_bert(record=True, steps=6):
    model = tiny_bert()
    cfg = xf.XGBLoRAConfig(target_modules=["query", "value"], record=record, **FAST)
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(lr=2e-2))
    booster.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):  # 3 rounds; booster_keep leaves 90% of each booster unmerged
        ids, labels = batch(g)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step()
    model.eval()
    return booster


def adapter(path):
    with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return json.loads((path / ADAPTER_CONFIG).read_text()), tensors


def test_export_through_the_booster_after_eject_equals_export_before(tmp_path):
    booster = boosted_bert()
    assert any(bool(m.lora_b.any()) for m in booster.layers.values())  # live boosters
    before = copy.deepcopy(booster)
    xf.export_lora(before, tmp_path / "before")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tuned = booster.model(input_ids=ids).logits
    xf.eject(booster.model)
    report = xf.export_lora(booster, tmp_path / "after")
    assert report["modules_to_save"] == ["classifier"]
    config_before, tensors_before = adapter(tmp_path / "before")
    config_after, tensors_after = adapter(tmp_path / "after")
    assert config_after == config_before
    assert tensors_after.keys() == tensors_before.keys()
    for key, value in tensors_before.items():
        torch.testing.assert_close(tensors_after[key], value, rtol=1e-6, atol=1e-7)
    # The adapter on the base model reproduces the ejected fine-tune.
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "after")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, tuned, rtol=1e-4, atol=1e-5)


def test_unmerge_through_the_booster_after_eject_restores_the_weights():
    booster = boosted_bert()
    original = {
        n: m.weight.detach().clone()
        for n, m in tiny_bert().named_modules()
        if isinstance(m, nn.Linear)
    }
    model = xf.eject(booster.model)
    recorded = sorted({t for r in booster.records.values() for t in r.rounds})
    assert recorded == [0, 1, 2, 3]  # 3 merged rounds and the live boosters eject merged
    assert xf.unmerge_(booster) == recorded
    for name in booster.layers:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and not module.weight.requires_grad
        torch.testing.assert_close(module.weight, original[name], rtol=0, atol=1e-6)
    assert not any(r.rounds for r in booster.records.values())


def test_export_or_unmerge_of_the_ejected_model_says_what_to_do(tmp_path):
    booster = boosted_bert()
    model = xf.eject(booster.model)
    hint = re.escape("export before eject, or pass the Booster")
    with pytest.raises(ValueError, match=hint):
        xf.export_lora(model, tmp_path)
    with pytest.raises(ValueError, match=hint):
        xf.unmerge_(model)
    # Without recording the Booster has nothing either, eject included.
    unrecorded = boosted_bert(record=False)
    xf.eject(unrecorded.model)
    with pytest.raises(ValueError, match="nothing recorded"):
        xf.export_lora(unrecorded, tmp_path)


# ------------------------------------------------------------------ 3. pre-injected models
def test_booster_refuses_a_config_the_injected_layers_contradict():
    model = tiny_bert()
    xf.inject(model, ["query"], alpha=2.0, dropout=0.1)
    with pytest.raises(ValueError, match="target_modules"):
        xf.Booster(model, xf.XGBLoRAConfig(alpha=2.0, dropout=0.1))  # "all-linear"
    with pytest.raises(ValueError, match="alpha/dropout"):
        xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query"], dropout=0.1))
    with pytest.raises(ValueError, match="alpha/dropout"):
        xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query"], alpha=2.0))
    booster = xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query"], alpha=2, dropout=0.1))
    assert list(booster.layers) == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    # "all-linear" injected by hand and given again: accepted.
    model = tiny_bert()
    injected = xf.inject(model)
    assert list(xf.Booster(model, xf.XGBLoRAConfig()).layers) == list(injected)


# ------------------------------------------------------------------ 4. config validation
NOT_A_NUMBER = [st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2)]


def bad_int(minimum, optional=False):
    """Wrong types (floats, bools, strings, ...) and ints below ``minimum``."""
    kinds = [*NOT_A_NUMBER, st.floats(), st.integers(max_value=minimum - 1)]
    return st.one_of(*kinds, *([] if optional else [st.none()]))


def bad_real(high=None, low_open=True, optional=False):
    """Wrong types, NaN/inf, values at or below 0 (below only where ``low_open`` is False) and
    (with ``high``) at or above ``high``."""
    kinds = [
        *NOT_A_NUMBER,
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(max_value=0.0, exclude_max=not low_open, allow_nan=False),
        st.integers(max_value=0 if low_open else -1),
    ]
    if high is not None:
        kinds += [st.floats(min_value=high, allow_nan=False), st.integers(min_value=int(high))]
    return st.one_of(*kinds, *([] if optional else [st.none()]))


def bad_choice(choices):
    names = st.text(max_size=8).filter(lambda s: s not in choices)
    return st.one_of(
        names, st.integers(), st.booleans(), st.none(), st.lists(st.text(), max_size=1)
    )


def bad_bool():
    return st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none())


INVALID = {
    "target_modules": st.one_of(
        st.integers(),
        st.floats(),
        st.none(),
        st.booleans(),
        st.sampled_from([[], (), "", "(", "[a-", [""], ["q_proj", 3], {"q_proj"}]),
        st.lists(st.integers(), min_size=1, max_size=2),
    ),
    "alpha": bad_real(),
    "dropout": bad_real(high=1.0, low_open=False),
    "kappa": bad_int(1),
    "kappa_growth": bad_real(),
    "layers_per_round": st.one_of(
        *NOT_A_NUMBER,
        st.none(),
        st.integers(max_value=0),
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=1.0, exclude_min=True),
        st.just(math.nan),
    ),
    "sample_by": bad_choice(("block", "module")),
    "total_steps": bad_int(1, optional=True),
    "rounds": bad_int(1, optional=True),
    "merge_step": bad_real(),
    "rounding": bad_choice(("nearest", "stochastic", "kahan")),
    "init": bad_choice(("kaiming", "gaussian")),
    "booster_init": bad_choice(("random", "gradient", "carry", "redraw")),
    "booster_keep": bad_real(high=1.0, low_open=False, optional=True),
    "gradient_init_rounds": bad_int(1, optional=True),
    "select": bad_choice(("uniform", "gradient")),
    "power_iters": bad_int(1),
    "weight_decay": bad_real(low_open=False),
    "optimizer_reset": bad_choice(("all", "momentum", "none")),
    "rewarm_steps": bad_int(0),
    "verify_replicas": bad_bool(),
    "seed": st.one_of(
        *NOT_A_NUMBER,
        st.none(),
        st.floats(),
        st.integers(min_value=2**64),
        st.integers(max_value=-(2**63) - 1),
    ),
    "record": bad_bool(),
}
# What else a field needs to be checked on its own.
CONTEXT = {"gradient_init_rounds": {"booster_init": "gradient"}}
FIELDS = list(xf.XGBLoRAConfig.__dataclass_fields__)
CHOICE_FIELDS = ("sample_by", "rounding", "init", "booster_init", "select", "optimizer_reset")
INT_FIELDS = ("kappa", "total_steps", "rounds", "gradient_init_rounds", "power_iters")
INT_FIELDS += ("rewarm_steps", "seed")


def expected_error(field, value):
    """TypeError for a value of the wrong type (a bool is no number, a float no int)."""
    if field == "target_modules":
        return (TypeError, ValueError)  # a wrong type, or an empty/invalid name or regex
    if field in CHOICE_FIELDS:
        return ValueError if isinstance(value, str) else TypeError
    if field in ("verify_replicas", "record"):
        return TypeError
    if value is None or isinstance(value, (bool, str, list)):
        return TypeError
    return TypeError if field in INT_FIELDS and isinstance(value, float) else ValueError


def test_every_config_field_has_invalid_values_drawn():
    assert sorted(INVALID) == sorted(FIELDS)


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_invalid_config_values_raise_a_one_line_error_naming_the_field(field, data):
    value = data.draw(INVALID[field], label=field)
    with pytest.raises((TypeError, ValueError)) as excinfo:
        xf.XGBLoRAConfig(**CONTEXT.get(field, {}), **{field: value})
    message = str(excinfo.value)
    assert f"XGBLoRAConfig.{field}" in message and "\n" not in message
    assert issubclass(excinfo.type, expected_error(field, value)), (field, value, message)


VALID = {
    "target_modules": st.sampled_from(["all-linear", r".*\.q_proj", ["q_proj"], ("q", "v")]),
    "alpha": st.one_of(st.floats(1e-6, 1e6), st.integers(1, 100)),
    "dropout": st.floats(0.0, 0.99),
    "kappa": st.integers(1, 10**6),
    "kappa_growth": st.floats(1e-3, 10.0),
    "layers_per_round": st.one_of(st.integers(1, 1000), st.floats(1e-6, 1.0)),
    "sample_by": st.sampled_from(["block", "module"]),
    "total_steps": st.one_of(st.none(), st.integers(1, 10**9)),
    "rounds": st.one_of(st.none(), st.integers(1, 10**4)),
    "merge_step": st.floats(1e-6, 10.0),
    "rounding": st.sampled_from(["nearest", "stochastic", "kahan"]),
    "init": st.sampled_from(["kaiming", "gaussian"]),
    "booster_init": st.sampled_from(["random", "gradient", "carry", "redraw"]),
    "booster_keep": st.one_of(st.none(), st.floats(0.0, 0.999)),
    "gradient_init_rounds": st.one_of(st.none(), st.integers(1, 100)),
    "select": st.sampled_from(["uniform", "gradient"]),
    "power_iters": st.integers(1, 100),
    "weight_decay": st.one_of(st.floats(0.0, 10.0), st.just(0)),
    "optimizer_reset": st.sampled_from(["all", "momentum", "none"]),
    "rewarm_steps": st.integers(0, 1000),
    "verify_replicas": st.booleans(),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "record": st.booleans(),
}


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_valid_config_values_construct_and_round_trip(field, data):
    value = data.draw(VALID[field], label=field)
    cfg = xf.XGBLoRAConfig(**CONTEXT.get(field, {}), **{field: value})
    assert getattr(cfg, field) == (list(value) if isinstance(value, tuple) else value)
    assert xf.XGBLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "module", [nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 1), nn.Embedding(5, 4), nn.Bilinear(2, 2, 3)]
)
def test_from_linear_of_another_module_names_the_supported_types(module):
    with pytest.raises(TypeError, match=re.escape("supports nn.Linear (2-D weight")):
        xf.FastRank1Linear.from_linear(module)


# ------------------------------------------------------------------ 5. trainable base weights
def test_inject_and_booster_freeze_the_base_weights():
    model = tiny_bert()
    booster = xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query", "dense"]))
    for layer in booster.layers.values():
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_booster_warns_once_when_boosted_base_weights_require_grad():
    model = tiny_bert()
    xf.inject(model, ["query", "value"])
    with warnings.catch_warnings(record=True) as caught:  # frozen: no warning
        warnings.simplefilter("always")
        xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query", "value"]))
    assert not [w for w in caught if "require grad" in str(w.message)]
    model.requires_grad_(True)  # e.g. to unfreeze the head, the base weights thaw too
    with pytest.warns(
        UserWarning, match="base weight/bias of 4 boosted layers require grad"
    ) as rec:
        xf.Booster(model, xf.XGBLoRAConfig(target_modules=["query", "value"]))
    assert len([w for w in rec if "require grad" in str(w.message)]) == 1
