"""Property-based checks of ``rank1_linear``, ``merge_`` and ``FastRank1Linear`` (hypothesis).

Every call on random shapes (N = 0/1, odd sizes), layouts (transposed and sliced views), dtypes
(fp32/fp16/bf16 and unsupported ones), devices (CPU, one tensor on "meta") and backends ("torch",
"triton" in the interpreter) either matches the float64 reference within the dtype's tolerance,
with finite values, or raises TypeError/ValueError/RuntimeError before any kernel runs, leaving
the weight bit-identical. The expected outcome is predicted from the drawn arguments, so a valid
call that raises fails as surely as an invalid call that runs.

Hypothesis runs derandomized and without an example database: CI sees the same examples.
"""

from __future__ import annotations

import contextlib
import math

import torch
from helpers.kernel_checks import TOL, bits_of, float64_reference, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xgblora_fast as xf
from xgblora_fast.ops import merge as merge_mod
from xgblora_fast.ops import rank1_linear as rank1_linear_mod

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.float64, torch.int32, torch.int64]
ERRORS = (TypeError, ValueError, RuntimeError)


def fixed(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def kernel_calls():
    """Count every call into a backend implementation (forward, backward, merge)."""
    calls: list[str] = []
    tables = (rank1_linear_mod._FORWARD, rank1_linear_mod._BACKWARD, merge_mod._MERGE)
    saved = [dict(t) for t in tables]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for table in tables:
        for name, fn in list(table.items()):
            table[name] = counted(name, fn)
    try:
        yield calls
    finally:
        for table, original in zip(tables, saved, strict=True):
            table.clear()
            table.update(original)


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (2-D) in another memory layout."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":  # every other column of a wider tensor: row stride 2 * cols, col stride 2
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def strided_vector(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0]


# ------------------------------------------------------------------ rank1_linear
@st.composite
def rank1_cases(draw):
    backend = draw(st.sampled_from(["torch", "triton"]))
    small = backend == "triton"  # the interpreter is slow: keep its examples tiny
    n = draw(st.sampled_from([0, 1, 2, 3, 7]) if small else st.integers(0, 33))
    k = draw(st.integers(0, 9 if small else 40))
    m = draw(st.integers(1, 9 if small else 40))
    lead = draw(st.sampled_from(["2d", "3d", "1d"]))
    dtype = draw(st.sampled_from(DTYPES))
    adapter_same = draw(st.booleans())
    with_bias = draw(st.booleans())
    x_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    w_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    strided_ab = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, -0.5, 2.5, 0.0]))
    fault = draw(
        st.sampled_from(
            ["none"] * 4 + ["bad_dtype", "meta", "length", "x_dtype", "half_on_bf16", "scale"]
        )
    )
    victim = draw(st.sampled_from(["x", "weight", "a", "b", "bias"]))
    bad_dtype = draw(st.sampled_from(BAD_DTYPES))
    seed = draw(st.integers(0, 2**16))
    return dict(
        backend=backend, n=n, k=k, m=m, lead=lead, dtype=dtype, adapter_same=adapter_same,
        with_bias=with_bias, x_layout=x_layout, w_layout=w_layout, strided_ab=strided_ab,
        scale=scale, fault=fault, victim=victim if with_bias or victim != "bias" else "a",
        bad_dtype=bad_dtype, seed=seed,
    )  # fmt: skip


def build_rank1(case):
    g = torch.Generator().manual_seed(case["seed"])
    n, k, m, dtype = case["n"], case["k"], case["m"], case["dtype"]
    adapter_dtype = dtype if case["adapter_same"] else torch.float32
    x = layout(torch.randn(n, k, generator=g).to(dtype), case["x_layout"])
    if case["lead"] == "3d" and n % 2 == 0 and n > 0:
        x = x.reshape(2, n // 2, k)
    elif case["lead"] == "1d" and n == 1:
        x = x[0]
    weight = layout((torch.randn(m, k, generator=g) / math.sqrt(k)).to(dtype), case["w_layout"])
    bias = torch.randn(m, generator=g).to(dtype) if case["with_bias"] else None
    a = torch.randn(k, generator=g).to(adapter_dtype)
    b = torch.randn(m, generator=g).to(adapter_dtype)
    if case["strided_ab"]:
        a, b = strided_vector(a), strided_vector(b)
    dy = torch.randn(*x.shape[:-1], m, generator=g).to(dtype)
    args = {"x": x, "weight": weight, "bias": bias, "a": a, "b": b}
    fault, victim, scale = case["fault"], case["victim"], case["scale"]
    expected = None
    if fault == "bad_dtype":
        args[victim] = args[victim].to(case["bad_dtype"])
        expected = TypeError
    elif fault == "meta":
        args[victim] = args[victim].to("meta")
        expected = ValueError
    elif fault == "length":
        name = {"x": "a", "weight": "b"}.get(victim, victim)
        args[name] = torch.cat([args[name], args[name][:1]])  # one element too many
        expected = ValueError
    elif fault == "x_dtype":
        other = torch.float16 if dtype != torch.float16 else torch.bfloat16
        args["x"] = args["x"].to(other)
        expected = TypeError
    elif fault == "half_on_bf16" and dtype == torch.bfloat16:
        args["a"] = args["a"].half()
        expected = TypeError
    elif fault == "scale":
        scale = float("nan")
        expected = ValueError
    if k == 0:  # in_features = 0 is refused (shapes are checked before dtypes and devices)
        expected = ValueError
    return args, scale, dy, expected


@fixed(300)
@given(case=rank1_cases())
def test_rank1_linear_matches_reference_or_refuses_before_any_kernel(case):
    args, scale, dy, expected = build_rank1(case)
    weight_bits = bits_of(args["weight"]) if args["weight"].dtype in DTYPES else None
    leaves = {
        name: t.detach().requires_grad_()
        for name, t in args.items()
        if t is not None and t.is_floating_point() and name != "weight"
    }
    call = {**args, **leaves}
    with kernel_calls() as calls:
        if expected is not None:
            try:
                xf.rank1_linear(**call, scale=scale, backend=case["backend"])
            except ERRORS as e:
                assert isinstance(e, expected), f"{type(e).__name__}: {e}"
                assert str(e), "an error needs a message"
            else:
                raise AssertionError(f"fault {case['fault']!r} on {case['victim']} was accepted")
            assert calls == [], f"a kernel ran before the error: {calls}"
            if weight_bits is not None and args["weight"].device.type == "cpu":
                assert torch.equal(bits_of(args["weight"]), weight_bits)
            return
        y = xf.rank1_linear(**call, scale=scale, backend=case["backend"])
        y.backward(dy)
    dtype = case["dtype"]
    assert y.shape == dy.shape and y.dtype == dtype
    assert torch.equal(bits_of(args["weight"]), weight_bits)
    y_ref, grads_ref = float64_reference(
        args["x"], args["weight"], args["bias"], args["a"], args["b"], scale, dy
    )
    if y.numel():
        assert torch.isfinite(y).all(), "NaN/Inf from finite inputs"
        assert rel_err(y, y_ref) < TOL[dtype], f"forward error {rel_err(y, y_ref):.2e}"
    for name, ref in grads_ref.items():
        got = leaves[name].grad
        assert got is not None and got.shape == ref.shape, name
        if got.numel():
            assert torch.isfinite(got).all(), f"grad of {name}: NaN/Inf from finite inputs"
            err = rel_err(got, ref)
            assert err < TOL[dtype], f"grad of {name}: error {err:.2e}"


# ------------------------------------------------------------------ merge_
@st.composite
def merge_cases(draw):
    backend = draw(st.sampled_from(["torch", "triton"]))
    small = backend == "triton"
    m = draw(st.integers(0, 20 if small else 70))
    k = draw(st.integers(0, 20 if small else 70))
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        backend=backend, m=m, k=k, dtype=dtype,
        adapter_same=draw(st.booleans()),
        w_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        strided_ab=draw(st.booleans()),
        rounding=draw(st.sampled_from(["nearest", "stochastic"])),
        scale=draw(st.sampled_from([1.0, -0.3, 1e-3, 0.0, 7.0])),
        fault=draw(st.sampled_from(
            ["none"] * 5
            + ["bad_dtype", "meta", "length", "nan", "inf", "overflow", "expanded", "rounding"]
        )),
        victim=draw(st.sampled_from(["weight", "a", "b"])),
        bad_dtype=draw(st.sampled_from(BAD_DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


@fixed(300)
@given(case=merge_cases())
def test_merge_matches_reference_or_refuses_leaving_weight_bit_identical(case):
    g = torch.Generator().manual_seed(case["seed"])
    m, k, dtype = case["m"], case["k"], case["dtype"]
    adapter_dtype = dtype if case["adapter_same"] else torch.float32
    base = torch.randn(m, k, generator=g).to(dtype)
    storage = torch.zeros(m, 2 * k, dtype=dtype) if case["w_layout"] == "sliced" else None
    if storage is not None:
        storage[:, ::2] = base
        weight = storage[:, ::2]
    else:
        weight = layout(base, case["w_layout"])
    a = torch.randn(k, generator=g).to(adapter_dtype)
    b = torch.randn(m, generator=g).to(adapter_dtype)
    if case["strided_ab"]:
        a, b = strided_vector(a), strided_vector(b)
    args = {"weight": weight, "a": a, "b": b}
    fault, victim, rounding, scale = case["fault"], case["victim"], case["rounding"], case["scale"]
    expected = None
    nonempty = m > 0 and k > 0
    if fault == "bad_dtype":
        args[victim] = args[victim].to(case["bad_dtype"])
        expected = TypeError
    elif fault == "meta" and victim != "weight":
        args[victim] = args[victim].to("meta")
        expected = ValueError
    elif fault == "length":
        name = "a" if victim == "weight" else victim
        args[name] = torch.cat([args[name], torch.ones(1, dtype=args[name].dtype)])
        expected = ValueError
    elif fault in ("nan", "inf") and nonempty and victim != "weight":
        args[victim] = args[victim].clone()
        args[victim][case["seed"] % args[victim].numel()] = float(fault)
        expected = ValueError
    elif fault in ("nan", "inf") and nonempty and scale != 0.0:  # in W: must not spread it
        weight[case["seed"] % m, case["seed"] % k] = float(fault)
        expected = ValueError
    elif fault == "overflow" and nonempty:  # W's largest finite + an update of the same size
        weight[0, 0] = torch.finfo(dtype).max
        root = math.sqrt(torch.finfo(dtype).max)
        args["a"] = torch.full((k,), root, dtype=adapter_dtype)
        args["b"] = torch.full((m,), root, dtype=adapter_dtype)
        scale = 1.0
        expected = ValueError
    elif fault == "expanded" and nonempty and m > 1:
        weight = args["weight"] = base[:1].expand(m, k)
        expected = ValueError
    elif fault == "rounding":
        rounding = "up"
        expected = ValueError
    weight = args["weight"]
    before = weight.clone()
    storage_before = storage.clone() if storage is not None else None
    with kernel_calls() as calls:
        if expected is not None:
            try:
                xf.merge_(**args, scale=scale, rounding=rounding, seed=case["seed"],
                          backend=case["backend"])  # fmt: skip
            except ERRORS as e:
                assert isinstance(e, expected), f"{type(e).__name__}: {e}"
                assert str(e)
            else:
                raise AssertionError(f"fault {fault!r} on {victim} was accepted")
            assert calls == [], f"a kernel ran before the error: {calls}"
            if weight.dtype in DTYPES:
                assert torch.equal(bits_of(weight), bits_of(before))
            return
        out = xf.merge_(**args, scale=scale, rounding=rounding, seed=case["seed"],
                        backend=case["backend"])  # fmt: skip
    assert out is weight
    if storage is not None:  # the columns between the view's were not written
        assert torch.equal(bits_of(storage[:, 1::2]), bits_of(storage_before[:, 1::2]))
    if not nonempty:
        return
    a32, b32 = args["a"].float(), args["b"].float()
    value = before.float() + (torch.tensor(scale) * b32)[:, None] * a32[None, :]
    if rounding == "nearest" or dtype == torch.float32:
        assert torch.equal(bits_of(weight), bits_of(value.to(dtype)))
    else:  # stochastic: one of the two neighbours of the fp32 value, same bits on both backends
        w64, v64 = weight.double(), value.double()
        ulp = torch.finfo(dtype).eps * v64.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((w64 - v64).abs() <= ulp).all()
        twin = before.contiguous().clone()
        xf.merge_(twin, args["a"].contiguous(), args["b"].contiguous(), scale,
                  "stochastic", seed=case["seed"], backend="torch")  # fmt: skip
        assert torch.equal(bits_of(weight), bits_of(twin))
    assert torch.isfinite(weight).all()
    truth = before.double() + scale * b32.double()[:, None] * a32.double()[None, :]
    if truth.abs().max() > 0:
        assert rel_err(weight, truth) < TOL[dtype]


# ------------------------------------------------------------------ FastRank1Linear
@fixed(80)
@given(
    k=st.integers(1, 24),
    m=st.integers(1, 24),
    n=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
    adapter_same=st.booleans(),
    bias=st.booleans(),
    alpha=st.sampled_from([1.0, 0.25, -2.0]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    poison=st.sampled_from(["none", "none", "nan_a", "inf_b", "wrong_input_dtype"]),
    seed=st.integers(0, 2**16),
)
def test_layer_forward_merge_and_faults(k, m, n, dtype, adapter_same, bias, alpha, rounding,
                                        poison, seed):  # fmt: skip
    """The layer equals the reference before a merge and its plain GEMM after, or refuses."""
    g = torch.Generator().manual_seed(seed)
    layer = xf.FastRank1Linear(
        k,
        m,
        bias=bias,
        alpha=alpha,
        dtype=dtype,
        adapter_dtype=dtype if adapter_same else torch.float32,
    )
    layer.reset_(g)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(m, generator=g))
    x = torch.randn(n, k, generator=g).to(dtype)
    if poison == "wrong_input_dtype":
        with kernel_calls() as calls:
            try:
                layer(x.double())
            except TypeError as e:
                assert "dtype" in str(e)
            else:
                raise AssertionError("float64 input to a low-precision layer was accepted")
        assert calls == []
        return
    y = layer(x)
    dy = torch.zeros_like(y)
    y_ref, _ = float64_reference(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, alpha, dy)
    if n:
        assert torch.isfinite(y).all() and rel_err(y, y_ref) < TOL[dtype]
    state = {key: v.clone() for key, v in layer.state_dict().items()}
    if poison != "none":
        with torch.no_grad():
            vec = layer.lora_a if poison == "nan_a" else layer.lora_b
            vec[seed % vec.numel()] = float("nan") if poison == "nan_a" else float("inf")
        state = {key: v.clone() for key, v in layer.state_dict().items()}
        try:
            layer.merge_(rounding, seed=seed)
        except ValueError as e:
            assert "NaN/Inf" in str(e)
        else:
            raise AssertionError("a NaN/Inf booster was merged")
        for key, v in layer.state_dict().items():  # nothing changed, the booster included
            assert torch.equal(bits_of(v), bits_of(state[key])), key
        return
    merged = layer.merged_weight()
    layer.merge_(rounding, seed=seed)
    assert torch.isfinite(layer.weight).all()
    assert float(layer.lora_b.detach().abs().max()) == 0.0  # re-initialised
    if rounding == "nearest" or dtype == torch.float32:
        assert torch.equal(bits_of(layer.weight), bits_of(merged))
    y_after = layer(x)  # b = 0: the plain GEMM of the merged weight
    if n:
        truth = x.double() @ (state["weight"].double() + alpha * torch.outer(
            state["lora_b"].double(), state["lora_a"].double())).t()  # fmt: skip
        if bias:
            truth = truth + state["bias"].double()
        assert rel_err(y_after, truth) < 4 * TOL[dtype]


def test_all_meta_tensors():
    """Meta tensors: the torch path infers shapes; Triton and the merge refuse before any kernel."""

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    args = (meta(3, 5), meta(4, 5), meta(4), meta(5), meta(4))
    with kernel_calls() as calls:
        y = xf.rank1_linear(*args, 1.0, backend="torch")
        assert y.device.type == "meta" and y.shape == (3, 4)
        assert calls == ["torch"]
        calls.clear()
        try:
            xf.rank1_linear(*args, 1.0, backend="triton")
        except RuntimeError as e:
            assert "meta" in str(e)
        else:
            raise AssertionError("backend='triton' accepted meta tensors")
        try:
            xf.merge_(meta(4, 5), meta(5), meta(4), 1.0)
        except ValueError as e:
            assert "meta" in str(e)
        else:
            raise AssertionError("merge_ accepted meta tensors")
        assert calls == []
