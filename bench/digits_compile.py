"""Does ``model.compile: true`` pay off on the default job (``experiments/digits_vlm.yaml``)?

Builds the job's model and data from its YAML (the CLI's own parsing), takes its first ``--batches`` training
batches, and times a train step (forward, backward, fused AdamW, every component trainable) of the eager model and
of a copy after ``mllm.compile()``, in interleaved rounds of 10 steps (medians). Prints the compile time (the first
3 compiled steps), the saving per step and the break-even: the steps after which compiling has paid for itself,
against the job's 2 700 steps (12 epochs × 225).

Run from the repository root: ``python bench/digits_compile.py``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_vs_hf_llava import flag, interleaved_median_ms  # noqa: E402

from cornstarch.data.datamodule import MultimodalDataModule  # noqa: E402
from cornstarch.lit.cli import CornstarchCLI, CornstarchTrainer  # noqa: E402
from cornstarch.lit.module import MultimodalLitModule  # noqa: E402

JOB_STEPS = 12 * 225
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "supervised_positions")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds of 10 steps per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cli = CornstarchCLI(MultimodalLitModule, MultimodalDataModule, trainer_class=CornstarchTrainer, run=False,
                        args=["--config", "experiments/digits_vlm.yaml", "--trainer.logger", "false"])
    data = cli.datamodule
    data.processor = cli.model.processor
    data.setup("fit")
    batches = [{k: v for k, v in b.items() if k in MODEL_INPUTS}
               for b in itertools.islice(data.train_dataloader(), args.batches)]
    eager = cli.model.model.train().requires_grad_(True)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    start = time.perf_counter()
    for batch in batches[:3]:
        compiled(**batch).loss.backward()
    compile_s = time.perf_counter() - start
    compiled.zero_grad(set_to_none=True)

    def ten_steps(model: torch.nn.Module):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        cycle = itertools.cycle(batches)

        def run() -> None:
            for _ in range(10):
                model(**next(cycle)).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    ms, busy = interleaved_median_ms({"eager": ten_steps(eager), "compiled": ten_steps(compiled)}, 2, args.repeats)
    eager_ms, compiled_ms = ms["eager"] / 10, ms["compiled"] / 10
    saving = (eager_ms - compiled_ms) / 1e3
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    print(f"digits_vlm train step ({len(batches)} batches, input_ids shapes {shapes}): eager {eager_ms:.1f} ms, "
          f"compiled {compiled_ms:.1f} ms ({eager_ms / compiled_ms:.2f}x); compile {compile_s:.1f} s; {flag(busy)}")
    if saving > 0:
        print(f"break-even after {compile_s / saving:.0f} steps (the job has {JOB_STEPS})")
    else:
        print(f"no saving per step: compiling never pays off on this job ({JOB_STEPS} steps)")


if __name__ == "__main__":
    main()
