"""Record the per-step training losses of a ``cornstarch fit`` run, bit for bit, to compare two versions of the code.

Add it to a run from the repository root; it writes the first ``steps`` losses (as ``float.hex`` strings, so equal
files mean bit-identical losses) and stops training:

    PYTHONPATH=. cornstarch fit --config experiments/digits_vlm.yaml \\
        --trainer.callbacks+=bench.loss_trace.LossTrace --trainer.callbacks.path losses_a.json
    # ... check out the other version, run again with losses_b.json, then:
    python -c "import json; print(json.load(open('losses_a.json')) == json.load(open('losses_b.json')))"
"""

from __future__ import annotations

import json

import lightning as L


class LossTrace(L.Callback):
    """Args:
        path: the JSON file to write.
        steps: how many training steps to record before stopping.
    """

    def __init__(self, path: str = "losses.json", steps: int = 200):
        self.path, self.steps, self.losses = path, steps, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()).hex())
        if len(self.losses) >= self.steps:
            with open(self.path, "w") as f:
                json.dump(self.losses, f)
            trainer.should_stop = True
