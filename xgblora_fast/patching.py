"""Swap ``FastRank1Linear`` into a model (``inject``) and plain modules back out (``eject``).

Targets are chosen like peft's ``target_modules``: a list of names matched as the full module
name or a dotted suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex string
(matched against the full name with ``re.fullmatch``), or ``"all-linear"`` (every linear layer
but the output embedding). Handled module types: ``nn.Linear`` and transformers' GPT-2 ``Conv1D``
(weight stored ``[in, out]``; wrapped as a transposed view, so no copy and merges land in the
original storage).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

from xgblora_fast.layer import FastRank1Linear

ALL_LINEAR = "all-linear"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_adaptable(module: nn.Module) -> bool:
    # MultiheadAttention reads its out_proj's weight directly and never calls its forward, so
    # a booster there would be silently ignored.
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _matcher(target_modules: str | Iterable[str], model: nn.Module):
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        get_out = getattr(model, "get_output_embeddings", None)
        output_layer = get_out() if callable(get_out) else None
        return lambda name, module: module is not output_layer
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) for s in suffixes):
        raise ValueError(f"target_modules must be a non-empty list of names, got {suffixes!r}")
    return lambda name, module: any(name == s or name.endswith("." + s) for s in suffixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _wrap(module: nn.Module, **layer_kwargs) -> FastRank1Linear:
    linear = module
    if not isinstance(module, nn.Linear):
        # GPT-2 Conv1D: y = x @ weight + bias with weight [in, out]; W = weight^T is a view.
        linear = nn.Linear(1, 1, bias=False, device="meta")
        linear.weight = nn.Parameter(module.weight.data.t(), requires_grad=False)
        linear.bias = module.bias
    requires_grad = (module.weight.requires_grad, getattr(module.bias, "requires_grad", False))
    layer = FastRank1Linear.from_linear(linear, **layer_kwargs)
    # The original module (unregistered: its tensors are the layer's) comes back on eject with
    # its class, hooks and attributes.
    object.__setattr__(layer, "_source_module", module)
    object.__setattr__(layer, "_source_requires_grad", requires_grad)
    return layer


def inject(
    model: nn.Module,
    target_modules: str | Iterable[str] = ALL_LINEAR,
    alpha: float = 1.0,
    dropout: float = 0.0,
    backend: str = "auto",
    freeze_base: bool = True,
    init: str = "kaiming",
) -> dict[str, FastRank1Linear]:
    """Replace every matching linear layer of ``model`` by a ``FastRank1Linear``, in place.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model).
        target_modules: list of names/suffixes, a regex, or ``"all-linear"``.
        alpha, dropout, backend, init: passed to each ``FastRank1Linear``.
        freeze_base: set ``requires_grad=False`` on every parameter but the boosters (peft's
            behaviour); unfreeze a head afterwards if it should train too.
    Returns:
        ``{module name: FastRank1Linear}`` in model order.
    Raises:
        ValueError when nothing matches (with the adaptable names that exist).
    """
    match = _matcher(target_modules, model)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_adaptable(module) and match(name, module)
    ]
    if not chosen:
        available = [n for n, m in model.named_modules() if n and _is_adaptable(m)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear/Conv1D module; "
            f"adaptable modules include {available[:8]}"
        )
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    layers = {}
    for name, module in chosen:
        layer = _wrap(module, alpha=alpha, dropout=dropout, backend=backend, init=init)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def _unwrap(layer: FastRank1Linear, rounding: str) -> nn.Module:
    layer.merge_(rounding=rounding)
    module = getattr(layer, "_source_module", None)
    weight_grad, bias_grad = getattr(layer, "_source_requires_grad", (False, False))
    if module is None:  # a FastRank1Linear built directly: hand back a plain nn.Linear
        module = nn.Linear(1, 1, bias=False, device="meta")
        module.in_features, module.out_features = layer.in_features, layer.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        # Conv1D stores [in, out]; the layer's weight is a view of that storage (or its moved
        # copy after .to()), so transpose back rather than trust the old Parameter.
        module.weight = nn.Parameter(layer.weight.data.t())
    else:
        module.weight = layer.weight
    module.bias = layer.bias
    module.weight.requires_grad_(weight_grad)
    if module.bias is not None:
        module.bias.requires_grad_(bias_grad)
    return module


def eject(model: nn.Module, rounding: str = "nearest") -> nn.Module:
    """Merge every ``FastRank1Linear`` of ``model`` into its weight and restore the plain module.

    ``nn.Linear`` layers get their original Parameter objects back; GPT-2 ``Conv1D`` layers get
    their original ``[in, out]`` storage. ``model.save_pretrained()`` then writes a standard
    checkpoint with the original keys. Returns ``model``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FastRank1Linear)]
    for name in names:
        _set_submodule(model, name, _unwrap(model.get_submodule(name), rounding))
    return model
