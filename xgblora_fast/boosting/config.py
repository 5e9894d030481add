"""``XGBLoRAConfig``: every knob of an XGBLoRA run, checked when built, with presets.

``XGBLoRAConfig()`` is the measured default; ``XGBLoRAConfig.paper()`` the paper's recipe.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from xgblora_fast.nn.layer import INITS
from xgblora_fast.nn.patching import check_target_modules
from xgblora_fast.ops.checks import ROUNDINGS

SAMPLE_BY = ("block", "module")
BOOSTER_INITS = ("random", "gradient", "carry", "redraw")
# The inits whose merges keep the booster (booster_keep applies): "redraw" keeps b, not a.
KEEPING_INITS = ("carry", "redraw")
SELECTIONS = ("uniform", "gradient")
OPTIMIZER_RESETS = ("all", "momentum", "none")
# booster_keep=None with a KEEPING_INITS init and every unit in every round.
DEFAULT_BOOSTER_KEEP = 0.9


# torch.Generator.manual_seed's range.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _config_error(kind: type[Exception], name: str, allowed: str, value: object) -> Exception:
    got = repr(value) if kind is ValueError else f"{value!r} ({type(value).__name__})"
    return kind(f"XGBLoRAConfig.{name} must be {allowed}, got {got}")


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    """An int (not a bool) ``>= minimum`` (or None where ``optional``)."""
    if value is None and optional:
        return
    allowed = f">= {minimum} (an int)" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _config_error(TypeError, name, allowed, value)
    if value < minimum:
        raise _config_error(ValueError, name, allowed, value)


def _check_real(
    name: str,
    value: object,
    interval: str,
    low: float,
    high: float = math.inf,
    optional: bool = False,
) -> None:
    """A finite real number (an int or a float, not a bool) in ``interval``, e.g. ``"(0, 1]"``
    with bounds ``low`` and ``high`` (the brackets say which are included)."""
    if value is None and optional:
        return
    allowed = f"in {interval} (a finite number)" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _config_error(TypeError, name, allowed, value)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    if not (math.isfinite(value) and above and below):
        raise _config_error(ValueError, name, allowed, value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    allowed = f"one of {choices}"
    if not isinstance(value, str):
        raise _config_error(TypeError, name, allowed, value)
    if value not in choices:
        raise _config_error(ValueError, name, allowed, value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _config_error(TypeError, name, "True or False", value)


@dataclasses.dataclass
class XGBLoRAConfig:
    """Every knob of an XGBLoRA run.

    The defaults are the best measured on the demo task (MiniLM on movie reviews, 3 seeds per
    budget; the README's accuracy section): every targeted layer in every round, rounds that
    grow 1.5x from ``kappa=10`` steps (10, 15, 22, 34, ...), and merges that keep each layer's
    ``a`` and leave 90% of its booster in place (``booster_init="carry"``, ``booster_keep``
    0.9). The paper's recipe is ``layers_per_round=0.35, kappa_growth=1.0, select="uniform",
    booster_init="random"``.

    Attributes:
        target_modules: which linear layers get boosters (peft-style: names/suffixes, a regex,
            or ``"all-linear"``).
        alpha: booster scale ``s`` in ``y = x W^T + s (x.a) b^T``.
        dropout: dropout on the boosters' input.
        kappa: optimizer steps per round (of round 0, with ``kappa_growth``).
        kappa_growth: round ``k`` lasts ``round(kappa * kappa_growth**k)`` steps (at least 1):
            1.0 keeps every round at ``kappa``; above 1 the rounds grow geometrically, so a run
            of T steps has ``ceil(log(1 + T (g - 1) / kappa) / log(g))`` rounds, g =
            ``kappa_growth`` (up to rounding; 1.5, the default: 10 rounds in 1000 steps). Short
            rounds while the loss falls fast, few restarts later: on the demo task the
            every-layer chain went from 0.830 (fixed rounds of 10) to 0.838 at 1000 steps (3
            seeds; LoRA r=1: 0.830); at 3000 steps both get 0.829-0.830 (LoRA r=1: 0.837), and
            at 200 steps 0.805 vs 0.792 (LoRA r=1: 0.820).
        layers_per_round: ``L_s``, an int count or a float fraction in (0, 1] of the units
            (default 1.0: all of them). Fewer train fewer boosters per step; on the demo task
            each fraction below 1 measured lower accuracy.
        sample_by: ``"block"`` (transformer blocks, all their targeted modules together) or
            ``"module"`` (individual linear layers).
        total_steps / rounds: length of the run (give one; ``rounds`` rounds of
            ``round_length`` steps). Only
            used for ``Booster.done`` and progress; the caller owns the loop.
        merge_step: the boosting step ``alpha_t``: ``W += merge_step * s b a^T``.
        rounding: merge rounding for fp16/bf16 weights (fp32: always nearest): ``"nearest"``
            (default), ``"stochastic"`` or ``"kahan"`` (a compensation buffer of W's size per
            merged layer). The demo's accuracy is the same under all three; nearest accumulates
            1.4-2x less error than stochastic and needs no memory, kahan 13-30x less after 1000
            merges (``bench/results/precision.md``).
        init: distribution of the random ``a``, ``"kaiming"`` (uniform) or ``"gaussian"``.
        booster_init: ``"carry"`` (default), ``"random"`` (``a`` redrawn, ``b = 0`` at every
            restart: the paper's recipe) or ``"gradient"``. ``"gradient"``: in each round's
            first step ``a`` becomes the top right singular vector of the layer's weight
            gradient ``G = dy^T x`` (same norm as the random draw; ``power_iters`` power
            iterations over the step's activations), so the booster starts along the best
            rank-1 descent direction. Needs
            ``attach(optimizer)`` (it acts just before ``optimizer.step()``). It gained 2.1
            points at 200 steps with 35% of the blocks per round; with every layer it diverges
            on the demo task (MiniLM's pooler: docs/accuracy_analysis.md). ``"carry"``: round 0
            draws ``a`` as ``"random"`` does; a merge then resets only ``b`` (to 0, or scales it by
            ``booster_keep``) and the layer's next booster keeps its trained ``a`` (direction
            and size), so a restart keeps the input direction already found. Alone (``b = 0``),
            200 steps, seeds 0 / 1: 0.807 / 0.816 vs 0.809 / 0.809 for ``"random"``; what
            makes it the default is ``booster_keep`` (docs/accuracy_analysis.md).
            ``"redraw"``: as ``"carry"``, but every merge gives the kept booster a fresh seeded
            ``a`` (the norm of the trained one) and puts the difference into ``W``: ``W += s b
            (a - beta a')^T``, ``a <- a'``, ``b <- beta b`` (``merge_step=1``), so the function
            is unchanged and each round explores a new input direction while the older ones
            stay in ``W``; with ``booster_keep=0`` it is ``"random"`` that keeps ``|a|``. On
            the demo task (1000 steps, seeds 0 / 2) 0.842 / 0.836 against 0.845 / 0.836 for
            ``"carry"``, with a higher training loss (docs/accuracy_analysis.md).
        booster_keep: with ``booster_init="carry"`` or ``"redraw"`` and every unit in every
            round, the fraction ``beta`` in [0, 1) of each booster a merge leaves in place:
            ``W += merge_step (1 - beta) s b a^T``, then ``b <- beta b`` (``a`` kept), so with
            ``merge_step=1`` the model's function is unchanged and the next round starts where
            this one ended instead of from ``b = 0``. 0: the whole booster is merged. None
            (default): 0.9 where it applies (``"carry"`` or ``"redraw"``, every unit in every
            round), else 0. ``finish()`` merges all. On the demo task 0.9 is the only schedule
            measured at or above LoRA r=1 at 200, 1000 and 3000 steps
            (docs/accuracy_analysis.md).
        gradient_init_rounds: with ``booster_init="gradient"``, only rounds ``0 .. N-1`` start
            from the gradient; later rounds keep the random ``a`` (None: every round). Demo
            task, 1000 steps, 3 seeds, 67% of the blocks in rounds of 10: 20 rounds 0.825 +-
            0.006, every round 0.821 +- 0.002 (docs/accuracy_analysis.md). A layer's
            successive gradient-init ``a`` repeat (mean |cos| 0.53 at 200 steps; random draws:
            0.04).
        select: with ``layers_per_round`` below 1, how a round picks its units: ``"gradient"``
            (default: probability proportional to the unit's weight-gradient norm, estimated in
            the previous round's last step from a 4-direction sketch; round 0 is uniform) or
            ``"uniform"`` (the paper's recipe). With every unit active it only changes the
            random draws.
        power_iters: power iterations of ``booster_init="gradient"``.
        weight_decay: AdamW's decoupled weight decay on the boosters (the practical form of the
            paper's norm penalty), in the group ``param_groups()`` returns (under a transformers
            ``Trainer``, set ``TrainingArguments.weight_decay`` instead). Default 0.3: with the
            default schedule, 3 seeds, it is level with 0.1 at 200 and 1000 steps and ahead at
            3000 (0.846 vs 0.841), and 0.1 is ahead of 1e-4, where the boosters overfit
            (docs/accuracy_analysis.md).
        optimizer_reset: what a merge does to the merged boosters' optimizer state: ``"all"``
            (drop it: the paper's recipe), ``"momentum"`` (zero the first moment, keep Adam's
            second moment and step count: the next round starts from zero velocity with the
            per-coordinate gradient scale already known, so its first steps are small instead of
            full-size sign steps) or ``"none"`` (keep everything).
        rewarm_steps: after each merge, ramp the boosters' learning rate linearly over this many
            steps (0: off), under whatever schedule the optimizer follows.
        verify_replicas: under ``torch.distributed`` with more than one rank, check at each
            round end that every rank holds bit-identical weights and boosters
            (``xf.verify_replicas``: one read of the boosted weights, one small
            all-gather); a diverged rank raises RuntimeError naming it.
        seed: seeds layer sampling, booster init and stochastic-rounding bits.
        record: keep every merged booster (``Booster.records``, in checkpoints too) for
            ``xf.export_lora`` and ``xf.unmerge_``; costs ``4 (in + out)`` bytes per merge.
    """

    target_modules: list[str] | str = "all-linear"
    alpha: float = 1.0
    dropout: float = 0.0
    kappa: int = 10
    kappa_growth: float = 1.5
    layers_per_round: int | float = 1.0
    sample_by: str = "block"
    total_steps: int | None = None
    rounds: int | None = None
    merge_step: float = 1.0
    rounding: str = "nearest"
    init: str = "kaiming"
    booster_init: str = "carry"
    booster_keep: float | None = None
    gradient_init_rounds: int | None = None
    select: str = "gradient"
    power_iters: int = 4
    weight_decay: float = 0.3
    optimizer_reset: str = "all"
    rewarm_steps: int = 0
    verify_replicas: bool = True
    seed: int = 0
    record: bool = True

    def __post_init__(self) -> None:
        """Check every field: TypeError for a wrong type (a bool is not a number), ValueError
        for a value out of range, each a one-line message naming the field."""
        check_target_modules(self.target_modules, "XGBLoRAConfig.target_modules")
        if isinstance(self.target_modules, tuple):  # what to_dict/JSON round trips give back
            self.target_modules = list(self.target_modules)
        _check_real("alpha", self.alpha, "(0, inf)", 0.0)
        _check_real("dropout", self.dropout, "[0, 1)", 0.0, 1.0)
        _check_int("kappa", self.kappa, 1)
        _check_real("kappa_growth", self.kappa_growth, "(0, inf)", 0.0)
        lps = self.layers_per_round
        if isinstance(lps, bool) or not isinstance(lps, numbers.Real):
            raise _config_error(
                TypeError,
                "layers_per_round",
                "an int count >= 1 or a float fraction in (0, 1]",
                lps,
            )
        if isinstance(lps, numbers.Integral):
            _check_int("layers_per_round (a count)", lps, 1)
        else:
            _check_real("layers_per_round (a fraction)", lps, "(0, 1]", 0.0, 1.0)
        _check_choice("sample_by", self.sample_by, SAMPLE_BY)
        _check_int("total_steps", self.total_steps, 1, optional=True)
        _check_int("rounds", self.rounds, 1, optional=True)
        if self.total_steps is not None and self.rounds is not None:
            raise ValueError("XGBLoRAConfig: give total_steps or rounds, not both")
        _check_real("merge_step", self.merge_step, "(0, inf)", 0.0)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("init", self.init, INITS)
        _check_choice("booster_init", self.booster_init, BOOSTER_INITS)
        _check_real("booster_keep", self.booster_keep, "[0, 1)", 0.0, 1.0, optional=True)
        if self.booster_keep and self.booster_init not in KEEPING_INITS:
            raise ValueError(
                f"XGBLoRAConfig.booster_keep needs booster_init in {KEEPING_INITS} (a restart "
                f"from b = 0 keeps nothing), got booster_init={self.booster_init!r}"
            )
        _check_int("gradient_init_rounds", self.gradient_init_rounds, 1, optional=True)
        if self.gradient_init_rounds is not None and self.booster_init != "gradient":
            raise ValueError(
                "XGBLoRAConfig.gradient_init_rounds needs booster_init='gradient', got "
                f"booster_init={self.booster_init!r}"
            )
        _check_choice("select", self.select, SELECTIONS)
        _check_int("power_iters", self.power_iters, 1)
        _check_real("weight_decay", self.weight_decay, "[0, inf)", 0.0)
        _check_choice("optimizer_reset", self.optimizer_reset, OPTIMIZER_RESETS)
        _check_int("rewarm_steps", self.rewarm_steps, 0)
        _check_bool("verify_replicas", self.verify_replicas)
        seeds = "an int in [-2**63, 2**64 - 1]"
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise _config_error(TypeError, "seed", seeds, self.seed)
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise _config_error(ValueError, "seed", seeds, self.seed)
        _check_bool("record", self.record)

    @property
    def planned_steps(self) -> int | None:
        """Total optimizer steps of the run, when known."""
        if self.rounds is not None:
            return sum(self.round_length(k) for k in range(self.rounds))
        return self.total_steps

    def round_length(self, round_index: int) -> int:
        """Optimizer steps of round ``round_index`` (0-based): ``kappa * kappa_growth**k``."""
        # In logs, capped: a long run of growing rounds must not overflow a float.
        exponent = min(round_index * math.log(self.kappa_growth), 60.0)
        return max(1, round(self.kappa * math.exp(exponent)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XGBLoRAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown XGBLoRAConfig fields: {sorted(unknown)}")
        return cls(**data)
