"""Argument validation shared by every op: clear errors before any kernel runs.

Only metadata is inspected on the hot path (shapes, dtypes, devices), so the checks are free
and work on fake tensors under ``torch.compile``. The merge additionally checks the values of
its small vectors, because a merge must never write NaN/Inf into a weight.
"""

from __future__ import annotations

import dataclasses
import math

import torch

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "cuda", "torch")
ROUNDINGS = ("nearest", "stochastic", "kahan")


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {names}")


def _check_vector(name: str, t: torch.Tensor, length: int, what: str) -> None:
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name} must be a vector of length {length} ({what}), got shape {tuple(t.shape)}"
        )


def _check_same_device(tensors: dict[str, torch.Tensor | None]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def check_scale(scale: object) -> float:
    """The scale ``s`` as a finite Python float.

    While ``torch.compile`` traces, a layer's float may arrive as a symbolic float whose value
    cannot be inspected; it was checked when the layer was built, so it passes through.
    """
    if torch.compiler.is_compiling():
        return scale  # type: ignore[return-value]
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python number, not a tensor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_rank1_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: object,
) -> float:
    """Validate ``rank1_linear`` inputs; return the scale as a float.

    ``x [..., K]`` and ``weight [M, K]`` share a dtype (fp32/fp16/bf16); ``a [K]``, ``b [M]`` are
    fp32 or ``weight``'s dtype; ``bias [M]`` is ``weight``'s dtype or fp32; one device.
    """
    for name, t in (("x", x), ("weight", weight), ("a", a), ("b", b)):
        _check_tensor(name, t)
    if bias is not None:
        _check_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {weight.dim()}-D")
    M, K = weight.shape
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    if x.shape[-1] != K:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects "
            f"in_features={K} (weight shape {tuple(weight.shape)})"
        )
    if K == 0:
        raise ValueError(f"weight has in_features=0 (shape {tuple(weight.shape)}); need >= 1")
    _check_vector("a", a, K, "in_features")
    _check_vector("b", b, M, "out_features")
    if bias is not None:
        _check_vector("bias", bias, M, "out_features")
    _check_float_dtype("weight", weight, WEIGHT_DTYPES)
    _check_float_dtype("x", x, WEIGHT_DTYPES)
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    adapter_dtypes = tuple(dict.fromkeys((torch.float32, weight.dtype)))
    _check_float_dtype("a", a, adapter_dtypes)
    _check_float_dtype("b", b, adapter_dtypes)
    if bias is not None:
        _check_float_dtype("bias", bias, adapter_dtypes)
    _check_same_device({"x": x, "weight": weight, "bias": bias, "a": a, "b": b})
    return check_scale(scale)


def check_compensation(
    weight: torch.Tensor, compensation: torch.Tensor | None, rounding: str
) -> None:
    """``compensation`` is given exactly when ``rounding == "kahan"``, shaped and typed as W.

    The buffer carries what rounding dropped from one merge into the next, element by element,
    so it must match ``weight``'s shape, dtype and device (any strides), and must not overlap
    ``weight`` or itself (both are written in place).
    """
    if rounding != "kahan":
        if compensation is not None:
            raise ValueError(f"compensation is used by rounding='kahan' only, got {rounding!r}")
        return
    if compensation is None:
        raise ValueError(
            "rounding='kahan' needs a compensation buffer kept between merges: "
            "compensation=torch.zeros_like(weight)"
        )
    _check_tensor("compensation", compensation)
    if compensation.shape != weight.shape:
        raise ValueError(
            f"compensation has shape {tuple(compensation.shape)}, weight "
            f"{tuple(weight.shape)}; they must match"
        )
    if compensation.dtype != weight.dtype:
        raise TypeError(
            f"compensation has dtype {compensation.dtype} but weight has {weight.dtype}; "
            "they must match"
        )
    _check_same_device({"weight": weight, "compensation": compensation})
    if compensation.numel() == 0 or compensation.device.type == "meta":
        return
    if torch._debug_has_internal_overlap(compensation) == 1:
        raise ValueError("compensation has overlapping memory (e.g. an expand()ed view)")
    if compensation.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        raise ValueError("compensation must not share memory with weight")


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of ``tensors`` (any shapes, flattened, in order) as Python floats.

    Every host read of the merge and round-end path goes through here: the tensors are
    concatenated on their device (type promotion keeps every value exact) and copied with one
    ``tolist()``, so a device costs one synchronisation whatever the number of values.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    values: list[list[float]] = [[] for _ in tensors]
    for indices in by_device.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices]).tolist()
        start = 0
        for i in indices:
            stop = start + tensors[i].numel()
            values[i] = flat[start:stop]
            start = stop
    return [float(v) for chunk in values for v in chunk]


def abs_max_tensor(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a 0-d tensor on ``t``'s device (NaN if ``t`` holds a NaN, inf if an inf).

    ``aminmax`` rather than an inf-norm: on CPU it is vectorised (0.04 ms for a 768 x 768 fp32
    W, where ``linalg.vector_norm(ord=inf)`` and ``isfinite().all()`` take 0.8 ms).
    """
    if t.numel() == 0:
        return t.new_zeros(())
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi)  # propagates NaN


def abs_max(t: torch.Tensor) -> float:
    """``max |t|`` as a float (NaN if ``t`` holds a NaN, inf if an inf), one reduction pass."""
    return host_values(abs_max_tensor(t))[0]


@dataclasses.dataclass(frozen=True)
class MergeStats:
    """The values a merge's safety check reads, read beforehand (e.g. for many merges at once).

    ``a_max``, ``b_max``: ``max |a|``, ``max |b|`` of the vectors merged; ``c_max``: ``max |C|`` of
    the Kahan buffer (None: not measured); ``w_max``: ``max |W|`` (None: not measured; the check
    then reads it itself when it needs it). They must describe the tensors as they are at the
    merge: ``check_merge_args`` trusts them. ``weight_version``: for the caller, e.g.
    ``(W._version, W.data_ptr())`` when measured, to drop a ``w_max`` that a write made stale.
    """

    a_max: float
    b_max: float
    c_max: float | None = None
    w_max: float | None = None
    weight_version: tuple[int, int] | None = None

    @staticmethod
    def tensors(
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        compensation: torch.Tensor | None = None,
        read_weight: bool = True,
    ) -> list[torch.Tensor]:
        """0-d device tensors ``[a_max, b_max, (c_max), (w_max)]`` (none for an empty ``W``: its
        merge reads nothing); no host read."""
        if weight.numel() == 0:
            return []
        out = [abs_max_tensor(a), abs_max_tensor(b)]
        if compensation is not None:
            out.append(abs_max_tensor(compensation))
        if read_weight:
            out.append(abs_max_tensor(weight))
        return out

    @classmethod
    def from_values(
        cls,
        values: list[float],
        weight: torch.Tensor,
        compensation: torch.Tensor | None = None,
        read_weight: bool = True,
    ) -> MergeStats:
        """The stats from ``host_values(*MergeStats.tensors(...))`` (same arguments)."""
        if weight.numel() == 0:
            return cls(
                0.0, 0.0, None if compensation is None else 0.0, 0.0 if read_weight else None
            )
        values = list(values)
        c_max = values[2] if compensation is not None else None
        w_max = values[-1] if read_weight else None
        return cls(values[0], values[1], c_max, w_max)

    @classmethod
    def read(
        cls,
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        compensation: torch.Tensor | None = None,
        read_weight: bool = True,
    ) -> MergeStats:
        """Measure the stats: one host read."""
        values = host_values(*cls.tensors(weight, a, b, compensation, read_weight))
        return cls.from_values(values, weight, compensation, read_weight)


def check_merge_args(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: object,
    rounding: object,
    compensation: torch.Tensor | None = None,
    row_offset: object = 0,
    weight_abs_max: object = None,
    stats: MergeStats | None = None,
) -> tuple[float, float | None]:
    """Validate ``merge_`` inputs, values included; return ``(scale, bound)``.

    ``scale`` is the scale as a float; ``bound`` is an upper bound on ``max |W|`` after the merge
    (``max |W| + |s| max|b| max|a| (+ max|C|)``; None when a zero update left ``W`` unread), for
    the caller to pass back as ``weight_abs_max`` at its next merge of the same, otherwise
    unwritten, ``W``.

    ``row_offset`` (W's first global row) must be an int >= 0 with every global element index
    ``(row_offset + i) * K + j`` inside int64, the kernels' index type.

    Raises before anything is written when the update ``s * b a^T`` (plus the compensation
    for ``rounding="kahan"``) would be NaN/Inf, or would push ``weight`` past its dtype's largest
    finite value. Costs one reduction pass over ``W`` (``max |W|``), and one over the
    compensation buffer; the exact element-wise check runs only when that bound is not enough.
    ``weight_abs_max``, a finite float the caller guarantees to be ``>= max |W|`` (so ``W`` holds
    no NaN/Inf), replaces the pass over ``W`` whenever it proves the merge safe.

    ``max |a|``, ``max |b|`` and ``max |C|`` are read in one host read (``host_values``),
    ``max |W|`` in one more when it is needed (``abs_max``). ``stats`` (``MergeStats``, measured
    on these tensors as they are now) replaces the first read and, with a ``w_max``, the second,
    so that many merges can share one read. The verdict and the bound are the same either way.
    """
    for name, t in (("weight", weight), ("a", a), ("b", b)):
        _check_tensor(name, t)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {weight.dim()}-D")
    M, K = weight.shape
    _check_vector("a", a, K, "in_features")
    _check_vector("b", b, M, "out_features")
    _check_float_dtype("weight", weight, WEIGHT_DTYPES)
    adapter_dtypes = tuple(dict.fromkeys((torch.float32, weight.dtype)))
    _check_float_dtype("a", a, adapter_dtypes)
    _check_float_dtype("b", b, adapter_dtypes)
    _check_same_device({"weight": weight, "a": a, "b": b})
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    check_compensation(weight, compensation, rounding)
    if not isinstance(row_offset, int) or isinstance(row_offset, bool):
        raise TypeError(f"row_offset must be an int, got {type(row_offset).__name__}")
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    if (row_offset + M) * K > 2**63 - 1:
        raise ValueError(f"row_offset={row_offset}: global element indices overflow int64")
    s = check_scale(scale)
    if weight_abs_max is not None:
        if not isinstance(weight_abs_max, (int, float)) or isinstance(weight_abs_max, bool):
            raise TypeError(
                f"weight_abs_max must be a float or None, got {type(weight_abs_max).__name__}"
            )
        if not 0 <= weight_abs_max < math.inf:
            raise ValueError(f"weight_abs_max must be finite and >= 0, got {weight_abs_max}")
        hint = float(weight_abs_max)
    if weight.numel() == 0:
        return s, 0.0
    if weight.device.type == "meta":
        raise ValueError("merge_ needs real tensors, got meta tensors (it reads a, b and W)")
    if torch._debug_has_internal_overlap(weight) == 1:
        raise ValueError(
            "weight has overlapping memory (e.g. an expand()ed view): an in-place merge would "
            "write one element through several indices; clone() it first"
        )
    kept = "weight left unchanged" if compensation is None else "weight and compensation unchanged"
    if stats is None:
        stats = MergeStats.read(weight, a, b, compensation, read_weight=False)
    a_max, b_max = stats.a_max, stats.b_max
    for name, value in (("a", a_max), ("b", b_max)):
        if not math.isfinite(value):
            raise ValueError(f"merge refused: {name} contains NaN/Inf; {kept}")
    bound = abs(s) * a_max * b_max
    if not math.isfinite(bound):
        raise ValueError(f"merge refused: s * b a^T overflows; {kept}")
    if compensation is not None:  # a Kahan merge adds the buffer too, even with a zero update
        c_max = stats.c_max if stats.c_max is not None else abs_max(compensation)
        if not math.isfinite(c_max):
            raise ValueError(f"merge refused: compensation contains NaN/Inf; {kept}")
        bound += c_max
    limit = torch.finfo(weight.dtype).max
    if weight_abs_max is not None and hint + bound <= limit:
        return s, hint + bound  # the caller's bound proves it: no pass over W
    if bound == 0.0:
        return s, (None if weight_abs_max is None else hint)  # W unread: no bound known
    # One reduction pass over W (no temporary): |W + s b a^T + C| <= |W|max + bound.
    w_max = stats.w_max if stats.w_max is not None else abs_max(weight)
    if not math.isfinite(w_max):
        raise ValueError(f"merge refused: weight already contains NaN/Inf; {kept}")
    if w_max + bound > limit:
        exact = _merged_abs_max(weight, a, b, s, compensation)
        if exact > limit:
            raise ValueError(
                f"merge refused: W + s b a^T would overflow {weight.dtype} (largest finite "
                f"{limit:.4g}); {kept}"
            )
        return s, exact
    return s, w_max + bound


def _merged_abs_max(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: float,
    compensation: torch.Tensor | None,
) -> float:
    """Exact ``max |W + s b a^T (+ C)|`` in float64, in row chunks (near-overflow merges only)."""
    rows = max(1, (1 << 20) // max(weight.shape[1], 1))
    a64 = a.detach().double()
    sb = s * b.detach().double()
    maxima = []
    for r0 in range(0, weight.shape[0], rows):
        chunk = weight[r0 : r0 + rows].double() + sb[r0 : r0 + rows, None] * a64[None, :]
        if compensation is not None:
            chunk += compensation[r0 : r0 + rows].double()
        maxima.append(chunk.abs().max())
    worst = 0.0
    for value in host_values(*maxima):
        worst = max(worst, value)
    return worst
