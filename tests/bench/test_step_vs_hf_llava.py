"""``bench/step_vs_hf_llava.py``: the comparators the benches time against cornstarch."""

from __future__ import annotations

import torch


def test_llava_with_the_same_skips_trains_like_llava(load_bench):
    """HF Llava's own code with cornstarch's two skips gives Llava's loss and Llava's gradients (the oracle: the
    unmodified ``LlavaForConditionalGeneration``), and never runs the tower past the selected layer."""
    bench = load_bench("step_vs_hf_llava")
    llava = bench.build_llava(bench.QUICK, "full").train()
    skips = bench.LlavaWithTheSameSkips(llava).train()
    batch = bench.make_batch(bench.QUICK)
    ran = []
    for layer in skips.llava.model.vision_tower.encoder.layers:
        layer.register_forward_hook(lambda module, args, out: ran.append(module))
    llava_loss, skips_loss = llava(**batch).loss, skips(**batch).loss
    assert len(ran) == bench.QUICK.vision_layers - 1  # vision_feature_layer=-2: the last layer is not needed
    torch.testing.assert_close(skips_loss, llava_loss, rtol=0, atol=1e-5)
    llava_loss.backward(), skips_loss.backward()
    theirs = dict(llava.named_parameters())
    compared = 0
    for name, param in skips.llava.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    last = f"model.vision_tower.encoder.layers.{bench.QUICK.vision_layers - 1}."
    assert all(theirs[n].grad is None or not theirs[n].grad.any() for n in theirs if n.startswith(last))
    assert compared == len(theirs) - sum(n.startswith(last) for n in theirs)
