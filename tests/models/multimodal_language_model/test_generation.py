"""Greedy decoding's fast path (``generation.py``): the tokens of ``language_model.generate`` and of HF Llava.

``MultimodalModel.generate`` decodes a plain greedy request itself; ``return_dict_in_generate=True`` sends the
same request through ``language_model.generate``, the reference here. Which path ran is checked by making the
LM's own ``generate`` fail.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.generation import GreedyRequest, plain_greedy_request
from tests import tiny
from tests.models.multimodal_language_model.test_llava_oracle import IMAGE_TOKEN, build_pair

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = tiny.VOCAB + 3  # the image placeholder, outside the LM's vocabulary
N = tiny.VISION_TOKENS["clip"]
MOE = dict(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           num_local_experts=4, num_experts_per_tok=2)
LMS = {"llama": lambda: tiny.llm("llama"), "gemma2": lambda: tiny.llm("gemma2"), "gpt2": lambda: tiny.llm("gpt2"),
       "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**MOE)).eval(),
       "phi3": lambda: tiny.llm("phi3")}  # Phi-3 has its own prepare_inputs_for_generation: left to generate


def model(family: str = "llama") -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, LMS[family]()).eval()
    mllm.set_modality_token_ids({"vision": TOKEN})
    return mllm


def prompts(rows: int) -> dict[str, torch.Tensor]:
    """``rows`` left-padded prompts of different lengths, each with one image (more than one row: padding)."""
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)]] * rows, seq_len=N + 10, pad_left=True)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixels(rows)}


def reference(mllm: MultimodalModel, inputs: dict, **kwargs) -> torch.Tensor:
    """The same request through ``language_model.generate`` (extra outputs keep it off the fast path)."""
    return mllm.generate(**inputs, **kwargs, return_dict_in_generate=True).sequences


def fast(mllm: MultimodalModel, monkeypatch: pytest.MonkeyPatch, inputs: dict, **kwargs) -> torch.Tensor:
    """``mllm.generate`` with the LM's own ``generate`` made to fail: the fast path must have run."""
    with monkeypatch.context() as patch:
        patch.setattr(mllm.language_model, "generate", _fails)
        return mllm.generate(**inputs, **kwargs)


def _fails(*args, **kwargs):
    raise AssertionError("language_model.generate was called")


GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "mixtral"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fast_path_gives_generates_tokens(family, rows, monkeypatch):
    mllm = model(family)
    inputs = prompts(rows)
    want = reference(mllm, inputs, **GREEDY)
    got = fast(mllm, monkeypatch, inputs, **GREEDY)
    assert got.shape == want.shape == (rows, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # placeholders restored


@pytest.mark.parametrize("rows", [1, 3])
def test_fast_path_gives_llavas_tokens(rows, monkeypatch):
    llava, mllm = build_pair(-2, "default")
    ids, mask = tiny.batch_with_placeholders([[(IMAGE_TOKEN, 16)]] * rows, seq_len=28, pad_left=True)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixels(rows)}
    want = llava.generate(**inputs, **GREEDY)
    assert torch.equal(fast(mllm, monkeypatch, inputs, **GREEDY), want)


def test_each_row_stops_at_its_own_eos_and_is_padded(monkeypatch):
    mllm = model()
    inputs = prompts(3)
    prompt = inputs["input_ids"].shape[1]
    free = fast(mllm, monkeypatch, inputs, **{**GREEDY, "eos_token_id": tiny.VOCAB + 50})[:, prompt:]  # no EOS
    eos = int(free[0, 2])  # ends row 0 mid-sequence
    kwargs = {**GREEDY, "eos_token_id": eos}
    got = fast(mllm, monkeypatch, inputs, **kwargs)
    assert torch.equal(got, reference(mllm, inputs, **kwargs))
    new = got[:, prompt:]
    ends = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in free]
    assert ends[0] <= 2 and None in ends, "a row that ends and one that runs on"
    assert new.shape[1] == 8
    for row, end in enumerate(ends):  # each row: the free run up to its first EOS, then only pad
        if end is None:
            assert torch.equal(new[row], free[row])
        else:
            assert torch.equal(new[row, :end + 1], free[row, :end + 1]) and new[row, end + 1:].eq(0).all()


def test_stops_early_once_every_row_has_ended(monkeypatch):
    mllm = model()
    inputs = prompts(2)
    prompt = inputs["input_ids"].shape[1]
    free = fast(mllm, monkeypatch, inputs, **{**GREEDY, "eos_token_id": tiny.VOCAB + 50})[:, prompt:]
    eos = [int(free[0, 1]), int(free[1, 2])]  # row 0 ends by step 1, row 1 by step 2
    kwargs = {**GREEDY, "eos_token_id": eos}
    got = fast(mllm, monkeypatch, inputs, **kwargs)
    assert got.shape[1] <= prompt + 3
    assert torch.equal(got, reference(mllm, inputs, **kwargs))


def test_an_lm_with_its_own_generation_hooks_is_left_to_generate():
    mllm = model("phi3")
    assert plain_greedy_request(mllm.language_model, GREEDY) is None
    inputs = prompts(2)
    assert torch.equal(mllm.generate(**inputs, **GREEDY), reference(mllm, inputs, **GREEDY))


def test_sampling_is_left_to_generate_and_unchanged():
    mllm = model()
    inputs = prompts(2)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
    torch.manual_seed(1)
    got = mllm.generate(**inputs, **kwargs)
    torch.manual_seed(1)
    assert torch.equal(got, reference(mllm, inputs, **kwargs))


class _Streamer:
    def put(self, value): ...

    def end(self): ...


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=True), dict(num_beams=2), dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=3), dict(return_dict_in_generate=True), dict(output_scores=True),
    dict(streamer=_Streamer()), dict(logits_processor=tf.LogitsProcessorList([tf.MinLengthLogitsProcessor(3, 2)])),
    dict(stopping_criteria=tf.StoppingCriteriaList([tf.MaxTimeCriteria(10.0)])), dict(max_time=10.0),
    dict(stop_strings=["x"]), dict(suppress_tokens=[5]), dict(bad_words_ids=[[5]]), dict(cache_implementation="static"),
    dict(synced_gpus=True), dict(position_ids=torch.zeros(1, 1)),
    dict(generation_config=tf.GenerationConfig(do_sample=True, max_new_tokens=4)),
], ids=lambda kwargs: next(iter(kwargs)))
def test_requests_beyond_plain_greedy_are_left_to_generate(kwargs):
    lm = tiny.llm("llama")
    assert plain_greedy_request(lm, {"max_new_tokens": 4, **kwargs}) is None


def test_plain_greedy_requests():
    lm = tiny.llm("llama")  # generation_config: eos 2, pad 0
    assert plain_greedy_request(lm, {"max_new_tokens": 4}) == GreedyRequest(4, (2,), 0)
    neutral = dict(do_sample=False, num_beams=1, temperature=0.7, top_p=0.9, synced_gpus=False, logits_processor=None,
                   repetition_penalty=1.0, use_cache=True)
    assert plain_greedy_request(lm, {"max_new_tokens": 4, **neutral}) == GreedyRequest(4, (2,), 0)
    assert plain_greedy_request(lm, {"max_new_tokens": 4, "eos_token_id": [7, 9], "pad_token_id": None}) == \
        GreedyRequest(4, (7, 9), 7)  # no pad token: the first EOS, as generate
    assert plain_greedy_request(lm, {}) is None  # no max_new_tokens: generate's own length rules
    config = tf.GenerationConfig(max_new_tokens=5, eos_token_id=3)
    assert plain_greedy_request(lm, {"generation_config": config}) == GreedyRequest(5, (3,), 0)  # the model's pad


@pytest.mark.slow  # one compilation, ~30 s on 2 cores
def test_compiled_decode_steps_give_the_same_tokens(monkeypatch):
    mllm = model()
    inputs = prompts(2)  # left padding
    prompt = inputs["input_ids"].shape[1]
    free = fast(mllm, monkeypatch, inputs, **{**GREEDY, "eos_token_id": tiny.VOCAB + 50})
    eos = int(free[0, prompt + 2])  # one row ends mid-sequence
    mllm.compile_generation = True
    for kwargs in ({**GREEDY, "eos_token_id": tiny.VOCAB + 50}, {**GREEDY, "eos_token_id": eos},
                   {**GREEDY, "max_new_tokens": 11}):  # the same batch size: one compilation serves all three
        got = fast(mllm, monkeypatch, inputs, **kwargs)
        mllm.compile_generation = False
        assert torch.equal(got, reference(mllm, inputs, **kwargs)), kwargs
        mllm.compile_generation = True
