"""inject/eject on tiny transformers models built offline (Llama: nn.Linear, GPT-2: Conv1D)."""

import copy

import peft
import pytest
import torch
import torch.nn as nn
from helpers.kernel_checks import assert_rel_close
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import xgblora_fast as xf

VOCAB = 128
KINDS = ["llama", "gpt2"]


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    return model.eval()


def input_ids(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def adaptable_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def peft_targets(kind: str, model: nn.Module, targets) -> set[str]:
    """The module names peft's LoRA would adapt for the same ``target_modules`` (the oracle)."""
    config = peft.LoraConfig(r=1, target_modules=targets, fan_in_fan_out=kind == "gpt2")
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    prefix = "base_model.model."
    return {
        n.removeprefix(prefix)
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def randomize(layers: dict[str, xf.FastRank1Linear], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_a.copy_(torch.randn(layer.in_features, generator=g) * 0.3)
            layer.lora_b.copy_(torch.randn(layer.out_features, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------
# inject: identity at init, which modules, freezing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inject_is_identity_at_init(kind):
    model = build(kind)
    ids = input_ids()
    before = logits(model, ids)
    adaptable = adaptable_names(model)
    layers = xf.inject(model, "all-linear", alpha=2.0, backend="torch")

    assert list(layers) == [n for n in adaptable if n != "lm_head"]  # model order
    for name, layer in layers.items():
        assert isinstance(layer, xf.FastRank1Linear)
        assert model.get_submodule(name) is layer
        assert layer.scale == 2.0
        assert torch.count_nonzero(layer.lora_b) == 0
    after = logits(model, ids)
    assert_rel_close(after, before, 1e-5, "logits at init")

    # freeze_base: exactly the boosters are trainable.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    boosters = {id(p) for layer in layers.values() for p in (layer.lora_a, layer.lora_b)}
    assert trainable == boosters


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", ["model.layers.1.self_attn.o_proj", "down_proj"]),
        ("llama", r"model\.layers\.0\.mlp\.(gate|up)_proj"),
        ("llama", r".*\.(k|v)_proj"),
        ("llama", "all-linear"),
        ("gpt2", ["c_attn"]),
        ("gpt2", ["mlp.c_proj"]),
        ("gpt2", r"transformer\.h\.1\.(attn|mlp)\.c_\w+"),
        ("gpt2", "all-linear"),
    ],
    ids=str,
)
def test_target_selection_matches_peft(kind, targets):
    model = build(kind)
    expected = peft_targets(kind, model, targets)
    assert expected  # every case selects something
    layers = xf.inject(model, targets, backend="torch")
    assert set(layers) == expected
    assert "lm_head" not in layers
    for name in adaptable_names(build(kind)):
        wrapped = isinstance(model.get_submodule(name), xf.FastRank1Linear)
        assert wrapped == (name in expected), name


def test_target_selection_semantics():
    model = build("llama")
    layers = xf.inject(model, ["q_proj"], backend="torch")
    assert list(layers) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    # Dotted-suffix matching only: "proj" is not a suffix of "...q_proj" at a dot.
    with pytest.raises(ValueError):
        xf.inject(build("llama"), ["proj"], backend="torch")
    # A plain string is a regex matched with fullmatch (peft's rule): "q_proj" matches nothing.
    with pytest.raises(ValueError):
        xf.inject(build("llama"), "q_proj", backend="torch")
    # lm_head can be targeted by name, but "all-linear" leaves it alone.
    assert list(xf.inject(build("llama"), ["lm_head"], backend="torch")) == ["lm_head"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", [["nonexistent"], [], r"lm_head\.weight"], ids=str)
def test_no_match_raises_and_leaves_model_alone(kind, targets):
    model = build(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError):
        xf.inject(model, targets, backend="torch")
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_inject_options_are_passed_on():
    model = build("llama")
    layers = xf.inject(model, ["o_proj"], alpha=0.25, dropout=0.1, backend="torch")
    for layer in layers.values():
        assert layer.scale == 0.25 and layer.dropout == 0.1 and layer.backend == "torch"
    # freeze_base=False keeps the other parameters trainable (the wrapped weight is frozen).
    model = build("llama")
    layers = xf.inject(model, ["o_proj"], freeze_base=False, backend="torch")
    assert model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    for layer in layers.values():
        assert not layer.weight.requires_grad


# ------------------------------------------------------------------------------------------------
# peft as the oracle for the whole adapted model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_matches_peft(kind):
    alpha = 2.0
    model = build(kind)
    config = peft.LoraConfig(
        r=1, lora_alpha=alpha, target_modules="all-linear", fan_in_fan_out=kind == "gpt2"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    layers = xf.inject(model, "all-linear", alpha=alpha, backend="torch")
    randomize(layers, seed=2)
    for name, layer in layers.items():
        lora = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(layer.lora_a[None, :])
            lora.lora_B["default"].weight.copy_(layer.lora_b[:, None])

    ids = input_ids(3)
    ours = model(ids, labels=ids)
    theirs = peft_model(ids, labels=ids)
    assert (theirs.logits - logits(build(kind), ids)).abs().max() > 0.1  # adapters matter
    assert_rel_close(ours.logits, theirs.logits, 1e-5, "logits")
    ours.loss.backward()
    theirs.loss.backward()
    for name, layer in layers.items():
        lora = peft_model.base_model.model.get_submodule(name)
        assert_rel_close(layer.lora_a.grad, lora.lora_A["default"].weight.grad[0], 1e-4, name)
        assert_rel_close(layer.lora_b.grad, lora.lora_B["default"].weight.grad[:, 0], 1e-4, name)


def test_gpt2_triton_forward_matches_torch():
    ids = input_ids(4, shape=(1, 10))
    outs = {}
    for backend in ("torch", "triton"):
        model = build("gpt2")
        layers = xf.inject(model, "all-linear", alpha=1.5, backend=backend)
        randomize(layers, seed=5)
        outs[backend] = logits(model, ids)
    assert (outs["torch"] - logits(build("gpt2"), ids)).abs().max() > 0.1
    assert_rel_close(outs["triton"], outs["torch"], 1e-5, "triton vs torch logits")


# ------------------------------------------------------------------------------------------------
# Train, eject, save
# ------------------------------------------------------------------------------------------------


def train_and_eject(kind: str):
    """Inject, take a few AdamW steps on the boosters, eject. Returns what the tests check."""
    model = build(kind)
    ids = input_ids(6)
    original = {
        "keys": list(model.state_dict()),
        "types": {n: type(m) for n, m in model.named_modules()},
        "params": {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)},
        "ptrs": {n: m.weight.data_ptr() for n, m in model.named_modules() if hasattr(m, "weight")},
        "logits": logits(model, ids),
    }
    layers = xf.inject(model, "all-linear", alpha=2.0, backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(layers)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(4):
        batch = input_ids(100 + step)
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()
    model.eval()
    adapted = logits(model, ids)
    assert (adapted - original["logits"]).abs().max() > 1e-3, "training did not change outputs"
    assert all(torch.count_nonzero(layer.lora_b) > 0 for layer in layers.values())

    returned = xf.eject(model)
    assert returned is model
    return model, ids, original, adapted, layers


@pytest.mark.parametrize("kind", KINDS)
def test_eject_restores_modules_and_keeps_outputs(kind):
    model, ids, original, adapted, layers = train_and_eject(kind)
    assert not any(isinstance(m, xf.FastRank1Linear) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == original["types"]
    for name, module in model.named_modules():
        if name in layers:
            assert type(module) is (nn.Linear if kind == "llama" else Conv1D), name
            # Merged in the original storage: same Parameter (Linear) / same memory (Conv1D).
            assert module.weight.data_ptr() == original["ptrs"][name], name
            if isinstance(module, nn.Linear):
                assert module.weight is original["params"][name], name
                out_features, in_features = module.weight.shape
            else:
                in_features, out_features = module.weight.shape
            assert (in_features, out_features) == (
                layers[name].in_features,
                layers[name].out_features,
            )
    assert list(model.state_dict()) == original["keys"]
    if kind == "gpt2":  # tied embeddings survive
        assert model.lm_head.weight is model.transformer.wte.weight
    assert_rel_close(logits(model, ids), adapted, 1e-5, "logits after eject")
    assert (logits(model, ids) - original["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_roundtrip(kind, tmp_path):
    model, ids, original, adapted, _ = train_and_eject(kind)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cls = LlamaForCausalLM if kind == "llama" else GPT2LMHeadModel
    loaded = cls.from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == original["keys"]
    assert not any(isinstance(m, xf.FastRank1Linear) for m in loaded.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    reloaded = logits(loaded, ids)
    torch.testing.assert_close(reloaded, logits(model, ids), rtol=0, atol=0)
    assert_rel_close(reloaded, adapted, 1e-5, "reloaded logits")


def test_eject_without_adapters_is_a_no_op():
    model = build("gpt2")
    ids = input_ids(7)
    before = logits(model, ids)
    types = {n: type(m) for n, m in model.named_modules()}
    assert xf.eject(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert torch.equal(logits(model, ids), before)


class TaggedLinear(nn.Linear):
    """A trivial ``nn.Linear`` subclass (as quantization-aware or framework-specific layers are)."""


def test_eject_restores_linear_subclass_type():
    torch.manual_seed(8)
    model = nn.Sequential(TaggedLinear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    weight = model[0].weight
    x = torch.randn(5, 16)
    layers = xf.inject(model, ["0", "2"], backend="torch")
    randomize(layers, seed=9)
    with torch.no_grad():
        adapted = model(x)
    xf.eject(model)
    assert type(model[0]) is TaggedLinear  # the original module comes back, not nn.Linear
    assert type(model[2]) is nn.Linear
    assert model[0].weight is weight
    with torch.no_grad():
        assert_rel_close(model(x), adapted, 1e-5, "logits after eject")


def test_eject_restores_requires_grad_when_the_base_was_not_frozen():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)
    xf.inject(model, "all-linear", freeze_base=False, backend="torch")
    assert not model[0].weight.requires_grad  # the wrapped base is frozen while boosting
    xf.eject(model)
    assert model[0].weight.requires_grad and model[0].bias.requires_grad
    assert not model[2].weight.requires_grad and model[2].bias.requires_grad


def test_multihead_attention_out_proj_is_never_targeted():
    """MHA reads out_proj.weight directly: a booster there would be silently ignored."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 2)})
    layers = xf.inject(model, "all-linear", backend="torch")
    assert list(layers) == ["head"]
    with pytest.raises(ValueError, match="matched no"):
        xf.inject(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}), ["out_proj"])
