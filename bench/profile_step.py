"""Where a cornstarch train step's time goes: ``torch.profiler`` operator table and page faults of a step.

The Llava-shaped bench configuration of ``step_vs_hf_llava.py`` (``--width 4``: 4× its width), all trainable, fused
AdamW, cornstarch eager or after ``mllm.compile()`` (``--compiled``). Prints the forward + backward FLOPs
(``pass_flops``), the median step time with the GEMM peak probed around it (``mfu.GemmPeak``), the minor page faults
and system CPU time per step (fresh large tensors are page-faulted in on first touch), and the operators that
took the most time over ``--steps`` profiled steps.

Run from the repository root: ``python bench/profile_step.py --width 1``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mfu import GemmPeak, adamw, full_step, widened  # noqa: E402
from step_vs_hf_llava import LLAVA_SHAPED, build_llava, cornstarch_from_llava, make_batch, pass_flops  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1, help="width factor of the bench configuration")
    parser.add_argument("--compiled", action="store_true", help="after mllm.compile()")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    spec = widened(LLAVA_SHAPED, args.width)
    model = cornstarch_from_llava(build_llava(spec, "full")).train()
    batch = make_batch(spec)
    flops = pass_flops(model, [batch])[0]
    if args.compiled:
        model.compile()
    step, peak = full_step(model, batch, adamw(model, fused=True)), GemmPeak()
    for _ in range(2):
        step()
    times, faults, system = [], [], []
    for _ in range(5):
        peak()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    step_s = statistics.median(times)
    print(f"{spec.describe()}; {'compiled' if args.compiled else 'eager'}; {flops / 1e9:.1f} GFLOP forward + backward")
    print(f"step {1e3 * step_s:.1f} ms (median of 5); GEMM peak {peak.best / 1e9:.1f} GFLOP/s; model FLOP/s over peak "
          f"{flops / step_s / peak.best:.2f}; minor page faults per step {statistics.median(faults):.0f} "
          f"(~{statistics.median(faults) * 4 / 1024:.0f} MiB first touched); system CPU {statistics.median(system):.2f} s")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                             max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
