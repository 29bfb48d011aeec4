"""``cornstarch`` with observation and fault-injection hooks, for the fault tests (``python -m tests.reliability.launch
fit --config ...``). The training itself is the console script's; the hooks only watch and stall:

- ``CS_PROGRESS``: a file that gets one line with the global step after each training step.
- ``CS_STALL_SAVE_AT`` (a global step) and ``CS_STALL_MARK`` (a file): the first checkpoint of that step or later is
  written halfway, synced, then the mark is written and the process sleeps, to be killed while it writes.
"""

from __future__ import annotations

import io
import os
import time

import torch

from cornstarch.lit import checkpointing
from cornstarch.lit.cli import main


def _install() -> None:
    progress = os.environ.get("CS_PROGRESS")
    stall_at = os.environ.get("CS_STALL_SAVE_AT")
    if progress:
        batch_end = checkpointing.Checkpoint.on_train_batch_end

        def on_train_batch_end(self, trainer, *args):
            batch_end(self, trainer, *args)
            with open(progress, "a") as f:
                f.write(f"{trainer.global_step}\n")
        checkpointing.Checkpoint.on_train_batch_end = on_train_batch_end
    if stall_at:
        save = checkpointing.AtomicCheckpointIO.save_checkpoint

        def stalled_save(self, checkpoint, path, storage_options=None):
            if checkpoint["global_step"] < int(stall_at):
                return save(self, checkpoint, path, storage_options)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                with open(os.environ["CS_STALL_MARK"], "w") as mark:
                    mark.write(f"{checkpoint['global_step']} {path}")
                time.sleep(600)
        checkpointing.AtomicCheckpointIO.save_checkpoint = stalled_save


if __name__ == "__main__":
    _install()
    main()
