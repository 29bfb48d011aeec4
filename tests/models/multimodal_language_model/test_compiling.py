"""``MultimodalModel.compile()``: compiled encoder and decoder layers train exactly as the eager model.

One tiny Llava-shaped model (CLIP tower, Llama LM, an image per sample, padding on the right) compiled with
inductor, checked against an eager copy with identical weights: the loss within 1e-5 and every gradient close over
three AdamW steps (so the compiled backward's updates are checked too), a second batch shape, then eval-mode logits,
greedy tokens and the saved weights' names unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cornstarch.models.encoder_layers import layer_stack
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.compiling import compile_layer, compile_layers, is_compiled
from tests import tiny

IMAGE = 120  # placeholder id, outside the tiny LM's text ids
LOSS_ATOL = 1e-5


def model() -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"), feature_layer=-2)},
                           tiny.llm("llama"), init_projector_type="mlp")
    mllm.set_modality_token_ids({"vision": IMAGE})
    return mllm


def batch(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    n_tokens = tiny.VISION_TOKENS["clip"]
    ids, mask = tiny.batch_with_placeholders([[(IMAGE, n_tokens)]] * 3, seq_len, seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : n_tokens + 4] = -100  # the answer: the text after the image
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": tiny.pixels(3, seed)}


def train_steps(mllm: MultimodalModel, batches: list[dict]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Loss and gradients of each batch, with an AdamW step after each."""
    optimizer = torch.optim.AdamW(mllm.parameters(), lr=1e-3)
    seen = []
    for b in batches:
        loss = mllm(**b).loss
        loss.backward()
        seen.append((loss.item(), {n: p.grad.clone() for n, p in mllm.named_parameters() if p.grad is not None}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seen


@pytest.mark.slow
def test_compiled_layers_train_like_eager_and_evaluate_eagerly(tmp_path):
    eager = model().train()
    compiled = copy.deepcopy(eager)
    compiled.compile()  # nn.Module's own method, in place
    for part in (compiled.vision_encoder.module, compiled.language_model):
        assert all(is_compiled(layer) for layer in layer_stack(part)[1])
    batches = [batch(40), batch(40, seed=1), batch(44, seed=2)]  # a second shape: recompiled, still equal
    for (loss_e, grads_e), (loss_c, grads_c) in zip(train_steps(eager, batches), train_steps(compiled, batches)):
        assert abs(loss_e - loss_c) <= LOSS_ATOL
        assert grads_e.keys() == grads_c.keys() and len(grads_e) > 0
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # evaluation and generation run the eager layers: identical results
    eager.eval(), compiled.eval()
    b = batch(40)
    with torch.no_grad():
        inputs = {k: v for k, v in b.items() if k != "labels"}
        torch.testing.assert_close(compiled(**inputs).logits, eager(**inputs).logits, rtol=1e-4, atol=1e-5)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        left = {k: v.flip(1) for k, v in inputs.items() if k != "pixel_values"}  # left padding for generation
        assert torch.equal(compiled.generate(**left, pixel_values=b["pixel_values"], **kwargs),
                           eager.generate(**left, pixel_values=b["pixel_values"], **kwargs))
    # weights keep their names: a compiled model saves and loads as the eager one
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.save_pretrained(tmp_path)
    reloaded = MultimodalModel.from_pretrained(tmp_path)
    for name, tensor in compiled.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_compile_layers_names_each_stack_once_and_is_idempotent():
    mllm = model()
    paths = compile_layers(mllm, backend="eager")
    assert paths == [f"vision_encoder.module.{layer_stack(mllm.vision_encoder.module)[0]}",
                     "language_model.model.layers"]
    layer = mllm.language_model.model.layers[0]
    forward = layer.forward
    assert compile_layer(layer, backend="eager") is layer and layer.forward is forward  # no second wrapper


def test_compiled_layer_runs_eagerly_outside_training():
    layer = torch.nn.Linear(4, 4)
    calls = []

    def backend(graph_module, example_inputs):  # a backend that records each compilation
        calls.append(graph_module)
        return graph_module.forward

    compile_layer(layer, backend=backend)
    x = torch.randn(2, 4)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert calls == []  # no grad, or eval mode: the eager forward
    layer.train()
    layer(x).sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None
