"""``torch.compile`` of a :class:`MultimodalModel`'s layers, for training.

The composed model's forward is mostly Python glue (routing inputs, checks on CPU tensors, merging features at the
placeholders) around a few stacks of identical layers: each encoder's and the language model's decoder layers. The
glue graph-breaks and costs little; the layers hold the work. Compiling each layer (as torchtune does) lets
inductor fuse its memory-bound passes (norms, rotary embeddings, activations, residual adds) around the matmuls,
in forward and backward, while the glue, hooks and checks stay eager. One layer class compiles once and is reused
by every layer of its stack.

Only training runs the compiled layers (module in training mode, autograd on): evaluation and ``generate`` (a KV
cache whose length grows every token) run the same layers eagerly. Parameters, their names, ``state_dict``,
saving and loading are unchanged.

>>> from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
>>> from cornstarch.models import ModalEncoderModule, MultimodalModel
>>> clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
...                                         num_attention_heads=2, image_size=8, patch_size=4))
>>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=3,
...                                      num_attention_heads=2, num_key_value_heads=1))
>>> mllm = MultimodalModel({"vision": ModalEncoderModule(clip)}, llama)
>>> compile_layers(mllm)  # compiles lazily, at the first training forward
['vision_encoder.module.encoder.layers', 'language_model.model.layers']
>>> is_compiled(mllm.language_model.model.layers[0])
True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..encoder_layers import layer_stack

_COMPILED = "_cornstarch_compiled_forward"


def compile_layer(layer: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Make ``layer`` run a ``torch.compile`` d forward in training (training mode, autograd on), its own eagerly
    otherwise. In place; compiling twice is a no-op.

    Args:
        layer: one layer (any ``nn.Module``); its hooks stay outside the compiled region.
        **compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, …).

    Returns:
        ``layer``.

    >>> layer = nn.Linear(4, 4)
    >>> _ = compile_layer(layer, backend="eager")
    >>> with torch.no_grad():  # not training: the eager forward
    ...     layer(torch.ones(1, 4)).shape
    torch.Size([1, 4])
    """
    if is_compiled(layer):
        return layer
    eager: Callable[..., Any] = layer.forward
    compiled = torch.compile(eager, **compile_kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer.forward = forward  # an instance attribute: nn.Module.__call__ (hooks included) calls it
    setattr(layer, _COMPILED, compiled)
    return layer


def is_compiled(layer: nn.Module) -> bool:
    """Whether :func:`compile_layer` has been applied to ``layer``."""
    return hasattr(layer, _COMPILED)


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """Compile every layer of each encoder's layer stack and of the language model's (:func:`compile_layer`).

    Layer stacks are found as for ``feature_layer`` (:func:`cornstarch.models.encoder_layers.layer_stack`: the
    longest list of a class in the model's ``_no_split_modules``); an encoder without one runs eagerly. Copy a
    model (``copy.deepcopy``) before compiling it, not after: a copy would share the original's compiled
    functions.

    Args:
        model: a :class:`MultimodalModel`.
        **compile_kwargs: passed to ``torch.compile``.

    Returns:
        The dotted paths of the compiled layer stacks.

    Raises:
        ValueError: if the language model has no such layer stack.
    """
    paths = []
    parts = {f"{key}_encoder.module": encoder.module for key, encoder in model.encoders.items()}
    for prefix, part in {**parts, "language_model": model.language_model}.items():
        try:
            path, layers = layer_stack(part)
        except ValueError:  # an encoder without one (e.g. a convolutional backbone) runs eagerly; the LM must have one
            if part is model.language_model:
                raise
            continue
        paths.append(f"{prefix}.{path}")
        for layer in layers:
            compile_layer(layer, **compile_kwargs)
    return paths
