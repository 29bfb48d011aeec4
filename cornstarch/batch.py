"""What a batch is: the keys every layer agrees on, the label that supervises nothing, and the supervised positions.

The data layer produces these keys, :class:`~cornstarch.models.MultimodalModel` consumes the model inputs and the
Lightning module splits off the rest. Modality inputs (``pixel_values``, ``input_features``, …) are the encoders'
own argument names and are not listed here.

>>> IGNORE_INDEX, TEXT_KEYS
(-100, ('input_ids', 'attention_mask', 'labels'))
>>> labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
>>> supervised_positions(labels)   # flat positions (row * seq + column) whose next token is supervised
tensor([1, 2, 6])
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that supervises nothing (transformers' and torch's cross-entropy ignore_index)
TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # [batch, seq] each
POSITION_IDS = "position_ids"  # [batch, seq]: restart per sample in packed rows
SUPERVISED_POSITIONS = "supervised_positions"  # [n]: flat positions whose next token is supervised (CPU-computed)
EVAL_KEYS = ("answers", "prompt_input_ids", "prompt_attention_mask")  # for generation, never model inputs
INDEX_KEY = "__index__"  # a sample's row in its dataset, so errors can name it


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]``: at column ``t`` the label of ``t + 1`` (``IGNORE_INDEX`` in the last column)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``row * seq + t`` whose next label ``labels[row, t + 1]`` is supervised.

    Args:
        labels: ``[batch, seq]`` with ``IGNORE_INDEX`` where nothing is supervised.

    Returns:
        ``[n_supervised]`` sorted int64 indices into the ``[batch * seq]`` flattened positions, on ``labels``'
        device. Computing it waits for the device, so for accelerator training the data layer computes it on the
        CPU and passes it as the batch's ``supervised_positions``.
    """
    return (next_labels(labels) != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # [n_supervised]
