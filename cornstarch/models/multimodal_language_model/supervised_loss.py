"""The LM head and cross-entropy only where the labels supervise a token.

A causal LM predicts token ``t + 1`` from position ``t``. In a multimodal batch most positions are prompt, modality
or padding tokens whose labels are -100, yet a plain forward computes ``[batch, seq, vocab]`` logits for all of
them, and their backward. Here the language model is asked (through transformers' ``logits_to_keep``, which every
``*ForCausalLM`` takes and which keeps each family's own head, soft-capping or scaling) for the logits of the
columns that supervise something in at least one row; the loss is the same mean cross-entropy over the same
targets as transformers' ``ForCausalLMLoss``.

>>> labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
>>> supervised_positions(labels)   # column 1 predicts 5, column 2 predicts 6 and 7
tensor([1, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .placeholders import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Columns ``t`` whose next label ``labels[:, t + 1]`` is supervised in any row.

    Args:
        labels: ``[batch, seq]`` with -100 where nothing is supervised.

    Returns:
        ``[n_kept]`` sorted column indices (int64), on ``labels``' device. Computing it waits for the device, so
        the data layer computes it on the CPU for accelerator training (see ``MultimodalCollator``).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # [n_kept]


def next_token_targets(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The label each kept logit column predicts: ``labels[:, positions + 1]`` (all of ``labels[:, 1:]`` if None).

    Returns:
        ``[batch, n_kept]`` (or ``[batch, seq - 1]``), aligned with ``logits[:, :n_kept]``.
    """
    if positions is None:
        return labels[:, 1:]
    return labels.index_select(1, positions + 1)  # [batch, n_kept]


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` against aligned ``targets`` (-100 ignored), computed in float32.

    Args:
        logits: ``[batch, n, vocab]``, column ``j`` predicting ``targets[:, j]``.
        targets: ``[batch, n]``.
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
