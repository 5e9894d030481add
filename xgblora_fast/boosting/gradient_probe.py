"""What a layer's weight gradient looks like, without ever forming it.

The gradient of a linear layer's weight is ``G = dy^T x`` (``[M, K]``) for input ``x [N, K]``
and output gradient ``dy [N, M]``. Boosting fits each weak learner to the negative gradient, so
two things about ``G`` steer the rounds:

- its top singular pair ``(u1, s1, v1)``: a rank-1 booster whose ``a`` is ``v1`` takes its first
  step along the best rank-1 descent direction (``Booster`` with ``booster_init="gradient"``);
- its Frobenius norm: which layers need a booster most (``select="gradient"``).

Both come from matrix-vector products over the saved activations: ``G v = dy^T (x v)`` and
``G^T u = x^T (dy u)``, a few GEMVs per layer and never an ``M x K`` temporary. The transposed
products ``x^T t`` use the Triton column-sum kernel on the Triton backend (fp32 accumulation,
no upcast copy of bf16 activations), the PyTorch path elsewhere.

``GradientProbe`` captures ``(x, dy)`` (or a sketch of them) with module hooks during one
training step; under data parallelism every product is all-reduced, so each rank computes the
same vectors from the global (averaged) gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from xgblora_fast.ops.autocast import autocast_off
from xgblora_fast.ops.backend import resolve_backend
from xgblora_fast.ops.checks import host_values

SKETCH_PROBES = 4  # random directions per layer for the norm estimate (relative sd ~ 1/sqrt(8))


def _rowdot(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x v`` as fp32 ``[N]`` for ``x [N, K]`` (any float dtype) and fp32 ``v [K]``."""
    if x.dtype == torch.float32:
        return x @ v
    return (x @ v.to(x.dtype)).float()


def _colsum(x: torch.Tensor, t: torch.Tensor, backend: str) -> torch.Tensor:
    """``x^T t`` as fp32 ``[K]`` for ``x [N, K]`` and fp32 ``t [N]``."""
    if resolve_backend(backend, x.device) == "triton":
        from xgblora_fast.kernels.rank1_reduce import weighted_colsum_triton

        return weighted_colsum_triton(x, t, with_colsum=False)[0]
    return (x.t() @ t) if x.dtype == torch.float32 else (x.float().t() @ t)


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average over data-parallel ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class LayerGradient:
    """``G = mean over ranks of sum_i dy_i^T x_i`` as an operator; nothing ``M x K`` is formed.

    Args:
        pairs: ``(x_i [N_i, K], dy_i [N_i, M])`` of one step (several with gradient accumulation).
        backend: the layer's backend (``"triton"`` uses the Triton column-sum kernel).
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], backend: str = "auto"):
        if not pairs:
            raise ValueError("LayerGradient needs at least one (x, dy) pair")
        self.pairs = pairs
        self.backend = backend

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v``: fp32 ``[M]`` for fp32 ``v [K]``."""
        with autocast_off(v.device):
            out = sum(_colsum(dy, _rowdot(x, v), self.backend) for x, dy in self.pairs)
        return _mean_over_ranks(out)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``G^T u``: fp32 ``[K]`` for fp32 ``u [M]``."""
        with autocast_off(u.device):
            out = sum(_colsum(x, _rowdot(dy, u), self.backend) for x, dy in self.pairs)
        return _mean_over_ranks(out)


def top_singular_pair(
    gradient: LayerGradient,
    start: torch.Tensor,
    iters: int,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Power iteration on ``G^T G``: ``(sigma1, u1 [M], v1 [K])``, fp32, unit vectors.

    ``start`` (``[K]``, any nonzero vector) fixes the sign: ``v1 . start > 0`` always holds,
    since every iterate is ``(G^T G)^k start`` up to a positive factor. Each iteration costs
    two passes over ``x`` and two over ``dy``. Returns zeros when ``G`` is zero. ``project``
    (an orthogonal projection, e.g. onto the complement of merged directions) restricts ``v``
    to its range: the top pair of ``G P`` (every iterate projected).
    """
    project = project or (lambda v: v)
    v = project(start.detach().float())
    v = v / v.norm().clamp_min(1e-30)
    for _ in range(iters):
        u = gradient.matvec(v)
        u = u / u.norm().clamp_min(1e-30)
        v = project(gradient.rmatvec(u))
        v = v / v.norm().clamp_min(1e-30)
    u = gradient.matvec(v)
    sigma = float(u.norm())
    return sigma, (u / sigma if sigma > 0 else u), v


def _input_requires_grad(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if torch.is_grad_enabled() and not x.requires_grad and x.is_floating_point():
        return (x.detach().requires_grad_(), *args[1:])
    return None


class GradientProbe:
    """Captures what ``LayerGradient`` needs from the next training step(s), via hooks.

    Args:
        layers: ``{name: module}`` (``nn.Linear``-like: ``in_features``, ``out_features``).
        sketch: None to keep ``(x, dy)`` pairs (references to tensors autograd holds anyway for
            active rank-1 layers), or a generator: then only ``g = dy^T (x Omega)`` is kept for
            ``SKETCH_PROBES`` Gaussian directions ``Omega`` drawn from it (``N x 4`` floats during
            the step), enough to estimate ``|G|_F^2 = E |G omega|^2``. The sketched step makes
            the layers' inputs require grad, so its backward reaches layers below the trainable
            ones (once per round).

    Forwards without gradient (evaluation) are ignored. Call ``remove()`` when done.
    """

    def __init__(self, layers: dict[str, nn.Module], sketch: torch.Generator | None = None):
        self.pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}
        self.sketches: dict[str, torch.Tensor] = {}
        self._omega: dict[str, torch.Tensor] = {}
        if sketch is not None:
            for name, layer in layers.items():
                omega = torch.randn(layer.in_features, SKETCH_PROBES, generator=sketch)
                self._omega[name] = omega.to(layer.weight.device)
        self._handles = [
            layer.register_forward_hook(self._forward_hook(name)) for name, layer in layers.items()
        ]
        if sketch is not None:
            # Layers below every trainable parameter get no output gradient at all; for the
            # sketched step, let the backward reach them.
            self._handles += [
                layer.register_forward_pre_hook(_input_requires_grad) for layer in layers.values()
            ]

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach().reshape(-1, module.in_features)
            if name in self._omega:
                # Only N x 4 floats survive until the backward, not x. fp32 under autocast too.
                with autocast_off(x.device):
                    xo = x.float() @ self._omega[name]
                output.register_hook(lambda dy: self._add_sketch(name, module, xo, dy))
            else:
                output.register_hook(lambda dy: self._add_pair(name, module, x, dy))

        return hook

    def _add_pair(self, name: str, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.pairs[name].append((x, dy.detach().reshape(-1, module.out_features)))

    @torch.no_grad()
    def _add_sketch(self, name: str, module: nn.Module, xo: torch.Tensor, dy: torch.Tensor):
        with autocast_off(dy.device):  # a backward run under autocast must not recast it
            g = dy.detach().reshape(-1, module.out_features).float().t() @ xo  # [M, probes]
        self.sketches[name] = self.sketches[name] + g if name in self.sketches else g

    @property
    def captured(self) -> bool:
        """True once a backward pass has reached every probed layer."""
        if self._omega:
            return len(self.sketches) == len(self._omega)
        return all(self.pairs.values())

    def squared_norm_tensors(self) -> dict[str, torch.Tensor]:
        """Estimates of ``|G|_F^2`` per layer (averaged over ranks) from the sketches, as 0-d
        tensors on the device (no host read: a round end reads them with its other values)."""
        names = list(self.sketches)
        # |mean_r G_r omega|^2 needs the averaged vectors, not the ranks' norms: one collective
        # over every layer's G Omega.
        flat = _mean_over_ranks(torch.cat([self.sketches[n].flatten() for n in names]))
        chunks = flat.split([self.sketches[n].numel() for n in names])
        return {n: c.square().sum() / SKETCH_PROBES for n, c in zip(names, chunks, strict=True)}

    def squared_norms(self) -> dict[str, float]:
        """``squared_norm_tensors`` as floats (one host read)."""
        tensors = self.squared_norm_tensors()
        return dict(zip(tensors, host_values(*tensors.values()), strict=True))

    def gradient(self, name: str, backend: str = "auto") -> LayerGradient:
        return LayerGradient(self.pairs[name], backend)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pairs = {n: [] for n in self.pairs}
        self.sketches = {}
