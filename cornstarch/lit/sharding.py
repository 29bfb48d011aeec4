"""FSDP units of a MultimodalModel, found from the models themselves, and how to shard with them.

Units (each one all-gathers and reduce-scatters as a whole), innermost first:

- a mixture-of-experts LM's experts, inside each decoder layer: the module holding a layer's expert weights
  (``MixtralExperts``, …: a class named ``…Experts`` with its own forward, or each expert of an ``experts`` list),
  so a layer's experts are gathered apart from its attention. Not where the family lists that class in its
  ``_no_split_modules`` (it must stay in one piece there);
- every encoder layer and LM decoder layer: the outermost modules whose class the part lists in its Hugging Face
  ``_no_split_modules`` (``CLIPEncoderLayer``, ``LlamaDecoderLayer``, … — also embeddings some families list);
- each projector;
- each ``ModalEncoderModule`` (the tower's remaining parameters: embeddings, layer norms). The tower's own root
  module is never a unit: sharding an HF vision tower's root breaks transformers' output capture;
- modules split off so that no unit mixes schedule components (e.g. LoRA adapters inside a frozen layer);
- the root (the ``MultimodalModel``: the LM's embeddings, final norm and head). The root's parameters stay
  gathered through its forward, so the LM's input embedding may be used outside the LM's forward (the merge).

Every unit's own parameters belong to one schedule component (``vision.module``, ``vision.projector``,
``language_model``, ``lora``), so a freeze-schedule transition flips ``requires_grad`` of whole units.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy
from transformers.modeling_layers import GradientCheckpointingLayer

CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass
class Unit:
    """One FSDP unit: a qualified name in the ``MultimodalModel`` (``""`` for the root) and its module."""

    name: str
    module: nn.Module
    kind: str  # "experts" | "layer" | "projector" | "encoder" | "split" | "root"


def no_split_classes(part: nn.Module) -> set[str]:
    """Class names listed in ``_no_split_modules`` by the Hugging Face models inside ``part`` (PEFT-wrapped too)."""
    names: set[str] = set()
    for module in part.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return names


def _outermost(part: nn.Module, prefix: str, classes: set[str]) -> list[Unit]:
    """Outermost submodules of ``part`` (not ``part`` itself) whose class name is in ``classes``."""
    found: list[Unit] = []
    taken: list[str] = []
    for name, module in part.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        if type(module).__name__ in classes:
            found.append(Unit(f"{prefix}.{name}", module, "layer"))
            taken.append(name)
    return found


def _experts(layer: Unit, no_split: set[str]) -> list[Unit]:
    """The expert-weight modules inside a decoder-layer unit (see the module docstring), outermost only."""
    found: list[Unit] = []
    taken: list[str] = []
    for name, module in layer.module.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken) or type(module).__name__ in no_split:
            continue
        if type(module).__name__.endswith("Experts") and not isinstance(module, CONTAINERS):
            found.append(Unit(f"{layer.name}.{name}", module, "experts"))
            taken.append(name)
        elif name.rpartition(".")[2] == "experts" and isinstance(module, nn.ModuleList):
            found += [Unit(f"{layer.name}.{name}.{i}", expert, "experts") for i, expert in enumerate(module)
                      if next(expert.parameters(), None) is not None]
            taken.append(name)
    return found


def _component_of(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, params in model.components().items() for _, p in params}


def _owned(unit: nn.Module, inner: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters of ``unit`` not inside any of the ``inner`` units."""
    inner_ids = {id(p) for m in inner for p in m.parameters()}
    return [p for p in unit.parameters() if id(p) not in inner_ids]


def _split_mixed(unit: Unit, inner: list[nn.Module], component_of: dict[int, str]) -> list[Unit]:
    """Submodules to shard on their own so ``unit`` keeps parameters of one component (its majority)."""
    owned = _owned(unit.module, inner)
    counts: dict[str, int] = {}
    for p in owned:
        counts[component_of.get(id(p), "?")] = counts.get(component_of.get(id(p), "?"), 0) + p.numel()
    if len(counts) <= 1:
        return []
    majority = max(counts, key=counts.get)
    inner_ids = {id(p) for m in inner for p in m.parameters()}
    split: list[Unit] = []
    taken: list[str] = []
    for name, module in unit.module.named_modules():
        if not name or isinstance(module, CONTAINERS) or any(name.startswith(t + ".") for t in taken):
            continue
        params = [p for p in module.parameters() if id(p) not in inner_ids]
        kinds = {component_of.get(id(p), "?") for p in params}
        if params and len(kinds) == 1 and majority not in kinds:
            split.append(Unit(f"{unit.name}.{name}".lstrip("."), module, "split"))
            taken.append(name)
    return split


def wrap_units(model: nn.Module, root: bool = True) -> list[Unit]:
    """The FSDP units of a ``MultimodalModel``, innermost first (the order to shard them in).

    Args:
        model: the ``MultimodalModel``.
        root: include the root unit (FSDP2 shards it; FSDP1's root is the Lightning module Lightning wraps).

    Returns:
        The units, children before their parents, the root last.
    """
    units: list[Unit] = []
    for key, encoder in model.encoders.items():
        units += _outermost(encoder.module, f"{key}_encoder.module", no_split_classes(encoder.module))
        units.append(Unit(f"{key}_encoder.projector", encoder.projector, "projector"))
    lm_no_split = no_split_classes(model.language_model)
    for layer in _outermost(model.language_model, "language_model", lm_no_split):
        units += _experts(layer, lm_no_split) + [layer]
    for key, encoder in model.encoders.items():
        units.append(Unit(f"{key}_encoder", encoder, "encoder"))
    if root:
        units.append(Unit("", model, "root"))
    component_of = _component_of(model)
    result: list[Unit] = []
    for unit in units:
        inner = [u.module for u in result if _contains(unit.module, u.module)]
        extra = _split_mixed(unit, inner, component_of)
        result += extra + [unit]
    return result


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return outer is not inner and any(m is inner for m in outer.modules())


def unit_components(model: nn.Module, units: list[Unit]) -> dict[str, set[str]]:
    """Per unit, the schedule components of the parameters it owns (for checks: one each)."""
    component_of = _component_of(model)
    result = {}
    for i, unit in enumerate(units):
        inner = [u.module for u in units[:i] if _contains(unit.module, u.module)]
        result[unit.name] = {component_of.get(id(p), "?") for p in _owned(unit.module, inner)}
    return result


def checkpointed_layers(units: list[Unit]) -> list[nn.Module]:
    """The layers activation checkpointing recomputes: the layer units that transformers itself checkpoints
    (``GradientCheckpointingLayer``: encoder and decoder layers), else every layer unit."""

    layers = [u.module for u in units if u.kind == "layer"]
    hf = [m for m in layers if isinstance(m, GradientCheckpointingLayer)]
    return hf or layers


# ------------------------------------------------------------------------------------------------ FSDP2
def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2 ``MixedPrecisionPolicy`` for a Trainer precision: ``bf16-mixed``/``16-mixed`` compute in half
    precision and reduce gradients in float32; other precisions need none (``None``).

    >>> mixed_precision_policy("bf16-mixed").param_dtype
    torch.bfloat16
    >>> mixed_precision_policy("32-true") is None
    True
    """

    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return None if half is None else MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)


def shard_fsdp2(model: nn.Module, mesh: Any, precision: str | None = None) -> list[Unit]:
    """Apply ``fully_shard`` to every unit of ``model`` (innermost first, the root last).

    Activation checkpointing is the model's own (``MultimodalLitModule(gradient_checkpointing=True)`` turns on
    transformers' per-layer checkpointing: the same layers as the units), so parameter names do not change.

    Args:
        model: the ``MultimodalModel`` (not yet sharded).
        mesh: the data-parallel ``DeviceMesh``.
        precision: the Trainer precision (see :func:`mixed_precision_policy`).

    Returns:
        The units.
    """

    units = wrap_units(model)
    policy = mixed_precision_policy(precision)
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    for unit in units:
        fully_shard(unit.module, **kwargs)
    return units


def refresh_fsdp2(model: nn.Module) -> None:
    """After ``requires_grad`` changed (a freeze-schedule transition): let each FSDP2 unit re-derive its
    gradient dtypes (it set them from the parameters that were trainable when it first ran)."""

    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None and hasattr(group, "_init_mp_dtypes"):
                group._init_mp_dtypes()


def is_fsdp2(model: nn.Module) -> bool:

    return isinstance(model, FSDPModule)


# ------------------------------------------------------------------------------------------------ FSDP1
def fsdp1_policies(model: nn.Module) -> tuple[Any, Any, bool]:
    """FSDP1 auto-wrap and activation-checkpointing policies for a ``MultimodalModel``, and ``use_orig_params``.

    The wrap policy wraps the same units as FSDP2 except the root (Lightning wraps the LightningModule, whose
    FSDP unit then holds the LM's embeddings, final norm and head); the checkpointing policy names the layers.
    ``use_orig_params`` is needed wherever frozen and trainable parameters meet (always true here: the optimizer
    has one group per component, which FSDP1 only allows with original parameters).

    Returns:
        ``(auto_wrap_policy, activation_checkpointing_policy, use_orig_params)``.
    """

    units = wrap_units(model, root=False)
    unit_ids = {id(u.module) for u in units}
    layer_ids = {id(m) for m in checkpointed_layers(units)}
    return CustomPolicy(lambda m: id(m) in unit_ids), CustomPolicy(lambda m: id(m) in layer_ids), True


@contextmanager
def gathered_root(model: nn.Module) -> Iterator[bool]:
    """Keep an FSDP2 root unit's parameters gathered (e.g. around ``generate``, which uses the LM's embeddings
    outside any forward); yields whether the model is sharded (then every rank must run the same number of
    forwards: ``generate(synced_gpus=True)``). A no-op for unsharded models."""
    if not is_fsdp2(model):
        yield False
        return
    model._get_fsdp_state()._lazy_init()  # the root must be known before any inner unit runs
    model.unshard()
    try:
        yield True
    finally:
        model.reshard()
