"""Every causal LM class in transformers' registry, composed with a tiny CLIP tower: it trains with the LM's own loss
in every training path, or ``MultimodalModel`` refuses it at construction with a clear message.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny LM is built from its config (``tests/sweep.py``)
and, in training mode, the loss and every parameter's gradient of each path are compared with the LM's own
full-logits forward (labels given) on the same merged embeddings:

- ``lm_head``: the LM's own forward (``supervised_logits_only`` off);
- ``supervised``: logits only where a token is supervised;
- ``chunked``: the fused, chunked head and loss (``loss_chunk_size``), for the heads it reproduces
  (``FUSABLE_FAMILIES``; the others fall back to the supervised path, see ``test_chunked_loss.py``);
- ``packed``: the batch packed into rows (``pack_batch``), against the LM's own forward on the same packed rows;
  and the packed cross-entropy equals the padded batch's when the LM attends within each sample (then
  ``supports_packing`` says so), else the model refuses packed batches.

MoE LMs run with ``output_router_logits=True`` and ``router_aux_loss_coef=0.5``, so a path that dropped the router
loss would be off by about 1. The coverage is printed at the end of the test session.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from cornstarch.data.packing import pack_batch
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.chunked_loss import fusable_head
from cornstarch.models.multimodal_language_model.language_models import labels_for, supports_packing
from tests import sweep, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest

MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
IMAGE, N = 16, 5  # 16x16 images, 8x8 patches: 4 patches + CLS = 5 features each
ATOL, RTOL = 1e-5, 1e-4


def clip() -> torch.nn.Module:
    """A one-layer CLIP tower, frozen (the paths differ after the merge; its gradients follow the projector's)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=IMAGE, patch_size=8))
    return tower.requires_grad_(False)


def batch(token: int) -> dict[str, torch.Tensor]:
    """Three right-padded samples (one image, none, two images), their prompts unsupervised."""
    ids, mask = tiny.batch_with_placeholders([[(token, N)], [], [(token, N)] * 2], seq_len=28)
    ids = ids.remainder(sweep.VOCAB - 3).where(ids != token, token)  # text ids inside the tiny vocabulary
    labels = ids.masked_fill((mask == 0) | (ids == token), -100)
    labels[:, :3] = -100
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def own_forward(mllm: MultimodalModel, inputs: dict[str, torch.Tensor]):
    """The LM's own full-logits forward, labels given, on the merged embeddings of ``inputs``."""
    embeds, labels = mllm.embed(inputs["input_ids"], mllm.encode({"vision": {"pixel_values": inputs["pixel_values"]}}),
                                inputs["labels"])
    extra = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
    labels = labels_for(mllm.language_model, labels)  # shifted for the few LMs that expect that
    return sweep.seeded(mllm.language_model, inputs_embeds=embeds, labels=labels, use_cache=False, **extra)


def loss_and_grads(mllm: MultimodalModel, run) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    mllm.zero_grad(set_to_none=True)
    out = run()
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in mllm.named_parameters() if p.grad is not None}, out


def assert_same(path: str, got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}: loss: {m}")
    assert got[1].keys() == want[1].keys(), f"{path}: {sorted(set(got[1]) ^ set(want[1]))}"
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}: {name}: {m}")


def cross_entropy(mllm: MultimodalModel, out) -> torch.Tensor:
    """The loss without the router term."""
    extra = mllm.router_loss(out)
    return out.loss.detach() - (0 if extra is None else extra.detach())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_causal_lm_trains_with_its_own_loss_in_every_path(model_type):
    if model_type in sweep.NOT_BUILT:
        sweep.RESULTS["lm"][model_type] = ("not built", sweep.NOT_BUILT[model_type])
        pytest.skip(sweep.NOT_BUILT[model_type])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(sweep.tiny_config(model_type))
    if model_type in sweep.SETUP:
        sweep.SETUP[model_type](lm)
    name = type(lm).__name__
    try:
        mllm = MultimodalModel({"vision": ModalEncoderModule(clip())}, lm)
    except ValueError as err:
        assert name in str(err), err  # the refusal names the class and says why
        sweep.RESULTS["lm"][model_type] = ("refused", str(err))
        return
    token = mllm.get_input_embeddings().weight.shape[0] + 3  # outside the vocabulary
    mllm.set_modality_token_ids({"vision": token})
    mllm.train()
    inputs = batch(token)

    want = loss_and_grads(mllm, lambda: own_forward(mllm, inputs))
    mllm.supervised_logits_only = False
    assert_same("lm_head", loss_and_grads(mllm, lambda: sweep.seeded(mllm, **inputs)), want)
    mllm.supervised_logits_only = True
    assert_same("supervised", loss_and_grads(mllm, lambda: sweep.seeded(mllm, **inputs)), want)
    fused = fusable_head(lm) is not None  # else the chunked path is the supervised one (test_chunked_loss.py)
    if fused:
        mllm.loss_chunk_size = 5
        chunked = loss_and_grads(mllm, lambda: sweep.seeded(mllm, **inputs))
        assert chunked[2].predictions is not None, "the fused head did not run"
        assert_same("chunked", chunked, want)
        mllm.loss_chunk_size = None

    packed, _ = pack_batch(inputs, capacity=56)
    if supports_packing(lm):
        packed_want = loss_and_grads(mllm, lambda: own_forward(mllm, packed))
        assert_same("packed", loss_and_grads(mllm, lambda: sweep.seeded(mllm, **packed)), packed_want)
        # each sample attends only to itself: the packed rows' cross-entropy is the padded batch's
        torch.testing.assert_close(cross_entropy(mllm, packed_want[2]), cross_entropy(mllm, want[2]),
                                   atol=ATOL, rtol=RTOL, msg=lambda m: f"packed rows vs padded batch: {m}")
        packing = "packing"
    else:
        with pytest.raises(ValueError, match=name):
            mllm(**packed)
        packing = "packing refused"
    moe = "MoE" if mllm.router_loss(want[2]) is not None else "dense"
    sweep.RESULTS["lm"][model_type] = ("pass", f"{name}: {moe}, {'fused' if fused else 'own head'}, {packing}")


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama4_text", "gemma2", "mistral"])
def test_sliding_and_chunked_attention_pack_per_sample(model_type):
    """Gemma 3 (sliding and global layers), Llama 4 (chunked and global layers), Gemma 2 and Mistral (sliding) with
    windows shorter than the samples: on packed rows every path gives the padded batch's loss, so each sample
    attends only to itself within its own window."""
    config = sweep.tiny_config(model_type)
    text = getattr(config, "get_text_config", lambda: config)()
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    lengths = batch(tiny.VOCAB + 3)["attention_mask"].sum(1)
    assert window == sweep.WINDOW and window < int(lengths.max()), (window, lengths)
    kinds = set(getattr(text, "layer_types", None) or ())
    assert len(kinds) != 1, kinds  # the mixed families really mix windowed and global layers
    test_causal_lm_trains_with_its_own_loss_in_every_path(model_type)
    assert sweep.RESULTS["lm"][model_type][1].endswith(", packing")
