"""``bench/generation_vs_hf_llava.py``: its bound of removing ``generate``'s bookkeeping decodes ``generate``'s tokens."""

from __future__ import annotations

import torch


def test_the_models_own_forwards_alone_give_generates_tokens(load_bench):
    bench = load_bench("generation_vs_hf_llava")
    spec = load_bench("step_vs_hf_llava").QUICK
    llava = bench.build_llava(spec, "default").eval()
    inputs = bench.prompts(spec, batch=3)  # left-padded rows of three lengths
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        expected = llava.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=bench.PAD,
                                  eos_token_id=bench.EOS)
        tokens = bench.llava_forwards_alone(llava, inputs, new_tokens=6)
    assert expected.shape == (3, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(tokens, expected)
