"""Mixture-of-experts LMs (Mixtral, Qwen3-MoE, OLMoE): the router loss is part of the loss in every training path.

The LMs run with ``output_router_logits=True`` and ``router_aux_loss_coef=0.5``: their own loss (labels given,
full logits) is the cross-entropy plus ``0.5 * aux_loss`` (about 1.0 here), so a path that dropped the router
term would miss by about 1.0; every path must match the LM's own loss within 1e-5, and its gradients too.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.data.packing import pack_batch
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.moe import expert_load, router_aux_coef
from cornstarch.models.multimodal_language_model.supervised_loss import causal_lm_loss, next_token_targets
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest

TOKEN = tiny.VOCAB + 3
N = tiny.VISION_TOKENS["clip"]
COEF = 0.5
EXPERTS = 4
_COMMON = dict(vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=COEF)
FAMILIES = {
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_COMMON, intermediate_size=64,
                                                              num_local_experts=EXPERTS)),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_COMMON, head_dim=16, moe_intermediate_size=32,
                                                                  num_experts=EXPERTS, decoder_sparse_step=1)),
    "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(**_COMMON, intermediate_size=32, num_experts=EXPERTS)),
}
PATHS = ("lm_head", "supervised", "chunked", "packed")


def model(family: str) -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, FAMILIES[family]())
    mllm.set_modality_token_ids({"vision": TOKEN})
    return mllm.train()


def batch() -> dict[str, torch.Tensor]:
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)], [], [(TOKEN, N)] * 2], seq_len=48)
    labels = ids.masked_fill((mask == 0) | (ids == TOKEN), -100)
    labels[:, :8] = -100  # the prompt unsupervised
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": tiny.pixels(3)}


def own_loss(mllm: MultimodalModel, inputs: dict[str, torch.Tensor]):
    """The LM's own forward (labels given, full logits) on the merged embeddings: its loss includes the router's."""
    embeds, labels = mllm.embed(inputs["input_ids"], mllm.encode({"vision": {"pixel_values": inputs["pixel_values"]}}),
                                inputs["labels"])
    extra = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
    return mllm.language_model(inputs_embeds=embeds, labels=labels, use_cache=False, **extra)


def step(mllm: MultimodalModel, run) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    mllm.zero_grad(set_to_none=True)
    out = run()
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in mllm.named_parameters() if p.grad is not None}, out


def run_path(mllm: MultimodalModel, path: str, inputs: dict[str, torch.Tensor]):
    mllm.supervised_logits_only = path != "lm_head"
    mllm.loss_chunk_size = 5 if path == "chunked" else None
    return step(mllm, lambda: mllm(**inputs))


def assert_matches(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_path_has_the_lms_own_loss_and_gradients(family, path):
    mllm = model(family)
    inputs = batch()
    if path == "packed":
        inputs, _ = pack_batch(inputs, capacity=96)
    want = step(mllm, lambda: own_loss(mllm, inputs))
    assert want[2].aux_loss is not None and float(want[2].aux_loss.detach()) > 1  # the term is really there, and large
    got = run_path(mllm, path, inputs)
    if path == "chunked":
        assert got[2].logits is None and got[2].predictions is not None  # the fused head really ran
    assert_matches(got, want)
    torch.testing.assert_close(got[2].aux_loss, want[2].aux_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_router_term_is_the_lms_coefficient_times_its_aux_loss(family):
    mllm = model(family)
    inputs = batch()
    out = mllm(**inputs)  # logits only where supervised
    assert router_aux_coef(mllm.language_model) == COEF
    targets = next_token_targets(inputs["labels"], out.logits_positions)
    cross_entropy = causal_lm_loss(out.logits, targets)
    torch.testing.assert_close(out.loss - cross_entropy, COEF * out.aux_loss)
    torch.testing.assert_close(mllm.router_loss(out), COEF * out.aux_loss)


def test_dropping_the_router_term_fails_the_equality(monkeypatch):
    """The equality above would catch a path that leaves the router loss out."""
    mllm = model("mixtral")
    inputs = batch()
    want = step(mllm, lambda: own_loss(mllm, inputs))
    monkeypatch.setattr(MultimodalModel, "router_loss", lambda self, output: None)
    with pytest.raises(AssertionError):
        assert_matches(run_path(mllm, "supervised", inputs), want)


def test_the_coefficient_is_the_one_the_lm_uses():
    mllm = model("olmoe")
    mllm.language_model.router_aux_loss_coef = 0.125  # the LM's forward reads its attribute, not its config
    inputs = batch()
    want = own_loss(mllm, inputs)
    torch.testing.assert_close(mllm(**inputs).loss, want.loss, atol=1e-5, rtol=1e-5)
    assert router_aux_coef(mllm.language_model) == 0.125


def test_dense_lm_and_router_logits_off_add_nothing():
    mllm = model("mixtral")
    mllm.language_model.config.output_router_logits = False
    out = mllm(**batch())
    assert out.aux_loss is None and mllm.router_loss(out) is None and mllm.expert_load(out) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expert_load_counts_each_tokens_top_k_experts(family):
    mllm = model(family)
    inputs = batch()
    out = mllm(**inputs)
    share = mllm.expert_load(out, inputs["attention_mask"])
    assert share.shape == (EXPERTS,)
    torch.testing.assert_close(share.sum(), torch.tensor(1.0))
    real = inputs["attention_mask"].flatten().bool()
    counts = torch.zeros(EXPERTS)
    for gate in out.router_logits:  # by hand: every real token's 2 largest router logits, every layer
        for row in gate[real]:
            counts[row.topk(2).indices] += 1
    torch.testing.assert_close(share, counts / counts.sum())


def test_expert_load_without_mask_counts_every_token():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 2.0, 3.0]])
    assert expert_load((logits, logits), top_k=2).tolist() == [0.25, 0.25, 0.25, 0.25]
    assert expert_load(None, top_k=2) is None


def test_a_loss_term_over_every_logit_keeps_the_full_logits_path():
    """Bamba's z-loss (mean squared log-sum-exp of every position's logits, padding included) needs all logits: with
    it on, training takes the LM's own full-logits forward, whose loss includes it."""
    from transformers import AutoModelForCausalLM

    from tests import sweep

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(sweep.tiny_config("bamba", z_loss_coefficient=0.5, vocab_size=tiny.VOCAB))
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, lm)
    mllm.set_modality_token_ids({"vision": TOKEN})
    inputs = batch()
    out = mllm.train()(**inputs)
    assert getattr(out, "logits_positions", None) is None and out.logits.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(out.loss, own_loss(mllm, inputs).loss)
    lm.z_loss_coefficient = 0.0  # without it (the LM reads its attribute), logits only where supervised again
    out = mllm(**inputs)
    assert out.logits_positions is not None
    torch.testing.assert_close(out.loss, own_loss(mllm, inputs).loss)
