"""Oracle: MultimodalModel equals transformers' LlavaForConditionalGeneration on identical weights and inputs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.models.feature_selection import penultimate_layer_without_cls, request_hidden_states, without_cls
from cornstarch.models.multimodal_language_model import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from cornstarch.models.multimodal_language_model.supervised_loss import at_positions
from tests import tiny

IMAGE_TOKEN = 99  # inside the LM vocabulary, as Llava needs


def build_pair(feature_layer: int, strategy: str, truncate: bool = False):
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=tiny.vision_config("clip"), text_config=tiny.llm_config("llama"),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    llava = tf.LlavaForConditionalGeneration(config).eval()

    clip = tf.CLIPVisionModel(config.vision_config)
    clip.load_state_dict(llava.model.vision_tower.state_dict())
    llama = tf.LlamaForCausalLM(config.text_config)
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    projector = MultimodalProjector(MultimodalProjectorConfig(in_features=32, out_features=64, projection_type="mlp"))
    src = llava.model.multi_modal_projector
    projector.projection[0].load_state_dict(src.linear_1.state_dict())
    projector.projection[2].load_state_dict(src.linear_2.state_dict())
    callbacks = {}
    if truncate:  # the first-class way: the tower keeps only the layers it needs
        callbacks = dict(feature_layer=feature_layer,
                         postprocess_module_callback=without_cls if strategy == "default" else None)
    elif strategy == "default":
        assert feature_layer == -2
        callbacks = dict(preprocess_callback=request_hidden_states,
                         postprocess_module_callback=penultimate_layer_without_cls)
    mllm = MultimodalModel({"vision": ModalEncoderModule(clip, projector=projector, **callbacks)}, llama).eval()
    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    return llava, mllm


def make_batch(n_tokens: int, pad_left: bool):
    ids, mask = tiny.batch_with_placeholders([[(IMAGE_TOKEN, n_tokens)], [(IMAGE_TOKEN, n_tokens)], []], seq_len=32,
                                             pad_left=pad_left)
    # two images: samples 0 and 1; sample 2 is text only
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    return ids, mask, labels, tiny.pixels(2)


CASES = [(-2, "default", 16), (-1, "full", 17)]


@pytest.mark.parametrize("pad_left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("feature_layer,strategy,n_tokens", CASES, ids=["layer-2_no_cls", "layer-1_cls"])
def test_logits_loss_grads_match_llava(feature_layer, strategy, n_tokens, pad_left):
    llava, mllm = build_pair(feature_layer, strategy)
    ids, mask, labels, px = make_batch(n_tokens, pad_left)

    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    out = mllm(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)

    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(mllm, llava)


def assert_grads_match(mllm: MultimodalModel, llava: tf.LlavaForConditionalGeneration) -> None:
    pairs = {
        "vision": (mllm.vision_encoder.module, llava.model.vision_tower),
        "llm_body": (mllm.language_model.model, llava.model.language_model),
        "lm_head": (mllm.language_model.lm_head, llava.lm_head),
    }
    for name, (mine, theirs) in pairs.items():
        theirs_grads = dict(theirs.named_parameters())
        for pname, p in mine.named_parameters():
            ref_grad = theirs_grads[pname].grad
            if ref_grad is None:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{name}.{pname}"
                continue
            torch.testing.assert_close(p.grad, ref_grad, atol=1e-5, rtol=1e-4, msg=f"{name}.{pname}")
    src = llava.model.multi_modal_projector
    torch.testing.assert_close(mllm.vision_encoder.projector.projection[0].weight.grad, src.linear_1.weight.grad,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mllm.vision_encoder.projector.projection[2].weight.grad, src.linear_2.weight.grad,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pad_left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("feature_layer,strategy,n_tokens", CASES, ids=["layer-2_no_cls", "layer-1_cls"])
def test_greedy_generate_matches_llava(feature_layer, strategy, n_tokens, pad_left):
    llava, mllm = build_pair(feature_layer, strategy)
    ids, mask, _, px = make_batch(n_tokens, pad_left)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs)
    out = mllm.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("truncate", [False, True], ids=["all_layers", "feature_layer"])
@pytest.mark.parametrize("feature_layer,strategy,n_tokens", CASES, ids=["layer-2_no_cls", "layer-1_cls"])
def test_training_forward_matches_llava(feature_layer, strategy, n_tokens, truncate):
    """In training, logits only at supervised columns (and a truncated tower) give Llava's loss and gradients."""
    llava, mllm = build_pair(feature_layer, strategy, truncate=truncate)
    llava.train(), mllm.train()
    ids, mask, labels, px = make_batch(n_tokens, pad_left=False)
    answer_start = mask.sum(1, keepdim=True) - 6  # supervise each sample's last 6 tokens, as in instruction tuning
    labels = labels.masked_fill(torch.arange(ids.shape[1]) < answer_start, -100)

    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    out = mllm(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    positions = out.logits_positions
    assert positions is not None and len(positions) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.logits, at_positions(ref.logits, positions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(mllm, llava)


def test_feature_layer_keeps_only_the_needed_layers_and_reloads(tmp_path):
    llava, mllm = build_pair(-2, "default", truncate=True)
    tower = mllm.vision_encoder.module
    assert tower.config.num_hidden_layers == llava.config.vision_config.num_hidden_layers - 1
    assert len(tower.encoder.layers) == tower.config.num_hidden_layers
    ids, mask, _, px = make_batch(16, pad_left=True)
    mllm.save_pretrained(tmp_path)
    again = MultimodalModel.from_pretrained(tmp_path).eval()
    assert again.vision_encoder.module.config.num_hidden_layers == tower.config.num_hidden_layers
    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px)
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, pixel_values=px).logits, ref.logits,
                               atol=1e-5, rtol=1e-5)
