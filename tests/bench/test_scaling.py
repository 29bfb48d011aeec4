"""``bench/scaling.py`` in its smoke mode: measures, plots and records every point of a curve."""

from __future__ import annotations

import json


def test_quick_batch_curve(load_bench, one_thread, tmp_path):
    scaling = load_bench("scaling")
    results = scaling.main(["--quick", "--curves", "batch", "--threads", "1", "--repeats", "1", "--loss-chunk-size", "8",
                            "--out", str(tmp_path)])
    points = json.loads((tmp_path / "scaling.json").read_text())["curves"]["batch"]
    assert [p["x"] for p in points] == scaling.QUICK_CURVES["batch"] == [p["batch"] for p in points]
    assert (tmp_path / "scaling_batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "CPUs" in results["machine"] and results["command"].startswith("python bench/scaling.py --quick")
    for p in points:
        assert p["dloss"] <= 1e-5
        # memory and FLOPs do not depend on the machine's load: both are below Llava's at every point
        assert p["peak_bytes"]["cs"] < p["peak_bytes"]["hf"] and p["peak_bytes"][scaling.CHUNKED] < p["peak_bytes"]["hf"]
        assert p["flops"]["cs"] < p["flops"]["hf"]
        assert p["ms"].keys() == {"hf", "cs", scaling.CHUNKED, scaling.SKIPS} and min(p["ms"].values()) > 0
    redrawn = tmp_path / "redrawn"
    redrawn.mkdir()
    scaling.main(["--replot", str(tmp_path / "scaling.json"), "--out", str(redrawn)])
    assert (redrawn / "scaling_batch.png").read_bytes()[:4] == b"\x89PNG"


def test_multi_image_batch_orders_images_by_sample(load_bench):
    scaling = load_bench("scaling")
    spec, images = scaling.point_spec(scaling.QUICK, "images", 3)
    batch = scaling.multi_image_batch(spec, images)
    image_tokens = (batch["input_ids"] == spec.image_token_id).sum(1)
    assert image_tokens.tolist() == [images * (spec.patches + 1)] * spec.batch
    assert batch["pixel_values"].shape == (spec.batch * images, 3, spec.image_size, spec.image_size)
