"""Tiny models of every class in transformers' registries, built from configs, for the coverage sweeps.

:func:`tiny_config` shrinks a model type's default config generically (widths, layers, heads, experts, vocabulary,
token ids, dropout) by field name, then applies a short per-family override table (:data:`OVERRIDES`) where a
family ties its sizes together in its own way. Model types the helper cannot build are listed with the reason in
:data:`NOT_BUILT` and :data:`ENCODERS_NOT_BUILT`. The sweeps record each class's outcome in :data:`RESULTS`; ``tests/conftest.py`` prints them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 128
LAYERS = 2
WINDOW = 8  # sliding windows / attention chunks: shorter than a sample, so per-sample masking is exercised

_RULES = [
    (r"vocab_size|.*_vocab_size|vocab_size_.*", VOCAB),
    (r"num_hidden_layers|n_layer|n_layers|num_layers|decoder_layers|encoder_layers|num_decoder_layers|"
     r"num_encoder_layers", LAYERS),
    (r"num_attention_heads|n_head|n_heads|num_heads|decoder_attention_heads|encoder_attention_heads|attention_heads|"
     r"swa_num_attention_heads|num_decoder_attention_heads|num_encoder_attention_heads|index_n_heads", 4),
    (r"hidden_size|d_model|n_embd|embed_dim|dim|attention_hidden_size|embedding_size|word_embed_proj_dim|lru_width|"
     r"input_embedding_size|output_embedding_size|emb_dim|backbone_hidden_size", 32),
    (r"head_dim|attention_head_dim|kv_channels|d_head|dim_head|attention_head_size|swa_head_dim|v_head_dim|"
     r"qk_head_dim|index_head_dim|linear_key_head_dim|linear_value_head_dim|linear_head_dim|qk_rope_head_dim|"
     r"qk_nope_head_dim", 8),
    (r".*intermediate_size.*|.*ffn_dim|ffn_hidden_size|d_ff|dff|dim_ff|n_inner|d_inner|feed_forward_size", 32),
    (r"num_experts|num_local_experts|n_routed_experts|moe_num_experts", 4),
    (r"num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k|index_topk", 2),
    (r"n_group|topk_group", 1),
    (r"kv_lora_rank|q_lora_rank|o_lora_rank", 16),
    (r"rotary_dim", 4),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len|context_length|max_target_positions", 256),
]
_WINDOWS = re.compile(r"^(sliding_window|attention_chunk_size|attention_window_size|sliding_window_size)$")
_RULES = [(re.compile(f"^({pattern})$"), value) for pattern, value in _RULES]
# Per-stage lists of vision backbones and audio feature extractors: every stage tiny.
_LIST_RULES = [
    (re.compile(r"^(depths|num_layers_per_stage|layer_depths|blocks)$"), 1),
    (re.compile(r"^(num_heads|num_attention_heads|heads)$"), 1),
    (re.compile(r"^(hidden_sizes|embed_dims|embed_dim|channels|conv_dim|neck_hidden_sizes|dims|hidden_dims)$"), 16),
]
_ENCODER_RULES = [
    (re.compile(r"^(image_size|img_size|crop_size)$"), 32),
    (re.compile(r"^(patch_size|patch_sizes)$"), 8),
    (re.compile(r"^(num_mel_bins|feature_size|input_feat_per_channel)$"), 16),
    (re.compile(r"^(max_source_positions)$"), 16),
    (re.compile(r"^(num_conv_pos_embeddings)$"), 16),
    (re.compile(r"^(num_conv_pos_embedding_groups)$"), 4),
    (re.compile(r"^(max_length|num_frames)$"), 16),
]
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "num_query_groups", "multi_query_group_num")
_SMALL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# model_type → config keyword arguments, where a family ties its sizes together in its own way.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dots1": dict(n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2),
    "lfm2_moe": dict(num_hidden_layers=2, num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "longcat_flash": dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, qk_head_dim=16,
                          zero_expert_num=2, expert_ffn_hidden_size=32, n_routed_experts=4, moe_topk=2),
    "bailing_hybrid": dict(num_experts=4, num_expert_group=1, topk_group=1, num_experts_per_token=2,
                           first_k_dense_replace=1, layer_group_size=2),
    "jamba": dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_dt_rank=8, use_mamba_kernels=False),
    "recurrent_gemma": dict(num_hidden_layers=3, block_types=["recurrent", "attention"]),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16),
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16, attn_layer_indices=[1]),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16,
                             layer_types=["mamba", "attention"]),
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, chunk_size=16, expand=2, n_groups=1),
    "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, attention_hidden_size=64,
                  attention_head_dim=16, mamba_dt_rank=8, use_mamba_kernels=False,
                  layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"]),
    "zamba2": dict(num_hidden_layers=2, layers_block_type=["linear_attention", "hybrid"], n_mamba_heads=4,
                   mamba_headdim=16, mamba_d_state=8, chunk_size=16, use_mamba_kernels=False,
                   attention_hidden_size=64, attention_head_dim=16, kv_channels=16, num_query_groups=4,
                   num_key_value_heads=4, num_mem_blocks=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2),
    "flint": dict(mlp_only_layers=[], num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"]),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "gemma3n_text": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                         intermediate_size=[32, 32], activation_sparsity_pattern=[0.0, 0.0], num_kv_shared_layers=0,
                         hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2),
    "dbrx": dict(attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4,
                                                           "moe_top_k": 2, "hidden_size": 32}),
    "bit": dict(num_groups=4),
    "reformer": dict(axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 8], attn_layers=["local", "local"]),
    "yolos": dict(image_size=[32, 32], num_detection_tokens=4),
    "mobilevitv2": dict(image_size=64),
    "swinv2": dict(window_size=4, image_size=64),
    "xlstm": dict(num_heads=4, embedding_dim=32, hidden_size=32, num_blocks=2, num_hidden_layers=2, mode="train",
                  chunk_size=4),
}

# model_type → a call preparing the built LM as its users must (e.g. choosing a language adapter).
SETUP: dict[str, Any] = {"xmod": lambda lm: lm.set_default_language("en_XX")}

_COUPLED = "the helper does not size this family's coupled fields "
# model_type → why the helper builds no tiny causal LM of it (not a verdict on the class).
NOT_BUILT: dict[str, str] = {
    "cohere_compass_text": _COUPLED + "(per-layer-type rope parameters)",
    "dbrx": _COUPLED + "(attention and FFN sub-configs)",
    "dory": _COUPLED + "(input / recurrent / output layer counts)",
    "dots3_note": _COUPLED + "(per-layer configs)",
    "dots3_note_text": _COUPLED + "(per-layer configs)",
    "gemma3n": "its vision tower needs the timm package, which is not installed",
    "gemma4_assistant": "its default config does not validate (hidden_size_per_layer_input)",
    "inkling_text": _COUPLED + "(hybrid sliding-window attention heads)",
    "inkling2_text": _COUPLED + "(hybrid attention and relative positions)",
    "inkling2_loop_text": _COUPLED + "(hybrid attention and relative positions)",
    "musicgen": "AutoModelForCausalLM cannot build it from its composite config (a multi-codebook audio decoder)",
    "musicgen_melody": "AutoModelForCausalLM cannot build it from its composite config (a multi-codebook audio decoder)",
    "qwen4_exp": _COUPLED + "(the attention indexer's budget and compression)",
    "qwen4_exp_text": _COUPLED + "(the attention indexer's budget and compression)",
}
# model_type → why the helper builds no tiny vision or audio encoder of it.
ENCODERS_NOT_BUILT: dict[str, str] = {
    **dict.fromkeys(("conditional_detr", "dab-detr", "deformable_detr", "detr", "edgetam_vision_model",
                     "sam2_vision_model", "sam3_vision_model", "table-transformer"),
                    "its backbone config names a model the helper does not build"),
    "dinat": "it needs the natten package, which is not installed",
    "timm_backbone": "it needs the timm package, which is not installed",
    "timm_wrapper": "it needs the timm package, which is not installed",
    "efficientnet": _COUPLED + "(stage widths scaled by its width coefficient)",
    "levit": _COUPLED + "(attention biases sized by the resolution of each stage)",
    "llama4": _COUPLED + "(the vision adapter's pixel-shuffle widths)",
    "muse_spark_audio": _COUPLED + "(per-layer patch sizes, widths and depths)",
    "nemotron3_5_transcribe_audio": _COUPLED + "(the head's audio width)",
    "nemotron3_diarization": _COUPLED + "(the head's audio width)",
    "swin": _COUPLED + "(window size against each stage's resolution)",
    "mllama": "the sweep does not build its tiled inputs (tiles, aspect-ratio ids and masks)",
    **dict.fromkeys(("gemma4_audio", "omniasr_audio", "pe_audio_encoder"), "the sweep does not build its input layout"),
}

# sweep → model_type → (outcome, detail); outcome is "pass", "refused" or "not built".
RESULTS: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)


def _shrunk(config: PretrainedConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments rebuilding ``config``'s class at tiny sizes (sub-configs shrunk too)."""
    values = config.to_dict()
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        sub = getattr(config, key, None) if isinstance(value, dict) else None
        if isinstance(sub, PretrainedConfig):
            kwargs[key] = _shrunk(sub, {})
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key == "router_jitter_noise"):
            kwargs[key] = 0.0
        if isinstance(value, int) and _WINDOWS.match(key) and value > WINDOW:
            kwargs[key] = WINDOW  # a window, not "none"
        elif value is None or isinstance(value, int):
            for pattern, new in _RULES:
                if pattern.match(key):
                    if value is None or value > new:
                        kwargs[key] = new
                    break
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            new = next((n for pattern, n in _LIST_RULES if pattern.match(key)), None)
            if new is not None:
                kwargs[key] = [min(v, new) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            new = next((n for pattern, n in _ENCODER_RULES if pattern.match(key)), None)
            if new is not None and value > new:
                kwargs[key] = new
        if key.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = _SMALL_IDS.get(key, VOCAB - 1 - sum(k.endswith("token_id") for k in kwargs))
        if key.endswith("token_id") and isinstance(value, list):
            kwargs[key] = [i for i in value if i < VOCAB] or 2
    heads = values.get("num_attention_heads")
    for key in _KV_HEADS:  # multi-head attention stays multi-head (MLA needs it), grouped stays grouped
        if key in values:
            kwargs[key] = 4 if values[key] in (None, heads) else 2
    layers = values.get("num_hidden_layers")
    for key, value in values.items():  # per-layer lists: one layer of each kind
        if isinstance(value, list) and layers and len(value) == layers and layers > LAYERS:
            kinds = list(dict.fromkeys(v for v in value if isinstance(v, str)))
            if len(kinds) == len(set(map(str, value))):
                kwargs[key] = (kinds * LAYERS)[:max(LAYERS, len(kinds))]
                kwargs["num_hidden_layers"] = len(kwargs[key])
    if "output_router_logits" in values:  # a MoE: its router loss on, and large, so a dropped term shows
        kwargs["output_router_logits"] = True
        if "router_aux_loss_coef" in values:
            kwargs["router_aux_loss_coef"] = 0.5
    if "is_decoder" in values:
        kwargs["is_decoder"] = True
    if "use_cache" in values:
        kwargs["use_cache"] = False
    return {**kwargs, **extra}


def tiny_config(model_type: str, **extra: Any) -> PretrainedConfig:
    """A tiny config of ``model_type`` (see the module docstring); ``extra`` overrides any field."""
    cls = CONFIG_MAPPING[model_type]
    return cls(**_shrunk(cls(), {**OVERRIDES.get(model_type, {}), **extra}))


def seeded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` after seeding torch: the same random draws (dropout, router noise) in every run."""
    torch.manual_seed(1)
    return fn(*args, **kwargs)
