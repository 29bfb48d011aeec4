"""Oracle: MultimodalModel equals transformers' LlavaForConditionalGeneration on identical weights and inputs.

Llava takes any ``text_config``, so the oracle covers every supported LM family (Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma2, Phi-3, GPT-2): logits, loss, every gradient (projector biases included) and greedy tokens, in eval
mode and in train mode, with right and left padding. Dropout is off (GPT-2's defaults are not zero) so train-mode
forwards are deterministic on both sides.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

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


FAMILIES = list(tiny.LLM_CLASSES)


def text_config(family: str):
    config = tiny.llm_config(family)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "resid_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    if family == "gemma2":  # a cap small enough to change these tiny logits, so a dropped cap shows
        config.final_logit_softcapping = 2.0
    if family == "gpt2":  # Llava's tying looks for ``embed_tokens``; GPT-2's is ``wte``: tie by hand below
        config.tie_word_embeddings = False
    return config


class SoftcappedLinear(nn.Linear):
    """Gemma2ForCausalLM's output layer: ``cap * tanh(linear(x) / cap)``. Llava's head is a plain linear layer,
    so with a Gemma2 ``text_config`` it would drop the cap that Gemma2 (and cornstarch) apply."""

    softcap: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x) / self.softcap) * self.softcap


def build_pair(feature_layer: int, strategy: str, truncate: bool = False, family: str = "llama"):
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=tiny.vision_config("clip"), text_config=text_config(family),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    llava = tf.LlavaForConditionalGeneration(config).eval()
    if family == "gpt2":
        llava.lm_head.weight = llava.model.language_model.wte.weight
        config.text_config.tie_word_embeddings = True
    if getattr(config.text_config, "final_logit_softcapping", None):  # Gemma2's own head caps its logits
        llava.lm_head.__class__ = SoftcappedLinear
        llava.lm_head.softcap = config.text_config.final_logit_softcapping
    with torch.no_grad():  # non-zero projector biases, so a bias mixed up or dropped shows in logits and grads
        for p in llava.model.multi_modal_projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    clip = tf.CLIPVisionModel(config.vision_config)
    clip.load_state_dict(llava.model.vision_tower.state_dict())
    lm = tiny.LLM_CLASSES[family](config.text_config)
    lm.base_model.load_state_dict(llava.model.language_model.state_dict())
    lm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    assert tied(lm) == tied(llava)
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
    mllm = MultimodalModel({"vision": ModalEncoderModule(clip, projector=projector, **callbacks)}, lm).eval()
    mllm.set_modality_token_ids({"vision": IMAGE_TOKEN})
    return llava, mllm


def tied(model) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def make_batch(n_tokens: int, pad_left: bool):
    ids, mask = tiny.batch_with_placeholders([[(IMAGE_TOKEN, n_tokens)], [(IMAGE_TOKEN, n_tokens)], []], seq_len=32,
                                             pad_left=pad_left)
    # two images: samples 0 and 1; sample 2 is text only
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    return ids, mask, labels, tiny.pixels(2)


CASES = [(-2, "default", 16), (-1, "full", 17)]
CASE_IDS = ["layer-2_no_cls", "layer-1_cls"]
# Llama with both feature selections; every other family with Llava's default one (penultimate layer, no CLS).
FAMILY_CASES = [pytest.param("llama", *case, id=f"llama-{cid}") for case, cid in zip(CASES, CASE_IDS)] + [
    pytest.param(family, *CASES[0], id=f"{family}-{CASE_IDS[0]}") for family in FAMILIES if family != "llama"]
PADS = pytest.mark.parametrize("pad_left", [False, True], ids=["right_pad", "left_pad"])


def test_every_family_is_covered():
    assert {p.values[0] for p in FAMILY_CASES} == set(tiny.LLM_CLASSES)


@PADS
@pytest.mark.parametrize("family,feature_layer,strategy,n_tokens", FAMILY_CASES)
def test_logits_loss_grads_match_llava(family, feature_layer, strategy, n_tokens, pad_left):
    llava, mllm = build_pair(feature_layer, strategy, family=family)
    ids, mask, labels, px = make_batch(n_tokens, pad_left)

    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    out = mllm(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)

    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(mllm, llava)


def assert_grads_match(mllm: MultimodalModel, llava: tf.LlavaForConditionalGeneration) -> None:
    """Every parameter's gradient equals Llava's, tower, projector (weights and biases), LM body and head."""
    src = llava.model.multi_modal_projector
    projector = mllm.vision_encoder.projector.projection
    pairs = {
        "vision": (mllm.vision_encoder.module, llava.model.vision_tower),
        "projector.linear_1": (projector[0], src.linear_1),
        "projector.linear_2": (projector[2], src.linear_2),
        "llm_body": (mllm.language_model.base_model, llava.model.language_model),
        "lm_head": (mllm.language_model.get_output_embeddings(), llava.lm_head),
    }
    compared = 0
    for name, (mine, theirs) in pairs.items():
        theirs_grads = dict(theirs.named_parameters(remove_duplicate=False))
        for pname, p in mine.named_parameters(remove_duplicate=False):
            ref_grad = theirs_grads[pname].grad
            compared += 1
            if ref_grad is None:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{name}.{pname}"
                continue
            assert p.grad is not None, f"{name}.{pname}: no gradient, Llava has one"
            torch.testing.assert_close(p.grad, ref_grad, atol=1e-5, rtol=1e-4, msg=f"{name}.{pname}")
    assert compared == len(list(mllm.named_parameters(remove_duplicate=False)))


@pytest.mark.parametrize("pad_left", [True], ids=["left_pad"])
@pytest.mark.parametrize("family,feature_layer,strategy,n_tokens", FAMILY_CASES)
def test_greedy_generate_matches_llava(family, feature_layer, strategy, n_tokens, pad_left):
    llava, mllm = build_pair(feature_layer, strategy, family=family)
    ids, mask, _, px = make_batch(n_tokens, pad_left)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs)
    out = mllm.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("feature_layer,strategy,n_tokens", CASES, ids=CASE_IDS)
def test_greedy_generate_right_padded_matches_llava(feature_layer, strategy, n_tokens):
    llava, mllm = build_pair(feature_layer, strategy)
    ids, mask, _, px = make_batch(n_tokens, pad_left=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(mllm.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs),
                       llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs))


def run_training_forward(llava, mllm, n_tokens: int, pad_left: bool, chunk: int | None = None) -> None:
    """In training, logits only at supervised columns (and a truncated tower) give Llava's loss and gradients;
    with ``chunk``, the fused chunked head + loss gives them too, and its predictions are Llava's argmax."""
    llava.train(), mllm.train()
    mllm.loss_chunk_size = chunk
    ids, mask, labels, px = make_batch(n_tokens, pad_left=pad_left)
    # supervise each sample's last 6 tokens, as in instruction tuning
    answer = (mask == 1) & (mask.cumsum(1) > mask.sum(1, keepdim=True) - 6)
    labels = labels.masked_fill(~answer, -100)
    assert (labels != -100).sum(1).tolist() == [2, 2, 4]  # image placeholders among the last 6 stay unsupervised

    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    out = mllm(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    positions = out.logits_positions
    assert positions is not None and len(positions) == int((labels[:, 1:] != -100).sum())
    if chunk is None:
        torch.testing.assert_close(out.logits, at_positions(ref.logits, positions), atol=1e-5, rtol=1e-5)
    else:
        assert out.logits is None
        assert torch.equal(out.predictions, at_positions(ref.logits, positions).argmax(-1))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(mllm, llava)


@pytest.mark.parametrize("truncate", [False, True], ids=["all_layers", "feature_layer"])
@pytest.mark.parametrize("feature_layer,strategy,n_tokens", CASES, ids=CASE_IDS)
def test_training_forward_matches_llava(feature_layer, strategy, n_tokens, truncate):
    llava, mllm = build_pair(feature_layer, strategy, truncate=truncate)
    run_training_forward(llava, mllm, n_tokens, pad_left=False)


@pytest.mark.parametrize("chunk", [None, 5], ids=["lm_head", "fused_chunked_loss"])
@pytest.mark.parametrize("family,feature_layer,strategy,n_tokens", FAMILY_CASES)
def test_training_forward_left_padded_matches_llava(family, feature_layer, strategy, n_tokens, chunk):
    llava, mllm = build_pair(feature_layer, strategy, family=family)
    run_training_forward(llava, mllm, n_tokens, pad_left=True, chunk=chunk)


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
