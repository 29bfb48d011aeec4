"""``bench/gpu_recipe.py`` runs end to end in its CPU smoke mode, so the GPU script cannot rot unnoticed."""

from __future__ import annotations

import json

import pytest
import torch


def test_quick_cpu_run(load_bench, one_thread, tmp_path):
    recipe = load_bench("gpu_recipe")
    out = tmp_path / "recipe.json"
    results = recipe.main(["--quick", "--device", "cpu", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["modes"].keys() == {"trainable", "frozen"}
    for mode in results["modes"].values():
        assert mode["dloss_fp32"] <= 1e-5
        assert mode["loss_bf16"]["hf"] == pytest.approx(mode["loss_bf16"]["cs"], abs=0.05)
        # cornstarch skips the head at unsupervised positions: it counts fewer FLOPs than Llava
        assert 0 < mode["flops"]["cs"] < mode["flops"]["hf"]
        assert mode["ms"].keys() == {"hf", "cs", recipe.SKIPS} and all(ms > 0 for ms in mode["ms"].values())
    assert results["gemm_peak"] == max(results["gemm_rates"]) > 0


def test_default_sizes(load_bench):
    """The default sizes are what the recipe promises: CLIP-L/14 at 336 px and a ~1B-parameter LM."""
    recipe = load_bench("gpu_recipe")
    spec = recipe.GPU_1B
    vision = (spec.vision_hidden, spec.vision_layers, spec.image_size, spec.patch, spec.patches)
    assert vision == (1024, 24, 336, 14, 576)
    with torch.device("meta"):
        llava = recipe.build_llava(spec, "default")
    lm = sum(p.numel() for p in llava.model.language_model.parameters()) + llava.lm_head.weight.numel()
    tower = sum(p.numel() for p in llava.model.vision_tower.parameters())
    assert 0.9e9 < lm < 1.2e9 and 0.28e9 < tower < 0.32e9
