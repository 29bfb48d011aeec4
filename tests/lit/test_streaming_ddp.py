"""Streamed shards (raw and encoded) under DDP with 2 CPU processes and 2 loader workers each: the same global
batches (and losses) as one process with twice the batch, and a run resumed mid-epoch from a checkpoint continues with
bit-identical losses and parameters on both ranks."""

from __future__ import annotations

import json

import pytest

from cornstarch.data import MultimodalCollator
from cornstarch.data.prepare import prepare
from cornstarch.demo import digits_vlm_dataset
from tests.lit import distributed_run as dr
from tests.lit.test_strategies import BATCH, RESUME_STEP, STEPS, check_resume, launch

DATA = {"num_workers": 2, "shuffle_buffer": 8}


@pytest.fixture(scope="module", params=["raw", pytest.param("encoded", marks=pytest.mark.slow)])
def shards(request, tmp_path_factory) -> str:
    """16 train digits (8×8 PNGs) as LLaVA rows, written to tar shards of 5 samples: raw, or encoded with the
    trained module's processor."""
    root = tmp_path_factory.mktemp("digits")
    rows = []
    for i, row in enumerate(digits_vlm_dataset("train", image_size=8, n=16)):
        row["images"][0].save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": row["messages"][0]["content"]},
                                                            {"from": "gpt", "value": row["messages"][1]["content"]}]})
    (root / "data.json").write_text(json.dumps(rows))
    collator = MultimodalCollator(dr.make_module().processor) if request.param == "encoded" else None
    report = prepare(str(root / "data.json"), str(root / "shards"), samples_per_shard=5, progress=False,
                     collator=collator)
    assert report["samples"] == 16 and report["encoded"] == (request.param == "encoded")
    return str(root / "shards")


def test_ddp_streams_the_single_process_batches_and_resumes_bit_for_bit(tmp_path, shards):
    # per-rank batch 2 of 16 samples: 4 steps per epoch, so the resume at step 3 is mid-epoch, workers mid-shard
    config = {"batch_size": BATCH // 2, "steps": STEPS, "limit_val_batches": 0, "train_shards": shards, "data": DATA,
              "strategy": "ddp", "checkpoint_every": 1, "record_state": True}
    assert RESUME_STEP % 4
    one = dr.run({**config, "strategy": "auto", "checkpoint_every": None, "batch_size": BATCH,
                  "out": str(tmp_path / "single")})
    ranks = launch({**config, "out": str(tmp_path / "a")})
    assert [s["step"] for s in ranks[0]["steps"]] == list(range(STEPS))
    for step, (r0, r1, ref) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], one["steps"])):
        assert r0["data"] != r1["data"], "each rank has its own samples"
        assert abs((r0["loss"] + r1["loss"]) / 2 - ref["loss"]) < 1e-5, (step, r0["loss"], r1["loss"], ref["loss"])
        assert r0["sums"] == r1["sums"], step
    check_resume(config, ranks, tmp_path)
