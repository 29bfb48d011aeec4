"""Tiny Hugging Face models built from configs (a few layers, hidden 32–64) for every supported family."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import transformers as tf
from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
from transformers.models.whisper.modeling_whisper import WhisperEncoder

IMAGE_SIZE = 32
PATCH = 8
VOCAB = 128
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH)


def vision_config(family: str):
    """Config of a tiny vision tower: 32×32 images, 8×8 patches (16 patches)."""
    if family == "clip":
        return tf.CLIPVisionConfig(**_VIT)
    if family == "siglip":
        return tf.SiglipVisionConfig(**_VIT)
    if family == "vit":
        return tf.ViTConfig(**_VIT)
    if family == "dinov2":
        kw = {k: v for k, v in _VIT.items() if k != "intermediate_size"}
        return tf.Dinov2Config(mlp_ratio=2, **kw)
    raise KeyError(family)


VISION_CLASSES = {"clip": tf.CLIPVisionModel, "siglip": tf.SiglipVisionModel, "vit": tf.ViTModel,
                  "dinov2": tf.Dinov2Model}
# Tokens per image each tower outputs: 16 patches, plus CLS where the family has one.
VISION_TOKENS = {"clip": 17, "siglip": 16, "vit": 17, "dinov2": 17}


def vision_model(family: str) -> torch.nn.Module:
    return VISION_CLASSES[family](vision_config(family)).eval()


MEL_BINS = 16
AUDIO_POSITIONS = 16  # encoders need exactly 2 * max_source_positions input frames


def audio_model(family: str) -> torch.nn.Module:
    """A tiny audio encoder: input_features [n, 16 mel bins, 32 frames]."""
    common = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                  num_mel_bins=MEL_BINS, max_source_positions=AUDIO_POSITIONS)
    if family == "whisper":
        config = tf.WhisperConfig(**common, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                                  vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1)
        return WhisperEncoder(config).eval()
    if family == "qwen2_audio":
        return Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**common)).eval()
    raise KeyError(family)


# Tokens per audio clip each encoder outputs.
AUDIO_TOKENS = {"whisper": AUDIO_POSITIONS, "qwen2_audio": AUDIO_POSITIONS // 2}


def audio_features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, MEL_BINS, 2 * AUDIO_POSITIONS, generator=torch.Generator().manual_seed(seed))


_LM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llm_config(family: str):
    if family == "llama":
        return tf.LlamaConfig(**_LM)
    if family == "mistral":
        return tf.MistralConfig(**_LM, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**_LM)
    if family == "qwen3":
        return tf.Qwen3Config(**_LM, head_dim=16)
    if family == "gemma":
        return tf.GemmaConfig(**_LM, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**_LM, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**_LM)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise KeyError(family)


LLM_CLASSES = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
               "qwen3": tf.Qwen3ForCausalLM, "gemma": tf.GemmaForCausalLM, "gemma2": tf.Gemma2ForCausalLM,
               "phi3": tf.Phi3ForCausalLM, "gpt2": tf.GPT2LMHeadModel}


def llm(family: str) -> torch.nn.Module:
    return LLM_CLASSES[family](llm_config(family)).eval()


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def batch_with_placeholders(counts_per_sample: list[list[tuple[int, int]]], seq_len: int, pad_left: bool = False,
                            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with runs of placeholder tokens.

    ``counts_per_sample[i]`` lists ``(token_id, n)`` runs for sample i; text tokens (ids 3..VOCAB-1 that are no
    placeholder) go around them, padding (id 0) fills to ``seq_len`` on the chosen side.
    """
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for i, runs in enumerate(counts_per_sample):
        ids = torch.randint(3, 60, (2 + i,), generator=g).tolist()
        for token_id, n in runs:
            ids += [token_id] * n + torch.randint(3, 60, (2,), generator=g).tolist()
        assert len(ids) <= seq_len, "sequence too short for the requested runs"
        pad = [0] * (seq_len - len(ids))
        mask = [1] * len(ids)
        rows.append(pad + ids if pad_left else ids + pad)
        masks.append([0] * len(pad) + mask if pad_left else mask + [0] * len(pad))
    return torch.tensor(rows), torch.tensor(masks)


@contextmanager
def captured_inputs_embeds(language_model: torch.nn.Module):
    """Collect (detached copies of) the ``inputs_embeds`` each call of ``language_model`` receives."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def placeholder_loss(mllm: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch``'s loss with ``encode_absent`` on (a rank without the modality's items; backward run), and
    without it (the expected value), both detached."""
    expected = mllm(**batch).loss.detach()
    mllm.encode_absent = True
    try:
        loss = mllm(**batch).loss
        loss.backward()
    finally:
        mllm.encode_absent = False
    return loss.detach(), expected


WORDS = ("USER ASSISTANT : what is this which digit shown and played ? the a an image audio picture sound "
         "zero one two three four five six seven eight nine describe hello world").split()


def tokenizer():
    """A word-level fast tokenizer (ids: <pad>=0, <s>=1, </s>=2, <unk>=3) that adds <s> like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pil_images(n: int, size: int = 40, seed: int = 0):
    """Random RGB PIL images (processors resize them to IMAGE_SIZE)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def image_processor(family: str):
    """A processor producing IMAGE_SIZE×IMAGE_SIZE pixel_values for the family's tower."""
    if family == "clip":
        return tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family == "siglip":
        return tf.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family == "vit":
        return tf.ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family == "dinov2":
        return tf.BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    raise KeyError(family)


AUDIO_RATE = 2560  # with hop 160 and 2-second chunks: 32 frames = 2 * AUDIO_POSITIONS


def audio_processor():
    return tf.WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=AUDIO_RATE, hop_length=160, chunk_length=2,
                                      n_fft=400)


def waveforms(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal(AUDIO_RATE // 2 + 100 * i).astype("float32") for i in range(n)]
