"""merge_: in-place W += s b a^T, nearest and stochastic rounding, bit-identical across backends."""

import math

import pytest
import torch
import triton.language as tl
from helpers.kernel_checks import bits_of, compensation_like, hash_and_round_kernel, rel_err

import xgblora_fast as xf
from xgblora_fast.ops import reference
from xgblora_fast.ops.merge import merge_with_bound_

BACKENDS = ["torch", "triton"]
LOW = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *LOW]


def make(M, K, dtype, seed, update=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, K, generator=g).to(dtype)
    a = torch.randn(K, generator=g) * update
    b = torch.randn(M, generator=g)
    return weight, a, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nearest_equals_rounded_fp32_sum(backend, dtype, record_error):
    """Result == fl32(fl32(s*b_i) * a_j) + w_ij rounded to nearest: bits, not tolerance."""
    weight, a, b = make(45, 301, dtype, seed=1)
    before = weight.clone()
    out = xf.merge_(weight, a, b, 0.37, backend=backend)
    assert out is weight
    sb = torch.tensor(0.37) * b
    expected = (before.float() + sb[:, None] * a[None, :]).to(dtype)
    assert torch.equal(bits_of(weight), bits_of(expected))
    truth = before.double() + 0.37 * b.double()[:, None] * a.double()[None, :]
    err = rel_err(weight, truth)
    record_error("merge_nearest", backend, dtype, err)
    assert err < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_triton_and_torch_write_the_same_bits(dtype, rounding):
    """Same seed -> bit-identical weights on both backends; transposed W, strided a and b."""
    weight, a, b = make(70, 33, dtype, seed=2, update=1e-2)
    w_torch = weight.clone()
    w_triton_storage = weight.t().contiguous()  # [K, M] storage, merged through a view
    w_triton = w_triton_storage.t()
    a_strided = torch.stack([a, -a], dim=1)[:, 0]  # strided views of the same values
    b_strided = torch.stack([b, -b], dim=1)[:, 0]
    xf.merge_(w_torch, a, b, 1.0, rounding, seed=1234, backend="torch")
    xf.merge_(w_triton, a_strided, b_strided, 1.0, rounding, seed=1234, backend="triton")
    assert torch.equal(bits_of(w_torch), bits_of(w_triton.contiguous()))
    assert not torch.equal(w_torch, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_same_seed_same_bits_other_seed_other_bits(backend, dtype):
    weight, a, b = make(40, 50, dtype, seed=3, update=1e-2)
    results = []
    for seed in (7, 7, 8):
        w = weight.clone()
        xf.merge_(w, a, b, 1.0, "stochastic", seed=seed, backend=backend)
        results.append(bits_of(w))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_is_unbiased_where_nearest_loses_the_update(dtype):
    """200 merges of an update below half an ulp: nearest keeps nothing, stochastic ~ all of it."""
    M, K, merges = 64, 256, 200
    g = torch.Generator().manual_seed(4)
    weight0 = (1.0 + torch.rand(M, K, generator=g)).to(dtype)  # in [1, 2): ulp is constant
    ulp = torch.finfo(dtype).eps
    a = torch.full((K,), 0.1 * ulp)  # each merge adds 0.1 ulp
    b = torch.ones(M)
    w_near, w_sr = weight0.clone(), weight0.clone()
    for i in range(merges):
        xf.merge_(w_near, a, b, 1.0, "nearest", backend="torch")
        xf.merge_(w_sr, a, b, 1.0, "stochastic", seed=i, backend="torch")
    truth = weight0.double() + merges * 0.1 * ulp
    assert torch.equal(w_near, weight0)  # round-to-nearest lost every update
    mean_err = (w_sr.double() - truth).mean().item()
    # Each element's error is a sum of 200 independent zero-mean roundings (sd ~ 0.3 ulp each).
    assert abs(mean_err) < 0.05 * ulp, mean_err
    gained = (w_sr.double() - weight0.double()).mean().item()
    assert gained == pytest.approx(merges * 0.1 * ulp, rel=0.05)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_probability_matches_distance(dtype):
    """One value 30% of the way between two neighbours rounds up ~30% of the time."""
    lo = torch.tensor(1.0)
    ulp = torch.finfo(dtype).eps
    value = torch.full((200_000,), (lo + 0.3 * ulp).item())
    bits = reference.counter_hash(99, torch.arange(value.numel()))
    rounded = reference.round_stochastic(value, bits, dtype).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + ulp}
    assert (rounded > 1.0).float().mean().item() == pytest.approx(0.3, abs=0.005)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rng_and_rounding_kernels_match_their_torch_twins(dtype):
    """Indices past 2**32 (high word used), edge values: max finite, beyond it, subnormal, -0."""
    idx = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62])
    fmax = torch.finfo(dtype).max
    beyond = min(2.0 * fmax, torch.finfo(torch.float32).max)  # finite fp32, past DTYPE's max
    tiny = torch.finfo(dtype).smallest_normal
    value = torch.tensor(
        [1.0 / 3, -2.7, fmax, beyond, -beyond, tiny / 3, -tiny / 5, -0.0, 12345.678]
    )
    bits = torch.empty(idx.numel(), dtype=torch.int64)
    out = torch.empty(idx.numel(), dtype=dtype)
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    hash_and_round_kernel[(1,)](idx, value, bits, out, 2024, idx.numel(), DTYPE=tl_dtype)
    expected_bits = reference.counter_hash(2024, idx)
    assert torch.equal(bits, expected_bits)
    assert len(set(expected_bits.tolist())) == idx.numel()
    expected = reference.round_stochastic(value, expected_bits, dtype)
    assert torch.equal(bits_of(out), bits_of(expected))
    assert torch.isfinite(expected.float()).all()  # past the largest finite: clamps to it
    assert expected[2].item() == fmax and expected[3].item() == fmax and expected[4] == -fmax


def test_counter_hash_bits_are_uniform():
    bits = reference.counter_hash(5, torch.arange(1 << 16))
    u = (bits >> 8).double() / 2**24
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    hist = torch.histc(u, bins=16, min=0, max=1)
    assert (hist / hist.sum() - 1 / 16).abs().max().item() < 0.005


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "poison",
    ["nan_a", "inf_b", "inf_scale_product", "overflow", "nan_in_weight"],
)
def test_merge_that_would_write_nan_or_inf_refuses_and_leaves_weight_untouched(backend, poison):
    weight, a, b = make(12, 20, torch.float16, seed=6)
    if poison == "nan_a":
        a[3] = float("nan")
    elif poison == "inf_b":
        b[0] = float("inf")
    elif poison == "inf_scale_product":
        a.fill_(1e30)
        b.fill_(1e30)  # finite vectors whose product overflows even fp32
    elif poison == "nan_in_weight":
        weight[5, 7] = float("nan")
    else:
        weight[0, 0] = 60000.0
        a.fill_(100.0)
        b.fill_(100.0)
    before = weight.clone()
    with pytest.raises(ValueError, match="merge refused"):
        xf.merge_(weight, a, b, 1.0, backend=backend)
    assert torch.equal(bits_of(weight), bits_of(before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_overflow_merge_that_stays_finite_is_applied(backend):
    """|W|max + |update|max exceeds the fp16 range, but not where they meet: exact check passes."""
    weight = torch.zeros(4, 4, dtype=torch.float16)
    weight[0, 0] = 60000.0
    a = torch.tensor([0.0, 100.0, 100.0, 100.0])
    b = torch.full((4,), 100.0)  # the 10000 update misses column 0, where the 60000 sits
    xf.merge_(weight, a, b, 1.0, backend=backend)
    assert weight[0, 0].item() == 60000.0
    assert weight[0, 1].item() == 10000.0
    assert torch.isfinite(weight.float()).all()


# ---- Kahan (compensated) merges ---------------------------------------------------------------


def kahan_case(M, K, dtype, seed):
    """``(weight, a, b, compensation)``: updates ~1e-2 of W, a buffer below half an ulp."""
    weight, a, b = make(M, K, dtype, seed, update=1e-2)
    return weight, a, b, compensation_like(weight, seed + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K"), [(37, 70), (1, 5), (19, 1)])
def test_kahan_triton_and_torch_write_the_same_bits_in_weight_and_buffer(dtype, M, K):
    """Three chained merges; W as a transposed view, C in its own (row-major) layout."""
    weight, a, b, compensation = kahan_case(M, K, dtype, seed=M + K)
    w_torch, c_torch = weight.clone(), compensation.clone()
    w_triton, c_triton = weight.t().contiguous().t(), compensation.clone()
    for step in range(3):
        scale = 0.5 - step  # signs change: the buffer sees both directions
        xf.merge_(w_torch, a, b, scale, "kahan", backend="torch", compensation=c_torch)
        xf.merge_(w_triton, a, b, scale, "kahan", backend="triton", compensation=c_triton)
        assert torch.equal(bits_of(w_torch), bits_of(w_triton)), step
        assert torch.equal(bits_of(c_torch), bits_of(c_triton)), step
    assert not torch.equal(c_torch, compensation)
    # The seed plays no part in a Kahan merge.
    w_seeded, c_seeded = weight.clone(), compensation.clone()
    xf.merge_(w_seeded, a, b, 0.5, "kahan", seed=77, backend="torch", compensation=c_seeded)
    w_other, c_other = weight.clone(), compensation.clone()
    xf.merge_(w_other, a, b, 0.5, "kahan", seed=78, backend="torch", compensation=c_other)
    assert torch.equal(bits_of(w_seeded), bits_of(w_other))
    assert torch.equal(bits_of(c_seeded), bits_of(c_other))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kahan_keeps_updates_that_nearest_loses(dtype):
    """200 merges of ~0.1 ulp: nearest keeps none, Kahan ends within an ulp of the truth.

    W + C holds the sum closer still: C is what W could not take yet, and each merge rounds C
    once, an error of at most ``eps |C| / 2 <= eps ulp / 4`` (C's own dtype is W's).
    """
    M, K, merges = 32, 64, 200
    g = torch.Generator().manual_seed(4)
    weight0 = (1.0 + torch.rand(M, K, generator=g)).to(dtype)  # in [1, 2): ulp is eps
    ulp = torch.finfo(dtype).eps
    a = torch.full((K,), 0.1 * ulp) * (1 + 0.1 * torch.rand(K, generator=g))
    b = torch.ones(M)
    w_near, w_kahan, comp = weight0.clone(), weight0.clone(), torch.zeros_like(weight0)
    for _ in range(merges):
        xf.merge_(w_near, a, b, 1.0, "nearest", backend="torch")
        xf.merge_(w_kahan, a, b, 1.0, "kahan", backend="torch", compensation=comp)
    truth = weight0.double() + merges * a.double()[None, :]
    assert torch.equal(w_near, weight0)  # round-to-nearest lost every update
    # W is W + C rounded to nearest, give or take C's own rounding errors: within an ulp,
    # which is at most eps |truth| (some elements reach [2, 4)).
    assert ((w_kahan.double() - truth).abs() <= ulp * truth.abs()).all()
    err_sum = (w_kahan.double() + comp.double() - truth).abs().max().item()
    assert err_sum <= merges * ulp * ulp / 4, err_sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan_a", "overflow", "nan_in_compensation", "overflow_by_c"])
def test_refused_kahan_merge_leaves_weight_and_buffer_untouched(backend, poison):
    weight, a, b, compensation = kahan_case(12, 20, torch.float16, seed=6)
    if poison == "nan_a":
        a[3] = float("nan")
    elif poison == "overflow":
        weight[0, 0] = 60000.0
        a.fill_(100.0)
        b.fill_(100.0)
    elif poison == "nan_in_compensation":
        compensation[2, 2] = float("nan")
    else:  # the largest finite weight plus a compensation that rounds it past the range
        weight[1, 1] = torch.finfo(torch.float16).max
        compensation[1, 1] = 20.0  # more than half its ulp (32): rounds up to inf
        a.zero_()  # a zero update: the buffer is still added
    before_w, before_c = weight.clone(), compensation.clone()
    with pytest.raises(ValueError, match=r"merge refused.*weight and compensation unchanged"):
        xf.merge_(weight, a, b, 1.0, "kahan", backend=backend, compensation=compensation)
    assert torch.equal(bits_of(weight), bits_of(before_w))
    assert torch.equal(bits_of(compensation), bits_of(before_c))


@pytest.mark.parametrize(
    ("rounding", "buffer", "error", "message"),
    [
        ("kahan", "none", ValueError, "needs a compensation buffer"),
        ("nearest", "good", ValueError, "rounding='kahan' only"),
        ("stochastic", "good", ValueError, "rounding='kahan' only"),
        ("kahan", "shape", ValueError, r"compensation has shape \(6, 5\), weight \(5, 6\)"),
        ("kahan", "dtype", TypeError, "compensation has dtype torch.float32 but weight"),
        ("kahan", "device", ValueError, "all tensors must be on one device"),
        ("kahan", "expanded", ValueError, "compensation has overlapping memory"),
        ("kahan", "weight", ValueError, "must not share memory with weight"),
        ("kahan", "tensor", TypeError, "compensation must be a torch.Tensor"),
    ],
)
def test_bad_compensation_buffers_are_refused_before_any_write(rounding, buffer, error, message):
    weight, a, b = make(5, 6, torch.bfloat16, seed=8)
    compensation = {
        "none": None,
        "good": torch.zeros_like(weight),
        "shape": torch.zeros(6, 5, dtype=weight.dtype),
        "dtype": torch.zeros(5, 6),
        "device": torch.zeros(5, 6, dtype=weight.dtype, device="meta"),
        "expanded": torch.zeros(6, dtype=weight.dtype).expand(5, 6),
        "weight": weight,
        "tensor": [[0.0] * 6] * 5,
    }[buffer]
    before = weight.clone()
    with pytest.raises(error, match=message):
        xf.merge_(weight, a, b, 1.0, rounding, compensation=compensation)
    assert torch.equal(bits_of(weight), bits_of(before))


# ---- the bound on max|W| that spares repeated merges their pass over W -------------------------


def weight_reads(monkeypatch, weight):
    """A list that grows by one each time the merge's safety check reduces over ``weight``."""
    from xgblora_fast.ops import checks

    reads = []
    real = checks.abs_max

    def counting(t):
        if t.shape == weight.shape:
            reads.append(t.shape)
        return real(t)

    monkeypatch.setattr(checks, "abs_max", counting)
    return reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_holds_and_spares_the_pass_over_w_without_changing_the_bits(
    backend, dtype, monkeypatch
):
    weight, a, b = make(23, 41, dtype, seed=11, update=0.3)
    twin = weight.clone()
    reads = weight_reads(monkeypatch, weight)
    bound = merge_with_bound_(weight, a, b, 0.5, backend=backend)
    assert reads == [weight.shape]  # no bound given: one pass over W
    for step in range(3):
        _, a, b = make(23, 41, dtype, seed=20 + step, update=0.3)
        bound = merge_with_bound_(weight, a, b, 0.5, backend=backend, weight_abs_max=bound)
        assert bound >= weight.double().abs().max().item()
    assert len(reads) == 1  # the bound proved every later merge safe: W was not read again
    # Same bits as merges that checked W in full.
    xf.merge_(twin, *make(23, 41, dtype, seed=11, update=0.3)[1:], 0.5, backend=backend)
    for step in range(3):
        _, a, b = make(23, 41, dtype, seed=20 + step, update=0.3)
        xf.merge_(twin, a, b, 0.5, backend=backend)
    assert torch.equal(bits_of(weight), bits_of(twin))
    assert len(reads) == 5


def test_a_bound_that_cannot_prove_safety_falls_back_to_the_full_check(monkeypatch):
    """fp16: a bound near the top of the range does not prove the merge safe, so W is read:
    the exact check then applies a merge that stays finite and refuses one that overflows."""
    weight = torch.zeros(4, 4, dtype=torch.float16)
    weight[0, 0] = 60000.0
    a = torch.tensor([0.0, 100.0, 100.0, 100.0])
    b = torch.full((4,), 100.0)
    reads = weight_reads(monkeypatch, weight)
    merge_with_bound_(weight, a, b, 1.0, weight_abs_max=60000.0)
    assert len(reads) == 1 and weight[0, 1].item() == 10000.0
    a[0] = 100.0  # now the update meets the 60000
    before = weight.clone()
    with pytest.raises(ValueError, match="would overflow"):
        merge_with_bound_(weight, a, b, 1.0, weight_abs_max=60000.0)
    assert torch.equal(bits_of(weight), bits_of(before))


@pytest.mark.parametrize(
    ("hint", "error"),
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-1.0, ValueError),
        (torch.tensor(1.0), TypeError),
        (True, TypeError),
    ],
    ids=["nan", "inf", "negative", "tensor", "bool"],
)
def test_bad_bounds_are_refused_before_any_write(hint, error):
    weight, a, b = make(5, 6, torch.float32, seed=3)
    before = weight.clone()
    with pytest.raises(error, match="weight_abs_max"):
        xf.merge_(weight, a, b, 1.0, weight_abs_max=hint)
    assert torch.equal(weight, before)
