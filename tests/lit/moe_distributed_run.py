"""MoE LMs under DDP and FSDP2 with 2 CPU processes: every training path's loss and gradients equal the LM's own.

Run as ``python tests/lit/moe_distributed_run.py OUT_DIR`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` set (``tests/lit/test_moe_distributed.py`` starts both processes). For each family (Mixtral,
Qwen3-MoE, OLMoE) and each wrapping (``torch`` DDP; FSDP2 ``fully_shard`` on cornstarch's units, experts in their
own units) each rank runs its own batch through every path and through the LM's own full-logits forward (labels
given); after each backward the synchronised gradients (full tensors under FSDP2) are compared. Each rank writes
``{OUT_DIR}/rank{r}.json``: per family, wrapping and path, the loss difference and the largest gradient difference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cornstarch.data.packing import pack_batch  # noqa: E402
from cornstarch.lit.sharding import shard_fsdp2  # noqa: E402
from tests.models.multimodal_language_model import test_moe as moe  # noqa: E402

PATHS = ("supervised", "chunked", "packed")


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().clone()
    return out


def step(model: torch.nn.Module, inputs: dict, supervised: bool, chunk: int | None):
    model.zero_grad(set_to_none=True)
    inner = model.module if hasattr(model, "module") and not hasattr(model, "encoders") else model
    inner.supervised_logits_only, inner.loss_chunk_size = supervised, chunk
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), grads(model), out


def compare(got, want) -> dict:
    diff = max((float((got[1][n] - g).abs().max()) for n, g in want[1].items()), default=0.0)
    return {"loss": float(got[0]), "own": float(want[0]), "loss_diff": abs(float(got[0] - want[0])),
            "grad_diff": diff, "same_grads": sorted(got[1]) == sorted(want[1]),
            "aux": float(got[2].aux_loss.detach()), "chunked": getattr(got[2], "predictions", None) is not None}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict = {}
    for family in sorted(moe.FAMILIES):
        for wrapping in ("ddp", "fsdp2"):
            mllm = moe.model(family)  # seeded: the same weights on both ranks
            if wrapping == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(mllm, find_unused_parameters=True)
                units = []
            else:
                from torch.distributed.device_mesh import init_device_mesh

                units = shard_fsdp2(mllm, init_device_mesh("cpu", (dist.get_world_size(),)))
                model = mllm
            torch.manual_seed(100 + rank)
            inputs = moe.batch()
            inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"])  # each rank its own images
            packed, _ = pack_batch(inputs, capacity=96)
            key = f"{family}/{wrapping}"
            results[key + "/experts_units"] = sum(u.kind == "experts" for u in units) if units else None
            own = step(model, inputs, supervised=False, chunk=None)
            own_packed = step(model, packed, supervised=False, chunk=None)
            for path in PATHS:
                batch = packed if path == "packed" else inputs
                got = step(model, batch, supervised=True, chunk=5 if path == "chunked" else None)
                results[f"{key}/{path}"] = compare(got, own_packed if path == "packed" else own)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
