"""Mixture-of-experts language models: the router's auxiliary loss in every training path, and the experts' load.

A transformers MoE ``*ForCausalLM`` (Mixtral, Qwen3-MoE, OLMoE, …) with ``output_router_logits=True`` returns the
router's load-balancing loss as ``aux_loss`` and, when given ``labels``, adds ``router_aux_loss_coef * aux_loss``
to its loss. The training paths that compute the cross-entropy outside the LM's forward (logits only where
supervised, the fused chunked head) add the same term with :func:`router_loss`, so every path's loss is the LM's
own. Families that add a term computed over *all* logits (:data:`FULL_LOGITS_TERMS`) keep the LM's full-logits
forward.

>>> from types import SimpleNamespace
>>> lm = SimpleNamespace(router_aux_loss_coef=0.5, config=SimpleNamespace())
>>> router_loss(lm, SimpleNamespace(aux_loss=torch.tensor(2.0)))
tensor(1.)
>>> router_loss(lm, SimpleNamespace(aux_loss=None)) is None  # a dense LM, or router logits not requested
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Attributes a MoE ``*ForCausalLM`` keeps its router-loss coefficient in (it scales ``aux_loss`` by it).
COEFFICIENT_ATTRIBUTES = ("router_aux_loss_coef", "aux_loss_coef")
# Config attributes naming how many experts each token is routed to.
TOP_K_ATTRIBUTES = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k")
# model_type → attribute (on the LM, else its config) of a loss term's weight the LM computes over the logits of every
# position (not only the supervised ones); while it is nonzero, training takes the LM's own full-logits forward.
FULL_LOGITS_TERMS: dict[str, str] = {"bamba": "z_loss_coefficient"}


def _base(language_model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft`` wrapper (or the model itself)."""
    get_base = getattr(language_model, "get_base_model", None)
    return get_base() if callable(get_base) else language_model


def router_aux_coef(language_model: nn.Module) -> float | None:
    """The coefficient the LM scales its router auxiliary loss by when it computes its own loss.

    Args:
        language_model: a Hugging Face ``*ForCausalLM`` (or a ``peft`` model wrapping one).

    Returns:
        The LM's own ``router_aux_loss_coef`` (``aux_loss_coef`` in JetMoE), else its config's; None for an LM
        without one.
    """
    model = _base(language_model)
    for holder in (model, getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        for name in COEFFICIENT_ATTRIBUTES:
            value = getattr(holder, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def router_loss(language_model: nn.Module, output: Any) -> torch.Tensor | None:
    """The router term the LM adds to its loss when given labels: ``coefficient * output.aux_loss``.

    Args:
        language_model: the LM that produced ``output``.
        output: its forward's output (``aux_loss`` is set when the LM computed router logits).

    Returns:
        A scalar tensor, or None when the output carries no router loss.

    Raises:
        ValueError: for an output with an ``aux_loss`` from an LM without a known coefficient.
    """
    aux = getattr(output, "aux_loss", None)
    if aux is None or not isinstance(aux, torch.Tensor):
        return None
    coef = router_aux_coef(language_model)
    if coef is None:
        raise ValueError(f"{type(_base(language_model)).__name__} returned a router aux_loss but has none of "
                         f"{COEFFICIENT_ATTRIBUTES}: cannot tell how it weighs that loss.")
    return coef * aux


def needs_full_logits(language_model: nn.Module) -> bool:
    """True if the LM's loss has a term over the logits of every position (see :data:`FULL_LOGITS_TERMS`).

    Args:
        language_model: the LM (or a ``peft`` model wrapping one).
    """
    model = _base(language_model)
    config = getattr(model, "config", None)
    attribute = FULL_LOGITS_TERMS.get(getattr(config, "model_type", None))
    if attribute is None:
        return False
    return bool(getattr(model, attribute, getattr(config, attribute, 0)))  # the value the LM's forward reads


def router_top_k(config: Any) -> int | None:
    """Experts per token from a MoE config (``num_experts_per_tok`` or a family's name for it).

    Args:
        config: the LM's config (its ``text_config`` is looked at too).

    Returns:
        The count, or None if the config names none.
    """
    for holder in (config, getattr(config, "text_config", None)):
        for name in TOP_K_ATTRIBUTES:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def expert_load(router_logits: Any, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Each expert's share of the routed tokens, averaged over MoE layers: ``[n_experts]``, summing to 1.

    The routing counted is the one the load-balancing loss sees: each token's ``top_k`` largest router logits.

    Args:
        router_logits: a forward's ``router_logits``: per MoE layer ``[tokens, n_experts]`` (layers with another
            expert count, or without a router, are skipped).
        top_k: experts per token.
        attention_mask: ``[batch, seq]`` (``tokens = batch * seq``); padding is not counted. None: every token.

    Returns:
        ``[n_experts]`` float32 shares on the logits' device (no host sync), or None without router logits.

    >>> logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 1.0, 3.0]])  # 3 tokens, 3 experts
    >>> expert_load((logits,), top_k=1)
    tensor([0.6667, 0.0000, 0.3333])
    """
    layers = [g for g in (router_logits or ()) if isinstance(g, torch.Tensor) and g.dim() == 2]
    if not layers:
        return None
    n_experts = layers[0].shape[-1]
    layers = [g for g in layers if g.shape[-1] == n_experts]
    counts = layers[0].new_zeros(n_experts, dtype=torch.float32)
    for gate in layers:  # a handful of layers; no loop over tokens
        chosen = gate.detach().topk(top_k, dim=-1).indices  # [tokens, k]
        weight = torch.ones_like(chosen, dtype=torch.float32)
        if attention_mask is not None and attention_mask.numel() == gate.shape[0]:
            weight = weight * attention_mask.reshape(-1, 1).to(weight)
        counts.index_add_(0, chosen.reshape(-1), weight.reshape(-1))
    return counts / counts.sum().clamp(min=1)
