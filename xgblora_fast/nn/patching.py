"""Swap ``FastRank1Linear`` into a model (``inject``) and plain modules back out (``eject``).

Targets are chosen like peft's ``target_modules``: a list of names matched as the full module
name or a dotted suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex string
(matched against the full name with ``re.fullmatch``), or ``"all-linear"`` (every linear layer
but the output embedding and the task heads, as peft's). Handled module types: ``nn.Linear`` and
transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``; wrapped as a transposed view, so no
copy and merges land in the original storage).

Task heads (``modules_to_save``, peft's notion): the modules named ``classifier``,
``pre_classifier``, ``score``, ``qa_outputs`` or ``classification_head`` (the heads transformers
puts on a body for classification and question answering, usually freshly initialised), plus any
the caller names. They are never boosted by ``"all-linear"`` and ``inject`` leaves their
parameters trainable: put them in the optimizer (``Booster.head_parameters()``). A pooler
(BERT's ``pooler.dense``) is part of the pretrained body and is boosted, as peft's
``"all-linear"`` adapts it; name it in ``modules_to_save`` where the checkpoint lacks it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

from xgblora_fast.nn.layer import FastRank1Linear

ALL_LINEAR = "all-linear"
# Names of the task heads transformers puts on a body (peft's SEQ_CLS / TOKEN_CLS / QUESTION_ANS
# modules_to_save, plus DistilBERT's fresh pre_classifier and BART's classification_head).
HEAD_NAMES = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head")


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


def check_target_modules(target_modules: object, what: str = "target_modules") -> None:
    """Raise TypeError/ValueError unless ``target_modules`` is ``"all-linear"``, a valid regex or a
    non-empty list/tuple of names (one-line messages naming ``what``)."""
    allowed = '"all-linear", a regex string, or a non-empty list of module names'
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(f"{what} must be {allowed}, got ''")
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"{what} is not a valid regex ({e}): {target_modules!r}") from None
        return
    if not isinstance(target_modules, (list, tuple)):
        raise TypeError(f"{what} must be {allowed}, got {type(target_modules).__name__}")
    if not target_modules:
        raise ValueError(f"{what} must be {allowed}, got an empty {type(target_modules).__name__}")
    bad = [s for s in target_modules if not isinstance(s, str) or not s]
    if bad:
        raise TypeError(f"{what} must hold non-empty str names only, got {bad[0]!r}")


def _names_matcher(names: Iterable[str]):
    names = list(names)
    return lambda name: any(name == s or name.endswith("." + s) for s in names)


def task_heads(model: nn.Module, modules_to_save: Iterable[str] = ()) -> list[str]:
    """Names of the task heads of ``model``, outermost only, in model order.

    A head is a module with parameters named one of ``HEAD_NAMES`` or matching a name of
    ``modules_to_save`` (full name or dotted suffix, as peft matches ``modules_to_save``). The
    output embedding (``lm_head``) is not a head: it belongs to the pretrained body.
    """
    extra = list(modules_to_save)
    if isinstance(modules_to_save, str) or not all(isinstance(n, str) for n in extra):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    named = _names_matcher(extra)
    outputs = {id(m) for m in _output_embeddings(model)}
    heads: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(h + ".") for h in heads) or id(module) in outputs:
            continue
        has_parameters = next(module.parameters(), None) is not None
        if has_parameters and (name.rpartition(".")[2] in HEAD_NAMES or named(name)):
            heads.append(name)
    return heads


def _output_embeddings(model: nn.Module) -> list[nn.Module]:
    """The output embedding of every transformers model in ``model`` (the outermost first)."""
    found = []
    for module in model.modules():
        get_out = getattr(module, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if isinstance(out, nn.Module):
            found.append(out)
    return found


def _matcher(target_modules: str | Iterable[str], model: nn.Module, heads: Iterable[str] = ()):
    if isinstance(target_modules, (set, frozenset)):  # peft accepts sets of names too
        target_modules = sorted(target_modules)
    check_target_modules(target_modules)
    if target_modules == ALL_LINEAR:
        outputs = {id(m) for m in _output_embeddings(model)}
        heads = tuple(heads)
        return lambda name, module: (
            id(module) not in outputs
            and not any(name == h or name.startswith(h + ".") for h in heads)
        )
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.fullmatch(name) is not None
    named = _names_matcher(target_modules)
    return lambda name, module: named(name)


def targeted_names(
    model: nn.Module, target_modules: str | Iterable[str], modules_to_save: Iterable[str] = ()
) -> list[str]:
    """The modules ``inject`` would wrap (``FastRank1Linear`` ones already injected included)."""
    match = _matcher(target_modules, model, task_heads(model, modules_to_save))
    return [
        name
        for name, module in model.named_modules()
        if name
        and (isinstance(module, FastRank1Linear) or _is_adaptable(module))
        and match(name, module)
    ]


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
    modules_to_save: Iterable[str] = (),
) -> dict[str, FastRank1Linear]:
    """Replace every matching linear layer of ``model`` by a ``FastRank1Linear``, in place.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model).
        target_modules: list of names/suffixes, a regex, or ``"all-linear"`` (every linear layer
            but the output embedding and the task heads, see ``task_heads``).
        alpha, dropout, backend, init: passed to each ``FastRank1Linear``.
        freeze_base: set ``requires_grad=False`` on every parameter but the boosters and the task
            heads (peft's behaviour with ``modules_to_save``): the heads stay trainable, so put
            them in the optimizer (``task_heads(model)`` names them).
        modules_to_save: names (or dotted suffixes) of further modules to treat as heads, e.g.
            ``["pooler"]`` when the checkpoint lacks BERT's pooler.
    Returns:
        ``{module name: FastRank1Linear}`` in model order.
    Raises:
        ValueError when nothing matches (with the adaptable names that exist); TypeError for a
        ``target_modules`` of the wrong type.
    """
    heads = task_heads(model, modules_to_save)
    match = _matcher(target_modules, model, heads)
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
        boosted = [name for name, _ in chosen]
        keep = {
            id(p)
            for h in heads
            if not any(b == h or b.startswith(h + ".") for b in boosted)  # a boosted head: base
            for p in model.get_submodule(h).parameters()
        }
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    layers = {}
    for name, module in chosen:
        layer = _wrap(module, alpha=alpha, dropout=dropout, backend=backend, init=init)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def _merge_live_booster(layer: FastRank1Linear, rounding: str) -> None:
    """Merge the layer's booster; a layer a recording ``Booster`` runs records it first (one
    more round after its last recorded one), so ``export_lora(booster)`` after ``eject`` still
    holds the whole fine-tune."""
    record = getattr(layer, "merge_record", None)
    recording = getattr(layer, "record_merges", False) and record is not None
    if not (recording and bool(layer.lora_b.any())):
        layer.merge_(rounding=rounding)
        return
    a, b = layer.booster_vectors()
    record.add_vectors(max(record.rounds, default=-1) + 1, 1.0, a, b, rounding)
    try:
        layer.merge_(rounding=rounding)
    except Exception:
        record.remove(len(record.rounds) - 1)  # a refused merge leaves W and the record alone
        raise


def _unwrap(layer: FastRank1Linear, rounding: str) -> nn.Module:
    _merge_live_booster(layer, rounding)
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

    A ``Booster`` with ``record=True`` keeps the merge records (``booster.records``, the boosters
    merged here included): ``xf.export_lora(booster, ...)`` and ``xf.unmerge_(booster)`` work
    after ``eject``; the ejected model alone holds no records. ``nn.Linear`` layers get their
    original Parameter objects back; GPT-2 ``Conv1D`` layers get their original ``[in, out]``
    storage. ``model.save_pretrained()`` then writes a standard
    checkpoint with the original keys. Returns ``model``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FastRank1Linear)]
    for name in names:
        _set_submodule(model, name, _unwrap(model.get_submodule(name), rounding))
    return model
