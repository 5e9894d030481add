"""Bad input gets a clear error naming the tensor, before any kernel runs."""

import pytest
import torch

import xgblora_fast as xf
from xgblora_fast.ops import backend as backend_mod
from xgblora_fast.ops import rank1_linear as rank1_linear_mod


@pytest.fixture
def no_kernels(monkeypatch):
    """Make every backend implementation fail loudly if it is reached."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before validation failed")

    for table in (rank1_linear_mod._FORWARD, rank1_linear_mod._BACKWARD):
        for name in list(table):
            monkeypatch.setitem(table, name, boom)
    from xgblora_fast.ops import merge as merge_mod

    for name in list(merge_mod._MERGE):
        monkeypatch.setitem(merge_mod._MERGE, name, boom)


def good(K=12, M=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(5, K, generator=g).to(dtype),
        torch.randn(M, K, generator=g).to(dtype),
        torch.randn(M, generator=g).to(dtype),
        torch.randn(K, generator=g),
        torch.randn(M, generator=g),
    )


CASES = [
    # (description, mutate(args) -> args, exception type, message fragment)
    ("x last dim", lambda x, w, bias, a, b: (x[:, :-1], w, bias, a, b), ValueError, "x has 11"),
    ("weight 3-D", lambda x, w, bias, a, b: (x, w[None], bias, a, b), ValueError, "weight must"),
    ("a length", lambda x, w, bias, a, b: (x, w, bias, a[:-1], b), ValueError, "a must be"),
    ("b length", lambda x, w, bias, a, b: (x, w, bias, a, b[:-2]), ValueError, "b must be"),
    ("a 2-D", lambda x, w, bias, a, b: (x, w, bias, a[None], b), ValueError, "a must be"),
    ("bias length", lambda x, w, bias, a, b: (x, w, bias[:3], a, b), ValueError, "bias must"),
    (
        "float64 x and weight",
        lambda x, w, bias, a, b: (x.double(), w.double(), bias, a, b),
        TypeError,
        "weight has dtype torch.float64",
    ),
    (
        "x and weight dtypes differ",
        lambda x, w, bias, a, b: (x.half(), w, bias, a, b),
        TypeError,
        "x has dtype torch.float16 but weight",
    ),
    (
        "integer a",
        lambda x, w, bias, a, b: (x, w, bias, a.long(), b),
        TypeError,
        "a has dtype torch.int64",
    ),
    (
        "fp16 adapter on bf16 base",
        lambda x, w, bias, a, b: (x.bfloat16(), w.bfloat16(), None, a.half(), b),
        TypeError,
        "a has dtype torch.float16",
    ),
    (
        "mixed devices",
        lambda x, w, bias, a, b: (x, w, bias, a.to("meta"), b),
        ValueError,
        "a on meta",
    ),
    ("x not a tensor", lambda x, w, bias, a, b: (x.tolist(), w, bias, a, b), TypeError, "x must"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank1_linear_rejects_bad_input(case, backend, no_kernels):
    _, mutate, exc, fragment = case
    args = mutate(*good())
    with pytest.raises(exc, match=fragment):
        xf.rank1_linear(*args, 1.0, backend=backend)


@pytest.mark.parametrize(
    ("scale", "exc", "fragment"),
    [(float("nan"), ValueError, "finite"), (torch.tensor(1.0), TypeError, "Python number")],
)
def test_bad_scale(scale, exc, fragment, no_kernels):
    with pytest.raises(exc, match=fragment):
        xf.rank1_linear(*good(), scale)


def test_bad_backend_and_dropout(no_kernels):
    with pytest.raises(ValueError, match="backend must be one of"):
        xf.rank1_linear(*good(), 1.0, backend="cutlass")
    with pytest.raises(ValueError, match="dropout must be in"):
        xf.rank1_linear(*good(), 1.0, dropout=1.0)


def test_unavailable_backends_say_why(monkeypatch, no_kernels):
    with pytest.raises(RuntimeError, match="CUDA C\\+\\+ extension, which is not built"):
        xf.rank1_linear(*good(), 1.0, backend="cuda")
    monkeypatch.setattr(backend_mod, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        xf.rank1_linear(*good(), 1.0, backend="triton")


def test_auto_backend_picks_torch_for_cpu_tensors():
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == "torch"


MERGE_CASES = [
    ("a length", lambda w, a, b: (w, a[:-1], b), ValueError, "a must be"),
    ("b length", lambda w, a, b: (w, a, b[1:]), ValueError, "b must be"),
    ("weight 1-D", lambda w, a, b: (w[0], a, b), ValueError, "weight must be 2-D"),
    ("int weight", lambda w, a, b: (w.int(), a, b), TypeError, "weight has dtype torch.int32"),
    ("mixed devices", lambda w, a, b: (w, a, b.to("meta")), ValueError, "b on meta"),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_rejects_bad_input(case, no_kernels):
    _, mutate, exc, fragment = case
    _, w, _, a, b = good()
    with pytest.raises(exc, match=fragment):
        xf.merge_(*mutate(w, a, b), 1.0)


def test_merge_rejects_unknown_rounding(no_kernels):
    _, w, _, a, b = good()
    with pytest.raises(ValueError, match="rounding must be one of"):
        xf.merge_(w, a, b, 1.0, rounding="up")
