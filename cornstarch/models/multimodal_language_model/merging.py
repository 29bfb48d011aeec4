"""Scatter encoder features into the LLM's input embeddings at the modality-token positions.

The hot path of every forward: no ``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero()`` or Python loop over
samples. The only Python loop is over modalities (a handful). Token/feature counts are checked exactly on CPU
tensors (where reading a count costs no device synchronisation) and with an asynchronous device assertion
elsewhere; the data layer counts modality tokens on the CPU before a batch ever reaches the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ...batch import IGNORE_INDEX
from .input_checks import check_vocabulary


def modality_masks(input_ids: torch.Tensor, token_ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """Boolean masks ``[batch, seq]`` of each modality's placeholder positions.

    >>> ids = torch.tensor([[5, 9, 9, 1]])
    >>> modality_masks(ids, {"vision": 9})["vision"].tolist()
    [[False, True, True, False]]
    """
    return {key: input_ids == token_id for key, token_id in token_ids.items()}


def _counts_error(key: str, n_tokens: int, n_features: int) -> str:
    return (
        f"Modality {key!r}: the batch has {n_tokens} {key} token(s) but the {key} encoder produced "
        f"{n_features} feature vector(s). Each placeholder must be expanded to as many tokens as its item "
        f"yields features (MultimodalProcessor does this)."
    )


def check_counts(masks: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> None:
    """Check that each modality has exactly as many placeholder tokens as feature vectors.

    Args:
        masks: per modality, ``[batch, seq]`` booleans of its placeholder positions.
        features: per modality that ran, ``[n_features, hidden]``; a modality absent here has 0 features.

    Raises:
        ValueError: naming the modality, the tokens found and the features produced (CPU tensors; on
            accelerators the check is an asynchronous device assertion that fails at the next sync).
    """
    if not masks:
        return
    keys = list(masks)
    found = torch.stack([masks[k].sum() for k in keys])  # [n_modalities]
    expected_list = [features[k].shape[0] if k in features else 0 for k in keys]
    if torch.compiler.is_compiling():
        return
    if on_host(found):
        expected = torch.tensor(expected_list)
        if not torch.equal(found, expected):
            bad = int((found != expected).int().argmax())
            raise ValueError(_counts_error(keys[bad], int(found[bad]), expected_list[bad]))
    else:  # compared with Python ints: no host-to-device copy of the expected counts (a blocking one would sync)
        matches = torch.stack([found[i] == n for i, n in enumerate(expected_list)])
        torch._assert_async(
            matches.all(),
            f"Modality token/feature count mismatch among {keys}; expected features per modality {expected_list}.",
        )


def on_host(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values costs no device synchronisation (it lives in host memory).

    >>> on_host(torch.zeros(2))
    True
    """
    return tensor.device.type == "cpu"


def merge_embeddings(
    input_ids: torch.Tensor,
    embedding: nn.Module,
    features: dict[str, torch.Tensor],
    token_ids: dict[str, int],
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embed ``input_ids`` and write each modality's features at its placeholder positions, in order.

    Modality token ids may lie outside the LM vocabulary: they are replaced by 0 before the lookup and their
    embeddings are overwritten. Labels at modality positions become -100.

    Args:
        input_ids: ``[batch, seq]`` token ids with placeholders.
        embedding: the LM's input embedding module.
        features: per modality, ``[n_features, llm_hidden]``, in placeholder order (sample by sample).
        token_ids: per modality, its placeholder token id.
        labels: optional ``[batch, seq]`` labels.

    Returns:
        ``(inputs_embeds [batch, seq, hidden], labels or None)``.

    Raises:
        ValueError: on a token/feature count mismatch (see :func:`check_counts`), a token id outside the
            embeddings (see :func:`.input_checks.check_vocabulary`), or features whose width differs from the
            embeddings'.
    """
    masks = modality_masks(input_ids, token_ids)
    check_counts(masks, features)
    placeholder = None
    for mask in masks.values():
        placeholder = mask if placeholder is None else placeholder | mask
    if placeholder is not None:
        input_ids = input_ids.masked_fill(placeholder, 0)
        if labels is not None:
            labels = labels.masked_fill(placeholder, IGNORE_INDEX)
    check_vocabulary(input_ids, getattr(embedding, "num_embeddings", None), token_ids, exact=on_host(input_ids))
    embeds = embedding(input_ids)  # [batch, seq, hidden]
    for key, feats in features.items():
        if feats.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"Modality {key!r}: features have width {feats.shape[-1]} but the language model's embeddings "
                f"have width {embeds.shape[-1]}; check the projector's out_features."
            )
        embeds = embeds.masked_scatter(masks[key].unsqueeze(-1), feats.to(embeds.dtype))
    return embeds, labels
