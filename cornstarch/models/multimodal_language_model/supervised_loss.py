"""The LM head and cross-entropy only where the labels supervise a token.

A causal LM predicts token ``t + 1`` from position ``t``. In a multimodal batch most positions are prompt, modality
or padding tokens whose labels are -100, yet a plain forward computes ``[batch, seq, vocab]`` logits for all of
them, and their backward. Here the decoder's last hidden states are gathered at the supervised positions before
the language model applies its own head (so each family's soft-capping or scaling still applies), giving logits
``[1, n_supervised, vocab]``; the loss is the same mean cross-entropy over the same targets as transformers'
``ForCausalLMLoss``.

>>> labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
>>> supervised_positions(labels)   # flat positions (row * seq + column) whose next token is supervised
tensor([1, 2, 6])
>>> next_token_targets(labels, supervised_positions(labels))
tensor([[5, 6, 7]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .placeholders import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``row * seq + t`` whose next label ``labels[row, t + 1]`` is supervised.

    Args:
        labels: ``[batch, seq]`` with -100 where nothing is supervised.

    Returns:
        ``[n_supervised]`` sorted int64 indices into the ``[batch * seq]`` flattened positions, on ``labels``'
        device. Computing it waits for the device, so for accelerator training the data layer computes it on the
        CPU and passes it as ``supervised_positions``.
    """
    return (_shifted(labels) != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # [n_supervised]


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]``: at ``t`` the label of ``t + 1`` (-100 in the last column)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def next_token_targets(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The label each logit predicts, aligned with the logits.

    Returns:
        ``[1, n]`` targets of the logits at flat ``positions`` (see :func:`supervised_positions`); with
        ``positions=None`` (full logits ``[batch, seq, vocab]``), ``labels[:, 1:]`` for ``logits[:, :-1]``.
    """
    if positions is None:
        return labels[:, 1:]
    return at_positions(_shifted(labels), positions)  # [1, n]


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, ...]`` → ``[1, n, ...]`` at flat ``positions``: labels, hidden states before the head, or
    full logits compared with a training forward's."""
    return values.flatten(0, 1).index_select(0, positions)[None]


class HiddenStatesAt:
    """Context manager: the language model's decoder returns its last hidden states only at ``positions``.

    The ``*ForCausalLM`` then applies its head (and any soft-capping) to ``[1, n, hidden]`` instead of
    ``[batch, seq, hidden]``.

    Args:
        decoder: the LM's decoder (``language_model.get_decoder()``).
        positions: ``[n]`` flat positions into ``[batch * seq]``.
    """

    def __init__(self, decoder: nn.Module, positions: torch.Tensor):
        self.decoder, self.positions = decoder, positions

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        selected = at_positions(output[0], self.positions)  # [batch, seq, hidden] -> [1, n, hidden]
        if isinstance(output, tuple):
            return (selected, *output[1:])
        output["last_hidden_state"] = selected
        return output

    def __enter__(self) -> "HiddenStatesAt":
        self._handle = self.decoder.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` against aligned ``targets`` (-100 ignored), computed in float32.

    Args:
        logits: ``[rows, n, vocab]``, ``logits[r, j]`` predicting ``targets[r, j]``.
        targets: ``[rows, n]``.
        num_items_in_batch: divide the summed loss by this (gradient accumulation, as in transformers);
            default: the mean over supervised targets.
    """
    flat_logits = logits.float().flatten(0, 1)  # [batch * n, vocab]
    flat_targets = targets.flatten().to(flat_logits.device)  # [batch * n]
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, sample_of_target: torch.Tensor,
                    n_samples: int) -> torch.Tensor:
    """Mean cross-entropy of each sample, for batches whose rows hold several samples (packing) or one.

    Args:
        logits: ``[rows, n, vocab]``, aligned with ``targets`` ``[rows, n]`` (see :func:`next_token_targets`).
        sample_of_target: ``[rows, n]``, the sample each target belongs to (ignored where the target is -100).
        n_samples: number of samples.

    Returns:
        ``[n_samples]`` (NaN for a sample without supervised targets).
    """
    flat_targets = targets.flatten()
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), flat_targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # [rows * n]
    supervised = flat_targets != IGNORE_INDEX
    sample = sample_of_target.flatten()[supervised]
    totals = token_loss.new_zeros(n_samples).index_add_(0, sample, token_loss[supervised])
    counts = torch.bincount(sample, minlength=n_samples).to(totals.dtype)
    return totals / counts  # [n_samples]

