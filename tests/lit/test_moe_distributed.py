"""MoE LMs (Mixtral, Qwen3-MoE, OLMoE) under DDP and FSDP2 with 2 CPU processes (gloo): in every training path
each rank's loss and the synchronised gradients equal those of the LM's own full-logits forward; under FSDP2 the
experts are units of their own. See ``tests/lit/moe_distributed_run.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lit import moe_distributed_run as run
from tests.lit.test_strategies import launch
from tests.models.multimodal_language_model import test_moe as moe

TIMEOUT = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_path_matches_the_lms_own_loss_under_ddp_and_fsdp2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run.REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(Path(run.__file__)), str(tmp_path)], cwd=str(run.REPO),
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outputs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for family in moe.FAMILIES:
        assert ranks[0][f"{family}/fsdp2/experts_units"] == 2  # one per MoE decoder layer
        for wrapping in ("ddp", "fsdp2"):
            for path in run.PATHS:
                key = f"{family}/{wrapping}/{path}"
                r0, r1 = ranks[0][key], ranks[1][key]
                for r in (r0, r1):
                    assert r["aux"] > 1 and r["same_grads"], (key, r)
                    assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, (key, r)
                assert r0["chunked"] == (path == "chunked"), key
                assert r0["loss"] != r1["loss"], key  # each rank really had its own batch


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_reduces_the_router_term_once_per_rank(tmp_path, strategy):
    """A Mixtral configured as YAML gives it (router loss on, coefficient 0.25) trained by the Lightning module on
    2 processes: each rank's training-path loss equals the LM's own on its batch, and each rank returns its
    cross-entropy weighted by its share of the global supervised tokens plus its router term unweighted (the mean
    of the returned losses is the global token-mean cross-entropy plus the ranks' mean router loss); the ranks keep
    identical parameters."""
    config = {"lm": "mixtral", "batch_size": 4, "steps": 3, "text_only_step": 1, "text_only_batch": 4,
              "limit_val_batches": 0, "strategy": strategy, "out": str(tmp_path / "a")}
    ranks = launch(config)
    for step, (r0, r1) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        total = r0["tokens"] + r1["tokens"]
        for r in (r0, r1):
            assert r["router"] > 0.25, (step, r)  # 0.25 × a load-balancing loss of about 2
            assert abs(r["ours"] - r["own"]) < 1e-5, (step, r)
            want = (r["ours"] - r["router"]) * r["tokens"] * 2 / total + r["router"]
            assert abs(r["loss"] - want) < 1e-5, (step, r["loss"], want)
        assert r0["sums"] == r1["sums"], step
