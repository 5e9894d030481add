"""Counter-based random bits and stochastic rounding, identical on every backend.

The bits for element ``idx`` of a tensor depend only on ``(seed, idx)``, so every data-parallel
rank that merges with the same seed writes bit-identical weights, and the PyTorch reference
(``xgblora_fast.ops.reference.counter_hash``) reproduces them exactly.

Hash: Chris Wellons' ``lowbias32`` (a bijection on 32-bit words), applied as
``h = lowbias32(lo ^ lowbias32(lowbias32(seed) + hi))`` with ``lo``/``hi`` the 32-bit halves of
the int64 element index.
"""

import triton
import triton.language as tl


@triton.jit
def lowbias32(x):
    """32-bit integer hash; ``x`` is uint32, wraps modulo 2**32."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def counter_hash(seed, idx):
    """uint32 random bits for int64 element indices ``idx`` under a 31-bit ``seed``."""
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    key = lowbias32(seed.to(tl.uint32))
    return lowbias32(lo ^ lowbias32(key + hi))


@triton.jit
def to_float32_exact(x):
    """``x`` (fp32/fp16/bf16) widened to fp32; bf16 through its bits, exact on every target.

    The Triton interpreter widens bf16 values in fp32's subnormal range wrongly; shifting the
    16 bits into the top half of an fp32 word is the exact widening everywhere.
    """
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_nearest(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded to nearest-even in ``DTYPE`` (finite inputs).

    bf16 uses integer arithmetic on the fp32 bits (exact, and the same on every target: the
    Triton interpreter truncates fp32 -> bf16 casts instead of rounding them).
    """
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


@triton.jit
def round_toward_zero(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded toward zero to fp16/bf16 (past the largest finite: to it).

    Built from integer ops and a round-to-nearest cast, which behave identically in the
    interpreter and on GPUs (the interpreter's own rtz cast overflows to NaN).
    """
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        nearest = value.to(DTYPE)
        overshoot = tl.abs(to_float32_exact(nearest)) > tl.abs(value)
        stepped = (nearest.to(tl.int16, bitcast=True) - 1).to(DTYPE, bitcast=True)
        return tl.where(overshoot, stepped, nearest)


@triton.jit
def round_stochastic(value, bits, DTYPE: tl.constexpr):
    """Round fp32 ``value`` to ``DTYPE`` (fp16/bf16) up or down with probability by distance.

    ``t`` is ``value`` rounded toward zero and ``n`` the next representable number away from
    zero; ``n`` is chosen when ``|value - t| > u * |n - t|`` with ``u = bits[31:8] / 2**24``.
    Both differences are exact in fp32, so the decision is exact on every backend. A value past
    the largest finite number rounds to it (``n`` is inf then and never chosen).
    """
    t = round_toward_zero(value, DTYPE)
    n = (t.to(tl.int16, bitcast=True) + 1).to(DTYPE, bitcast=True)
    t32 = to_float32_exact(t)
    gap = tl.abs(to_float32_exact(n) - t32)
    u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    go_up = tl.abs(value - t32) > u * gap
    return tl.where(go_up, n, t)
