"""Which Hugging Face causal LMs a ``MultimodalModel`` can drive, and which of them train on packed rows.

``MultimodalModel`` merges encoder features into the LM's input embeddings and calls the LM with
``inputs_embeds``; :func:`check_language_model` refuses, at construction, an LM that cannot work that way, naming
its class and the reason. The generic checks (an encoder-decoder, no input embedding matrix, a forward without
``inputs_embeds``) cover most cases; :data:`UNSUPPORTED` lists the families whose obstacle only shows when they
run (found by the test suite's sweep over transformers' causal-LM registry).

Most causal LMs shift their labels inside (``logits[t]`` is scored against ``labels[t + 1]``); the decoders of
some encoder-decoder families do not (:data:`UNSHIFTED_LABELS`), and :func:`labels_for` gives those shifted
labels, so that every LM's own loss is the next-token loss.

Packed rows (several samples per row, ``position_ids`` restarting per sample, no ``attention_mask``) give each
sample its own loss only if the LM builds a per-sample attention mask from the position ids and carries no state
from one token to the next outside attention: :func:`supports_packing`.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
...                                      num_attention_heads=2, num_key_value_heads=1))
>>> check_language_model(llama)  # fine: returns None
>>> supports_packing(llama)
True
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from ...batch import next_labels

_NEEDS_IDS = "it needs token ids, not embeddings: "
_ASSISTANT = "it is an assistant (draft) model that runs on its target model's shared key/value states"
# model_type → why a MultimodalModel cannot drive that family (what only shows when it runs).
UNSUPPORTED: dict[str, str] = {
    "blt": _NEEDS_IDS + "it cuts its input into patches by the entropy of the next byte given the input ids",
    "deepseek_v4": _NEEDS_IDS + "its hash-routed MoE layers pick experts from the input ids",
    **dict.fromkeys(("gemma4", "gemma4_text"),
                    _NEEDS_IDS + "it recovers them by matching inputs_embeds against its embedding matrix"),
    **dict.fromkeys(("gemma4_assistant", "gemma4_unified_assistant"), _ASSISTANT),
    "git": "it is a captioning model whose loss skips the tokens of its own image encoder at the start of each "
           "sequence",
    "prophetnet": "its own loss scores n-gram streams of future tokens with label smoothing, not the next token",
    "reformer": "in training it needs every sequence to be exactly prod(axial_pos_shape) tokens long",
}

# model_type → the LM scores logits[t] against labels[t] (it expects labels already shifted); the others shift.
UNSHIFTED_LABELS = frozenset({
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
    "trocr", "whisper", "xlm", "xlnet",
})

# Mask builders of transformers.masking_utils that turn restarting position ids into a per-sample mask.
_PACKED_MASKS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
_LAYOUT = ("its attention mask or position embeddings follow the row's layout, not the restarting position ids: "
           "packed samples would see each other or keep counting positions")
_STATE = "its recurrent or linear-attention layers carry state from one sample into the next"
# model_type → why packed rows would mix samples although the family builds its masks with those builders
# (measured by the test suite's sweep: packed rows against the padded batch).
NO_PACKING: dict[str, str] = {
    **dict.fromkeys(("afmoe", "bart", "bigbird_pegasus", "biogpt", "blenderbot", "blenderbot-small", "camembert",
                     "data2vec-text", "marian", "mbart", "megatron-bert", "mpt", "mvp", "opt", "pegasus", "plbart",
                     "roberta", "roberta-prelayernorm", "trocr", "xlm-roberta", "xlm-roberta-xl", "xmod"), _LAYOUT),
    **dict.fromkeys(("bailing_hybrid", "bamba", "granitemoehybrid", "kimi_linear", "lara_mini", "lfm3", "minimax",
                     "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_next", "recurrent_gemma", "zamba2",
                     "zaya"), _STATE),
    "gpt_oss": "it builds its attention masks without the position ids, so packed samples would see each other",
    "gemma3n_text": "its own forward gives non-finite gradients on rows whose positions restart",
}


def _base(language_model: nn.Module) -> nn.Module:
    get_base = getattr(language_model, "get_base_model", None)
    return get_base() if callable(get_base) else language_model


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def unsupported_reason(language_model: nn.Module) -> str | None:
    """Why ``language_model`` cannot be the LM of a ``MultimodalModel``, or None if it can.

    Args:
        language_model: a Hugging Face causal LM (or a ``peft`` model wrapping one).

    Returns:
        A sentence naming the obstacle, or None.
    """
    model = _base(language_model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; the LM must be a decoder-only causal LM"
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.dim() != 2:
        return "it has no input embedding matrix to merge encoder features into"
    parameters = inspect.signature(model.forward).parameters
    if "inputs_embeds" not in parameters:
        return "its forward takes no inputs_embeds, through which encoder features reach the LM"
    return UNSUPPORTED.get(_model_type(model))


def check_language_model(language_model: nn.Module) -> None:
    """Refuse a language model a ``MultimodalModel`` cannot drive.

    Args:
        language_model: the LM (or a ``peft`` model wrapping one).

    Raises:
        ValueError: naming the LM's class and the reason (see :func:`unsupported_reason`).
    """
    reason = unsupported_reason(language_model)
    if reason is not None:
        raise ValueError(f"{type(_base(language_model)).__name__} cannot be the language model of a MultimodalModel: "
                         f"{reason}.")


def labels_for(language_model: nn.Module, labels: Any) -> Any:
    """The labels to give the LM's own forward so that it scores each position against the next token: ``labels``
    as they are for the families that shift them inside, shifted by one (:func:`cornstarch.batch.next_labels`) for
    those in :data:`UNSHIFTED_LABELS`.

    Args:
        language_model: the LM (or a ``peft`` model wrapping one).
        labels: ``[batch, seq]`` labels aligned with the input ids, or None.

    Returns:
        The labels for the LM's forward (None for None).

    >>> from types import SimpleNamespace
    >>> bart = SimpleNamespace(config=SimpleNamespace(model_type="bart"))
    >>> labels_for(bart, torch.tensor([[-100, 5, 6]])).tolist()
    [[5, 6, -100]]
    """
    if labels is None or _model_type(_base(language_model)) not in UNSHIFTED_LABELS:
        return labels
    return next_labels(labels)


def supports_packing(language_model: nn.Module) -> bool:
    """Whether packed rows give each sample the loss it has alone.

    Args:
        language_model: the LM (or a ``peft`` model wrapping one).

    Returns:
        True if its modeling code builds attention masks with transformers' mask builders (which read sample
        boundaries from restarting position ids) and its family is not in :data:`NO_PACKING` (masks built without
        the position ids, or layers with state across tokens: recurrent, convolutional, linear attention).
    """
    model = _base(language_model)
    if _model_type(model) in NO_PACKING:
        return False
    module = sys.modules.get(type(model).__module__)
    return any(callable(getattr(module, name, None)) for name in _PACKED_MASKS)


def check_packing(language_model: nn.Module) -> None:
    """Refuse packed rows for an LM that would let samples attend to each other.

    Args:
        language_model: the LM (or a ``peft`` model wrapping one).

    Raises:
        ValueError: naming the LM's class and the reason, unless :func:`supports_packing`.
    """
    if supports_packing(language_model):
        return
    model = _base(language_model)
    reason = NO_PACKING.get(_model_type(model), "it does not build per-sample attention masks from position ids")
    raise ValueError(f"{type(model).__name__} cannot train on packed rows (position_ids without attention_mask): "
                     f"{reason}. Turn packing off for this language model.")
