"""Host memory between train steps: glibc's default ``malloc`` against :func:`keep_freed_host_memory` (CPU).

The Llava-shaped bench configuration of ``bench/step_vs_hf_llava.py`` (CLIP-style tower 4×128, Llama-style LM 4×256,
vocab 32 000, batch 4), all trainable, fused AdamW, a plain loop (forward, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``, as Lightning's loop does). Each (model, allocator) runs alone in a fresh process, the
processes alternating over ``--rounds``; each reports the median of ``--steps`` steps after 3 warm-up steps: step
time, forward / backward / optimizer times, and minor page faults (4 KiB pages the kernel had to map in). Printed:
each figure per model and allocator (median over rounds) and the speed-up of keeping freed memory.

Run from the repository root: ``python bench/host_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_vs_hf_llava import LLAVA_SHAPED, adamw, build_llava, cornstarch_from_llava, cpu_name, make_batch  # noqa: E402

from cornstarch.lit.host_memory import keep_freed_host_memory  # noqa: E402

PHASES = ("step", "forward", "backward", "optimizer", "faults")


def measure(model_name: str, allocator: str, steps: int, threads: int) -> dict[str, float]:
    """One process's figures: medians over ``steps`` steps after 3 warm-up steps."""
    torch.set_num_threads(threads)
    tf.logging.set_verbosity_error()
    applied = keep_freed_host_memory() if allocator == "kept" else False
    llava = build_llava(LLAVA_SHAPED, "full").train()
    model = llava if model_name == "hf" else cornstarch_from_llava(llava).train()
    if model_name != "hf":
        del llava
    batch = make_batch(LLAVA_SHAPED)
    optimizer = adamw(model)  # fused
    rows = []
    for _ in range(3 + steps):
        faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        rows.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    out = {name: statistics.median(r[i] for r in rows[3:]) for i, name in enumerate(PHASES)}
    return {**out, "applied": applied}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # one child process: MODEL ALLOCATOR
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.steps, args.threads)))
        return
    print(f"machine: {cpu_name()}, threads {args.threads}, torch {torch.__version__}; {LLAVA_SHAPED.describe()}; "
          f"fused AdamW; {args.steps} steps per process, {args.rounds} rounds")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for key in [(m, a) for m in ("cornstarch", "hf") for a in ("default", "kept")]:
            out = subprocess.run([sys.executable, __file__, "--measure", *key, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout
            runs.setdefault(key, []).append(json.loads(out.splitlines()[-1]))
    med = {key: {p: statistics.median(r[p] for r in rs) for p in PHASES} for key, rs in runs.items()}
    print(f"  {'model':<11}{'malloc':<9}{'step ms':>9}{'forward':>9}{'backward':>10}{'optimizer':>11}{'faults':>9}")
    for (model, allocator), m in med.items():
        print(f"  {model:<11}{allocator:<9}{1e3 * m['step']:9.1f}{1e3 * m['forward']:9.1f}{1e3 * m['backward']:10.1f}"
              f"{1e3 * m['optimizer']:11.1f}{m['faults']:9.0f}")
    for model in ("cornstarch", "hf"):
        print(f"  {model}: keeping freed memory {med[(model, 'default')]['step'] / med[(model, 'kept')]['step']:.2f}x "
              f"the default's step rate")
    for allocator in ("default", "kept"):
        print(f"  HF / cornstarch step time, {allocator} malloc: "
              f"{med[('hf', allocator)]['step'] / med[('cornstarch', allocator)]['step']:.2f}x")


if __name__ == "__main__":
    main()
