"""Every supported encoder family and LLM family composes into a MultimodalModel that trains, saves and loads.

Vision towers (CLIP, SigLIP, ViT, DINOv2), audio encoders (Whisper, Qwen2-Audio) and causal LMs (Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2, Phi-3, GPT-2) are tiny models built from configs. Modality token ids lie outside the
LM vocabulary on purpose: the model must never look them up (nor use them as labels).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cornstarch.models.multimodal_language_model import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from cornstarch.models.multimodal_language_model.supervised_loss import at_positions
from tests import tiny

VISION_TOKEN = tiny.VOCAB + 5  # out of the LM vocabulary: an embedding lookup or a label of it would crash
AUDIO_TOKEN = tiny.VOCAB + 6
LLM_HIDDEN = 64

# Encoder parameters that never influence ``last_hidden_state`` (pooling heads, an unused mask token), so they get
# no gradient; every other trainable encoder parameter must get one.
UNUSED_ENCODER_PARAMS = {
    "clip": ("post_layernorm.",),  # applied to the pooled CLS output only
    "siglip": ("head.",),  # attention-pooling head
    "vit": ("pooler.",),
    "dinov2": ("embeddings.mask_token",),  # used only with bool_masked_pos
    "whisper": (),
    "qwen2_audio": (),
}

# Each vision tower with a few LLMs; together every LLM family appears at least once. Third item: left padding.
VISION_PAIRS = [
    ("clip", "llama", False), ("clip", "gemma", True), ("clip", "phi3", False),
    ("siglip", "mistral", False), ("siglip", "gemma2", True), ("siglip", "qwen2", False),
    ("vit", "qwen2", True), ("vit", "gpt2", False), ("vit", "llama", False),
    ("dinov2", "qwen3", False), ("dinov2", "phi3", True), ("dinov2", "gpt2", False),
]
AUDIO_PAIRS = [("whisper", "llama", False), ("whisper", "gemma2", True),
               ("qwen2_audio", "qwen2", False), ("qwen2_audio", "gpt2", True)]


def test_parametrization_covers_every_family():
    assert {v for v, _, _ in VISION_PAIRS} == set(tiny.VISION_CLASSES)
    assert {a for a, _, _ in AUDIO_PAIRS} == set(tiny.AUDIO_TOKENS)
    assert {lm for _, lm, _ in VISION_PAIRS + AUDIO_PAIRS} == set(tiny.LLM_CLASSES)


def encoder_model(family: str) -> nn.Module:
    return tiny.vision_model(family) if family in tiny.VISION_CLASSES else tiny.audio_model(family)


def build(encoder_families: dict[str, str], llm_family: str, **kwargs) -> MultimodalModel:
    """``{"vision": "clip", ...}`` → a MultimodalModel with lazily created projectors and token ids set."""
    torch.manual_seed(0)
    encoders = {key: ModalEncoderModule(encoder_model(fam)) for key, fam in encoder_families.items()}
    mllm = MultimodalModel(encoders, tiny.llm(llm_family), **kwargs)
    ids = {"vision": VISION_TOKEN, "audio": AUDIO_TOKEN}
    mllm.set_modality_token_ids({key: ids[key] for key in encoder_families})
    return mllm


def modality_input(key: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    if key == "vision":
        return {"pixel_values": tiny.pixels(n, seed)}
    return {"input_features": tiny.audio_features(n, seed)}


def reference_features(encoder: ModalEncoderModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the LM should receive for one modality, computed by hand: projector(last_hidden_state), item by item."""
    with torch.no_grad():
        hidden = encoder.module(**inputs).last_hidden_state  # [n_items, n_tokens, enc_hidden]
        return encoder.projector(hidden).reshape(-1, LLM_HIDDEN)


def reference_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal LM loss on text tokens only (padding and every out-of-vocabulary placeholder ignored)."""
    labels = ids.masked_fill((mask == 0) | (ids >= tiny.VOCAB), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def full_logits_forward(mllm: MultimodalModel, **batch):
    """The same forward with logits at every position (``supervised_logits_only`` off)."""
    mllm.supervised_logits_only = False
    try:
        return mllm(**batch)
    finally:
        mllm.supervised_logits_only = True


def assert_grads(module: nn.Module, what: str, unused: tuple[str, ...] = ()) -> None:
    """Every trainable parameter of ``module`` (except the ``unused`` prefixes) has a nonzero gradient."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    for prefix in unused:  # the exemption list must name real parameters, not hide a typo
        assert any(n.startswith(prefix) for n in names), f"{what}: no parameter starts with {prefix!r}"
    missing = [n for n, p in module.named_parameters()
               if p.requires_grad and not n.startswith(unused) and (p.grad is None or not p.grad.any())]
    assert names and not missing, f"{what}: parameters without gradient: {missing}"


def run_single_modality(key: str, enc_family: str, llm_family: str, n_tokens: int, pad_left: bool):
    mllm = build({key: enc_family}, llm_family)
    token = mllm.modality_token_ids[key]
    items_per_sample = [2, 0, 3]  # several items per sample, one sample with none, in the middle
    ids, mask = tiny.batch_with_placeholders([[(token, n_tokens)] * c for c in items_per_sample], seq_len=64,
                                             pad_left=pad_left)
    inputs = modality_input(key, sum(items_per_sample))
    labels = ids.masked_fill(mask == 0, -100)  # placeholders keep their out-of-vocab ids: the model must mask them

    with tiny.captured_inputs_embeds(mllm.language_model) as seen:
        out = mllm(input_ids=ids, attention_mask=mask, labels=labels, **inputs)

    # training with labels: logits only at the columns that predict a supervised token, the loss unchanged
    full = full_logits_forward(mllm, input_ids=ids, attention_mask=mask, labels=labels, **inputs)
    assert full.logits.shape == (3, 64, tiny.VOCAB) and getattr(full, "logits_positions", None) is None
    assert out.logits_positions is not None and 0 < len(out.logits_positions) < 3 * 63
    torch.testing.assert_close(out.logits, at_positions(full.logits, out.logits_positions), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, reference_loss(full.logits, ids, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.loss, out.loss, atol=1e-5, rtol=1e-5)

    # merged features: the hand-computed ones at placeholders, text embeddings everywhere else
    (embeds,) = seen
    is_placeholder = ids == token
    assert int(is_placeholder.sum()) == 5 * n_tokens
    torch.testing.assert_close(embeds[is_placeholder], reference_features(mllm.encoders[key], inputs),
                               atol=1e-6, rtol=1e-5)
    text_embeds = mllm.language_model.get_input_embeddings()(ids.masked_fill(is_placeholder, 0))
    torch.testing.assert_close(embeds[~is_placeholder], text_embeds[~is_placeholder].detach(), atol=0, rtol=0)

    out.loss.backward()
    encoder = mllm.encoders[key]
    assert_grads(encoder.projector, f"{key} projector")
    assert_grads(encoder.module, f"{enc_family} encoder", UNUSED_ENCODER_PARAMS[enc_family])
    assert_grads(mllm.language_model, f"{llm_family} LM")


@pytest.mark.parametrize("vision,llm_family,pad_left", VISION_PAIRS,
                         ids=[f"{v}-{lm}{'-leftpad' if p else ''}" for v, lm, p in VISION_PAIRS])
def test_vision_family_trains(vision, llm_family, pad_left):
    run_single_modality("vision", vision, llm_family, tiny.VISION_TOKENS[vision], pad_left)


@pytest.mark.parametrize("audio,llm_family,pad_left", AUDIO_PAIRS,
                         ids=[f"{a}-{lm}{'-leftpad' if p else ''}" for a, lm, p in AUDIO_PAIRS])
def test_audio_family_trains(audio, llm_family, pad_left):
    run_single_modality("audio", audio, llm_family, tiny.AUDIO_TOKENS[audio], pad_left)


# ------------------------------------------------------------------------------------------ two modalities
NV, NA = tiny.VISION_TOKENS["clip"], tiny.AUDIO_TOKENS["whisper"]
V, A = VISION_TOKEN, AUDIO_TOKEN


def two_modality_model(llm_family: str = "qwen2") -> MultimodalModel:
    return build({"vision": "clip", "audio": "whisper"}, llm_family)


def test_two_modalities_merge_into_the_right_positions():
    mllm = two_modality_model()
    runs = [
        [(V, NV), (A, NA), (V, NV)],  # images and audio, interleaved
        [(V, NV)],  # images only
        [],  # neither
        [(A, NA)],  # audio only
    ]
    ids, mask = tiny.batch_with_placeholders(runs, seq_len=64)
    px, af = tiny.pixels(3, seed=1), tiny.audio_features(2, seed=2)
    labels = ids.masked_fill(mask == 0, -100)

    with tiny.captured_inputs_embeds(mllm.language_model) as seen:
        out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px, input_features=af)
    (embeds,) = seen

    vision = reference_features(mllm.vision_encoder, {"pixel_values": px})  # [3 * NV, hidden]
    audio = reference_features(mllm.audio_encoder, {"input_features": af})  # [2 * NA, hidden]
    torch.testing.assert_close(embeds[ids == V], vision, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(embeds[ids == A], audio, atol=1e-6, rtol=1e-5)
    # the per-item layout, spelled out: sample 0 holds image 0, audio 0, image 1; sample 1 image 2; sample 3 audio 1
    torch.testing.assert_close(embeds[1][ids[1] == V], vision[2 * NV:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(embeds[3][ids[3] == A], audio[NA:], atol=1e-6, rtol=1e-5)
    text = (ids != V) & (ids != A)
    torch.testing.assert_close(embeds[text], mllm.language_model.get_input_embeddings()(ids[text]).detach(),
                               atol=0, rtol=0)

    # the same through the public pieces the model is made of
    features = mllm.encode({"vision": {"pixel_values": px}, "audio": {"input_features": af}})
    embedded, merged_labels = mllm.embed(ids, features, labels)
    torch.testing.assert_close(embedded.detach(), embeds, atol=0, rtol=0)
    assert (merged_labels[(ids == V) | (ids == A)] == -100).all()
    assert torch.equal(merged_labels[text], labels[text])

    assert torch.isfinite(out.loss)
    full = full_logits_forward(mllm, input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px,
                               input_features=af)
    torch.testing.assert_close(out.loss, reference_loss(full.logits, ids, mask), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for key, family in (("vision", "clip"), ("audio", "whisper")):
        assert_grads(mllm.encoders[key].projector, f"{key} projector")
        assert_grads(mllm.encoders[key].module, family, UNUSED_ENCODER_PARAMS[family])


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_absent_modality_runs_without_its_inputs():
    mllm = two_modality_model()
    vision_calls = count_calls(mllm.vision_encoder.module)
    ids, mask = tiny.batch_with_placeholders([[(A, NA)], [], [(A, NA), (A, NA)]], seq_len=64)
    af = tiny.audio_features(3)
    labels = ids.masked_fill(mask == 0, -100)

    out = mllm(input_ids=ids, attention_mask=mask, labels=labels, input_features=af)  # no pixel_values at all
    assert torch.isfinite(out.loss) and out.logits.shape[::2] == (1, tiny.VOCAB)
    assert vision_calls == [0]
    out.loss.backward()
    assert all(p.grad is None for p in mllm.vision_encoder.parameters())
    assert_grads(mllm.audio_encoder.projector, "audio projector")

    # an empty batch of images counts as no images
    with torch.no_grad():
        same = mllm(input_ids=ids, attention_mask=mask, input_features=af,
                    pixel_values=torch.empty(0, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE))
    assert torch.equal(at_positions(same.logits, out.logits_positions), out.logits.detach())
    assert vision_calls == [0]

    # placeholders with no inputs for them are an error that names the modality
    ids_v, mask_v = tiny.batch_with_placeholders([[(V, NV)], []], seq_len=32)
    with pytest.raises(ValueError, match="vision"):
        mllm(input_ids=ids_v, attention_mask=mask_v)


def test_text_only_batch_equals_the_language_model():
    mllm = two_modality_model("gemma")
    ids, mask = tiny.batch_with_placeholders([[], [], []], seq_len=12, pad_left=True)
    with torch.no_grad():
        out = mllm(input_ids=ids, attention_mask=mask)
        ref = mllm.language_model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.logits, ref.logits)


# ------------------------------------------------------------------------------------------ save / load
SAVE_LOAD_CASES = [
    pytest.param({"vision": "vit"}, "gpt2", id="vit-gpt2_tied"),
    pytest.param({"vision": "clip"}, "gemma", id="clip-gemma_tied"),
    pytest.param({"vision": "siglip"}, "llama", id="siglip-llama"),
    pytest.param({"vision": "clip", "audio": "whisper"}, "qwen2", id="clip+whisper-qwen2"),
]


def tied(lm: nn.Module) -> bool:
    return lm.get_input_embeddings().weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()


@pytest.mark.parametrize("encoder_families,llm_family", SAVE_LOAD_CASES)
def test_save_load_is_bit_exact(encoder_families, llm_family, tmp_path):
    mllm = build(encoder_families, llm_family).eval()
    runs, inputs = [[], []], {}
    for key, family in encoder_families.items():
        n_tokens = (tiny.VISION_TOKENS if key == "vision" else tiny.AUDIO_TOKENS)[family]
        runs[0].append((mllm.modality_token_ids[key], n_tokens))
        inputs.update(modality_input(key, 1, seed=3))
    ids, mask = tiny.batch_with_placeholders(runs, seq_len=48)

    mllm.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()

    assert loaded.modality_token_ids == mllm.modality_token_ids
    assert list(loaded.encoders) == list(mllm.encoders)
    for key in encoder_families:
        assert type(loaded.encoders[key].module) is type(mllm.encoders[key].module)
    assert type(loaded.language_model) is type(mllm.language_model)
    assert tied(loaded.language_model) == tied(mllm.language_model)
    theirs = loaded.state_dict()
    assert theirs.keys() == mllm.state_dict().keys()
    for name, tensor in mllm.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    with torch.no_grad():
        expected = mllm(input_ids=ids, attention_mask=mask, **inputs).logits
        got = loaded(input_ids=ids, attention_mask=mask, **inputs).logits
    assert torch.equal(got, expected)


def test_save_load_keeps_encoder_order(tmp_path):
    mllm = two_modality_model()  # vision first, then audio
    mllm.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path)
    assert list(loaded.encoders) == ["vision", "audio"]
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in mllm.named_parameters()]


@pytest.mark.parametrize("projection_type,activation", [("linear", "gelu"), ("mlp", "silu")])
def test_projector_round_trip_is_exact(projection_type, activation, tmp_path):
    torch.manual_seed(0)
    projector = MultimodalProjector(MultimodalProjectorConfig(
        in_features=32, out_features=LLM_HIDDEN, projection_type=projection_type, activation=activation))
    with torch.no_grad():  # non-default values everywhere (biases start at zero), so a skipped load shows
        for p in projector.parameters():
            p.copy_(torch.randn_like(p))
    projector.save_pretrained(tmp_path)
    loaded = MultimodalProjector.from_pretrained(tmp_path)

    assert (loaded.config.in_features, loaded.config.out_features) == (32, LLM_HIDDEN)
    assert (loaded.config.projection_type, loaded.config.activation) == (projection_type, activation)
    assert repr(loaded.projection) == repr(projector.projection)
    assert loaded.state_dict().keys() == projector.state_dict().keys()
    for name, tensor in projector.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), projector(x))


# ------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("llm_family", ["llama", "gpt2"])  # gpt2: with dropout, replayed from the saved RNG state
def test_gradient_checkpointing_gives_the_same_loss_and_grads(llm_family):
    mllm = two_modality_model(llm_family)
    mllm.train()
    ids, mask = tiny.batch_with_placeholders([[(V, NV), (A, NA)], [(V, NV)], []], seq_len=64)
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                 pixel_values=tiny.pixels(2), input_features=tiny.audio_features(1))
    blocks = {  # first block of each stack; checkpointing replays it during backward
        "llm": (mllm.language_model.transformer.h[0].attn if llm_family == "gpt2"
                else mllm.language_model.model.layers[0].self_attn),
        "clip": mllm.vision_encoder.module.encoder.layers[0].self_attn,
        "whisper": mllm.audio_encoder.module.layers[0].self_attn,
    }
    calls = {name: count_calls(module) for name, module in blocks.items()}

    def step():
        for c in calls.values():
            c[0] = 0
        mllm.zero_grad()
        torch.manual_seed(1)
        out = mllm(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in mllm.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, {name: c[0] for name, c in calls.items()}

    loss, grads, runs = step()
    assert runs == {"llm": 1, "clip": 1, "whisper": 1}

    mllm.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt, runs_ckpt = step()
    assert runs_ckpt == {"llm": 2, "clip": 2, "whisper": 2}  # every stack really recomputed in backward
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)

    mllm.gradient_checkpointing_disable()
    assert step()[2] == {"llm": 1, "clip": 1, "whisper": 1}
