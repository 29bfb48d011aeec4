"""The LM head and cross-entropy fused, a chunk of supervised tokens at a time: no ``[n, vocab]`` logits are kept.

With logits only where supervised (:mod:`.supervised_loss`), a training step still materialises ``[n_supervised,
vocab]`` logits, their log-softmax (saved for backward) and their gradient: with a 128k vocabulary and 8k supervised
tokens, 4 GB each in float32. :func:`chunked_head_loss` computes the same loss ``chunk_size`` tokens at a time and,
while each chunk's logits are at hand, its gradients too (the gradient of a cross-entropy is ``softmax - one_hot``):
the hidden states' gradient chunk by chunk, the head's weight gradient accumulated in one buffer. Backward then only
scales them by the incoming gradient. Same FLOPs as the unfused head (three GEMMs), memory ``O(chunk_size × vocab)``.

Only for heads that are a plain ``nn.Linear`` followed by nothing but an optional logit soft-capping
(``tanh(z / cap) · cap``, Gemma 2): :func:`fusable_head` says which language models qualify (most of transformers'
causal LMs); others (logit scaling: Granite, Cohere, Falcon-H1) keep the LM's own head
(:class:`.supervised_loss.HiddenStatesAt`). The head's input is taken where the LM hands it to its head, so what a
family applies to its hidden states before the head (MiniCPM's width scaling) is included.

>>> _ = torch.manual_seed(0)
>>> head = nn.Linear(8, 50, bias=False)
>>> hidden = torch.randn(5, 8, requires_grad=True)
>>> targets = torch.tensor([3, -100, 7, 7, 1])
>>> loss, predictions = chunked_head_loss(hidden, head.weight, None, targets, chunk_size=2)
>>> reference = F.cross_entropy(head(hidden), targets, ignore_index=-100)
>>> torch.allclose(loss, reference), predictions.shape
(True, torch.Size([5]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...batch import IGNORE_INDEX

# model_types whose ``*ForCausalLM`` returns its output layer's result as the logits, unchanged (the test suite's
# sweep over transformers' causal LMs checks the fused loss and gradients against the LM's own for each of them).
PLAIN_HEADS = frozenset({
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bailing_hybrid", "bamba", "bart",
    "bert", "bert-generation", "big_bird", "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small",
    "bloom", "camembert", "codegen", "ctrl", "cwm", "data2vec-text", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "diffllama", "doge", "dots1", "electra", "emu3_text_model", "ernie", "ernie4_5", "ernie4_5_moe", "exaone",
    "exaone4", "exaone_moe", "falcon", "falcon_mamba", "flex_olmo", "flint", "fuyu", "gemma", "gemma3", "glm", "glm4",
    "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "got_ocr2", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gpt_neox_japanese", "gpt_oss", "gptj", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3",
    "hy_v4", "internlm3", "iquestcoder", "jais2", "jamba", "jetmoe", "kimi_linear", "kolibri1", "laguna", "lara_mini",
    "lfm2", "lfm2_moe", "lfm3", "llama", "llama4_text", "longcat_flash", "mamba", "mamba2", "marian", "mbart",
    "megatron-bert", "mellum", "mimo_v2_flash", "minicpm3", "minimax", "minimax_m2", "minimax_m3_vl_text",
    "ministral", "ministral3", "mistral", "mixtral", "modernbert-decoder", "moshi", "moss_transcribe_diarize", "mpt",
    "mvp", "nemotron", "nemotron_h", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe", "openai-gpt", "opt", "pegasus",
    "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe", "plbart", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "rembert", "roberta", "roberta-prelayernorm",
    "roc_bert", "roformer", "rwkv", "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm",
    "starcoder2", "trocr", "whisper", "xglm", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "youtu", "zamba",
    "zamba2", "zaya",
})
# model_type → the config attribute holding the final logit soft-capping ``tanh(z / cap) · cap`` (None: none)
# its ``*ForCausalLM`` applies to the head's output, and nothing else.
SOFTCAPPED_HEADS: dict[str, str] = {
    **dict.fromkeys(("beam", "gemma2", "gemma3_text", "gemma3n_text", "gemma4_unified_text", "gemma4_text",
                     "nanochat", "vaultgemma"), "final_logit_softcapping"),
    "xlstm": "output_logit_soft_cap",
}
# model_type → the soft-capping attribute (None: a plain head): the families :func:`chunked_head_loss` reproduces.
FUSABLE_FAMILIES: dict[str, str | None] = {**dict.fromkeys(PLAIN_HEADS), **SOFTCAPPED_HEADS}


def fusable_head(language_model: nn.Module) -> tuple[nn.Linear, float | None] | None:
    """The LM's output layer and its logit soft-capping, if :func:`chunked_head_loss` reproduces its logits.

    Args:
        language_model: a Hugging Face ``*ForCausalLM`` (or a ``peft`` model wrapping one).

    Returns:
        ``(head, softcap)`` for a family in :data:`FUSABLE_FAMILIES` whose output layer is a plain ``nn.Linear``;
        None otherwise (an unknown family, or a head replaced by an adapter).
    """
    config = getattr(language_model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = language_model.get_output_embeddings()
    if model_type not in FUSABLE_FAMILIES or type(head) is not nn.Linear:
        return None
    cap_attribute = FUSABLE_FAMILIES[model_type]
    return head, (getattr(config, cap_attribute, None) if cap_attribute else None)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` itself, if it is None (no chunking) or a positive number of tokens.

    Raises:
        ValueError: for anything else.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"loss_chunk_size must be a positive number of tokens (or None: off), got {chunk_size!r}.")
    return chunk_size


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` written into the float32 ``out`` (computed in the weight's dtype, as the
    LM's own head would, then widened)."""
    if weight.dtype != out.dtype:
        return out.copy_(F.linear(hidden, weight, bias))
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


class _ChunkedHeadLoss(torch.autograd.Function):
    """``sum(cross_entropy(softcap(hidden @ weight.T + bias), targets)) / divisor`` and the argmax of the logits."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, divisor: torch.Tensor, softcap: float | None, chunk_size: int,
                differentiate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        needs_hidden, needs_weight, needs_bias = (differentiate and need for need in ctx.needs_input_grad[:3])
        grads = needs_hidden or needs_weight or needs_bias
        n = hidden.shape[0]
        accumulate = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None  # [n, hidden]
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if needs_weight else None  # [vocab, hidden]
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if needs_bias else None  # [vocab]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(n, dtype=torch.long, device=hidden.device)
        buffer = hidden.new_empty(min(chunk_size, n), weight.shape[0], dtype=torch.float32)  # [chunk, vocab], reused
        for start in range(0, n, chunk_size):  # chunks of tokens (host-side shapes only: no device sync)
            rows = slice(start, min(start + chunk_size, n))
            h, t = hidden[rows], targets[rows]  # [c, hidden], [c]
            logits = _logits_into(buffer[:h.shape[0]], h, weight, bias)  # [c, vocab] float32
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            predictions[rows] = logits.argmax(-1)
            supervised = t != IGNORE_INDEX
            safe = torch.where(supervised, t, 0)[:, None]  # [c, 1]
            picked = logits.gather(1, safe)  # [c, 1] the targets' logits
            # log-sum-exp and softmax in place of the logits: one [c, vocab] buffer, no temporaries of its size
            peak = logits.amax(-1, keepdim=True)  # [c, 1]
            exp = logits.sub_(peak).exp_()
            sums = exp.sum(-1, keepdim=True)  # [c, 1]
            total += ((peak + sums.log() - picked).squeeze(1) * supervised).sum()
            if not grads:
                continue
            grad = exp.div_(sums)  # softmax
            grad.scatter_add_(1, safe, -torch.ones_like(safe, dtype=grad.dtype))  # softmax - one_hot
            grad.mul_((supervised / divisor)[:, None])
            if softcap is not None:
                grad.mul_(1 - capped * capped)  # d(cap · tanh(z / cap)) / dz
            grad = grad.to(weight.dtype)
            if needs_hidden:
                grad_hidden[rows] = grad @ weight
            if needs_weight:
                grad_weight.addmm_(grad.t().to(accumulate), h.to(accumulate))
            if needs_bias:
                grad_bias += grad.sum(0, dtype=accumulate)
        ctx.grads = (grad_hidden,
                     None if grad_weight is None else grad_weight.to(weight.dtype),
                     None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(predictions)
        return total / divisor, predictions

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_predictions: Any) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("chunked_head_loss computes its gradients once; backward through it cannot run twice "
                               "(retain_graph): set MultimodalModel.loss_chunk_size = None for that.")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # handed over: autograd may take these buffers as the parameters' .grad without a copy
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in (grad_hidden, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None, None)


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      chunk_size: int, softcap: float | None = None,
                      num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the head's logits at ``hidden``, computed and differentiated ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[n, hidden]`` the decoder's last hidden states where a token is supervised.
        weight, bias: the output layer's ``[vocab, hidden]`` weight and ``[vocab]`` bias (or None).
        targets: ``[n]`` token ids, -100 where nothing is supervised.
        chunk_size: tokens per chunk; memory is ``O(chunk_size × vocab)``.
        softcap: the LM's final logit soft-capping, if any.
        num_items_in_batch: divide the summed loss by this (as transformers does); default: the mean over
            supervised targets.

    Returns:
        The loss (a float32 scalar; gradients flow to ``hidden``, ``weight``, ``bias``) and ``[n]`` the argmax of
        each logit row (for token accuracy).

    Raises:
        ValueError: for a ``chunk_size`` below 1.
    """
    check_chunk_size(chunk_size)
    targets = targets.to(hidden.device)
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(hidden.device)
    differentiate = torch.is_grad_enabled()  # Function.forward itself always runs without grad mode
    return _ChunkedHeadLoss.apply(hidden, weight, bias, targets, divisor, softcap, chunk_size, differentiate)
