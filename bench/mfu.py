"""How well a train step uses the machine: model FLOP/s over the GEMM peak, and the step against HF Llava.

Configurations (:class:`step_vs_hf_llava.Spec`): the Llava-shaped bench configuration (CLIP-style tower 4×128,
Llama 4×256, vocab 32 000, batch 4, 65 image + 48 text tokens, 16 supervised) and the same at 4× its width (tower
4×512, LM 4×1024).

[1] model FLOP/s over GEMM peak. The model FLOPs of a step are those of its forward and backward, counted by torch's
    ``FlopCounterMode`` (``pass_flops``: matmuls, attention, convolutions); the optimizer does no matmul. The GEMM
    peak is the best rate of a 1536×1536 fp32 matmul with the bench's threads, probed between the timed steps all
    through the run (the shared machine's rate varies within a run). For cornstarch eager, cornstarch after
    ``mllm.compile()`` (each encoder and decoder layer compiled) and HF Llava, all trainable, fused AdamW: the full
    step (forward, backward, ``optimizer.step()``, ``zero_grad``) and forward + backward alone, medians of
    interleaved repeats; the optimizer step alone (memory-bound: it reads and writes every parameter, gradient and
    both moments); compile time (the first compiled step minus an eager one); and the GEMM-only ceiling: the step's
    own matmuls (shapes recorded by ``torch.profiler``) each timed alone, plus the optimizer step, as if nothing else
    cost anything: the best model FLOP/s this step could reach on this machine.
[2] train step vs ``LlavaForConditionalGeneration`` at the bench configuration, same weights and batch (losses
    asserted equal within 1e-5), all trainable and with the tower frozen, with plain ``torch.optim.AdamW`` (its
    default: a loop over the parameters on CPU tensors, ``foreach`` on accelerators) on both sides and with the
    fused AdamW on both sides; cornstarch eager and compiled. Also timed: HF Llava's own code with cornstarch's two
    skips (``LlavaWithTheSameSkips``: ``logits_to_keep`` at the supervised positions, the tower cut at the selected
    layer), the most that skipping work can give, and two ceilings: cornstarch's matmuls alone plus its optimizer
    step alone.

Every part prints ``other CPU``: the share of the CPUs that other processes used while timing.

Run from the repository root: ``python bench/mfu.py`` (``--parts 1`` or ``2``; ``--widths 1`` for the bench
configuration only; ``--quick`` for a smoke run on a small model).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_vs_hf_llava import (  # noqa: E402
    bench_spec,
    fill_defaults,
    cpu_name,
    LOSS_ATOL,
    LlavaWithTheSameSkips,
    Spec,
    assert_same_loss,
    build_llava,
    cornstarch_from_llava,
    flag,
    freeze_vision_tower,
    interleaved_median_ms,
    loss_of,
    make_batch,
    pass_flops,
)

GEMM_N = 1536


class GemmPeak:
    """The best fp32 GEMM rate seen: call it between timed steps; each call times a few ``GEMM_N``² matmuls."""

    def __init__(self, tries: int = 3):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(GEMM_N, GEMM_N, generator=g), torch.randn(GEMM_N, GEMM_N, generator=g)
        self.tries = tries
        self.rates: list[float] = []

    def __call__(self) -> None:
        for _ in range(self.tries):
            start = time.perf_counter()
            torch.mm(self.a, self.b)
            self.rates.append(2 * GEMM_N**3 / (time.perf_counter() - start))

    @property
    def best(self) -> float:
        return max(self.rates)


def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: fused (one kernel) or torch's default (on CPU tensors a loop over the
    parameters; ``foreach`` on accelerators)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                             fused=True if fused else None)


def full_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def forward_backward(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def optimizer_alone(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.step()`` alone, on gradients computed once (kept between calls)."""
    model(**batch).loss.backward()
    return optimizer.step


def compiled_copy(model: torch.nn.Module, batch: dict) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` after ``compile()``, and the seconds its first train step took over an eager one."""
    compiled = copy.deepcopy(model)
    compiled.compile()
    start = time.perf_counter()
    forward_backward(compiled, batch)()
    first = time.perf_counter() - start
    start = time.perf_counter()
    forward_backward(model, batch)()
    return compiled, first - (time.perf_counter() - start)


def gemm_only_seconds(model: torch.nn.Module, batch: dict, repeats: int = 3) -> float:
    """Seconds of a forward + backward's matmuls alone: each ``mm``/``addmm``/``bmm`` the profiler records, on fresh
    tensors of its shapes, best of ``repeats``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        forward_backward(model, batch)()
    total = 0.0
    for event in prof.events():
        if event.name not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        shapes = [s for s in event.input_shapes if s]
        if event.name == "aten::addmm":
            shapes = shapes[1:]  # bias first
        a, b = torch.randn(shapes[0]), torch.randn(shapes[1])
        op = torch.bmm if event.name == "aten::bmm" else torch.mm
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            op(a, b)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def widened(spec: Spec, factor: int) -> Spec:
    if factor == 1:
        return spec
    return dataclasses.replace(spec, name=f"{spec.name} x{factor} width", vision_hidden=factor * spec.vision_hidden,
                               lm_hidden=factor * spec.lm_hidden)


# ----------------------------------------------------------------------------------------------- parts
def bench_mfu(spec: Spec, warmup: int, repeats: int, peak: GemmPeak) -> dict:
    """[1]: FLOPs, step times (full, forward + backward, optimizer alone), compile time and the GEMM-only ceiling."""
    llava = build_llava(spec, "full").train()
    mllm = cornstarch_from_llava(llava).train()
    batch = make_batch(spec)
    assert abs(loss_of(llava, batch) - loss_of(mllm, batch)) <= LOSS_ATOL
    compiled, compile_s = compiled_copy(mllm, batch)
    dloss = abs(loss_of(mllm, batch) - compiled(**batch).loss.item())  # training mode: the compiled layers
    assert dloss <= LOSS_ATOL, f"compiled loss differs by {dloss}"
    flops = {"cs": pass_flops(mllm, [batch])[0], "hf": pass_flops(llava, [batch])[0]}
    flops["cs compiled"] = flops["cs"]
    models = {"hf": llava, "cs": mllm, "cs compiled": compiled}
    optimizers = {name: adamw(m, fused=True) for name, m in models.items()}
    first_probe = len(peak.rates)
    runs: dict[str, Callable[[], None]] = {"gemm peak": peak}
    runs.update({f"step {n}": full_step(m, batch, optimizers[n]) for n, m in models.items()})
    runs.update({f"fwd+bwd {n}": forward_backward(m, batch) for n, m in models.items()})
    ms, busy = interleaved_median_ms(runs, warmup, repeats)
    opt_ms, busy2 = interleaved_median_ms({"gemm peak": peak, "optimizer": optimizer_alone(mllm, batch,
                                                                                          optimizers["cs"])},
                                          warmup, repeats)
    mllm.zero_grad(set_to_none=True)
    gemm_s = gemm_only_seconds(mllm, batch)
    params = sum(p.numel() for p in mllm.parameters() if p.requires_grad)
    return {"spec": spec, "flops": flops, "ms": ms, "optimizer_ms": opt_ms["optimizer"], "gemm_ms": 1e3 * gemm_s,
            "compile_s": compile_s, "params": params, "dloss": dloss, "busy": max(busy, busy2),
            "median_peak": statistics.median(peak.rates[first_probe:])}


def bench_vs_llava(spec: Spec, frozen: bool, warmup: int, repeats: int, peak: GemmPeak) -> dict:
    """[2]: HF Llava vs cornstarch eager and compiled, plain and fused AdamW on both sides."""
    llava = build_llava(spec, "full").train()
    mllm = cornstarch_from_llava(llava).train()
    if frozen:
        freeze_vision_tower(llava), freeze_vision_tower(mllm)
    batch = make_batch(spec)
    skips = LlavaWithTheSameSkips(llava).train()
    dloss = max(assert_same_loss({"hf": llava, name: model}, batch)
                for name, model in (("cs", mllm), ("hf skips", skips)))
    compiled, _ = compiled_copy(mllm, batch)
    runs: dict[str, Callable[[], None]] = {"gemm peak": peak}
    for fused in (False, True):
        kind = "fused" if fused else "plain"
        for name, model in (("hf", llava), ("hf skips", skips), ("cs", mllm), ("cs compiled", compiled)):
            runs[f"{name}, {kind} AdamW"] = full_step(model, batch, adamw(model, fused))
    alone = copy.deepcopy(mllm)  # its own gradients, kept between optimizer steps
    for fused in (False, True):
        runs[f"optimizer alone, {'fused' if fused else 'plain'} AdamW"] = optimizer_alone(alone, batch,
                                                                                          adamw(alone, fused))
    ms, busy = interleaved_median_ms(runs, warmup, repeats)
    mllm.zero_grad(set_to_none=True)
    return {"ms": ms, "dloss": dloss, "busy": busy, "gemm_ms": 1e3 * gemm_only_seconds(mllm, batch)}


# ----------------------------------------------------------------------------------------------- output
def print_mfu(r: dict, peak: float) -> None:
    spec, ms, flops = r["spec"], r["ms"], r["flops"]
    print(f"  {spec.describe()}; {r['params'] / 1e6:.1f} M trainable parameters; {flag(r['busy'])}")
    print(f"    model FLOPs per step (forward + backward): cornstarch {flops['cs'] / 1e9:.1f} G, HF "
          f"{flops['hf'] / 1e9:.1f} G; compiled |dloss| {r['dloss']:.1e}; compile time {r['compile_s']:.1f} s")
    print(f"    {'':<14}{'step ms':>9}{'MFU':>7}{'fwd+bwd ms':>12}{'MFU':>7}")
    for name in ("hf", "cs", "cs compiled"):
        step, fb = ms[f"step {name}"], ms[f"fwd+bwd {name}"]
        print(f"    {name:<14}{step:>9.1f}{flops[name] / (step / 1e3) / peak:>7.2f}{fb:>12.1f}"
              f"{flops[name] / (fb / 1e3) / peak:>7.2f}")
    if r.get("median_peak"):
        print(f"    against the median GEMM probe of this part ({r['median_peak'] / 1e9:.1f} GFLOP/s; slowed by the same "
              f"load as the steps, not the target's definition): full step cs {flops['cs'] / (ms['step cs'] / 1e3) / r['median_peak']:.2f}, "
              f"compiled {flops['cs'] / (ms['step cs compiled'] / 1e3) / r['median_peak']:.2f}")
    opt, gemm = r["optimizer_ms"], r["gemm_ms"]
    print(f"    optimizer step alone (fused AdamW): {opt:.1f} ms = {opt / ms['step cs compiled']:.0%} of the compiled "
          f"step; it moves {7 * 4 * r['params'] / 2**30:.2f} GiB (read parameter, gradient, 2 moments; write 3): "
          f"{7 * 4 * r['params'] / (opt / 1e3) / 1e9:.1f} GB/s")
    print(f"    GEMM-only ceiling: the step's own matmuls alone take {gemm:.1f} ms ({flops['cs'] / (gemm / 1e3) / peak:.2f}"
          f" of peak for its FLOPs); with the optimizer step, {gemm + opt:.1f} ms: the full step cannot exceed "
          f"{flops['cs'] / ((gemm + opt) / 1e3) / peak:.2f} of peak here")
    saving = (ms["step cs"] - ms["step cs compiled"]) / 1e3
    break_even = f"{r['compile_s'] / saving:.0f} steps" if saving > 0 else "never (no saving per step)"
    print(f"    cs compiled vs HF: {ms['step hf'] / ms['step cs compiled']:.2f}x; cs eager vs HF: "
          f"{ms['step hf'] / ms['step cs']:.2f}x; compile time paid back after {break_even}")


def print_vs_llava(title: str, r: dict) -> None:
    ms = r["ms"]
    print(f"  {title}: |dloss| {r['dloss']:.1e}; {flag(r['busy'])}")
    for kind in ("plain", "fused"):
        hf = ms[f"hf, {kind} AdamW"]
        print(f"    {kind} AdamW: HF {hf:.1f} ms; cornstarch {ms[f'cs, {kind} AdamW']:.1f} ms "
              f"({hf / ms[f'cs, {kind} AdamW']:.2f}x), compiled {ms[f'cs compiled, {kind} AdamW']:.1f} ms "
              f"({hf / ms[f'cs compiled, {kind} AdamW']:.2f}x)")
    for kind in ("plain", "fused"):
        skips = ms[f"hf skips, {kind} AdamW"]
        print(f"    bound of skipping work, {kind} AdamW: HF Llava's own code with cornstarch's two skips (logits_to_keep at "
              f"the supervised positions, tower cut at the selected layer) {skips:.1f} ms, so skipping gives at most "
              f"{ms[f'hf, {kind} AdamW'] / skips:.2f}x here; cornstarch eager {ms[f'cs, {kind} AdamW'] / skips:.2f} of "
              f"its time, compiled {ms[f'cs compiled, {kind} AdamW'] / skips:.2f}")
    for kind in ("plain", "fused"):
        opt = ms[f"optimizer alone, {kind} AdamW"]
        floor = r["gemm_ms"] + opt
        print(f"    ceiling, {kind} AdamW: cornstarch's matmuls alone ({r['gemm_ms']:.1f} ms) + its optimizer step alone "
              f"({opt:.1f} ms) = {floor:.1f} ms, so no step doing its FLOPs can beat HF by more than "
              f"{ms[f'hf, {kind} AdamW'] / floor:.2f}x here")


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--widths", nargs="+", type=int, default=[1, 4], help="width factors for part 1")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: a small model, few steps")
    args = parser.parse_args(argv)
    fill_defaults(args, repeats=(10, 3), warmup=(2, 1))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = bench_spec(args)
    start = time.perf_counter()
    peak = GemmPeak()
    print(f"machine: {machine()}; transformers {tf.__version__}; warmup {args.warmup}, repeats {args.repeats}")
    results = []
    if 1 in args.parts:
        for factor in args.widths:
            results.append(bench_mfu(widened(spec, factor), args.warmup, args.repeats, peak))
            print(f"[1] done: {results[-1]['spec'].name}, medians (ms) "
                  + ", ".join(f"{k} {v:.1f}" for k, v in results[-1]["ms"].items()), flush=True)
    if 2 in args.parts:
        vs = {}
        for frozen in (False, True):
            vs[frozen] = bench_vs_llava(spec, frozen, args.warmup, args.repeats, peak)
            print(f"[2] done: tower {'frozen' if frozen else 'trainable'}", flush=True)
    print(f"GEMM peak ({GEMM_N}² fp32, best of {len(peak.rates)} probes through the run): {peak.best / 1e9:.1f} "
          f"GFLOP/s (median probe {statistics.median(peak.rates) / 1e9:.1f})")
    if results:
        print("[1] model FLOP/s over the GEMM peak (MFU), full train step and forward + backward alone")
        for r in results:
            print_mfu(r, peak.best)
    if 2 in args.parts:
        print("[2] train step vs HF Llava (bench configuration)")
        print_vs_llava("all trainable", vs[False])
        print_vs_llava("vision tower frozen", vs[True])
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
