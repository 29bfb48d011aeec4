"""Checks of :meth:`MultimodalModel.forward`'s inputs that turn silent wrong results and deep errors into clear ones.

They cost no device synchronisation: shapes and dtypes are read on the host, values are checked exactly only on
CPU tensors, and on accelerators with an asynchronous device assertion (it fails at the next synchronisation).

>>> ids = torch.tensor([[1, 5, 9]])
>>> check_text_inputs(ids, None, torch.ones(1, 2), None, has_cache=False)  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
ValueError: attention_mask has shape [1, 2] but input_ids has [1, 3]: pad both to the same length ...
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...batch import IGNORE_INDEX

# Encoder inputs that hold normalised floating-point values (what the encoders' processors output).
FLOAT_INPUTS = {"pixel_values": "image processor", "pixel_values_videos": "video processor",
                "input_features": "feature extractor", "input_values": "feature extractor"}
NO_TARGETS = ("The batch has no supervised token (all labels are -100, so the mean loss would be 0/0 = NaN): its "
              "loss is 0 and it adds no gradient. Check that the samples' answers reach the labels.")


def check_text_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, labels: torch.Tensor | None, has_cache: bool) -> None:
    """Check that ``attention_mask`` and ``labels`` line up with ``input_ids`` (or ``inputs_embeds``).

    Args:
        input_ids: ``[batch, seq]``, or None when ``inputs_embeds`` (``[batch, seq, hidden]``) is given.
        attention_mask: ``[batch, seq]`` (longer only with a cache: it then covers the cached tokens too); other
            layouts (4-D masks) are the language model's to check.
        labels: ``[batch, seq]``.
        has_cache: whether a KV cache from earlier tokens is given.

    Raises:
        ValueError: naming the field, both shapes and the fix.
    """
    name, reference = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if reference is None:
        return
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {list(input_ids.shape)}; it must be [batch, seq] (add a batch "
                         "dimension: input_ids[None]).")
    shape = list(reference.shape[:2])
    if labels is not None and list(labels.shape) != shape:
        raise ValueError(f"labels has shape {list(labels.shape)} but {name} has {shape}: pad labels with -100 to "
                         "the same length (MultimodalCollator does).")
    if attention_mask is not None and attention_mask.dim() == 2:
        batch, length = attention_mask.shape
        if batch != shape[0] or length < shape[1] or length > shape[1] and not has_cache:
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)} but {name} has {shape}: pad "
                             "both to the same length (MultimodalCollator does).")


def check_encoder_dtypes(routed: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse integer pixels or waveforms (e.g. raw ``uint8`` images) where an encoder takes normalised floats.

    Args:
        routed: per encoder, its inputs (``MultimodalModel.route_inputs``).

    Raises:
        ValueError: naming the input, its dtype and the processor to run first.

    >>> check_encoder_dtypes({"vision": {"pixel_values": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: pixel_values (vision encoder) has dtype torch.uint8, but the encoder takes normalised ...
    """
    for key, inputs in routed.items():
        for name, value in inputs.items():
            if name in FLOAT_INPUTS and isinstance(value, torch.Tensor) and not value.is_floating_point():
                raise ValueError(f"{name} ({key} encoder) has dtype {value.dtype}, but the encoder takes normalised "
                                 f"floating-point values: run the {key} {FLOAT_INPUTS[name]} (MultimodalProcessor or "
                                 "MultimodalCollator do) on the raw items instead of passing them.")


def check_finite_inputs(routed: Mapping[str, Mapping[str, Any]], exact: Callable[[torch.Tensor], bool]) -> None:
    """Refuse NaN or infinite encoder inputs (pixel values, audio features), which would make every loss NaN.

    Args:
        routed: per encoder, its inputs (``MultimodalModel.route_inputs``).
        exact: whether reading a tensor's values is free (host memory): then a ``ValueError`` naming the input;
            elsewhere an asynchronous device assertion, so ``forward`` never waits for the device.

    Raises:
        ValueError: naming the input and its encoder (``exact``).
        RuntimeError: from the device assertion (not ``exact``), at the next synchronisation.

    >>> check_finite_inputs({"vision": {"pixel_values": torch.tensor([0.5, float("nan")])}}, lambda t: True)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: pixel_values (vision encoder) holds NaN or infinite values: ...
    """
    for key, inputs in routed.items():
        for name, value in inputs.items():
            if name not in FLOAT_INPUTS or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            finite = torch.isfinite(value).all()
            message = (f"{name} ({key} encoder) holds NaN or infinite values: check the {key} items and their "
                       f"{FLOAT_INPUTS[name]} (the data layer names the sample when it loads them).")
            if not exact(value):
                torch._assert_async(finite, message)
            elif not finite:
                raise ValueError(message)


def check_vocabulary(text_ids: torch.Tensor, vocab_size: int | None, token_ids: Mapping[str, int],
                     exact: bool | None = None) -> None:
    """Check that every token id, placeholders aside, indexes the language model's embeddings.

    Args:
        text_ids: ``[batch, seq]`` ids with the modality placeholders already replaced by 0.
        vocab_size: rows of the LM's input embeddings (None: not checked).
        token_ids: the modality placeholders' ids (for the message).
        exact: raise a ``ValueError`` naming the position (the default on CPU tensors, where reading the result
            costs nothing); False: an asynchronous device assertion (the default elsewhere).

    Raises:
        ValueError: naming the row, column, id and vocabulary size (``exact``).
        RuntimeError: from the device assertion (not ``exact``), at the next synchronisation.

    >>> check_vocabulary(torch.tensor([[1, 0, 130]]), 128, {"vision": 128})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: input_ids[0, 2] = 130 is outside the language model's vocabulary of 128 tokens ...
    """
    if vocab_size is None or torch.compiler.is_compiling():
        return
    bad = (text_ids < 0) | (text_ids >= vocab_size)  # [batch, seq]
    if not (text_ids.device.type == "cpu" if exact is None else exact):
        torch._assert_async(~bad.any(), f"input_ids hold ids outside the language model's vocabulary of {vocab_size} "
                                        "tokens (placeholders aside): the tokenizer does not match the model.")
        return
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"input_ids[{row}, {column}] = {int(text_ids[row, column])} is outside the language model's vocabulary "
            f"of {vocab_size} tokens (and no modality token: those are {dict(token_ids)}). The tokenizer does not "
            "match the language model: use the model's own tokenizer, or resize its embeddings "
            "(language_model.resize_token_embeddings(len(tokenizer))).")


def zero_loss_without_targets(output: Any, has_targets: bool | torch.Tensor) -> Any:
    """A batch whose labels supervise no token gets loss 0 (not the 0/0 = NaN of a mean over no tokens).

    The zero stays connected to the graph, so ``backward`` gives zero gradients (not NaN) and data-parallel ranks
    stay in step; a batch with supervised tokens keeps its loss bit for bit. When ``has_targets`` is known on the
    host (a bool, or a CPU tensor) and false, a warning says so.

    Args:
        output: a forward's output with ``loss`` (None: returned as is).
        has_targets: whether any label supervises a token: a bool, or a 0-d bool tensor (on an accelerator it is
            never read on the host).

    Returns:
        ``output``, with ``loss`` replaced where there are no targets.

    >>> from types import SimpleNamespace
    >>> zero_loss_without_targets(SimpleNamespace(loss=torch.tensor(2.5)), torch.tensor(True)).loss
    tensor(2.5000)
    """
    if getattr(output, "loss", None) is None:
        return output
    if isinstance(has_targets, torch.Tensor) and has_targets.device.type == "cpu":
        has_targets = bool(has_targets)
    if isinstance(has_targets, bool):
        if has_targets:
            return output
        warnings.warn(NO_TARGETS, stacklevel=3)
        has_targets = output.loss.new_zeros((), dtype=torch.bool)
    output.loss = torch.where(has_targets, output.loss, 0.0)
    return output


def any_targets(labels: torch.Tensor) -> torch.Tensor:
    """0-d bool: whether any position's next label is supervised (computed where ``labels`` are: no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).any()


def check_distinct_token_ids(token_ids: Mapping[str, int], reserved: Mapping[str, int | None] | None = None) -> None:
    """Check that each modality has its own placeholder id, none of them a reserved one (pad, bos, eos, unk).

    Two modalities sharing an id would have their features scattered into each other's positions; a placeholder
    that is also the padding or end token would turn those into feature slots.

    Args:
        token_ids: modality key → placeholder token id.
        reserved: description → id of tokens no placeholder may be (e.g. ``{"the tokenizer's pad token": 0}``).

    Raises:
        ValueError: naming both modalities (or the modality and the reserved token) and the id.

    >>> check_distinct_token_ids({"vision": 7, "audio": 7})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: Modalities 'vision' and 'audio' have the same placeholder token id 7; give each modality ...
    """
    owners = {token_id: what for what, token_id in (reserved or {}).items() if token_id is not None}
    seen: dict[int, str] = {}
    for key, token_id in token_ids.items():
        if token_id in seen:
            raise ValueError(f"Modalities {seen[token_id]!r} and {key!r} have the same placeholder token id "
                             f"{token_id}; give each modality its own token (MultimodalProcessor's predefined_tokens).")
        if token_id in owners:
            raise ValueError(f"The {key!r} placeholder token id {token_id} is {owners[token_id]}; give the "
                             "modality a token of its own (MultimodalProcessor's predefined_tokens).")
        seen[token_id] = key
