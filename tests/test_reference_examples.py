"""The examples of the reference page (shared/reference/creating_mllm.md) run as written.

Hub ids are replaced by small local checkpoints: a tiny model is saved with ``save_pretrained`` to a temporary
directory and loaded back with the same ``XXX.from_pretrained(path)`` call the page makes.
"""

from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, SiglipVisionModel
from transformers.activations import ACT2CLS
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM

# The page's ViT example imports ViTPreTrainedModel and loads "openai/clip-vit-large-patch14" with it. That class is
# transformers' abstract base of the ViT models: it has no layers and no forward, so it cannot encode anything (and
# that hub id is a CLIP checkpoint). ViTModel is the concrete ViT encoder that loads a ViT checkpoint.
from transformers.models.vit.modeling_vit import ViTModel

from cornstarch.models.feature_selection import penultimate_layer_without_cls, request_hidden_states
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.modeling_multimodal_language_model import (
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from tests import tiny

IMAGE_TOKEN = tiny.VOCAB + 7
LLM_HIDDEN = 64


def local_checkpoint(tmp_path, name: str, model: nn.Module) -> str:
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def assert_same_weights(model: nn.Module, other: nn.Module) -> None:
    theirs = other.state_dict()
    assert model.state_dict().keys() == theirs.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def image_batch(n_tokens_per_image: int, images_per_sample=(1, 0, 2), seq_len: int = 64):
    ids, mask = tiny.batch_with_placeholders([[(IMAGE_TOKEN, n_tokens_per_image)] * c for c in images_per_sample],
                                             seq_len=seq_len)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, tiny.pixels(sum(images_per_sample))


# ------------------------------------------------------------------------------------------ "Creating a Multimodal LLM"
def test_vit_llama_example(tmp_path):
    torch.manual_seed(0)
    saved_llm, saved_vit = tiny.llm("llama"), tiny.vision_model("vit")
    llm_path = local_checkpoint(tmp_path, "llama", saved_llm)
    vit_path = local_checkpoint(tmp_path, "vit", saved_vit)

    # --- as on the page (local paths for hub ids; ViTModel for ViTPreTrainedModel, see the import above)
    llm = LlamaForCausalLM.from_pretrained(llm_path)
    vision_encoder = ViTModel.from_pretrained(vit_path)

    mllm = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(vision_encoder),
        },
        language_model=llm,
    )
    # ---

    assert_same_weights(llm, saved_llm)  # the local checkpoints were really loaded
    assert_same_weights(vision_encoder, saved_vit)
    # "mllm has language_model and vision_encoder modules"
    assert {"language_model", "vision_encoder"} <= dict(mllm.named_children()).keys()
    assert mllm.language_model is llm
    assert isinstance(mllm.vision_encoder, ModalEncoderModule)
    assert mllm.vision_encoder.module is vision_encoder
    assert isinstance(mllm.vision_encoder.projector, MultimodalProjector)
    assert mllm.encoders == {"vision": mllm.vision_encoder}

    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    ids, mask, labels, px = image_batch(tiny.VISION_TOKENS["vit"])
    out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px)
    # training with labels: logits only where the next token is supervised
    assert out.logits.shape == (1, len(out.logits_positions), tiny.VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    assert mllm.vision_encoder.projector.projection.weight.grad.any()
    assert vision_encoder.embeddings.patch_embeddings.projection.weight.grad.any()


# ------------------------------------------------------------------------------------------ "Model Architecture"
def test_architecture_tree():
    torch.manual_seed(0)
    vision, audio, whatever = tiny.vision_model("clip"), tiny.audio_model("whisper"), tiny.vision_model("siglip")
    llm = tiny.llm("llama")
    mllm = MultimodalModel(
        encoders={"vision": ModalEncoderModule(vision), "audio": ModalEncoderModule(audio),
                  "whatever": ModalEncoderModule(whatever)},
        language_model=llm,
    )
    assert list(dict(mllm.named_children())) == ["language_model", "vision_encoder", "audio_encoder",
                                                 "whatever_encoder"]
    assert list(mllm.encoders) == ["vision", "audio", "whatever"]
    for key, module in (("vision", vision), ("audio", audio), ("whatever", whatever)):
        encoder = getattr(mllm, f"{key}_encoder")
        assert mllm.encoders[key] is encoder
        assert isinstance(encoder, ModalEncoderModule)
        assert list(dict(encoder.named_children())) == ["module", "projector"]
        assert encoder.module is module
        assert isinstance(encoder.projector, MultimodalProjector)
    assert mllm.language_model is llm


# ------------------------------------------------------------------------------------------ "Creating a Projector"
def test_default_projector_is_one_linear():
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("mistral"))
    projection = mllm.vision_encoder.projector.projection
    assert type(projection) is nn.Linear
    assert (projection.in_features, projection.out_features) == (32, LLM_HIDDEN)


def test_linear_projector_type():
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("siglip"))}, tiny.llm("llama"),
                           init_projector_type="linear", init_activation="relu")
    projector = mllm.vision_encoder.projector
    assert type(projector.projection) is nn.Linear
    assert (projector.projection.in_features, projector.projection.out_features) == (32, LLM_HIDDEN)
    assert projector.config.projection_type == "linear"


REFERENCE_ACTIVATIONS = {"gelu": F.gelu, "relu": torch.relu, "silu": F.silu, "tanh": torch.tanh,
                         "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@pytest.mark.parametrize("activation", list(REFERENCE_ACTIVATIONS))
def test_mlp_projector_type(activation):
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"),
                           init_projector_type="mlp", init_activation=activation)
    projector = mllm.vision_encoder.projector
    assert (projector.config.projection_type, projector.config.activation) == ("mlp", activation)
    projection = projector.projection
    # "two torch.nn.Linear layers, where there is an activation layer as init_activation type in the middle"
    assert [type(m) for m in projection.children()] == [nn.Linear, ACT2CLS[activation], nn.Linear]
    first, act, last = projection.children()
    assert first.in_features == 32 and last.out_features == LLM_HIDDEN
    assert first.out_features == last.in_features
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = last(REFERENCE_ACTIVATIONS[activation](first(x)))
        torch.testing.assert_close(projector(x), expected, atol=1e-6, rtol=1e-5)


def test_unknown_projector_type_or_activation_is_refused():
    with pytest.raises(ValueError, match="conv"):
        MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"),
                        init_projector_type="conv")
    with pytest.raises(ValueError, match="not_an_activation"):
        MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"),
                        init_projector_type="mlp", init_activation="not_an_activation")


class MyProjection(nn.Module):
    """A user's own projection: LayerNorm → Linear → Tanh."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, LLM_HIDDEN)

    def forward(self, x):
        return torch.tanh(self.proj(self.norm(x)))


@pytest.mark.parametrize("your_config", [MultimodalProjectorConfig(in_features=32, out_features=LLM_HIDDEN),
                                         MultimodalProjectorConfig()], ids=["sized_config", "empty_config"])
@pytest.mark.parametrize("init_projector_type", ["linear", "mlp"])
def test_wrapped_custom_projection_is_used_as_is(your_config, init_projector_type):
    torch.manual_seed(0)
    my_projector_module = MyProjection()
    with torch.no_grad():  # values no initialisation would produce (LayerNorm starts at 1/0, Linear bias at 0)
        for p in my_projector_module.parameters():
            p.copy_(torch.randn_like(p))
    before = {k: v.clone() for k, v in my_projector_module.state_dict().items()}
    clip = tiny.vision_model("clip")

    # --- as on the page
    wrapped_projector_module = MultimodalProjector(your_config, my_projector_module)
    encoder = ModalEncoderModule(module=clip, projector=wrapped_projector_module)
    # ---
    mllm = MultimodalModel({"vision": encoder}, tiny.llm("mistral"), init_projector_type=init_projector_type)

    assert mllm.vision_encoder.projector is wrapped_projector_module
    assert wrapped_projector_module.projection is my_projector_module
    for name, tensor in my_projector_module.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} was re-initialised"

    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    ids, mask, labels, px = image_batch(tiny.VISION_TOKENS["clip"])
    with tiny.captured_inputs_embeds(mllm.language_model) as seen:
        out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px)
    with torch.no_grad():
        expected = my_projector_module(clip(pixel_values=px).last_hidden_state).reshape(-1, LLM_HIDDEN)
    torch.testing.assert_close(seen[0][ids == IMAGE_TOKEN], expected, atol=1e-6, rtol=1e-5)
    out.loss.backward()
    assert my_projector_module.proj.weight.grad.any() and my_projector_module.norm.weight.grad.any()


def test_projector_is_created_lazily_only_by_the_multimodal_model():
    torch.manual_seed(0)
    clip_a = tiny.vision_model("clip")
    clip_b = tiny.vision_model("clip")
    clip_b.load_state_dict(clip_a.state_dict())

    # --- as on the page
    encoder = ModalEncoderModule(module=clip_a)
    # which is equivalent to
    equivalent = ModalEncoderModule(module=clip_b, projector=None)
    # ---

    for enc in (encoder, equivalent):
        assert enc.projector is None  # nothing is built yet
        with pytest.raises(ValueError, match="projector"):
            enc(pixel_values=tiny.pixels(1))

    llm = tiny.llm("llama")
    torch.manual_seed(1)
    mllm_a = MultimodalModel({"vision": encoder}, llm, init_projector_type="mlp", init_activation="silu")
    torch.manual_seed(1)
    mllm_b = MultimodalModel({"vision": equivalent}, llm, init_projector_type="mlp", init_activation="silu")

    for enc in (encoder, equivalent):
        assert isinstance(enc.projector, MultimodalProjector)
        assert (enc.projector.config.in_features, enc.projector.config.out_features) == (32, LLM_HIDDEN)
        assert [type(m) for m in enc.projector.projection.children()] == [nn.Linear, ACT2CLS["silu"], nn.Linear]
    assert_same_weights(encoder.projector, equivalent.projector)  # same seed, same construction
    assert mllm_a.vision_encoder is encoder and mllm_b.vision_encoder is equivalent


# ------------------------------------------------------------------------------------------ "Callback Interface"
def test_callbacks_and_modules_run_in_the_documented_order():
    torch.manual_seed(0)
    vision_encoder = tiny.vision_model("clip")
    vision_projector = MultimodalProjector(MultimodalProjectorConfig(in_features=32, out_features=LLM_HIDDEN))
    llm = tiny.llm("llama")
    calls, seen = [], {}

    def preprocess_vision_callback(inputs):
        calls.append("preprocess")
        seen["preprocessed"] = inputs["pixel_values"].flip(-1)
        return {**inputs, "pixel_values": seen["preprocessed"]}

    def postprocess_vision_callback(inputs, output):
        calls.append("postprocess_module")
        assert output is seen["module_output"]
        seen["postprocessed"] = output.last_hidden_state[:, 1:] * 0.5  # drop CLS, rescale
        return (seen["postprocessed"],)

    def postprocess_projector_callback(inputs, output):
        calls.append("postprocess_projector")
        assert output[0] is seen["projector_output"]
        seen["final"] = output[0] + 1.0
        return (seen["final"],)

    def module_pre_hook(module, args, kwargs):
        calls.append("module")
        assert kwargs["pixel_values"] is seen["preprocessed"]

    def module_hook(module, args, output):
        seen["module_output"] = output

    def projector_pre_hook(module, args):
        calls.append("projector")
        assert args[0] is seen["postprocessed"]

    def projector_hook(module, args, output):
        seen["projector_output"] = output

    vision_encoder.register_forward_pre_hook(module_pre_hook, with_kwargs=True)
    vision_encoder.register_forward_hook(module_hook)
    vision_projector.register_forward_pre_hook(projector_pre_hook)
    vision_projector.register_forward_hook(projector_hook)
    llm.register_forward_pre_hook(lambda *_: calls.append("language_model"))

    # --- as on the page (model= as in its callback section)
    encoder = ModalEncoderModule(
        model=vision_encoder,
        projector=vision_projector,
        preprocess_callback=preprocess_vision_callback,
        postprocess_module_callback=postprocess_vision_callback,
        postprocess_projector_callback=postprocess_projector_callback,
    )
    # ---
    mllm = MultimodalModel({"vision": encoder}, llm)
    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    ids, mask, labels, px = image_batch(16)  # 16 patches per image once CLS is dropped
    with tiny.captured_inputs_embeds(llm) as embeds:
        out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px)

    assert calls == ["preprocess", "module", "postprocess_module", "projector", "postprocess_projector",
                     "language_model"]
    assert torch.equal(seen["preprocessed"], px.flip(-1))
    torch.testing.assert_close(embeds[0][ids == IMAGE_TOKEN], seen["final"].detach().reshape(-1, LLM_HIDDEN),
                               atol=0, rtol=0)
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------ Llava-Next example
IMAGE_NEWLINE = torch.randn(LLM_HIDDEN, generator=torch.Generator().manual_seed(42))  # in the LLM's space


def pack_image_features(image_features, image_sizes, vision_feature_select_strategy=None, image_newline=None):
    """A stand-in for LlavaNext's: each image's features, then one ``image_newline``, all concatenated.

    ``"default"`` drops the CLS feature first. Returns ``(features [total, hidden], feature_lens [n_images])``.
    """
    if image_sizes is not None:
        assert len(image_sizes) == image_features.shape[0]
    if vision_feature_select_strategy == "default":
        image_features = image_features[:, 1:]
    packed = [torch.cat([f, image_newline[None].to(f)], dim=0) for f in image_features]
    return torch.cat(packed, dim=0), torch.tensor([p.shape[0] for p in packed])


def postprocess_projector_callback(
    inputs: dict,
    output: BaseModelOutput | tuple,
    vision_feature_select_strategy: Optional[str] = None,
) -> BaseModelOutput | tuple:
    pixel_values = inputs.get("pixel_values", None)
    image_sizes = inputs.get("image_sizes", None)  # a free variable on the page
    image_features = output[0]  # (the page leaves it unbound when there are no pixel_values)

    if pixel_values is not None and pixel_values.size(0) > 0:
        # output[0] == output.last_hidden_state
        image_features = output[0]

        # pack_image_features function should be borrowed from
        # the LlavaNextForConditionalGeneration class
        image_features, feature_lens = pack_image_features(
            image_features,
            image_sizes,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_newline=IMAGE_NEWLINE,
        )
        CALLBACK_LOG.append((type(output), image_features))

    # replace output hidden state with postprocessed results
    if isinstance(output, ModelOutput):
        output.last_hidden_state = image_features
    else:
        output = (image_features,) + output[1:]

    return output


CALLBACK_LOG: list = []


def expected_packed(encoder: ModalEncoderModule, px: torch.Tensor, drop_cls: bool, penultimate: bool):
    """The features the LLM should get, by hand: projector(features) per image, minus CLS, plus the newline."""
    with torch.no_grad():
        out = encoder.module(pixel_values=px, output_hidden_states=True)
        hidden = out.hidden_states[-2][:, 1:] if penultimate else out.last_hidden_state
        projected = encoder.projector(hidden[:, 1:] if drop_cls else hidden)
        newline = IMAGE_NEWLINE.expand(px.shape[0], 1, LLM_HIDDEN)
        return torch.cat([projected, newline], dim=1).reshape(-1, LLM_HIDDEN)


def check_llava_next_model(mllm, n_features: int, drop_cls: bool = False, penultimate: bool = False,
                           output_type: type = None, encoder_inputs: dict | None = None):
    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    ids, mask, labels, px = image_batch(n_features)
    CALLBACK_LOG.clear()
    with tiny.captured_inputs_embeds(mllm.language_model) as embeds:
        if encoder_inputs is None:
            out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px)
        else:
            out = mllm(input_ids=ids, attention_mask=mask, labels=labels,
                       encoder_inputs={"vision": {"pixel_values": px, **encoder_inputs}})
    # training with labels: logits only where the next token is supervised
    assert out.logits.shape == (1, len(out.logits_positions), tiny.VOCAB) and torch.isfinite(out.loss)

    ((seen_type, returned),) = CALLBACK_LOG
    if output_type is not None:
        assert issubclass(seen_type, output_type)
    merged = embeds[0][ids == IMAGE_TOKEN]
    torch.testing.assert_close(merged, returned.detach(), atol=0, rtol=0)  # what the callback returned...
    torch.testing.assert_close(merged, expected_packed(mllm.vision_encoder, px, drop_cls, penultimate),
                               atol=1e-6, rtol=1e-5)  # ...which is the projected features plus one newline each
    out.loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in mllm.vision_encoder.projector.parameters())

    # the token count must follow the callback, not the encoder: the encoder's own count is refused
    bad_ids, bad_mask, _, _ = image_batch(n_features - 1)
    with pytest.raises(ValueError, match="vision"):
        mllm(input_ids=bad_ids, attention_mask=bad_mask, pixel_values=px)


def test_llava_next_clip_mistral_example(tmp_path):
    torch.manual_seed(0)
    clip_path = local_checkpoint(tmp_path, "clip", tiny.vision_model("clip"))
    mistral_path = local_checkpoint(tmp_path, "mistral", tiny.llm("mistral"))

    # --- as on the page
    clip = CLIPVisionModel.from_pretrained(clip_path)
    mistral = MistralForCausalLM.from_pretrained(mistral_path)

    mllm = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(
                model=clip,
                postprocess_projector_callback=postprocess_projector_callback,
            )
        },
        language_model=mistral,
    )
    # ---
    # CLIP gives 17 features per image (16 patches + CLS); the callback adds a newline: 18
    check_llava_next_model(mllm, tiny.VISION_TOKENS["clip"] + 1, output_type=ModelOutput)


def test_llava_next_siglip_llama_example(tmp_path):
    torch.manual_seed(0)
    siglip_path = local_checkpoint(tmp_path, "siglip", tiny.vision_model("siglip"))
    llama_path = local_checkpoint(tmp_path, "llama", tiny.llm("llama"))

    # --- as on the page
    siglip = SiglipVisionModel.from_pretrained(siglip_path)
    llama = LlamaForCausalLM.from_pretrained(llama_path)

    mllm = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(
                model=siglip,
                postprocess_projector_callback=postprocess_projector_callback,
            )
        },
        language_model=llama,
    )
    # ---
    check_llava_next_model(mllm, tiny.VISION_TOKENS["siglip"] + 1, output_type=ModelOutput)


def test_llava_next_callback_with_select_strategy_and_image_sizes():
    torch.manual_seed(0)
    callback = functools.partial(postprocess_projector_callback, vision_feature_select_strategy="default")
    mllm = MultimodalModel(
        {"vision": ModalEncoderModule(model=tiny.vision_model("clip"), postprocess_projector_callback=callback)},
        tiny.llm("qwen2"),
    )
    # "default" drops CLS (17 → 16) and the newline adds one back; image_sizes reaches the callback only
    check_llava_next_model(mllm, tiny.VISION_TOKENS["clip"], drop_cls=True,
                           encoder_inputs={"image_sizes": torch.tensor([[32, 32]] * 3)})


def test_llava_next_callback_on_tuple_output():
    """After a postprocess_module_callback that returns a tuple, the callback takes its tuple branch."""
    torch.manual_seed(0)
    mllm = MultimodalModel(
        {"vision": ModalEncoderModule(
            model=tiny.vision_model("clip"),
            preprocess_callback=request_hidden_states,
            postprocess_module_callback=penultimate_layer_without_cls,  # (layer -2 without CLS,): 16 per image
            postprocess_projector_callback=postprocess_projector_callback,
        )},
        tiny.llm("gemma"),
        init_projector_type="mlp",
    )
    check_llava_next_model(mllm, 16 + 1, penultimate=True, output_type=tuple)
