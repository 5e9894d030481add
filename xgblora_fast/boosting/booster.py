"""XGBLoRA boosting: rounds of rank-1 boosters on sampled layers, merged into the weights.

``Booster`` drives any model with ``FastRank1Linear`` layers (it injects them if there are
none). Each round it samples the active layers with its own seeded generator (the same on every
data-parallel rank), lets only their boosters run, and after the round's steps merges
them into ``W`` in place, restarts them in place (same Parameter objects) and drops their
optimizer state completely (moments *and* step count: keeping Adam's step count after zeroing
its moments makes the first update ~3x lr). By default a restart keeps the layer's ``a`` and
90% of its booster (``booster_keep``: 10% of ``s b a^T`` is merged, ``b <- 0.9 b``);
``booster_init="random"`` is the paper's restart: ``b = 0`` and a fresh seeded ``a`` (every
rank draws the same).

Plain loop::

    booster = xf.Booster(model, xf.XGBLoRAConfig(kappa=10, kappa_growth=1.5))
    optimizer = torch.optim.AdamW(booster.param_groups(), lr=1e-3)
    booster.attach(optimizer)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())      # at a round's end: merge, re-init, start the next
    booster.finish()                   # merge what the last round learned

Inactive layers run the plain GEMM and their boosters get no gradient (``grad is None``, so the
optimizer skips them). Under DDP every rank runs the same subset; use
``find_unused_parameters=True`` since the inactive boosters are not in the graph (they are a few
vectors, so the extra all-reduce is negligible).
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from xgblora_fast.boosting.config import (
    DEFAULT_BOOSTER_KEEP,
    GRADIENT_INITS,
    KEEPING_INITS,
    XGBLoRAConfig,
)
from xgblora_fast.boosting.distributed import agree_across_ranks, verify_replicas
from xgblora_fast.boosting.gradient_probe import (
    GradientProbe,
    top_singular_pair,
)
from xgblora_fast.boosting.records import MergeRecord
from xgblora_fast.boosting.strategies import merged_basis, orthogonal_part, strategy_for
from xgblora_fast.nn.layer import FastRank1Linear, is_dtensor, local_rows
from xgblora_fast.nn.patching import inject, targeted_names, task_heads
from xgblora_fast.ops import checks
from xgblora_fast.ops.checks import abs_max_tensor

# Per-parameter optimizer state that holds a direction (Adam/AdamW's first moment, SGD's
# momentum): what optimizer_reset="momentum" zeroes.
MOMENTUM_STATE = ("exp_avg", "momentum_buffer")
_BLOCK_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _check_injected(
    model: nn.Module,
    layers: dict[str, FastRank1Linear],
    cfg: XGBLoRAConfig,
    modules_to_save: list[str] | tuple[str, ...],
) -> None:
    """A model injected before the ``Booster``: its layers must be the ones ``cfg`` describes, or
    ``cfg.target_modules``, ``alpha`` and ``dropout`` would be silently ignored."""
    differ = [
        f"{n} (alpha={m.alpha}, dropout={m.dropout})"
        for n, m in layers.items()
        if m.alpha != float(cfg.alpha) or m.dropout != cfg.dropout
    ]
    if differ:
        raise ValueError(
            f"the model already holds FastRank1Linear layers whose alpha/dropout differ from the "
            f"config's (alpha={cfg.alpha}, dropout={cfg.dropout}): {differ[:3]}; pass the values "
            "they were injected with, or build the Booster on the model before xf.inject"
        )
    expected = targeted_names(model, cfg.target_modules, modules_to_save)
    extra = [n for n in layers if n not in set(expected)]
    missing = [n for n in expected if n not in layers]
    if extra or missing:
        raise ValueError(
            f"the model already holds FastRank1Linear layers that config.target_modules="
            f"{cfg.target_modules!r} does not select: injected but not targeted {extra[:3]}, "
            f"targeted but not injected {missing[:3]}; pass the target_modules they were "
            "injected with, or build the Booster on the model before xf.inject"
        )


def _warn_trainable_base(layers: dict[str, FastRank1Linear]) -> None:
    """One warning if base weights of boosted layers require grad (FastRank1Linear froze them)."""
    trainable = [
        n
        for n, m in layers.items()
        if m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad)
    ]
    if trainable:
        warnings.warn(
            f"the base weight/bias of {len(trainable)} boosted layers require grad (e.g. "
            f"{trainable[:3]}): an optimizer over them trains the full W, not XGBLoRA's "
            "boosters; FastRank1Linear keeps them frozen, so call requires_grad_(False) on them "
            "(model.requires_grad_(True) undoes it)",
            UserWarning,
            stacklevel=3,
        )


def _write_rows_(t: torch.Tensor, whole: torch.Tensor) -> None:
    """``t[:] = whole`` (cast to t's dtype); for a row-sharded DTensor, only the rows held here."""
    local, start = local_rows(t)
    local.copy_(whole[start : start + local.shape[0]])


def group_units(names: list[str], sample_by: str) -> dict[str, list[str]]:
    """Sampling units: ``{unit: [module names]}``, in model order.

    ``"block"`` groups modules by their first numbered container (``model.layers.3``,
    ``transformer.h.0``); modules outside any numbered container form a unit of their own.
    """
    units: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK_INDEX.match(name) if sample_by == "block" else None
        units.setdefault(match.group(1) if match else name, []).append(name)
    return units


class Booster:
    """Runs XGBLoRA rounds over the ``FastRank1Linear`` layers of ``model``.

    Args:
        model: the model; if it holds no ``FastRank1Linear`` yet, ``config.target_modules`` are
            injected (base frozen, peft-style; ``"all-linear"`` leaves out the output embedding
            and the task heads, which stay trainable). If it does (``xf.inject`` ran before),
            the config must describe those layers: same ``alpha`` and ``dropout``, and
            ``target_modules`` selecting exactly them (ValueError otherwise).
        config: the run's ``XGBLoRAConfig``.
        optimizer: the optimizer over the boosters (or attach it later with ``attach``).
        modules_to_save: names (or dotted suffixes) of modules to train fully besides the
            detected task heads (``classifier``, ``score``, ``qa_outputs``, ...; see
            ``xgblora_fast.nn.patching.task_heads``), as peft's ``modules_to_save``.

    Attributes:
        modules_to_save: the task heads, fully trained outside the boosters: put
            ``head_parameters()`` in the optimizer next to ``param_groups()``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: XGBLoRAConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        modules_to_save: list[str] | tuple[str, ...] = (),
    ) -> None:
        if config is not None and not isinstance(config, XGBLoRAConfig):
            raise TypeError(f"config must be an XGBLoRAConfig, got {type(config).__name__}")
        self.config = config or XGBLoRAConfig()
        cfg = self.config
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FastRank1Linear)}
        if layers:
            _check_injected(model, layers, cfg, modules_to_save)
        else:
            layers = inject(
                model,
                cfg.target_modules,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                init=cfg.init,
                modules_to_save=modules_to_save,
            )
        _warn_trainable_base(layers)
        self.model = model
        self.layers: dict[str, FastRank1Linear] = layers
        self.modules_to_save: list[str] = [
            head
            for head in task_heads(model, modules_to_save)
            if not any(n == head or n.startswith(head + ".") for n in layers)
        ]
        self.units = group_units(list(layers), cfg.sample_by)
        lps = cfg.layers_per_round
        n_units = len(self.units)
        self.units_per_round = (
            min(lps, n_units) if isinstance(lps, int) else max(1, round(lps * n_units))
        )
        every_unit = self.units_per_round == n_units
        if cfg.booster_keep and not every_unit:
            # A booster left on a layer the next round skips would drop out of its output.
            raise ValueError(
                f"booster_keep needs every unit in every round, got {self.units_per_round} of "
                f"{n_units} (layers_per_round={lps!r})"
            )
        # The fraction of each booster a merge leaves in place (config None: where it applies).
        if cfg.booster_keep is not None:
            self.booster_keep = cfg.booster_keep
        elif cfg.booster_init in KEEPING_INITS and every_unit:
            self.booster_keep = DEFAULT_BOOSTER_KEEP
        else:
            self.booster_keep = 0.0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.strategy = strategy_for(cfg.booster_init)
        self.optimizer: torch.optim.Optimizer | None = None
        self._step_hook = None
        self._init_probe: GradientProbe | None = None
        self._norm_probe: GradientProbe | None = None
        self._unit_scores: dict[str, float] | None = None
        self._round_sigma: dict[str, float] = {}
        self.round = 0
        self.global_step = 0
        self.step_in_round = 0
        self.active: list[str] = []
        self.history: list[dict[str, Any]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._cumulative_trainable = 0
        self._touched: set[str] = set()
        self._lr_envelope: dict[int, float] = {}
        self._lr_written: dict[int, float] = {}
        # The layers carry their records too (a layer that already has one keeps it), so the
        # model alone is enough for xf.export_lora / xf.unmerge_.
        for layer in layers.values():
            if not hasattr(layer, "merge_record"):
                layer.merge_record = MergeRecord.for_layer(layer)
            # xf.eject records the booster it merges too (the records outlive the layers).
            layer.record_merges = cfg.record
        self.records: dict[str, MergeRecord] = {n: m.merge_record for n, m in layers.items()}
        # |W|_F when the booster was built: the history's relative update sizes divide by it, so
        # a round end reads no W beyond what its merges do.
        self._base_norms = {
            n: float(torch.linalg.vector_norm(m.weight.detach(), dtype=torch.float32))
            for n, m in layers.items()
        }
        for layer in layers.values():
            layer.init = cfg.init
            layer.reset_(self.generator)
        self._begin_round()
        self._arm_probes()
        self._init_step_counting()
        if optimizer is not None:
            self.attach(optimizer)

    # ----------------------------------------------------------------- set-up
    def parameters(self) -> list[nn.Parameter]:
        """Every booster parameter (``lora_a``, ``lora_b`` of each layer)."""
        return [p for m in self.layers.values() for p in (m.lora_a, m.lora_b)]

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the task heads (``modules_to_save``), trained fully: a freshly
        initialised classifier learns nothing unless they are in the optimizer, e.g.
        ``AdamW([*booster.param_groups(), {"params": booster.head_parameters(), "lr": 1e-3}])``.
        """
        seen: set[int] = set()
        params = []
        for name in self.modules_to_save:
            for p in self.model.get_submodule(name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def param_groups(self, **group_options: Any) -> list[dict[str, Any]]:
        """One optimizer param group with the boosters and ``config.weight_decay``."""
        return [
            {"params": self.parameters(), "weight_decay": self.config.weight_decay} | group_options
        ]

    def _init_step_counting(self) -> None:
        """State of the step counting that ``attach`` turns on (called by ``__init__``)."""
        self._step_post_hook = None
        # Optimizer steps that ran since the last ``step()`` call (counted once attached).
        self._optimizer_steps = 0
        self._warned_unattached = False

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` for state resets, learning-rate re-warm-up and gradient init.

        Once attached, rounds count the optimizer steps that actually ran (a step post-hook):
        ``step()`` after a micro-batch of gradient accumulation, or after a step that a
        ``GradScaler`` skipped (inf/NaN gradients), counts nothing. Wrappers that hold the real
        optimizer as ``.optimizer`` (accelerate's, as the transformers ``Trainer`` passes it)
        are unwrapped for the hooks.
        """
        self.optimizer = optimizer
        for handle in (self._step_hook, self._step_post_hook):
            if handle is not None:
                handle.remove()
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        self._step_hook = inner.register_step_pre_hook(self._before_optimizer_step)
        self._step_post_hook = inner.register_step_post_hook(self._after_optimizer_step)
        self._optimizer_steps = 0

    @property
    def done(self) -> bool:
        planned = self.config.planned_steps
        return planned is not None and self.global_step >= planned

    # ----------------------------------------------------------------- rounds
    def _begin_round(self) -> None:
        names = list(self.units)
        if self._unit_scores is not None and sum(self._unit_scores.values()) > 0:
            weights = torch.tensor([self._unit_scores[n] for n in names], dtype=torch.float64)
            order = torch.multinomial(
                weights, self.units_per_round, replacement=False, generator=self.generator
            )
        else:
            order = torch.randperm(len(names), generator=self.generator)[: self.units_per_round]
        self._unit_scores = None
        chosen = sorted(order.tolist())
        self.active = [m for i in chosen for m in self.units[names[i]]]
        active = set(self.active)
        for name, layer in self.layers.items():
            layer.active = name in active
            if not layer.active:  # no stale gradient may reach the optimizer
                layer.lora_a.grad = None
                layer.lora_b.grad = None
        self._round_start_step = self.global_step

    def step(self, loss: float | None = None) -> bool:
        """Count the optimizer step; at the end of a round merge, re-init and start the next.

        Call it after ``optimizer.step()`` (and after ``scheduler.step()``). ``loss`` (a float)
        goes into the round's history. Returns True when this step ended a round.

        With an attached optimizer a round counts the optimizer steps that ran since the last
        call, never calls: with gradient accumulation call it once per micro-batch or once per
        optimizer step, either way; a call after a skipped step (``GradScaler`` found inf/NaN
        gradients) counts nothing. Without ``attach`` every call counts one step.
        """
        if loss is not None:
            self._loss_sum += float(loss)
            self._loss_count += 1
        if self._step_post_hook is None:
            ran = 1
        else:
            ran, self._optimizer_steps = self._optimizer_steps, 0
            if ran == 0:
                self._drop_abandoned_captures()
                return False
        self.global_step += ran
        self.step_in_round += ran
        if self._init_probe is not None and self._init_probe.captured:
            raise RuntimeError(
                "booster_init='gradient' acts just before optimizer.step(): call "
                "booster.attach(optimizer) before training"
            )
        ended = self.step_in_round >= self.config.round_length(self.round)
        if ended:
            self._end_round()
            self._begin_round()
        self._arm_probes()
        self._apply_rewarm()
        return ended

    def finish(self) -> None:
        """Merge the boosters of an unfinished round, and all that ``booster_keep`` left."""
        # Optimizer steps that ran after the last step() call belong to this round.
        self.global_step += self._optimizer_steps
        self.step_in_round += self._optimizer_steps
        self._optimizer_steps = 0
        if self.step_in_round > 0 or self._any_booster_kept():
            self._end_round(keep=0.0)
        self._disarm_probes()
        for layer in self.layers.values():
            layer.active = False

    def _any_booster_kept(self) -> bool:
        """Whether an active booster is not zero (``booster_keep`` left it): one host read."""
        whole = [
            b.full_tensor() if is_dtensor(b) else b
            for b in (self.layers[n].lora_b.detach() for n in self.active)
        ]
        return any(checks.host_values(*(b.any() for b in whole)))

    # ----------------------------------------------------------------- gradient probes
    def _arm_probes(self) -> None:
        """Hook what the next training step must capture (the gradient init, the unit scores)."""
        cfg = self.config
        self._disarm_probes()
        if self._gradient_init_round() and self.step_in_round == 0:
            self._init_probe = GradientProbe({n: self.layers[n] for n in self.active})
        if cfg.select == "gradient" and self.step_in_round == cfg.round_length(self.round) - 1:
            # Seeded per round: every rank sketches with the same directions.
            sketch = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.round)
            self._norm_probe = GradientProbe(self.layers, sketch=sketch)

    def _gradient_init_round(self) -> bool:
        """Whether the current round's boosters start from the gradient."""
        cfg = self.config
        limit = cfg.gradient_init_rounds
        return cfg.booster_init in GRADIENT_INITS and (limit is None or self.round < limit)

    def _disarm_probes(self) -> None:
        for probe in (self._init_probe, self._norm_probe):
            if probe is not None:
                probe.remove()
        self._init_probe = self._norm_probe = None

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._init_probe is not None and self._init_probe.captured:
            scales = self._gradient_scales()
            self._gradient_init()
            for name, scale in scales.items():
                grad = self.layers[name].lora_b.grad
                if grad is not None:
                    grad.mul_(scale)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_steps += 1

    @torch.no_grad()
    def _gradient_scales(self) -> dict[str, float]:
        """Per active layer, what happened to its gradient between backward and this step.

        The probe saw the backward's raw output gradients; a ``GradScaler`` has since unscaled
        the parameters' gradients and the ``Trainer`` may have clipped them. At a round's start
        ``b = 0``, so the backward's ``db`` is ``s G a``: its ratio to ``s |G a|`` from the
        probe is the factor the gradient init's ``db`` must carry too (1 without either).
        """
        probe = self._init_probe
        agree_across_ranks(self.active, f"the active layers of round {self.round}")
        scales: dict[str, float] = {}
        for name in self.active:
            layer = self.layers[name]
            grad = layer.lora_b.grad
            a = layer.lora_a.full_tensor() if is_dtensor(layer.lora_a) else layer.lora_a
            # Every rank runs the (all-reduced) product, whether or not it has a gradient.
            implied = abs(layer.alpha) * float(
                probe.gradient(name, layer.backend).matvec(a.detach().float()).norm()
            )
            if grad is None:
                continue
            whole = grad.full_tensor() if is_dtensor(grad) else grad
            seen = float(whole.float().norm())
            if implied > 0 and seen > 0 and math.isfinite(seen / implied):
                scales[name] = seen / implied
        return scales

    def _drop_abandoned_captures(self) -> None:
        """After a ``step()`` that no optimizer step preceded: if the gradients show that the
        step was abandoned (zeroed, or inf/NaN: a ``GradScaler`` skipped it), re-arm the probes
        so that their captures come from the step that will run, not from the skipped one. A
        micro-batch of gradient accumulation leaves finite gradients: the captures stay."""
        probes = [p for p in (self._init_probe, self._norm_probe) if p is not None]
        if not any(any(p.pairs.values()) or p.sketches for p in probes):
            return
        grads = [
            p.grad
            for n in self.active
            for p in (self.layers[n].lora_a, self.layers[n].lora_b)
            if p.grad is not None
        ]
        finite = all(bool(g.isfinite().all()) for g in grads)
        if not grads or not finite or not any(bool(g.any()) for g in grads):
            self._arm_probes()

    @torch.no_grad()
    def _gradient_init(self) -> None:
        """Point each active ``a`` along ``v1`` of its layer's gradient and fix the gradients.

        At a round's start ``b = 0``, so the true gradients at the new ``a`` are ``da = 0`` and
        ``db = s G a = s sigma1 |a| u1``: the step the optimizer is about to take is exact.
        """
        probe = self._init_probe
        # The power iterations all-reduce per active layer: ranks must agree on the layers first.
        agree_across_ranks(self.active, f"the active layers of round {self.round}")
        for name in self.active:
            layer = self.layers[name]
            a, b = layer.lora_a, layer.lora_b
            # FSDP2: every rank computes the same whole vectors (the products are all-reduced)
            # and writes its own rows of a and of the sharded gradients.
            whole_a = a.full_tensor() if is_dtensor(a) else a
            norm = float(whole_a.float().norm())
            project = None
            if self.config.booster_init == "orthogonal-gradient":  # v1 outside merged a's
                project = functools.partial(orthogonal_part, basis=merged_basis(layer))
            sigma, u, v = top_singular_pair(
                probe.gradient(name, layer.backend), whole_a, self.config.power_iters, project
            )
            _write_rows_(a, v * norm)
            for p in (a, b):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _write_rows_(a.grad, torch.zeros_like(v))
            _write_rows_(b.grad, u * (layer.alpha * sigma * norm))
            self._round_sigma[name] = sigma
        probe.remove()
        self._init_probe = None

    def _unit_score_tensors(self) -> tuple[list[str], list[torch.Tensor]] | None:
        """``(layers, |G|_F^2 estimates)`` from the last step's sketch, on the device; None if
        none was taken."""
        probe = self._norm_probe
        if probe is None or not probe.captured:
            return None
        squared = probe.squared_norm_tensors()
        return list(squared), list(squared.values())

    def _unit_scores_from(self, names: list[str], squared: list[float]) -> dict[str, float]:
        """Each unit's gradient norm from the values of ``_unit_score_tensors``."""
        by_layer = dict(zip(names, squared, strict=True))
        return {
            unit: math.sqrt(sum(by_layer[m] for m in members))
            for unit, members in self.units.items()
        }

    @torch.no_grad()
    def _end_round(self, keep: float | None = None) -> None:
        """Merge the round's boosters; ``keep`` (default ``self.booster_keep``) of each stays."""
        cfg = self.config
        keep = self.booster_keep if keep is None else keep
        if self.optimizer is None and cfg.optimizer_reset != "none" and not self._warned_unattached:
            self._warned_unattached = True
            warnings.warn(
                "Booster merged without an attached optimizer: the merged boosters' optimizer "
                "state (Adam's moments) is kept across merges, and rounds count step() calls. "
                "Call booster.attach(optimizer) before training",
                stacklevel=3,
            )
        # Every value the round end decides on (finite boosters, history norms, unit scores, the
        # merges' safety checks) is measured on the device first and read in ONE transfer: a
        # round end costs one host synchronisation, whatever the number of layers.
        generator_state = self.generator.get_state()  # a refused round draws nothing
        plans = []
        tensors: list[torch.Tensor] = []
        for name in self.active:
            layer = self.layers[name]
            whole_a, whole_b = layer.booster_vectors()
            plan = self.strategy.plan(layer, cfg.merge_step, keep, self.generator)
            request, finish = layer.merge_stats_request(
                plan.direction, whole_b, plan.step, cfg.rounding
            )
            # max |a|, max |b| of the booster (its NaN/Inf check): the merge's own where the same.
            a_max = request[0] if request and plan.direction is whole_a else abs_max_tensor(whole_a)
            b_max = request[1] if request and whole_b is layer.lora_b else abs_max_tensor(whole_b)
            own = [a_max, b_max, plan.direction.norm(), whole_b.detach().norm()]
            plans.append((name, plan, whole_b, finish, len(own), len(request)))
            tensors += own + request
        scored = self._unit_score_tensors()
        score_names, score_tensors = scored if scored is not None else ([], [])
        values = checks.host_values(*tensors, *score_tensors)
        # All or nothing: a booster with NaN/Inf (a diverged loss) stops the run before any layer
        # of the round is merged, so the weights stay as they were at the round's start.
        bad = []
        at = 0
        for name, *_, n_own, n_request in plans:
            if not (math.isfinite(values[at]) and math.isfinite(values[at + 1])):
                bad.append(name)
            at += n_own + n_request
        if bad:
            self.generator.set_state(generator_state)
            raise FloatingPointError(
                f"round {self.round}: the boosters of {bad[:4]} contain NaN/Inf (did the loss "
                "diverge?); nothing was merged, the weights are unchanged. Lower the learning "
                "rate or resume from the last checkpoint"
            )
        self._unit_scores = (
            None if scored is None else self._unit_scores_from(score_names, values[at:])
        )
        update_norms: dict[str, float] = {}
        relative: dict[str, float] = {}
        at = 0
        for index, (name, plan, whole_b, finish, n_own, n_request) in enumerate(plans):
            layer = self.layers[name]
            direction_norm, b_norm = values[at + 2], values[at + 3]
            stats = finish(values[at + n_own : at + n_own + n_request])
            at += n_own + n_request
            norm = abs(plan.step * layer.alpha) * direction_norm * b_norm
            w_norm = self._base_norms[name]
            update_norms[name] = norm
            relative[name] = norm / w_norm if w_norm > 0 else math.inf
            seed = (cfg.seed * 1_000_003 + self.round * 10_007 + index) % (2**31)
            if cfg.record:  # before the merge, which re-initialises the booster
                self.records[name].add_vectors(
                    self.round, plan.step, plan.direction, layer.lora_b, cfg.rounding
                )
            try:
                layer.merge_vectors_(plan.direction, whole_b, plan.step, cfg.rounding, seed, stats)
            except Exception:
                if cfg.record:  # a refused merge (W untouched) leaves no record behind
                    self.records[name].remove(len(self.records[name].rounds) - 1)
                raise
            self.strategy.restart_(layer, plan, keep, self.generator)
            self._reset_optimizer_state(layer)
            self._touched.add(name)
        trainable = sum(
            self.layers[n].in_features + self.layers[n].out_features for n in self.active
        )
        self._cumulative_trainable += trainable
        self.history.append(
            {
                "round": self.round,
                "steps": [self._round_start_step, self.global_step],
                "active": list(self.active),
                "loss": self._loss_sum / self._loss_count if self._loss_count else None,
                "update_norm": update_norms,
                "relative_update": relative,
                "trainable_params": trainable,
                "cumulative_trainable_params": self._cumulative_trainable,
                "weights_touched": sum(self.layers[n].weight.numel() for n in self._touched),
                "gradient_sigma": dict(self._round_sigma),
                "unit_scores": dict(self._unit_scores or {}),
            }
        )
        self._round_sigma = {}
        self.round += 1
        self.step_in_round = 0
        self._loss_sum = 0.0
        self._loss_count = 0
        if cfg.verify_replicas:
            verify_replicas(self, where=f" after round {self.round - 1}")

    def _reset_optimizer_state(self, layer: FastRank1Linear) -> None:
        reset = self.config.optimizer_reset
        for p in (layer.lora_a, layer.lora_b):
            p.grad = None
            if self.optimizer is None or reset == "none":
                continue
            if reset == "all":
                self.optimizer.state.pop(p, None)
                continue
            for key in MOMENTUM_STATE:
                buffer = self.optimizer.state.get(p, {}).get(key)
                if isinstance(buffer, torch.Tensor):
                    buffer.zero_()

    def _apply_rewarm(self) -> None:
        """Scale the boosters' lr by ``min(1, (steps since merge + 1) / rewarm_steps)``.

        The envelope is whatever lr the group had when the booster last looked, unless the
        booster wrote it itself, so a scheduler's value is followed and nothing compounds.
        """
        if self.optimizer is None or self.config.rewarm_steps == 0:
            return
        # Round 0 follows no merge: the global schedule's own warm-up covers it.
        ramp = (self.step_in_round + 1) / self.config.rewarm_steps
        factor = 1.0 if self.round == 0 else min(1.0, ramp)
        # The live Parameters: FSDP2's fully_shard (after the booster was built) replaces them.
        boosters = {id(p) for p in self.parameters()}
        for i, group in enumerate(self.optimizer.param_groups):
            if not any(id(p) in boosters for p in group["params"]):
                continue
            if group["lr"] != self._lr_written.get(i):
                self._lr_envelope[i] = group["lr"]
            group["lr"] = self._lr_envelope[i] * factor
            self._lr_written[i] = group["lr"]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state plus the generator state (a uint8 tensor under ``"generator"``)."""
        return {
            "config": self.config.to_dict(),
            "round": self.round,
            "global_step": self.global_step,
            "step_in_round": self.step_in_round,
            "round_start_step": self._round_start_step,
            "active": list(self.active),
            "history": self.history,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "cumulative_trainable": self._cumulative_trainable,
            "touched": sorted(self._touched),
            "lr_envelope": {str(k): v for k, v in self._lr_envelope.items()},
            "lr_written": {str(k): v for k, v in self._lr_written.items()},
            "round_sigma": dict(self._round_sigma),
            "base_norms": dict(self._base_norms),
            "generator": self.generator.get_state(),
            "records": {n: r.state_dict() for n, r in self.records.items() if r.rounds},
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` fits this booster (changes nothing)."""
        if state["config"] != self.config.to_dict():
            raise ValueError("booster state was saved with a different XGBLoRAConfig")
        named = [*state["active"], *state["records"], *state.get("base_norms", {})]
        missing = [n for n in named if n not in self.layers]
        if missing:
            raise ValueError(f"booster state names layers this model lacks: {missing[:4]}")
        for name, record in state["records"].items():
            layer = self.layers[name]
            MergeRecord.check_state(record, layer.in_features, layer.out_features)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for name, record in self.records.items():
            record.load_state_dict(state["records"].get(name))
        self.round = state["round"]
        self.global_step = state["global_step"]
        self.step_in_round = state["step_in_round"]
        self._round_start_step = state["round_start_step"]
        self.history = json.loads(json.dumps(state["history"]))
        self._loss_sum = state["loss_sum"]
        self._loss_count = state["loss_count"]
        self._cumulative_trainable = state["cumulative_trainable"]
        self._touched = set(state["touched"])
        self._lr_envelope = {int(k): v for k, v in state["lr_envelope"].items()}
        self._lr_written = {int(k): v for k, v in state["lr_written"].items()}
        self._round_sigma = dict(state["round_sigma"])
        self._base_norms.update(state.get("base_norms", {}))  # older checkpoints lack them
        self.generator.set_state(state["generator"])
        self.active = list(state["active"])
        active = set(self.active)
        for name, layer in self.layers.items():
            layer.active = name in active
        self._arm_probes()

    def save_history(self, path: str) -> None:
        """Write the per-round history as JSON."""
        with open(path, "w") as f:
            json.dump({"config": self.config.to_dict(), "rounds": self.history}, f, indent=1)
