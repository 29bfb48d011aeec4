"""Training throughput under each strategy on this machine: one process vs DDP vs FSDP2 (2 processes).

The model and data are the default experiment's (``experiments/digits_vlm.yaml``; ``--hidden`` widens the tower
and the LM for a heavier model). Every strategy trains on the same global batch (one process: ``--batch``; two
processes: half each); the freeze schedule is dropped so every step trains everything. Each strategy runs in its
own fresh process(es), one after another in this one invocation, and reports samples per second over the timed
steps after ``--warmup`` steps; the table gives each as a ratio to the one-process run.

    python bench/strategies.py [--steps 30] [--warmup 5] [--batch 32] [--hidden 64] [--threads 2]

``--threads``: torch threads of the one-process run (the 2-process runs use ``threads // 2`` each), so all runs
use the same cores. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "experiments" / "digits_vlm.yaml"
RUNS = [("single", "auto", 1), ("ddp", "ddp", 2), ("fsdp2", "fsdp2", 2)]


def build(hidden: int, batch: int):
    """The default experiment's module and data module (as the CLI builds them), every component training."""
    import yaml
    from jsonargparse import ArgumentParser

    from cornstarch.data import MultimodalDataModule
    from cornstarch.lit import MultimodalLitModule

    cfg = yaml.safe_load(CONFIG.read_text())
    for part in (cfg["model"]["encoders"]["vision"]["model"], cfg["model"]["language_model"]):
        part["config"].update(hidden_size=hidden, intermediate_size=2 * hidden)
    cfg["model"]["freeze_schedule"] = None
    cfg["data"]["batch_size"] = batch
    cfg["data"].pop("val", None)
    parser = ArgumentParser()
    parser.add_class_arguments(MultimodalLitModule, "model")
    parser.add_class_arguments(MultimodalDataModule, "data")
    init = parser.instantiate(parser.parse_object({"model": cfg["model"], "data": cfg["data"]}))
    return init.model, init.data


def worker(config: dict) -> None:
    """One training run (Lightning launches the second process for ``devices=2``); rank 0 writes the rate."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(config["threads"])

    class Timer(Callback):
        def __init__(self):
            self.start = None
            self.timed = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == config["warmup"]:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is not None:
                self.timed += 1

    L.seed_everything(0, verbose=False)
    module, data = build(config["hidden"], config["batch"] // config["devices"])
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=config["devices"], strategy=config["strategy"],
                        max_steps=config["warmup"] + config["steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(module, datamodule=data)
    elapsed = time.perf_counter() - timer.start
    if trainer.global_rank == 0:
        rate = timer.timed * config["batch"] / elapsed
        Path(config["out"]).write_text(json.dumps({"samples_per_s": rate, "steps": timer.timed,
                                                   "params": sum(p.numel() for p in module.parameters())}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, strategy, devices in RUNS:
            threads = args.threads if devices == 1 else max(1, args.threads // devices)
            config = {"strategy": strategy, "devices": devices, "steps": args.steps, "warmup": args.warmup,
                      "batch": args.batch, "hidden": args.hidden, "threads": threads, "out": f"{tmp}/{name}.json"}
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], env=env,
                                  capture_output=True, text=True, cwd=str(REPO))
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(Path(config["out"]).read_text())
    base = results["single"]["samples_per_s"]
    print(f"digits_vlm model, hidden {args.hidden} ({results['single']['params'] / 1e6:.2f} M params), global batch "
          f"{args.batch}, {args.steps} timed steps after {args.warmup}; {args.threads} threads in total")
    print(f"{'strategy':<8} {'processes':>9} {'samples/s':>10} {'vs single':>10}")
    for name, _, devices in RUNS:
        rate = results[name]["samples_per_s"]
        print(f"{name:<8} {devices:>9} {rate:>10.1f} {rate / base:>10.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
