"""``FastRank1Linear``: a drop-in ``nn.Linear`` with a rank-1 booster, merge and re-init."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from xgblora_fast.ops.checks import MergeStats, check_backend, check_scale
from xgblora_fast.ops.merge import merge_, merge_with_bound_
from xgblora_fast.ops.rank1_linear import rank1_linear

INITS = ("kaiming", "gaussian")


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows of t held here, global index of the first)``: ``(t, 0)`` for a plain tensor.

    A DTensor must be sharded by rows (``Shard(0)``) on a 1-D mesh, as FSDP2's ``fully_shard``
    keeps parameters: torch.chunk-style blocks, the last ones shorter or empty when the rows do
    not divide evenly. The local tensor aliases the shard, so writing it updates the parameter.
    """
    if not is_dtensor(t):
        return t, 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(
            f"FastRank1Linear merges DTensors sharded by rows on a 1-D mesh (FSDP2's "
            f"fully_shard: placements (Shard(dim=0),)); got placements {tuple(t.placements)} "
            f"on a {t.device_mesh.ndim}-D mesh"
        )
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape):
        raise NotImplementedError(
            f"local shard of shape {tuple(local.shape)} is not the torch.chunk block "
            f"{tuple(shape)} of the global shape {tuple(t.shape)}"
        )
    return local, offset[0]


class FastRank1Linear(nn.Module):
    """``y = x W^T + bias + s (dropout(x) . a) b^T`` with ``W``/``bias`` frozen.

    Parameters: ``weight [out, in]`` and ``bias [out]`` (the frozen base: construction and
    ``from_linear`` set ``weight.requires_grad = False`` and ``bias.requires_grad = False``; set
    back to True, the optimizer would train the whole ``W`` too, and ``Booster`` warns),
    ``lora_a [in]`` (Kaiming-uniform as peft's ``lora_A``) and ``lora_b [out]`` (zeros, so a
    fresh booster changes nothing). ``scale = alpha`` (peft's ``lora_alpha / r`` with ``r = 1``).

    ``merge_(rounding, seed, step)`` folds the booster into ``W`` in place and re-initialises it;
    ``reset_()`` re-inits in place, keeping the same Parameter objects (optimizers, DDP, FSDP and
    torch.compile keep their references); ``merge_vectors_(a, b, step)`` adds any ``s b a^T``
    (the boosting strategies' merges: keep part of the booster, move it to a new ``a``). With
    ``active = False`` the layer runs the plain GEMM and its booster gets no gradient.

    ``merge_(rounding="kahan")`` allocates, on first use, the buffer ``compensation`` (W's shape,
    dtype and strides, zeros) that carries what each merge's rounding dropped into the next one.
    It is a persistent buffer (checkpoints keep it; ``load_state_dict`` allocates or drops it to
    match the state loaded) and is ``None`` until then; ``to_linear()`` folds it into the plain
    layer's weight, which carries no buffer. Under DDP it is identical on every rank (merges are
    deterministic): ``broadcast_buffers=False`` spares its copy at every forward.

    FSDP2 (``fully_shard``, parameters sharded by rows on a 1-D mesh): merges and ``reset_`` work
    on each rank's row block and write the bits a single-process run writes (stochastic rounding
    draws the bits of the global element index; with the same seeded generator every rank draws
    the same whole ``a``).
    ``rounding="kahan"``, ``merged_weight`` and ``to_linear`` need unsharded weights.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        alpha: the scale ``s``.
        dropout: dropout probability on the adapter's input (base path untouched).
        dtype, device: of the base weight.
        adapter_dtype: of ``lora_a``/``lora_b``; default fp32 (as peft keeps adapters).
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
        init: how ``reset_`` draws ``a``: ``"kaiming"`` (uniform, bound 1/sqrt(in), peft's
            ``lora_A`` init) or ``"gaussian"`` (normal, std 1/sqrt(in)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        alpha: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = torch.float32,
        backend: str = "auto",
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self._init_from(base.weight, base.bias, alpha, dropout, adapter_dtype, backend, init)

    def _init_from(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        alpha: float,
        dropout: float,
        adapter_dtype: torch.dtype | None,
        backend: str,
        init: str,
    ) -> None:
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise TypeError(
                f"FastRank1Linear needs a 2-D weight [out, in] (nn.Linear), got shape {shape}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        adapter_dtype = adapter_dtype or weight.dtype
        kw = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_a = nn.Parameter(torch.empty(self.in_features, **kw))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, **kw))
        self.alpha = check_scale(alpha)
        self.dropout = dropout
        self.backend = check_backend(backend)
        self.init = init
        self.active = True
        # W-sized: allocated by the first Kahan merge only (see merge_).
        self.register_buffer("compensation", None)
        # (weight._version, weight.data_ptr(), bound >= max|W|) after this layer's last merge:
        # while W is unwritten since, the next merge's safety check needs no pass over W.
        self._weight_bound: tuple[int, int, float] | None = None
        self.reset_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        alpha: float = 1.0,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = torch.float32,
        backend: str = "auto",
        init: str = "kaiming",
    ) -> FastRank1Linear:
        """Wrap ``linear``: the same ``weight``/``bias`` Parameter objects, frozen, no copy.

        ``linear`` must be an ``nn.Linear`` (or a subclass) with a 2-D weight ``[out, in]``;
        anything else (``nn.Conv2d``, ``nn.Embedding``, ...) is a TypeError. GPT-2's ``Conv1D``
        goes through ``xf.inject``, which wraps its ``[in, out]`` weight as a transposed view.
        """
        if not isinstance(linear, nn.Linear) or getattr(linear.weight, "ndim", None) != 2:
            raise TypeError(
                "FastRank1Linear.from_linear supports nn.Linear (2-D weight [out, in]; GPT-2 "
                f"Conv1D through xf.inject), got {type(linear).__name__}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear.weight, linear.bias, alpha, dropout, adapter_dtype, backend, init)
        return layer

    @property
    def scale(self) -> float:
        """The ``s`` in ``y = x W^T + bias + s (x.a) b^T``."""
        return self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return F.linear(x, self.weight, self.bias)
        return rank1_linear(
            x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.alpha,
            backend=self.backend,
            dropout=self.dropout,
            training=self.training,
        )

    @torch.no_grad()
    def reset_(
        self, generator: torch.Generator | None = None, a: torch.Tensor | None = None
    ) -> None:
        """Re-initialise the booster in place: ``a`` random (see ``init``), ``b = 0``.

        The Kaiming bound 1/sqrt(in) matches peft's ``kaiming_uniform_(lora_A, a=sqrt(5))`` for
        ``r = 1``. Pass a seeded ``generator`` to draw the same ``a`` on every rank, or the next
        ``a [in]`` itself (a strategy's draw; nothing is drawn then). With ``a`` sharded (FSDP2)
        each rank takes its block of the whole ``[in]`` vector: the shards together are the
        single-process draw, and every generator advances alike.
        """
        whole = self.draw_a(generator) if a is None else a
        local_a, start = local_rows(self.lora_a)
        local_a.copy_(whole[start : start + local_a.shape[0]])
        self.lora_b.zero_()

    @torch.no_grad()
    def draw_a(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random ``a``: ``[in]``, in ``lora_a``'s dtype and device (the whole vector,
        also when ``a`` is sharded); ``init`` picks the distribution.

        A ``generator`` on another device than ``a`` (the ``Booster``'s CPU generator for a model
        on a GPU) draws where it lives and the vector is copied over: the same ``a`` on every
        device and every rank."""
        device = self.lora_a.device if generator is None else generator.device
        a = torch.empty(self.in_features, dtype=self.lora_a.dtype, device=device)
        width = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        if self.init == "kaiming":
            a.uniform_(-width, width, generator=generator)
        else:
            a.normal_(0.0, width, generator=generator)
        return a.to(self.lora_a.device)

    @torch.no_grad()
    def booster_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [in], b [out])``: the booster's whole vectors (gathered when FSDP2 shards them)."""
        a, b = self.lora_a, self.lora_b
        return (a.full_tensor() if is_dtensor(a) else a, b.full_tensor() if is_dtensor(b) else b)

    def _merge_operands(
        self, a: torch.Tensor, b: torch.Tensor, rounding: str
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(W rows held here, b rows, first row)`` of a merge of ``b a^T``, after its checks."""
        if a.shape != (self.in_features,) or b.shape != (self.out_features,):
            raise ValueError(
                f"merge vectors must be a [{self.in_features}] and b [{self.out_features}], got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if rounding == "kahan" and is_dtensor(self.weight):  # refused before any all-gather
            raise NotImplementedError(
                "rounding='kahan' on an FSDP2-sharded weight: the compensation buffer is not "
                "sharded with it; use 'stochastic' or 'nearest'"
            )
        if not is_dtensor(self.weight):
            return self.weight, b, 0
        weight, start = local_rows(self.weight)
        return weight, b[start : start + weight.shape[0]], start

    @torch.no_grad()
    def merge_stats_request(
        self, a: torch.Tensor, b: torch.Tensor, step: float = 1.0, rounding: str = "nearest"
    ) -> tuple[list[torch.Tensor], Callable[[list[float]], MergeStats]]:
        """``(tensors, finish)`` for ``merge_vectors_(a, b, step, rounding)``: the device tensors
        its safety check reads (no host read here) and ``finish(values)``, which turns their
        values (``checks.host_values(*tensors)``, batched with other layers' as the caller likes)
        into the ``stats`` to pass to it. ``max |W|`` is measured only where the bound left by
        the last merge is not known."""
        weight, b, _ = self._merge_operands(a, b, rounding)
        compensation = self.compensation if rounding == "kahan" else None
        read_weight = self._known_weight_bound() is None
        tensors = MergeStats.tensors(weight, a, b, compensation, read_weight)
        version = (weight._version, weight.data_ptr())

        def finish(values: list[float]) -> MergeStats:
            stats = MergeStats.from_values(values, weight, compensation, read_weight)
            # A first Kahan merge allocates its buffer as zeros.
            c_max = 0.0 if rounding == "kahan" and compensation is None else stats.c_max
            return dataclasses.replace(stats, c_max=c_max, weight_version=version)

        return tensors, finish

    @torch.no_grad()
    def merge_vectors_(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        step: float = 1.0,
        rounding: str = "nearest",
        seed: int | None = None,
        stats: MergeStats | None = None,
    ) -> None:
        """``W += step * s * b a^T`` in place for whole vectors ``a [in]``, ``b [out]``; the
        booster is not touched. What ``merge_`` and the boosting strategies build on.

        ``rounding="kahan"`` allocates the ``compensation`` buffer on first use (zeros). The
        safety check reads a few values from the device (one transfer); ``stats``, from
        ``merge_stats_request`` with the same arguments (nothing written since but other layers'
        weights), spares it that transfer, so that a round's merges can share one.

        FSDP2-sharded ``W`` (a DTensor, rows sharded on a 1-D mesh): every rank must call this
        with the same vectors and ``seed``, as ``Booster`` does. Each merges its own rows with its
        global row offset, so the gathered ``W`` is bit for bit the single-process merge. Kahan is
        refused there (NotImplementedError): FSDP2 does not shard the W-sized buffer.
        """
        weight, b, start = self._merge_operands(a, b, rounding)
        version = (weight._version, weight.data_ptr())
        if stats is not None and stats.w_max is not None and stats.weight_version != version:
            stats = dataclasses.replace(stats, w_max=None)  # W written since: measure again
        if rounding == "kahan" and self.compensation is None:
            self.compensation = torch.zeros_like(self.weight)
        compensation = self.compensation if rounding == "kahan" else None
        bound = merge_with_bound_(
            weight,
            a,
            b,
            step * self.alpha,
            rounding,
            seed,
            self.backend,
            compensation,
            start,
            self._known_weight_bound(),
            stats,
        )
        # Every write to W outside merges (optimizer, load_state_dict, copy_) bumps its version
        # counter and so drops the bound; writes through ``weight.data`` do not: call
        # ``forget_weight_bound()`` after those. Shards (FSDP2) always check in full.
        tracked = bound is not None and not is_dtensor(self.weight)
        self._weight_bound = (
            (self.weight._version, self.weight.data_ptr(), bound) if tracked else None
        )

    @torch.no_grad()
    def merge_(self, rounding: str = "nearest", seed: int | None = None, step: float = 1.0) -> None:
        """Merge the booster, ``W += step * s * b a^T`` in place (no temporary of W's size), then
        ``reset_()``: with ``step=1`` the layer computes what it did, from a fresh booster.

        ``rounding``: ``"nearest"``, ``"stochastic"`` (bits seeded by ``seed``) or ``"kahan"``
        (see ``merge_vectors_``); fp32 weights always round to nearest. A merge that would write
        NaN/Inf raises and leaves ``W`` and the booster untouched. ``Booster`` merges through
        the strategy of its ``booster_init`` instead (``boosting/strategies.py``).
        """
        self.merge_vectors_(*self.booster_vectors(), step, rounding, seed)
        self.reset_()

    def _known_weight_bound(self) -> float | None:
        """The bound on ``max |W|`` left by the last merge, if ``W`` is unwritten since."""
        known = self._weight_bound
        if known is None or is_dtensor(self.weight):
            return None
        version, ptr, bound = known
        if (version, ptr) != (self.weight._version, self.weight.data_ptr()):
            return None
        return bound

    def forget_weight_bound(self) -> None:
        """Make the next merge check ``W`` in full (after writing it through ``weight.data``)."""
        self._weight_bound = None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A copy of ``W + s b a^T (+ compensation)`` in W's dtype, rounded once to nearest.

        The layer is unchanged; with a Kahan buffer the result holds what earlier merges'
        rounding dropped too (a Kahan merge of copies). Not for FSDP2-sharded weights: merge in
        place and gather ``weight.full_tensor()`` instead.
        """
        if is_dtensor(self.weight):
            raise NotImplementedError(
                "merged_weight()/to_linear() build the whole W: on an FSDP2-sharded layer call "
                "merge_() and gather weight.full_tensor()"
            )
        weight = self.weight.detach().clone()
        compensation = None if self.compensation is None else self.compensation.clone()
        rounding = "nearest" if compensation is None else "kahan"
        merge_(
            weight, self.lora_a, self.lora_b, self.alpha, rounding, None, self.backend, compensation
        )
        return weight

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (this layer is left unchanged)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight.copy_(self.merged_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The Kahan buffer exists only after a first Kahan merge: allocate it (or drop it) so that
        # the layer's state becomes the one loaded, and strict loading sees the keys it expects.
        key = prefix + "compensation"
        if key in state_dict and self.compensation is None:
            self.compensation = torch.zeros_like(self.weight)
        elif key not in state_dict and self.compensation is not None:
            self.compensation = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, alpha={self.alpha}, dropout={self.dropout}, "
            f"active={self.active}, backend={self.backend!r}, init={self.init!r}"
        )
