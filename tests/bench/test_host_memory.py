"""``bench/host_memory.py`` measures a step of each model in its child-process mode, so the script cannot rot."""

from __future__ import annotations


def test_one_process_measures_each_phase(load_bench, one_thread):
    bench = load_bench("host_memory")
    for model in ("cornstarch", "hf"):
        out = bench.measure(model, "default", steps=1, threads=1)  # "kept" would change this test process
        assert out["applied"] is False and out["faults"] >= 0
        assert out["step"] >= out["forward"] + out["backward"] > 0 and out["optimizer"] > 0
