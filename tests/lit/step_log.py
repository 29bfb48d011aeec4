"""A callback the cluster tests add from the command line (``--trainer.callbacks+=tests.lit.step_log.StepLog``): each
rank appends one JSON line per training step to ``{out}/rank{global_rank}.jsonl`` as it goes, so a test can watch a
run's progress (and signal it mid-run) and compare its losses with another run's."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    """Args:
        out: the directory of the per-rank files (appended to, so a resumed run continues the same files).
        delay: seconds to sleep after each step (gives a test time to act while the run is in progress).
    """

    def __init__(self, out: str, delay: float = 0.0):
        self.out = Path(out)
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"step": trainer.global_step - 1, "loss": float(outputs["loss"].detach()),
                  "data": int(batch["input_ids"].sum()), "world_size": trainer.world_size,
                  "environment": type(trainer._accelerator_connector.cluster_environment).__name__,
                  "strategy": type(trainer.strategy).__name__}
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.delay:
            time.sleep(self.delay)


def read(out: str | Path, rank: int) -> list[dict]:
    """The records rank ``rank`` wrote under ``out`` (none if it wrote nothing yet)."""
    path = Path(out) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
