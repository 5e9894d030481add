"""FastRank1Linear: peft's LoRA ``Linear`` (r=1) as the oracle, merge/reset/to_linear, dropout."""

import copy
import math

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.kernel_checks import assert_rel_close

import xgblora_fast as xf

BACKENDS = ["torch", "triton"]
K, M = 48, 40  # in/out features: modest, the Triton interpreter is slow


class Tiny(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(K, M, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_lora_layer(model: nn.Module, alpha: float):
    """A peft LoRA wrapper (r=1) of a deepcopy of ``model``, and its LoRA ``Linear`` layer."""
    config = peft.LoraConfig(r=1, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    lora = peft_model.base_model.model.proj
    assert isinstance(lora, peft.tuners.lora.Linear)
    assert lora.scaling["default"] == pytest.approx(alpha)  # lora_alpha / r with r = 1
    return peft_model, lora


def set_adapter(layer: xf.FastRank1Linear, lora, a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
        lora.lora_A["default"].weight.copy_(a[None, :])  # [1, in]
        lora.lora_B["default"].weight.copy_(b[:, None])  # [out, 1]


def random_adapter(layer: xf.FastRank1Linear) -> None:
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.in_features))
        layer.lora_b.copy_(torch.randn(layer.out_features))


# ------------------------------------------------------------------------------------------------
# peft as the oracle: outputs and every gradient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    ("lead", "alpha"), [((3, 13), 2.5), ((37,), 1.0), ((2, 5, 4), -0.75)], ids=str
)
@pytest.mark.parametrize("construct", ["from_linear", "init"])
def test_matches_peft_lora(backend, with_bias, lead, alpha, construct):
    torch.manual_seed(len(lead) * 100 + int(with_bias) * 10 + len(construct))
    model = Tiny(with_bias)
    peft_model, lora = peft_lora_layer(model, alpha)
    if construct == "from_linear":
        linear = copy.deepcopy(model.proj)
        layer = xf.FastRank1Linear.from_linear(linear, alpha=alpha, backend=backend)
    else:
        layer = xf.FastRank1Linear(K, M, bias=with_bias, alpha=alpha, backend=backend)
        with torch.no_grad():
            lora.base_layer.weight.copy_(layer.weight)
            if with_bias:
                lora.base_layer.bias.copy_(layer.bias)
    assert layer.scale == alpha
    set_adapter(layer, lora, torch.randn(K), torch.randn(M))
    if with_bias:  # a trainable bias in both
        layer.bias.requires_grad_(True)
        lora.base_layer.bias.requires_grad_(True)

    x = torch.randn(*lead, K)
    dy = torch.randn(*lead, M)
    x_ours = x.clone().requires_grad_()
    x_peft = x.clone().requires_grad_()
    y_ours = layer(x_ours)
    y_peft = peft_model(x_peft)
    assert y_ours.shape == (*lead, M) and y_ours.dtype == torch.float32
    # The adapter really contributes (the comparison is not just the base GEMM).
    assert (y_peft - model(x)).abs().max() > 0.1
    assert_rel_close(y_ours, y_peft, 1e-5, "forward")

    y_ours.backward(dy)
    y_peft.backward(dy)
    assert_rel_close(x_ours.grad, x_peft.grad, 1e-5, "dx")
    assert_rel_close(layer.lora_a.grad, lora.lora_A["default"].weight.grad[0], 1e-5, "da")
    assert_rel_close(layer.lora_b.grad, lora.lora_B["default"].weight.grad[:, 0], 1e-5, "db")
    if with_bias:
        assert_rel_close(layer.bias.grad, lora.base_layer.bias.grad, 1e-5, "dbias")
    assert layer.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_base_weight_matches_peft(backend):
    """Unusual for XGBLoRA but supported: a trainable W gets dW = dy^T x."""
    torch.manual_seed(11)
    model = Tiny(bias=True)
    peft_model, lora = peft_lora_layer(model, 1.5)
    layer = xf.FastRank1Linear.from_linear(copy.deepcopy(model.proj), alpha=1.5, backend=backend)
    set_adapter(layer, lora, torch.randn(K), torch.randn(M))
    layer.weight.requires_grad_(True)
    lora.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 9, K)
    dy = torch.randn(2, 9, M)
    layer(x).backward(dy)
    peft_model(x).backward(dy)
    assert_rel_close(layer.weight.grad, lora.base_layer.weight.grad, 1e-5, "dW")
    assert_rel_close(layer.lora_a.grad, lora.lora_A["default"].weight.grad[0], 1e-5, "da")


def test_functional_matches_layer():
    torch.manual_seed(3)
    layer = xf.FastRank1Linear(K, M, alpha=0.5, backend="torch")
    random_adapter(layer)
    x = torch.randn(K, 10).t()  # non-contiguous input
    y = xf.rank1_linear(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, 0.5)
    assert_rel_close(y, layer(x), 1e-6, "functional vs layer")


# ------------------------------------------------------------------------------------------------
# from_linear, merge_, reset_, to_linear
# ------------------------------------------------------------------------------------------------


def test_from_linear_shares_and_freezes_weight():
    torch.manual_seed(0)
    linear = nn.Linear(K, M)
    assert linear.weight.requires_grad
    layer = xf.FastRank1Linear.from_linear(linear, alpha=3.0)
    assert layer.weight is linear.weight
    assert layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    assert layer.lora_a.shape == (K,) and layer.lora_b.shape == (M,)
    assert layer.lora_a.dtype == torch.float32 and layer.lora_b.dtype == torch.float32
    assert layer.scale == 3.0 and layer.active
    # b starts at zero: a fresh layer is the linear layer it wraps; a is not zero.
    assert torch.count_nonzero(layer.lora_b) == 0
    assert torch.count_nonzero(layer.lora_a) == K
    x = torch.randn(5, K)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    # Same storage: an in-place change to the linear weight is seen by the layer.
    with torch.no_grad():
        linear.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("step", [1.0, 0.4])
def test_merge_preserves_output_and_parameters(backend, with_bias, step):
    """``merge_(step=t)``: ``W += t s b a^T`` in place, then a fresh booster (``a`` redrawn,
    ``b = 0``) in the same Parameters; with ``t = 1`` the layer computes what it did."""
    torch.manual_seed(5)
    layer = xf.FastRank1Linear(K, M, bias=with_bias, alpha=1.75, backend=backend)
    random_adapter(layer)
    a_obj, b_obj, w_obj = layer.lora_a, layer.lora_b, layer.weight
    w_ptr = layer.weight.data_ptr()
    w_before = layer.weight.detach().clone()
    a_before, b_before = layer.lora_a.detach().clone(), layer.lora_b.detach().clone()
    x = torch.randn(2, 7, K)
    with torch.no_grad():
        y_before = layer(x)

    layer.merge_(step=step)

    assert layer.weight is w_obj and layer.weight.data_ptr() == w_ptr
    merged = step * 1.75 * torch.outer(b_before.double(), a_before.double())
    assert_rel_close(layer.weight, w_before.double() + merged, 1e-6, "merged weight")
    assert layer.lora_a is a_obj and layer.lora_b is b_obj
    assert torch.count_nonzero(layer.lora_b) == 0
    assert not torch.equal(layer.lora_a, a_before)
    assert layer.lora_a.abs().max() <= 1 / math.sqrt(K)
    with torch.no_grad():
        y_after = layer(x)
    # The fresh booster adds nothing: the layer is a plain linear layer with the merged weight.
    torch.testing.assert_close(y_after, F.linear(x, layer.weight, layer.bias))
    if step == 1.0:
        assert_rel_close(y_after, y_before, 1e-5, "forward after merge")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_vectors_adds_any_outer_product_and_leaves_the_booster(backend):
    """``merge_vectors_(v, u, t)``: ``W += t s u v^T`` for vectors of the caller's, float64-checked;
    the booster is not touched and no random number is drawn."""
    torch.manual_seed(9)
    layer = xf.FastRank1Linear(K, M, alpha=0.75, backend=backend)
    random_adapter(layer)
    w0 = layer.weight.detach().double().clone()
    booster = [t.detach().clone() for t in (layer.lora_a, layer.lora_b)]
    v, u = torch.randn(K), torch.randn(M)
    rng = torch.get_rng_state()
    layer.merge_vectors_(v, u, -0.5)
    assert_rel_close(layer.weight, w0 - 0.375 * torch.outer(u.double(), v.double()), 1e-6, "W")
    assert torch.equal(layer.lora_a, booster[0]) and torch.equal(layer.lora_b, booster[1])
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("a_len, b_len", [(K + 1, M), (K, M - 1)], ids=["long_a", "short_b"])
def test_merge_vectors_refuses_wrong_shapes_before_touching_w(a_len, b_len):
    torch.manual_seed(7)
    layer = xf.FastRank1Linear(K, M, alpha=1.0)
    random_adapter(layer)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"merge vectors must be a \[{K}\] and b \[{M}\]"):
        layer.merge_vectors_(torch.ones(a_len), torch.ones(b_len))
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_keeps_working_after_merge(backend):
    torch.manual_seed(6)
    layer = xf.FastRank1Linear(K, M, alpha=1.0, backend=backend)
    opt = torch.optim.AdamW([layer.lora_a, layer.lora_b], lr=1e-2)
    x = torch.randn(16, K)
    target = torch.randn(16, M)

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()

    for _ in range(3):
        step()
    assert torch.count_nonzero(layer.lora_b) > 0
    layer.merge_()
    assert torch.count_nonzero(layer.lora_b) == 0
    with torch.no_grad():
        y_merged = layer(x)
    w_merged = layer.weight.detach().clone()
    step()
    # The optimizer's references are the layer's live parameters: the step moved them.
    assert opt.param_groups[0]["params"][0] is layer.lora_a
    assert opt.param_groups[0]["params"][1] is layer.lora_b
    assert torch.count_nonzero(layer.lora_b) > 0
    with torch.no_grad():
        assert (layer(x) - y_merged).abs().max() > 1e-4
    assert torch.equal(layer.weight, w_merged)  # the frozen base weight is untouched by the step


def test_merge_bf16_stochastic_is_seeded_and_within_one_ulp():
    torch.manual_seed(7)
    layers = []
    for _ in range(2):
        layer = xf.FastRank1Linear(K, M, dtype=torch.bfloat16, alpha=0.5, backend="torch")
        layers.append(layer)
    with torch.no_grad():
        layers[1].weight.copy_(layers[0].weight)
        if layers[0].bias is not None:
            layers[1].bias.copy_(layers[0].bias)
    a, b = torch.randn(K) * 0.01, torch.randn(M) * 0.01
    for layer in layers:
        with torch.no_grad():
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
    exact = layers[0].weight.double() + 0.5 * torch.outer(b.double(), a.double())
    for layer in layers:
        layer.merge_(rounding="stochastic", seed=1234)
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert layers[0].weight.dtype == torch.bfloat16
    # Each element is one of the two bf16 neighbours of the exact value: within one ulp.
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs()
    assert ((layers[0].weight.double() - exact).abs() <= ulp + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_keeps_identity(backend):
    torch.manual_seed(8)
    layer = xf.FastRank1Linear(K, M, backend=backend)
    random_adapter(layer)
    a_obj, b_obj = layer.lora_a, layer.lora_b
    a_ptr, b_ptr = layer.lora_a.data_ptr(), layer.lora_b.data_ptr()
    a_before = layer.lora_a.detach().clone()
    w_before = layer.weight.detach().clone()
    layer.reset_()
    assert layer.lora_a is a_obj and layer.lora_b is b_obj
    assert layer.lora_a.data_ptr() == a_ptr and layer.lora_b.data_ptr() == b_ptr
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    assert torch.count_nonzero(layer.lora_b) == 0
    assert not torch.equal(layer.lora_a, a_before)
    assert layer.lora_a.abs().max() <= 1 / math.sqrt(K)
    assert torch.equal(layer.weight, w_before)  # reset does not merge
    # A generator makes the re-init reproducible.
    layer.reset_(generator=torch.Generator().manual_seed(1))
    first = layer.lora_a.detach().clone()
    layer.reset_(generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer.lora_a, first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_to_linear_matches_and_leaves_layer_alone(backend, with_bias):
    torch.manual_seed(9)
    layer = xf.FastRank1Linear(K, M, bias=with_bias, alpha=2.0, backend=backend)
    random_adapter(layer)
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 5, K)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert (linear.in_features, linear.out_features) == (K, M)
    assert (linear.bias is None) == (not with_bias)
    with torch.no_grad():
        y_layer = layer(x)
        y_linear = linear(x)
    assert (y_layer - F.linear(x, layer.weight, layer.bias)).abs().max() > 0.1
    assert_rel_close(y_linear, y_layer, 1e-5, "to_linear")
    # The layer is unchanged, and the new module holds its own copy of the weight.
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert linear.weight.data_ptr() != layer.weight.data_ptr()
    with torch.no_grad():
        linear.weight.zero_()
    assert torch.equal(layer.weight, state["weight"])


# ------------------------------------------------------------------------------------------------
# active=False
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_is_plain_linear(backend):
    torch.manual_seed(10)
    layer = xf.FastRank1Linear(K, M, alpha=1.0, backend=backend)
    random_adapter(layer)
    x = torch.randn(4, 3, K, requires_grad=True)
    assert (layer(x) - F.linear(x, layer.weight, layer.bias)).abs().max() > 0.1
    layer.active = False
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    dy = torch.randn_like(y)
    y.backward(dy)
    assert layer.lora_a.grad is None and layer.lora_b.grad is None
    torch.testing.assert_close(x.grad, dy @ layer.weight)
    layer.active = True
    assert (layer(x) - y).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------
# Adapter dropout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_zero_b_is_base(backend):
    torch.manual_seed(12)
    layer = xf.FastRank1Linear(K, M, dropout=0.5, backend=backend).train()
    x = torch.randn(2, 6, K)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_train_vs_eval(backend):
    torch.manual_seed(13)
    layer = xf.FastRank1Linear(K, M, alpha=1.5, dropout=0.3, backend=backend)
    random_adapter(layer)
    no_drop = copy.deepcopy(layer)
    no_drop.dropout = 0.0
    x = torch.randn(2, 6, K)
    with torch.no_grad():
        layer.eval()
        y_eval1, y_eval2 = layer(x), layer(x)
        assert torch.equal(y_eval1, y_eval2)
        assert_rel_close(y_eval1, no_drop(x), 1e-6, "eval mode = no dropout")
        layer.train()
        y_train = layer(x)
    assert (y_train - y_eval1).abs().max() > 1e-3
    # Dropout touches the adapter branch only: y - base is rank-1 with column space along b.
    delta = (y_train - F.linear(x, layer.weight, layer.bias)).reshape(-1, M).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 1
    coef = delta @ layer.lora_b.double() / layer.lora_b.double().square().sum()
    assert_rel_close(delta, torch.outer(coef, layer.lora_b.double()), 1e-5, "rank-1 along b")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(3, 7), (20,)], ids=str)
def test_dropout_matches_manual_reference(backend, lead):
    """Same RNG state -> same mask as a manual ``F.dropout``; float64 outputs and gradients."""
    p, alpha = 0.4, 1.25
    torch.manual_seed(14)
    layer = xf.FastRank1Linear(K, M, alpha=alpha, dropout=p, backend=backend).train()
    random_adapter(layer)
    layer.bias.requires_grad_(True)
    x = torch.randn(*lead, K, requires_grad=True)
    dy = torch.randn(*lead, M)

    torch.manual_seed(1000)
    y = layer(x)
    y.backward(dy)
    torch.manual_seed(1000)
    x_drop = F.dropout(x.detach().reshape(-1, K), p, training=True)
    mask = (x_drop != 0).double().reshape(x.shape)
    assert 0 < mask.mean() < 1  # some elements really are dropped

    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_a.detach().double().requires_grad_()
    b64 = layer.lora_b.detach().double().requires_grad_()
    bias64 = layer.bias.detach().double().requires_grad_()
    xa = x64 * mask / (1 - p)
    y64 = x64 @ layer.weight.double().t() + bias64 + alpha * (xa @ a64)[..., None] * b64
    y64.backward(dy.double())

    assert_rel_close(y, y64, 1e-5, "forward with dropout")
    assert_rel_close(x.grad, x64.grad, 1e-5, "dx with dropout")
    assert_rel_close(layer.lora_a.grad, a64.grad, 1e-5, "da with dropout")
    assert_rel_close(layer.lora_b.grad, b64.grad, 1e-5, "db with dropout")
    assert_rel_close(layer.bias.grad, bias64.grad, 1e-5, "dbias with dropout")


def test_invalid_dropout_rejected():
    with pytest.raises(ValueError):
        xf.FastRank1Linear(K, M, dropout=1.0)
    with pytest.raises(ValueError):
        xf.FastRank1Linear.from_linear(nn.Linear(K, M), dropout=-0.1)


# ------------------------------------------------------------------------------------------------
# Low precision: bf16 base, fp32 adapters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_base_fp32_adapters(backend):
    torch.manual_seed(15)
    alpha = 0.8
    layer = xf.FastRank1Linear(K, M, dtype=torch.bfloat16, alpha=alpha, backend=backend)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.lora_a.dtype == torch.float32 and layer.lora_b.dtype == torch.float32
    random_adapter(layer)
    x = torch.randn(3, 8, K).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(3, 8, M).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert x.grad.dtype == torch.bfloat16
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_b.grad.dtype == torch.float32

    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_a.detach().double().requires_grad_()
    b64 = layer.lora_b.detach().double().requires_grad_()
    y64 = (
        x64 @ layer.weight.double().t() + layer.bias.double() + alpha * (x64 @ a64)[..., None] * b64
    )
    y64.backward(dy.double())
    assert_rel_close(y, y64, 1e-2, "bf16 forward")
    assert_rel_close(x.grad, x64.grad, 1e-2, "bf16 dx")
    assert_rel_close(layer.lora_a.grad, a64.grad, 1e-2, "bf16 da")
    assert_rel_close(layer.lora_b.grad, b64.grad, 1e-2, "bf16 db")

    # merge_ in bf16 keeps the output close to the pre-merge adapter output.
    with torch.no_grad():
        y_before = layer(x)
        layer.merge_()
        assert torch.count_nonzero(layer.lora_b) == 0
        assert_rel_close(layer(x), y_before, 2e-2, "bf16 forward after merge")


def test_kahan_buffer_is_lazy_persistent_and_stays_out_of_plain_layers():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    layer = xf.FastRank1Linear(K, M, dtype=dtype, backend="torch")
    layer.merge_("nearest")
    assert layer.compensation is None and "compensation" not in layer.state_dict()
    with torch.no_grad():
        layer.lora_b.normal_(std=1e-3)
    layer.merge_("kahan")
    buffer = layer.compensation
    assert buffer.shape == layer.weight.shape and buffer.dtype == dtype
    assert buffer.abs().max() > 0 and not buffer.requires_grad
    assert "compensation" in layer.state_dict()
    with torch.no_grad():
        layer.lora_b.normal_(std=1e-3)
    layer.merge_("kahan")
    assert layer.compensation is buffer  # allocated once, updated in place

    # The plain layer holds W + C rounded once (b = 0 after the merge) and no buffer.
    linear = layer.to_linear()
    assert set(linear.state_dict()) == {"weight", "bias"}
    assert torch.equal(linear.weight, (layer.weight.float() + buffer.float()).to(dtype))
    model = xf.eject(nn.Sequential(copy.deepcopy(layer)))
    assert type(model[0]) is nn.Linear and set(model.state_dict()) == {"0.weight", "0.bias"}

    # load_state_dict allocates the buffer, or drops it, to match the state loaded.
    fresh = xf.FastRank1Linear(K, M, dtype=dtype, backend="torch")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.compensation, buffer)
    fresh.load_state_dict(xf.FastRank1Linear(K, M, dtype=dtype).state_dict())
    assert fresh.compensation is None


# ------------------------------------------------------------------------------------------------
# the bound on max|W| kept between merges
# ------------------------------------------------------------------------------------------------


def count_weight_reads(monkeypatch, layer: xf.FastRank1Linear) -> list:
    from xgblora_fast.ops import checks

    reads = []
    real = checks.abs_max

    def counting(t):
        if t.shape == layer.weight.shape:
            reads.append(1)
        return real(t)

    monkeypatch.setattr(checks, "abs_max", counting)
    return reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_merges_skip_the_pass_over_w_until_something_else_writes_it(backend, monkeypatch):
    torch.manual_seed(12)
    layer = xf.FastRank1Linear(K, M, backend=backend)
    reads = count_weight_reads(monkeypatch, layer)
    for _ in range(3):
        random_adapter(layer)
        layer.merge_()
    assert len(reads) == 1  # only the first merge read W
    assert layer._known_weight_bound() >= layer.weight.abs().max().item()
    with torch.no_grad():  # a write that is not a merge (an optimizer, copy_, load_state_dict)
        layer.weight.mul_(1.5)
    random_adapter(layer)
    layer.merge_()
    assert len(reads) == 2
    assert layer._known_weight_bound() >= layer.weight.abs().max().item()
    layer.load_state_dict(layer.state_dict())
    random_adapter(layer)
    layer.merge_()
    assert len(reads) == 3


def test_nan_written_into_w_between_merges_is_still_refused():
    torch.manual_seed(13)
    layer = xf.FastRank1Linear(K, M)
    random_adapter(layer)
    layer.merge_()
    with torch.no_grad():
        layer.weight[3, 4] = float("nan")
    random_adapter(layer)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="weight already contains NaN"):
        layer.merge_()
    assert torch.equal(layer.weight.isnan(), before.isnan())
    torch.testing.assert_close(layer.weight, before, equal_nan=True, rtol=0, atol=0)


def test_writes_through_data_need_forget_weight_bound():
    """``weight.data`` writes bypass the version counter: the documented escape hatch works."""
    torch.manual_seed(14)
    layer = xf.FastRank1Linear(K, M, dtype=torch.float16)
    random_adapter(layer)
    layer.merge_()
    layer.weight.data[0, 0] = 65000.0
    with torch.no_grad():
        layer.lora_a.fill_(10.0)
        layer.lora_b.fill_(100.0)
    layer.forget_weight_bound()
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="would overflow"):
        layer.merge_()
    assert torch.equal(layer.weight, before)
