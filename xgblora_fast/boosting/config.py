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
BOOSTER_INITS = ("random", "gradient", "carry", "redraw", "orthogonal", "orthogonal-gradient")
# The inits whose rounds start from the weight gradient's top singular pair.
GRADIENT_INITS = ("gradient", "orthogonal-gradient")
# The inits whose merges keep the booster (booster_keep applies): "redraw" keeps b, not a.
KEEPING_INITS = ("carry", "redraw")
SELECTIONS = ("uniform", "gradient")
OPTIMIZER_RESETS = ("all", "momentum", "none")
# booster_keep=None with a KEEPING_INITS init and every unit in every round.
DEFAULT_BOOSTER_KEEP = 0.9


# torch.Generator.manual_seed's range.
SEED_RANGE = (-(2**63), 2**64 - 1)
# What each preset sets on top of the field defaults ("paper": arXiv 2410.19694's recipe).
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "booster_init": "random",
        "layers_per_round": 0.35,
        "select": "uniform",
        "kappa_growth": 1.0,
    },
}
PRESETS = tuple(PRESET_VALUES)
GROUPS = ("core", "advanced")


def meta(help: str, core: bool = False) -> dict[str, str]:
    """A config field's ``metadata``: its one-line ``help`` and its ``group`` (``"core"`` or
    ``"advanced"``), what ``xgblora-fast finetune --help`` shows and how it groups the flag."""
    return {"help": help, "group": GROUPS[0] if core else GROUPS[1]}


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
    """Every knob of an XGBLoRA run, checked when built (one-line TypeError/ValueError).

    Two presets: ``XGBLoRAConfig()`` holds the defaults measured best on the demo task, and
    ``XGBLoRAConfig.paper()`` the recipe of the paper (arXiv 2410.19694); ``preset(name)``
    picks one by name. Each field's one-line help and group ("core" or "advanced") is in its
    ``metadata``; what each knob does and what was measured: docs/method.md.
    """

    target_modules: list[str] | str = dataclasses.field(
        default="all-linear",
        metadata=meta(
            "the linear layers that get boosters, as in peft: module names, each matching the full "
            "name or its dotted suffix (on the command line comma-separated: q_proj,v_proj or "
            "attention.self.query); all-linear (every linear layer but the output and task heads); "
            "or a regex that must match the whole module name (re.fullmatch, as peft treats a "
            "string; on the command line a value holding any of * + ? | ( ) [ ] { } ^ $ \\)",
            core=True,
        ),
    )
    alpha: float = dataclasses.field(
        default=1.0, metadata=meta("booster scale s in y = x W^T + s (x.a) b^T", core=True)
    )
    dropout: float = dataclasses.field(default=0.0, metadata=meta("dropout on the boosters' input"))
    kappa: int = dataclasses.field(
        default=10,
        metadata=meta(
            "optimizer steps per round (of round 0 when kappa_growth is not 1)", core=True
        ),
    )
    kappa_growth: float = dataclasses.field(
        default=1.5,
        metadata=meta(
            "round k lasts round(kappa * kappa_growth**k) steps: 1 keeps every round at kappa, "
            "1.5 grows them 10, 15, 22, 34, ... from kappa 10",
            core=True,
        ),
    )
    layers_per_round: int | float = dataclasses.field(
        default=1.0,
        metadata=meta(
            "L_s, the units each round trains: a count (e.g. 2) or a fraction (e.g. 0.35)"
        ),
    )
    sample_by: str = dataclasses.field(
        default="block",
        metadata=meta(
            "what a unit that rounds sample is: block (a transformer block's targeted modules "
            "together) or module (each linear layer alone)",
        ),
    )
    total_steps: int | None = dataclasses.field(
        default=None,
        metadata=meta(
            "optimizer steps of the run (or give rounds); only for Booster.done and progress",
            core=True,
        ),
    )
    rounds: int | None = dataclasses.field(
        default=None, metadata=meta("length of the run in rounds, instead of total_steps")
    )
    merge_step: float = dataclasses.field(
        default=1.0, metadata=meta("the boosting step alpha_t: W += merge_step * s b a^T")
    )
    rounding: str = dataclasses.field(
        default="nearest",
        metadata=meta(
            "merge rounding of fp16/bf16 weights (fp32: always nearest): nearest, stochastic or "
            "kahan (a compensation buffer of W's size per merged layer)",
        ),
    )
    init: str = dataclasses.field(
        default="kaiming",
        metadata=meta("distribution of a random a: kaiming (uniform) or gaussian"),
    )
    booster_init: str = dataclasses.field(
        default="carry",
        metadata=meta(
            "how a round's booster starts: carry (the a its layer trained last), random (a "
            "fresh a, b = 0: the paper's restart), gradient (a along the top singular vector of "
            "dL/dW), redraw (as carry, with a fresh a at each merge and the difference merged "
            "into W), orthogonal (as random, a drawn orthogonal to the layer's merged a's) or "
            "orthogonal-gradient (as gradient, the top singular pair in that complement)",
            core=True,
        ),
    )
    booster_keep: float | None = dataclasses.field(
        default=None,
        metadata=meta(
            "with booster_init carry or redraw: the fraction of each booster a merge leaves in "
            "place (None: 0.9 with every unit in every round, else 0)",
        ),
    )
    gradient_init_rounds: int | None = dataclasses.field(
        default=None,
        metadata=meta("with booster_init gradient: only the first N rounds (None: every round)"),
    )
    select: str = dataclasses.field(
        default="gradient",
        metadata=meta(
            "how rounds of fewer than all units pick them: by gradient norm (gradient) or "
            "uniformly (uniform)",
        ),
    )
    power_iters: int = dataclasses.field(
        default=4, metadata=meta("power iterations of booster_init gradient")
    )
    weight_decay: float = dataclasses.field(
        default=0.3,
        metadata=meta(
            "AdamW's decoupled weight decay on the boosters, in param_groups() (the finetune "
            "baseline lora: on LoRA's factors)",
        ),
    )
    optimizer_reset: str = dataclasses.field(
        default="all",
        metadata=meta(
            "at each merge, drop the merged boosters' optimizer state (all), only its momentum "
            "(momentum), or nothing (none)",
        ),
    )
    rewarm_steps: int = dataclasses.field(
        default=0, metadata=meta("linear lr re-warm-up over N steps after each merge (0: off)")
    )
    verify_replicas: bool = dataclasses.field(
        default=True,
        metadata=meta(
            "under torch.distributed: check at every round end that all ranks hold the same "
            "weights and boosters",
        ),
    )
    seed: int = dataclasses.field(
        default=0, metadata=meta("seeds layer sampling, booster init and stochastic-rounding bits")
    )
    record: bool = dataclasses.field(
        default=True,
        metadata=meta(
            "keep every merged booster (for export_lora and unmerge_; 4 (in + out) bytes a merge)",
        ),
    )

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
        if self.gradient_init_rounds is not None and self.booster_init not in GRADIENT_INITS:
            raise ValueError(
                "XGBLoRAConfig.gradient_init_rounds needs booster_init='gradient' (or "
                f"'orthogonal-gradient'), got booster_init={self.booster_init!r}"
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
        if self.booster_init.startswith("orthogonal") and not self.record:
            raise ValueError(
                f"XGBLoRAConfig.booster_init={self.booster_init!r} needs record=True (a resumed "
                "run rebuilds the merged directions from the merge records)"
            )

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

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> XGBLoRAConfig:
        """The config of preset ``name`` (one of ``PRESETS``) with ``overrides`` on top."""
        if name not in PRESET_VALUES:
            raise ValueError(f"unknown XGBLoRAConfig preset {name!r}; choose one of {PRESETS}")
        return cls(**(PRESET_VALUES[name] | overrides))

    @classmethod
    def paper(cls, **overrides: Any) -> XGBLoRAConfig:
        """The paper's recipe (arXiv 2410.19694): a random ``a`` and ``b = 0`` at every restart
        with the whole booster merged, 35% of the units per round drawn uniformly, fixed rounds
        of ``kappa`` steps; ``overrides`` on top."""
        return cls.preset("paper", **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XGBLoRAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown XGBLoRAConfig fields: {sorted(unknown)}")
        return cls(**data)
