"""DDP and FSDP2 with 2 CPU processes against one process on the same global batches; FSDP2 resume and export.

Each distributed scenario is one run of ``tests/lit/distributed_run.py`` launched by Lightning itself (bounded by a
subprocess timeout, so a hang fails the test): 16 digits, per-rank batch 4 (global 8), 6 steps, only the projector
training until step 2 and tower + LM from then on, and at step 1 rank 1's batch has no image. The reference is the same script in this process with
batch 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lit import distributed_run as dr

SCRIPT = Path(dr.__file__)
STEPS, BATCH, TEXT_ONLY_STEP = 6, 4, 1
COMMON = {"batch_size": BATCH, "steps": STEPS, "text_only_step": TEXT_ONLY_STEP, "text_only_batch": BATCH,
          "limit_val_batches": 1, "record_state": True}
TIMEOUT = 300


def launch(config: dict) -> list[dict]:
    """Run the script with 2 CPU processes; the records of rank 0 and rank 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(dr.REPO)}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps({"devices": 2, **config})], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=str(dr.REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = Path(config["out"])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 8: the reference trajectory."""
    out = tmp_path_factory.mktemp("single")
    record = dr.run({**COMMON, "batch_size": 2 * BATCH, "out": str(out)})
    return record, out


def states(out: Path, ranks=(0, 1)) -> list[list[dict]]:
    """Per rank, per step: the full model state_dict and optimizer state (see ``distributed_run.full_state``)."""
    return [torch.load(Path(out) / f"state{r}.pt", weights_only=False) for r in ranks]


def assert_states(got: dict, want: dict, what: str, atol: float = 0.0) -> None:
    """Every model tensor and every optimizer entry (moments, step, learning rate, group) equal (``atol`` 0:
    bit-identical)."""
    assert got["step"] == want["step"], what
    assert got["model"].keys() == want["model"].keys(), what
    assert got["optimizer"].keys() == want["optimizer"].keys(), what
    pairs = [(f"model {k}", v, want["model"][k]) for k, v in got["model"].items()]
    for name, entry in got["optimizer"].items():
        other = want["optimizer"][name]
        if atol and entry.keys() != other.keys():  # FSDP2 steps unused parameters with zero gradients
            assert {k for k in entry if k not in other} <= {"step", "exp_avg", "exp_avg_sq"}, (what, name)
            assert not any(entry[k].any() for k in ("exp_avg", "exp_avg_sq") if k in entry and k not in other), \
                (what, name)
            entry = {k: v for k, v in entry.items() if k in other}
        pairs += [(f"optimizer {name}.{k}", v, other[k]) for k, v in entry.items()]
    assert {k for e in got["optimizer"].values() for k in e} >= {"exp_avg", "exp_avg_sq", "step", "lr"}, what
    for key, mine, theirs in pairs:
        msg = f"{what}, step {got['step']}: {key}"
        if not torch.is_tensor(mine):
            assert mine == theirs, msg
        elif atol == 0:
            assert torch.equal(mine, theirs), msg
        else:
            torch.testing.assert_close(mine, theirs, atol=atol, rtol=0, msg=msg)


# elementwise tolerance of a parameter or moment against the single process (the global batch is reduced in a
# different order; observed differences are below 1e-6)
SINGLE_ATOL = 1e-5


def check_matches_single(ranks: list[dict], single_record: dict, out: Path | None = None,
                         single_out: Path | None = None) -> None:
    """Losses, stages and frozen gradients per step against one process; with ``out``, every rank's full model and
    optimizer state equal the other rank's exactly and the single process's within ``SINGLE_ATOL``."""
    ref = single_record["steps"]
    if out is not None:
        per_rank, (one,) = states(out), states(single_out, ranks=(0,))
        assert [s["step"] for s in per_rank[0]] == [s["step"] for s in one] == list(range(STEPS))
        for r0, r1, ref_state in zip(*per_rank, one):
            assert_states(r1, r0, "rank 1 vs rank 0")
            assert_states(r0, ref_state, "rank 0 vs one process", atol=SINGLE_ATOL)
    assert [s["step"] for s in ranks[0]["steps"]] == list(range(STEPS))
    for step, (r0, r1, one) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], ref)):
        # the mean of the ranks' returned losses is the global token-mean loss
        assert abs((r0["loss"] + r1["loss"]) / 2 - one["loss"]) < 1e-5, (step, r0["loss"], r1["loss"], one["loss"])
        assert r0["stage"] == r1["stage"] == one["stage"] == (0 if step < dr.TRANSITION else 1)
        # frozen parameters never get a gradient, on any rank (tower and LM in stage 0)
        assert r0["frozen_grads_none"] and r1["frozen_grads_none"], step
        assert (r0["n_frozen"] > 0) == (step < dr.TRANSITION)
        # the ranks hold identical parameters, across the transition, equal to the single process's
        assert r0["sums"] == r1["sums"], step
        for name, value in one["sums"].items():
            assert abs(r0["sums"][name] - value) < 1e-4, (step, name, r0["sums"][name], value)
    # the step where rank 1's batch had no image really happened (and completed)
    assert ranks[0]["steps"][TEXT_ONLY_STEP]["has_image"] and not ranks[1]["steps"][TEXT_ONLY_STEP]["has_image"]
    assert all(s["has_image"] for s in ref)


RESUME_STEP = 3  # mid-epoch (2 steps per epoch), after the transition


def check_resume(config: dict, ranks: list[dict], tmp_path: Path, resume_step: int = RESUME_STEP,
                 steps: int = STEPS) -> None:
    """Resumed from the step-3 checkpoint (after the transition, mid-epoch), the run continues exactly: the same
    batches on each rank, the same losses, parameters and optimizer state."""
    ckpt = tmp_path / "a" / "ckpt" / f"step={resume_step}.ckpt"
    assert ckpt.exists(), sorted(os.listdir(tmp_path / "a" / "ckpt"))
    resumed = launch({**config, "out": str(tmp_path / "b"), "resume": str(ckpt)})
    assert [s["step"] for s in resumed[0]["steps"]] == list(range(resume_step, steps))
    before, after = states(tmp_path / "a"), states(tmp_path / "b")
    for r in (0, 1):
        assert [s["step"] for s in after[r]] == list(range(resume_step, steps))
        for got in after[r]:  # the full model and optimizer state, bit-identical to the uninterrupted run's
            assert_states(got, before[r][got["step"]], f"rank {r} resumed")
        for got in resumed[r]["steps"]:
            want = ranks[r]["steps"][got["step"]]
            assert got["data"] == want["data"], (r, got["step"])  # the same batch on this rank
            assert got["loss"] == want["loss"] and got["sums"] == want["sums"], (r, got["step"])


def check_export(tmp_path: Path, single_out: Path) -> None:
    """The final checkpoint exported as one save_pretrained directory gives the trained model's logits."""
    from cornstarch.lit.cli import CornstarchTrainer
    from cornstarch.models.multimodal_language_model import MultimodalModel

    final = tmp_path / "a" / "ckpt" / f"step={STEPS}.ckpt"
    CornstarchTrainer(accelerator="cpu", logger=False).export(dr.make_module(), ckpt_path=str(final),
                                                              output_dir=str(tmp_path / "exported"))
    model = MultimodalModel.from_pretrained(str(tmp_path / "exported")).eval()
    trained = torch.load(tmp_path / "a" / "logits.pt", weights_only=False)  # computed by the (sharded) model
    with torch.no_grad():
        logits = model(**trained["inputs"]).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-6)
    unsharded = torch.load(single_out / "logits.pt", weights_only=False)["logits"]
    torch.testing.assert_close(logits, unsharded, rtol=0, atol=1e-4)


def test_ddp_two_processes_match_one_resume_and_export(tmp_path, single):
    config = {**COMMON, "strategy": "ddp", "checkpoint_every": 1}
    ranks = launch({**config, "out": str(tmp_path / "a")})
    assert ranks[0]["strategy"] == "DDPStrategy" and ranks[0]["world_size"] == 2
    check_matches_single(ranks, single[0], tmp_path / "a", single[1])
    assert (tmp_path / "a" / "ckpt" / f"step={RESUME_STEP}.ckpt").is_file()  # one file
    check_resume(config, ranks, tmp_path)
    check_export(tmp_path, single[1])


def test_fsdp2_two_processes_match_one_resume_and_export(tmp_path, single):
    """FSDP2 (with per-layer activation checkpointing): same trajectory; resumed from the step-3 sharded checkpoint
    (after the transition, mid-epoch) it continues with identical losses; the exported directory gives the
    sharded model's logits."""
    config = {**COMMON, "strategy": "fsdp2", "gradient_checkpointing": True, "checkpoint_every": 1}
    ranks = launch({**config, "out": str(tmp_path / "a")})
    assert ranks[0]["strategy"] == "FSDP2Strategy"
    check_matches_single(ranks, single[0], tmp_path / "a", single[1])
    assert (tmp_path / "a" / "ckpt" / f"step={RESUME_STEP}.ckpt").is_dir()  # one shard per rank
    check_resume(config, ranks, tmp_path)
    check_export(tmp_path, single[1])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_chunked_loss_matches_one_process_with_the_lm_head(tmp_path, single, strategy):
    """loss_chunk_size (head + loss fused, 7 tokens a chunk; the head is the tied embedding matrix): the same
    trajectory as one process computing logits with the LM's own head, across the transition and the imageless
    rank."""
    from cornstarch.models.multimodal_language_model.chunked_loss import fusable_head

    assert fusable_head(dr.make_module(loss_chunk_size=7).model.language_model) is not None  # the fused path runs
    ranks = launch({**COMMON, "strategy": strategy, "loss_chunk_size": 7, "out": str(tmp_path / "a")})
    check_matches_single(ranks, single[0])


def test_fsdp2_lora_adapters_in_their_own_units(tmp_path):
    """LoRA adapters (their own FSDP2 units inside frozen decoder layers) join at step 2: same losses as one
    process, frozen base weights never get gradients, the LM's base weights never change."""
    config = {**COMMON, "steps": 4, "lora": True, "limit_val_batches": 0}
    one = dr.run({**config, "batch_size": 2 * BATCH, "out": str(tmp_path / "single")})
    ranks = launch({**config, "strategy": "fsdp2", "out": str(tmp_path / "a")})
    for step, (r0, r1, ref) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], one["steps"])):
        assert abs((r0["loss"] + r1["loss"]) / 2 - ref["loss"]) < 1e-5, step
        assert r0["frozen_grads_none"] and r1["frozen_grads_none"]
        assert r0["sums"]["language_model"] == ranks[0]["steps"][0]["sums"]["language_model"]
        assert abs(r0["sums"]["lora"] - ref["sums"]["lora"]) < 1e-5
    assert ranks[0]["steps"][-1]["sums"]["lora"] != ranks[0]["steps"][0]["sums"]["lora"]  # adapters trained


def test_ddp_packed_rows_match_one_process_and_resume(tmp_path):
    """pack=True under DDP: each rank packs its share of the rows a single process with twice the rows per batch
    packs (16 digits of ~33 tokens: 6 rows of 100 tokens, 3 global steps of 2 rows per epoch, no wrap-around),
    with the same losses step for step, identical ranks; resumed from step 2 (mid-epoch) it continues exactly."""
    config = {**COMMON, "steps": 4, "batch_size": 1, "text_only_step": None, "limit_val_batches": 0,
              "data": {"pack": True, "max_length": 100}, "strategy": "ddp", "checkpoint_every": 1}
    one = dr.run({**config, "strategy": "auto", "checkpoint_every": None, "batch_size": 2,
                  "out": str(tmp_path / "single")})
    ranks = launch({**config, "out": str(tmp_path / "a")})
    assert [s["step"] for s in ranks[0]["steps"]] == list(range(4))
    for step, (r0, r1, ref) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], one["steps"])):
        assert abs((r0["loss"] + r1["loss"]) / 2 - ref["loss"]) < 1e-5, (step, r0["loss"], r1["loss"], ref["loss"])
    for r0, r1 in zip(*states(tmp_path / "a")):
        assert_states(r1, r0, "rank 1 vs rank 0")
    check_resume(config, ranks, tmp_path, resume_step=2, steps=4)


def test_ddp_grouped_batches_resume_exactly(tmp_path):
    """group_by_length=True under DDP (16 digits, per-rank batch 4: 2 steps an epoch): identical ranks; resumed
    from step 3 (mid-epoch 1) the run trains the same grouped batches with the same losses and state."""
    config = {**COMMON, "steps": 4, "text_only_step": None, "limit_val_batches": 0,
              "data": {"group_by_length": True}, "strategy": "ddp", "checkpoint_every": 1}
    ranks = launch({**config, "out": str(tmp_path / "a")})
    for r0, r1 in zip(*states(tmp_path / "a")):
        assert_states(r1, r0, "rank 1 vs rank 0")
    check_resume(config, ranks, tmp_path, resume_step=3, steps=4)
