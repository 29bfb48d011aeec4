"""The training loss of :class:`MultimodalModel`: the LM head and cross-entropy only where a token is supervised
(:mod:`.supervised_loss`), optionally fused and chunked (:mod:`.chunked_loss`), plus a mixture-of-experts LM's
router term (:mod:`.moe`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .chunked_loss import check_chunk_size, chunked_head_loss, fusable_head
from .moe import expert_load, needs_full_logits, router_loss, router_top_k
from .supervised_loss import HiddenStatesAt, at_positions, causal_lm_loss, next_token_targets
from .supervised_loss import supervised_positions as supervised_positions_of


@dataclass
class MultimodalCausalLMOutput(CausalLMOutputWithPast):
    """A causal-LM output whose ``logits`` may cover only some positions.

    ``logits_positions``: ``[n]`` flat positions (``row * seq + column``) when ``logits`` is ``[1, n, vocab]``
    (training with labels: only where the next token is supervised); None when ``logits`` covers every position.
    ``predictions``: ``[1, n]`` the argmax of each of those logits, given instead of ``logits`` (None) when the head
    and loss ran in chunks (``MultimodalModel.loss_chunk_size``).
    ``aux_loss``, ``router_logits``: a mixture-of-experts LM's router load-balancing loss (unscaled; ``loss``
    includes it scaled as the LM scales it) and its per-layer router logits, when the LM returns them.
    """

    logits_positions: torch.LongTensor | None = None
    predictions: torch.LongTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class TrainingLoss:
    """``loss_chunk_size``, ``router_loss``, ``expert_load`` and the supervised-only forward of
    :class:`MultimodalModel` (a mixin: it needs ``language_model``, ``training`` and ``supervised_logits_only``)."""

    language_model: nn.Module
    _loss_chunk_size: int | None = None
    _warned_unfusable: bool = False

    @property
    def loss_chunk_size(self) -> int | None:
        """In training with labels, fuse the LM head and loss and run them this many supervised tokens at a time,
        without keeping logits (:mod:`.chunked_loss`); None (the default): the LM's own head.

        Raises:
            ValueError: when set to anything but None or a positive integer.
        """
        return self._loss_chunk_size

    @loss_chunk_size.setter
    def loss_chunk_size(self, value: int | None) -> None:
        self._loss_chunk_size = check_chunk_size(value)

    def _supervised_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                            labels: torch.Tensor, positions: torch.Tensor,
                            lm_kwargs: dict[str, Any]) -> MultimodalCausalLMOutput:
        """The LM with its head and loss only at the flat ``positions``: the LM's own head on ``[1, n, hidden]``,
        or, with ``loss_chunk_size`` and a head :func:`.chunked_loss.fusable_head` accepts, the fused chunked
        head and loss (no logits kept; ``predictions`` instead); plus the LM's router term (:meth:`router_loss`).
        A family whose head is not handed ``[batch, seq, hidden]`` computes full logits, taken at ``positions``."""
        num_items = lm_kwargs.pop("num_items_in_batch", None)
        targets = next_token_targets(labels, positions)  # [1, n_supervised]
        fused = self._fused_head()
        head = self.language_model.get_output_embeddings()
        # The LM's own forward runs in both cases (so it computes its router loss, if any); only its head is
        # given the supervised positions (or, fused, nothing: the chunked head runs outside it).
        with HiddenStatesAt(head, positions, capture=fused is not None) as at:
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs)
        if fused is not None and at.fired:
            loss, predictions = chunked_head_loss(at.selected[0], head.weight, head.bias, targets[0],
                                                  self.loss_chunk_size, fused[1], num_items)
            logits, predictions = None, predictions[None]  # [1, n_supervised]
        else:
            # logits[0, j] predicts the token after flat position positions[j]: [1, n_supervised, vocab]
            logits = out.logits if at.fired else at_positions(out.logits, positions)
            loss, predictions = causal_lm_loss(logits, targets, num_items), None
        extra = self.router_loss(out)
        if extra is not None:  # what the LM adds to its own loss when given labels
            loss = loss + extra.to(loss.device)
        return MultimodalCausalLMOutput(loss=loss, logits=logits, logits_positions=positions, predictions=predictions,
                                        cache=getattr(out, "cache", None),
                                        hidden_states=getattr(out, "hidden_states", None),
                                        attentions=getattr(out, "attentions", None),
                                        aux_loss=getattr(out, "aux_loss", None),
                                        router_logits=getattr(out, "router_logits", None))

    def router_loss(self, output: Any) -> torch.Tensor | None:
        """The mixture-of-experts router term of a forward's ``loss``: the LM's ``aux_loss`` scaled as the LM scales
        it (``router_aux_loss_coef``); None for a dense LM or when router logits were not requested
        (``output_router_logits``). Every training path includes it in ``loss``.

        Args:
            output: this model's forward output (any training path).

        Raises:
            ValueError: for a router loss from an LM without a known coefficient.
        """
        return router_loss(self.language_model, output)

    def expert_load(self, output: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each expert's share of the tokens a forward routed, averaged over MoE layers (:func:`.moe.expert_load`).

        Args:
            output: this model's forward output, with ``router_logits`` (``output_router_logits``).
            attention_mask: the forward's ``[batch, seq]`` mask (padding is not counted); None: every token.

        Returns:
            ``[n_experts]`` shares summing to 1, or None for a dense LM, without router logits, or when the LM's
            config names no experts-per-token count.
        """
        top_k = router_top_k(getattr(self.language_model, "config", None))
        if top_k is None:
            return None
        return expert_load(getattr(output, "router_logits", None), top_k, attention_mask)

    def _fused_head(self) -> tuple[nn.Linear, float | None] | None:
        """The head for the chunked loss when ``loss_chunk_size`` is set; warns once if the LM's head does not
        qualify (its own head then runs, with logits)."""
        if self.loss_chunk_size is None:
            return None
        fused = fusable_head(self.language_model)
        if fused is None and not self._warned_unfusable:
            self._warned_unfusable = True
            warnings.warn(f"loss_chunk_size is set but the language model's head "
                          f"({type(self.language_model.get_output_embeddings()).__name__} of model_type "
                          f"{getattr(self.language_model.config, 'model_type', None)!r}) is not one chunked_loss "
                          "reproduces; its own head computes the logits instead.", stacklevel=3)
        return fused

    def _supervised_positions(self, labels: torch.Tensor | None, given: torch.Tensor | None) -> torch.Tensor | None:
        """Flat positions to compute logits at, or None for the language model's own full-logits forward.

        Only in training with labels and ``supervised_logits_only``: then the ``supervised_positions`` the data
        layer computed on the CPU, or else positions derived from CPU labels. Labels already on an accelerator
        without them take the full path, so that ``forward`` never waits for the device. An LM whose loss has a
        term over every position's logits (:data:`.moe.FULL_LOGITS_TERMS`), or without an output layer, takes the full
        path too.
        """
        if labels is None or not (self.training and self.supervised_logits_only):
            return None
        if needs_full_logits(self.language_model) or self.language_model.get_output_embeddings() is None:
            return None  # a loss term over every position's logits, or no head to give only some positions
        if given is not None:
            return given
        return supervised_positions_of(labels) if labels.device.type == "cpu" else None
