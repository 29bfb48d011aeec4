"""Greedy decoding without ``generate``'s per-step machinery, for the requests that need none of it.

``MultimodalModel.generate`` embeds the modality inputs once and then decodes. A plain greedy request (no
sampling, beams, logits processors, stopping strings, streamer, extra outputs…) of an LM whose generation hooks are
transformers' defaults is decoded here: prefill with the merged embeddings (logits at the last position only),
then one LM forward per new token with a ``DynamicCache``, argmax, finished rows padded with the pad token, stop
once every row has produced an end-of-sequence token or at ``max_new_tokens``. The LM receives exactly the inputs
``language_model.generate`` would give it (position ids from the attention mask, the mask dropped when it holds no
padding, the same cache), so the tokens are the same; only the bookkeeping around the LM's forward is gone.
Anything else returns ``None`` from :func:`plain_greedy_request` and goes to ``language_model.generate``.

With ``compile=True`` (``MultimodalModel.compile_generation``) the keys and values live in a ``StaticCache`` and each
decode step runs through ``torch.compile``: same tokens, no Python work per layer and token, one compilation per
batch size (tens of seconds on a CPU, so worth it only over many calls; ``bench/generation_vs_hf_llava.py
--compile`` prints the break-even).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
...                                   num_attention_heads=2, num_key_value_heads=1, eos_token_id=2)).eval()
>>> request = plain_greedy_request(lm, {"max_new_tokens": 3, "do_sample": False})
>>> request
GreedyRequest(max_new_tokens=3, eos_token_ids=(2,), pad_token_id=2)
>>> plain_greedy_request(lm, {"max_new_tokens": 3, "do_sample": True}) is None  # sampling: left to generate
True
>>> ids = torch.tensor([[5, 6, 7]])
>>> out = greedy_decode(lm, ids, lm.get_input_embeddings()(ids), None, request)
>>> torch.equal(out, lm.generate(ids, max_new_tokens=3, do_sample=False))
True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.generation.utils import GenerationMixin

# GenerationConfig fields that may hold these values (besides None) in a plain greedy request.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "do_sample": (False,), "num_beams": (1,), "num_return_sequences": (1,), "use_cache": (True,),
    "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,), "guidance_scale": (1.0,), "min_length": (0,), "min_new_tokens": (0,),
    "output_attentions": (False,), "output_hidden_states": (False,), "output_scores": (False,),
    "output_logits": (False,), "return_dict_in_generate": (False,), "remove_invalid_values": (False,),
    "renormalize_logits": (False,), "is_assistant": (False,), "penalty_alpha": (0, 0.0), "num_beam_groups": (1,),
    "use_mtp": (False,), "token_healing": (False,), "low_memory": (False,),
}
# Fields greedy decoding does not read: sampling warpers (applied only with do_sample), beam-search scoring,
# assistant settings (used only with an assistant model, which is a generate argument, not a field), compile
# settings (used only with a static cache), special tokens and lengths (read below), bookkeeping.
_IGNORED = frozenset({
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "length_penalty", "early_stopping", "diversity_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight",
    "compile_config", "disable_compile", "max_length", "max_new_tokens", "pad_token_id", "bos_token_id",
    "eos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
})
# generate() arguments that are not GenerationConfig fields and change nothing at these values.
_NEUTRAL_ARGUMENTS: dict[str, tuple[Any, ...]] = {"synced_gpus": (False,)}
# The generation hooks a model may override; the fast path reproduces the defaults only.
_HOOKS = ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation", "_prepare_cache_for_generation",
          "_prepare_position_ids_for_generation", "generate", "_sample", "_prefill")


@dataclasses.dataclass(frozen=True)
class GreedyRequest:
    """What a plain greedy request asks for: how many tokens, which end a row, what fills finished rows."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


def plain_greedy_request(language_model: nn.Module, generate_kwargs: Mapping[str, Any]) -> GreedyRequest | None:
    """The request ``language_model.generate(**generate_kwargs)`` makes, if it is plain greedy decoding.

    Args:
        language_model: a transformers causal LM.
        generate_kwargs: the keyword arguments that would go to its ``generate`` (inputs excluded), e.g.
            ``{"max_new_tokens": 24, "do_sample": False, "eos_token_id": 2}``; a ``generation_config`` among them
            replaces the model's own, as in ``generate``.

    Returns:
        A :class:`GreedyRequest`, or ``None`` where :func:`greedy_decode` would not give what ``generate`` gives:
        sampling, beams, any logits processor or stopping criterion besides the end-of-sequence tokens and
        ``max_new_tokens``, a streamer, extra outputs (``return_dict_in_generate``, scores…), a given cache, a
        static cache implementation, no ``max_new_tokens``, or an LM that overrides a generation hook or lacks the
        ``cache``/``position_ids``/``logits_to_keep`` arguments.
    """
    kwargs = dict(generate_kwargs)
    given = kwargs.pop("generation_config", None)
    if not _default_generation_hooks(language_model):
        return None
    try:  # the configuration generate itself would use: given or the model's, its defaults, then the kwargs
        config, unused = language_model._prepare_generation_config(given, **kwargs)
    except (AttributeError, TypeError, ValueError):  # generate will say what is wrong, or do what it does
        return None
    for name, value in unused.items():
        if value is not None and value not in _NEUTRAL_ARGUMENTS.get(name, ()):
            return None  # a streamer, logits processor, stopping criteria, assistant model, model input…
    for name, value in config.to_dict().items():
        if name in _IGNORED or value is None or value in _NEUTRAL.get(name, ()):
            continue
        return None
    if not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1:
        return None
    eos = config.eos_token_id
    eos_ids = () if eos is None else tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]  # as generate does
    return GreedyRequest(config.max_new_tokens, eos_ids, None if pad is None else int(pad))


def _default_generation_hooks(language_model: nn.Module) -> bool:
    cls = type(language_model)
    if not isinstance(language_model, GenerationMixin):
        return False
    if any(getattr(cls, hook, None) is not getattr(GenerationMixin, hook, None) for hook in _HOOKS):
        return False
    params = inspect.signature(language_model.forward).parameters
    return all(name in params for name in ("cache", "position_ids", "logits_to_keep", "inputs_embeds"))


@torch.no_grad()
def greedy_decode(
    language_model: nn.Module,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    request: GreedyRequest,
    compile: bool = False,
) -> torch.Tensor:
    """Greedy decoding from merged prompt embeddings: what ``language_model.generate`` returns for ``request``.

    Args:
        language_model: a causal LM for which :func:`plain_greedy_request` returned ``request``.
        input_ids: ``[batch, prompt]``, the prompt's ids (the first part of the output).
        inputs_embeds: ``[batch, prompt, hidden]``, the prompt's embeddings (modality features merged).
        attention_mask: ``[batch, prompt]`` (0 at padding, left padding for batched prompts), or None.
        request: from :func:`plain_greedy_request`.
        compile: keep the keys and values in a ``StaticCache`` and run each decode step (the LM's forward on one
            token and the argmax) through ``torch.compile``: no Python work per layer and token, at the price of
            a compilation (tens of seconds on a CPU) for each new batch size in the process. Same tokens.

    Returns:
        ``[batch, prompt + n]`` ids: the prompt, then ``n <= max_new_tokens`` new tokens (``n`` is smaller when
        every row has ended); a row that has produced an end-of-sequence token is continued with the pad token.
    """
    batch, prompt = input_ids.shape
    device = input_ids.device
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if bool((attention_mask == 1).all()):
            attention_mask = None  # generate drops a mask without padding too (the LM then needs none)
    else:
        position_ids = torch.arange(prompt, device=device).expand(batch, prompt)
    if attention_mask is not None:  # grown in place: step t reads the first prompt + t columns
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, request.max_new_tokens)], dim=1)
    text_config = language_model.config.get_text_config(decoder=True)
    if compile:
        cache = StaticCache(config=text_config, max_cache_len=prompt + request.max_new_tokens)
        step_fn = _compiled_step()
    else:
        cache, step_fn = DynamicCache(config=text_config), next_token
    out = language_model(inputs_embeds=inputs_embeds, attention_mask=_first(attention_mask, prompt),
                         position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1, return_dict=True)
    token = out.logits[:, -1].float().argmax(-1)  # [batch]
    del out
    new_tokens = torch.empty(batch, request.max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(request.eos_token_ids, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    position = position_ids[:, -1:]
    steps = request.max_new_tokens
    for step in range(request.max_new_tokens):
        if eos.numel():
            token = torch.where(unfinished, token, request.pad_token_id)
            unfinished &= (token[:, None] != eos).all(-1)  # not an EOS (isin costs more at these sizes)
        new_tokens[:, step] = token
        if step + 1 == request.max_new_tokens:
            break
        if eos.numel() and not bool(unfinished.any()):
            steps = step + 1
            break
        position = position + 1
        token = step_fn(language_model, token[:, None], position, _first(attention_mask, prompt + step + 1), cache)
    return torch.cat([input_ids, new_tokens[:, :steps]], dim=1)


def next_token(language_model: nn.Module, token: torch.Tensor, position: torch.Tensor,
               attention_mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
    """One decode step: the LM on ``token`` ``[batch, 1]`` at ``position`` ``[batch, 1]``, extending ``cache``;
    returns the greedy next token ``[batch]``."""
    logits = language_model(input_ids=token, attention_mask=attention_mask, position_ids=position, cache=cache,
                            use_cache=True, return_dict=True).logits
    return logits[:, -1].float().argmax(-1)


@functools.cache
def _compiled_step() -> Any:
    """``next_token`` through ``torch.compile``, built on first use (one per process)."""
    return torch.compile(next_token, dynamic=True)


def _first(mask: torch.Tensor | None, columns: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, :columns]
