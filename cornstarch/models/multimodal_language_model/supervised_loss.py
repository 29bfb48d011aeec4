"""The LM head and cross-entropy only where the labels supervise a token.

A causal LM predicts token ``t + 1`` from position ``t``. In a multimodal batch most positions are prompt, modality
or padding tokens whose labels are -100, yet a plain forward computes ``[batch, seq, vocab]`` logits for all of
them, and their backward. Here the head's input (the decoder's last hidden states) is gathered at the supervised
positions before the language model applies its own head (so each family's soft-capping or scaling still applies),
giving logits ``[1, n_supervised, vocab]``; the loss is the same mean cross-entropy over the same targets as
transformers' ``ForCausalLMLoss``.

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

from ...batch import IGNORE_INDEX, next_labels, supervised_positions  # noqa: F401  (re-exported)


def next_token_targets(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The label each logit predicts, aligned with the logits.

    Returns:
        ``[1, n]`` targets of the logits at flat ``positions`` (see :func:`supervised_positions`); with
        ``positions=None`` (full logits ``[batch, seq, vocab]``), ``labels[:, 1:]`` for ``logits[:, :-1]``.
    """
    if positions is None:
        return labels[:, 1:]
    return at_positions(next_labels(labels), positions)  # [1, n]


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, ...]`` → ``[1, n, ...]`` at flat ``positions``: labels, hidden states before the head, or
    full logits compared with a training forward's."""
    return values.flatten(0, 1).index_select(0, positions)[None]


class HiddenStatesAt:
    """Context manager: the language model's output layer (its head) sees its input only at ``positions``.

    A forward pre-hook on the head gathers its ``[batch, seq, hidden]`` input (the decoder's last hidden states,
    after whatever the family applies to them before the head) at the flat ``positions``, so the
    ``*ForCausalLM`` computes ``[1, n, vocab]`` logits instead of ``[batch, seq, vocab]`` (and applies any
    soft-capping or scaling after its head as usual). With ``capture=True`` the selected states are kept in
    ``selected`` and the head gets an empty ``[1, 0, hidden]`` slice: the LM's forward still runs whole (its router
    loss included) but computes no logits, for a head applied outside it (:mod:`.chunked_loss`).

    ``fired`` tells whether the head ran on a ``[batch, seq, hidden]`` input; when it did not (a family whose head
    gets something else), the LM computed its logits at every position and nothing was selected.

    Args:
        head: the LM's output layer (``language_model.get_output_embeddings()``).
        positions: ``[n]`` flat positions into ``[batch * seq]``.
        capture: keep the states in ``selected``, hand the head none.
    """

    def __init__(self, head: nn.Module, positions: torch.Tensor, capture: bool = False):
        self.head, self.positions, self.capture = head, positions, capture
        self.selected: torch.Tensor | None = None
        self.fired = False

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs.get("input")
        if self.fired or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        self.fired = True
        selected = at_positions(hidden, self.positions)  # [batch, seq, hidden] -> [1, n, hidden]
        if self.capture:
            self.selected, selected = selected, selected[:, :0]  # the head gets [1, 0, hidden]
        return ((selected, *args[1:]), kwargs) if args else (args, {**kwargs, "input": selected})

    def __enter__(self) -> "HiddenStatesAt":
        self._handle = self.head.register_forward_pre_hook(self._hook, with_kwargs=True)
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


def predicted_and_target_tokens(output: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each computed logit predicts (its argmax) and the label it is scored against, for any training
    forward's output: full logits ``[batch, seq, vocab]``, logits at the supervised positions
    (``logits_positions``), or the chunked loss's ``predictions`` with no logits.

    Args:
        output: a :class:`~cornstarch.models.multimodal_language_model.MultimodalModel` forward's output.
        labels: the ``[batch, seq]`` labels given to that forward.

    Returns:
        ``(predictions, targets)`` of one shape (``[batch, seq - 1]`` or ``[1, n_supervised]``); targets are
        ``IGNORE_INDEX`` where nothing is supervised.
    """
    positions = getattr(output, "logits_positions", None)  # set when logits exist only where supervised
    targets = next_token_targets(labels, positions)
    predictions = getattr(output, "predictions", None)  # given instead of logits by the chunked loss
    if predictions is None:
        logits = output.logits if positions is not None else output.logits[:, :-1]  # [*, n, vocab]
        predictions = logits.argmax(-1)
    return predictions, targets


def token_accuracy(output: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctly predicted and supervised token counts of a training forward (any output shape, see
    :func:`predicted_and_target_tokens`), as 0-d tensors on the model's device (no host sync).

    >>> from types import SimpleNamespace
    >>> labels = torch.tensor([[-100, 4, 5]])
    >>> logits = torch.nn.functional.one_hot(torch.tensor([[4, 9, 0]]), 10).float()  # predicts 4, then 9
    >>> correct, total = token_accuracy(SimpleNamespace(logits=logits), labels)
    >>> int(correct), int(total)
    (1, 2)
    """
    predictions, targets = predicted_and_target_tokens(output, labels)
    supervised = targets != IGNORE_INDEX
    return ((predictions == targets) & supervised).sum(), supervised.sum()
