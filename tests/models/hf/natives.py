"""Tiny transformers-native multimodal models and processors (Llava, Llava-Next, Qwen2-Audio) built from configs."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf
from PIL import Image
from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

from tests import tiny

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<|AUDIO|>"
AUDIO_MARKS = ("<|audio_bos|>", "<|audio_eos|>")
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]  # grid resolutions of 32-pixel tiles
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }} : {% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def tokenizer(*tokens: str):
    """tests.tiny's word-level tokenizer with the given special tokens added (ids inside the tiny LM vocabulary)."""
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tok


def llava(layer=-2, strategy="default", tower="clip", seed=0, **config) -> tf.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    token = tokenizer(IMAGE_TOKEN).convert_tokens_to_ids(IMAGE_TOKEN)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tiny.vision_config(tower), text_config=tiny.llm_config("llama"), image_token_index=token,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, **config)).eval()


def llava_next(layer=-2, strategy="default", tower="clip", seed=0) -> tf.LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    token = tokenizer(IMAGE_TOKEN).convert_tokens_to_ids(IMAGE_TOKEN)
    return tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(
        vision_config=tiny.vision_config(tower), text_config=tiny.llm_config("llama"), image_token_index=token,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_grid_pinpoints=PINPOINTS)).eval()


def qwen2_audio(seed=0) -> tf.Qwen2AudioForConditionalGeneration:
    torch.manual_seed(seed)
    audio = Qwen2AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                    num_mel_bins=tiny.MEL_BINS, max_source_positions=tiny.AUDIO_POSITIONS)
    token = tokenizer(AUDIO_TOKEN, *AUDIO_MARKS).convert_tokens_to_ids(AUDIO_TOKEN)
    return tf.Qwen2AudioForConditionalGeneration(tf.Qwen2AudioConfig(
        audio_config=audio, text_config=tiny.llm_config("qwen2"), audio_token_index=token)).eval()


def llava_processor(strategy="default", tower="clip") -> tf.LlavaProcessor:
    return tf.LlavaProcessor(image_processor=tiny.image_processor(tower), tokenizer=tokenizer(IMAGE_TOKEN),
                             patch_size=tiny.PATCH, vision_feature_select_strategy=strategy,
                             num_additional_image_tokens=int(tower == "clip"), chat_template=CHAT_TEMPLATE)


def llava_next_processor(strategy="default", tower="clip") -> tf.LlavaNextProcessor:
    size = tiny.IMAGE_SIZE
    image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=PINPOINTS)
    return tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer(IMAGE_TOKEN),
                                 patch_size=tiny.PATCH, vision_feature_select_strategy=strategy,
                                 num_additional_image_tokens=int(tower == "clip"), chat_template=CHAT_TEMPLATE)


def qwen2_audio_processor() -> tf.Qwen2AudioProcessor:
    return tf.Qwen2AudioProcessor(feature_extractor=tiny.audio_processor(),
                                  tokenizer=tokenizer(AUDIO_TOKEN, *AUDIO_MARKS))


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of the given (height, width)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def waveforms(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Random clips of the given numbers of samples (at tiny.AUDIO_RATE; 5120 samples fill the encoder's input)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype("float32") for n in lengths]


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (same shapes required)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_like_native(mllm: torch.nn.Module, native: torch.nn.Module, batch: dict) -> None:
    """``mllm`` gives ``native``'s logits (within 1e-5) and greedy tokens on the native processor's ``batch``."""
    with torch.no_grad():
        assert max_difference(mllm(**batch).logits, native(**batch).logits) <= 1e-5
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(mllm.generate(**batch, **greedy), native.generate(**batch, **greedy))
