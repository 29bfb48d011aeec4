"""GPU recipe: a bf16 train step of cornstarch vs HF Llava at ~1B parameters, and its model-FLOPs utilisation.

Built from configs (nothing downloaded): a ViT-L-sized CLIP tower (CLIP-L/14 at 336 px: hidden 1024, 24 layers,
576 patches + CLS) and a Llama-shaped LM of ~1.0B parameters (hidden 2048, 16 layers, 32 heads, MLP 6144, vocab
32 000), Llava's default feature selection (layer -2, CLS dropped: 576 image tokens per sample), batch 8, 48 text
tokens per sample of which the last 16 are supervised. ``LlavaForConditionalGeneration`` and the cornstarch
``MultimodalModel`` hold identical weights (``bench/step_vs_hf_llava.py``); their float32 losses on the batch are
asserted equal within 1e-5 relative (the two sides' matmuls have different shapes, so a GPU's kernels may round
differently) before both are cast to bfloat16 (parameters, gradients and fused AdamW state all in
bf16: no float32 master weights).

Reported, all trainable and with the tower frozen: the median step time (forward + backward + fused
``AdamW.step()`` + ``zero_grad``; steps of the models interleaved, the device synchronised after each), the
ratio HF/cornstarch, the bound of skipping work (HF Llava's own code given cornstarch's two skips,
``LlavaWithTheSameSkips``: HF over it is what skipping gives on the device), the peak device memory of a step,
and the model-FLOPs utilisation: the FLOPs of cornstarch's forward + backward (torch's ``FlopCounterMode``: the
model's work, the optimizer excluded) per second of a step, over (a) the best bf16 GEMM rate measured in the same run (8192² matmuls, several times through the run) and
(b) the GPU's datasheet dense bf16 peak where known (H100/H200 SXM 989 TFLOP/s). HF's rate of its own counted FLOPs
(which include logits at every position) is printed beside it.

Designed to finish in a few minutes on one H200: ``python bench/gpu_recipe.py`` (``--json PATH`` to keep the
numbers). ``python bench/gpu_recipe.py --quick --device cpu`` runs the same code on tiny sizes in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers as tf

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # repository, bench/

from cornstarch.batch import SUPERVISED_POSITIONS, supervised_positions  # noqa: E402
from step_vs_hf_llava import (  # noqa: E402
    fill_defaults,
    MB,
    QUICK,
    LlavaWithTheSameSkips,
    SKIPS,
    Spec,
    adamw,
    loss_of,
    build_llava,
    cornstarch_from_llava,
    freeze_vision_tower,
    interleaved_median_ms,
    make_batch,
    make_step,
    pass_flops,
)

# CLIP-L/14 at 336 px and a ~1.0B-parameter Llama-shaped LM; batch 8, 16 supervised tokens per sample
GPU_1B = Spec("vit-l + 1b", vision_hidden=1024, vision_layers=24, lm_hidden=2048, lm_layers=16, vocab=32_000,
              image_size=336, patch=14, batch=8, text_tokens=48, answer_tokens=16)

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched against torch.cuda.get_device_name()
DATASHEET_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "B200": 2250e12}


LOSS_RTOL = 1e-5


def flop_text(flops: float) -> str:
    """``flops`` in TFLOP, or GFLOP below one TFLOP."""
    return f"{flops / 1e12:.2f} T" if flops >= 1e12 else f"{flops / 1e9:.3g} G"


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its datasheet dense bf16 peak (None when unknown, e.g. on a CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int, reps: int = 10) -> float:
    """Best FLOP/s of ``reps`` ``[size, size] @ [size, size]`` matmuls in ``dtype`` on ``device`` (each timed alone)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up (kernel choice, allocation)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synced(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` followed by a device synchronisation, so wall-clock timing covers its kernels."""
    def run() -> None:
        step()
        synchronize(device)
    return run


def peak_device_bytes(step: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      device: torch.device) -> int | None:
    """Peak device bytes of a train step of ``model`` (``step()``, after a first step created the AdamW state): its
    parameters and AdamW state, plus the most the CUDA allocator held above what was allocated before the step
    (gradients, activations, temporaries), so that the other model on the same device does not count. None on a
    CPU."""
    if device.type != "cuda":
        return None
    step()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])
    return torch.cuda.max_memory_allocated(device) - before + resident


def build_models(spec: Spec, device: torch.device) -> dict[str, torch.nn.Module]:
    """HF Llava (layer -2, CLS dropped), cornstarch and HF Llava with cornstarch's two skips (``SKIPS``: the bound of
    skipping work), all with the same weights, float32, on ``device``."""
    with torch.device(device):
        llava = build_llava(spec, "default").train()
        mllm = cornstarch_from_llava(llava).train()
    return {"hf": llava, "cs": mllm, SKIPS: LlavaWithTheSameSkips(llava).train()}


def run_mode(spec: Spec, frozen: bool, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
             gemm_size: int, rates: list[float]) -> dict:
    """One training mode (all trainable, or tower frozen): losses checked, step times, memory, FLOPs."""
    models = build_models(spec, device)
    cpu_batch = make_batch(spec, image_tokens=spec.patches)
    hf_batch = {k: v.to(device) for k, v in cpu_batch.items()}
    # computed on the CPU, as cornstarch's data layer does, so that forward never waits for the device
    positions = supervised_positions(cpu_batch["labels"]).to(device)
    batches = {"hf": hf_batch, "cs": {**hf_batch, SUPERVISED_POSITIONS: positions}, SKIPS: dict(hf_batch)}
    fp32 = {name: loss_of(model, batches[name]) for name, model in models.items()}
    dloss_fp32 = max(abs(fp32["hf"] - fp32[name]) for name in ("cs", SKIPS))
    assert dloss_fp32 <= LOSS_RTOL * abs(fp32["hf"]), f"float32 losses differ: {fp32}"
    for name, model in models.items():
        model.to(dtype)
        batches[name]["pixel_values"] = batches[name]["pixel_values"].to(dtype)
        if frozen:
            freeze_vision_tower(model)
    with torch.no_grad():
        losses = {name: model(**batches[name]).loss.item() for name, model in models.items()}
    flops = {name: pass_flops(model, [batches[name]])[0] for name, model in models.items()}
    assert flops["cs"] < flops["hf"], "cornstarch computed logits at every position: supervised_positions not used"
    optimizers = {name: adamw(model) for name, model in models.items()}
    steps = {name: synced(make_step(model, batches[name], optimizers[name]), device) for name, model in models.items()}
    peak = {name: peak_device_bytes(steps[name], models[name], optimizers[name], device) for name in models}
    rates.append(gemm_rate(device, dtype, gemm_size))
    ms, busy = interleaved_median_ms(steps, warmup, repeats)
    rates.append(gemm_rate(device, dtype, gemm_size))
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    del models, steps, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ms": ms, "flops": flops, "peak_bytes": peak, "dloss_fp32": dloss_fp32,
            "loss_bf16": losses, "busy": busy, "params": params["cs"]}


def report(mode: str, r: dict, gemm_peak: float, datasheet: float | None) -> None:
    ms, flops = r["ms"], r["flops"]
    model_rate = flops["cs"] / (ms["cs"] / 1e3)  # cornstarch's work per second of its step
    print(f"[{mode}] |dloss| float32 {r['dloss_fp32']:.1e}; bf16 losses hf {r['loss_bf16']['hf']:.4f} "
          f"cs {r['loss_bf16']['cs']:.4f}")
    for name in ("hf", "cs"):
        rate = flops[name] / (ms[name] / 1e3)
        peak = "" if r["peak_bytes"][name] is None else f", peak {r['peak_bytes'][name] / MB:,.0f} MB"
        print(f"    {name}: {ms[name]:8.1f} ms/step, {flop_text(flops[name])}FLOP counted (fwd+bwd), "
              f"{flop_text(rate)}FLOP/s of its own count{peak}")
    print(f"    bound of skipping work: HF Llava's own code with cornstarch's two skips {ms[SKIPS]:.1f} ms/step, "
          f"HF/it {ms['hf'] / ms[SKIPS]:.2f}x; cornstarch takes {ms['cs'] / ms[SKIPS]:.2f} of its time")
    print(f"    HF/cs {ms['hf'] / ms['cs']:.2f}x; model FLOPs (cornstarch's count) {flop_text(model_rate)}FLOP/s = "
          f"MFU {model_rate / gemm_peak:.1%} of the measured GEMM peak"
          + (f", {model_rate / datasheet:.1%} of the datasheet peak" if datasheet else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, help=f"samples per step (default {GPU_1B.batch})")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 20; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3; quick 1)")
    parser.add_argument("--modes", nargs="+", default=["trainable", "frozen"], choices=["trainable", "frozen"])
    parser.add_argument("--quick", action="store_true", help="tiny model (the CPU smoke configuration)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    fill_defaults(args, repeats=(20, 2), warmup=(3, 1))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tf.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = QUICK if args.quick else GPU_1B
    if args.batch:
        spec = dataclasses.replace(spec, batch=args.batch)
    gemm_size = 256 if args.quick else 8192
    name, datasheet = datasheet_peak(device)
    start = time.perf_counter()
    print(f"{name}; torch {torch.__version__}, transformers {tf.__version__}; {args.dtype}; warmup {args.warmup}, "
          f"repeats {args.repeats}\nconfig: {spec.describe()}; Llava's default selection (layer -2, no CLS)")
    rates: list[float] = [gemm_rate(device, dtype, gemm_size)]
    results = {"device": name, "dtype": args.dtype, "spec": dataclasses.asdict(spec), "modes": {}}
    for mode in args.modes:
        results["modes"][mode] = run_mode(spec, mode == "frozen", device, dtype, args.warmup, args.repeats,
                                          gemm_size, rates)
    gemm_peak = max(rates)
    print(f"parameters {results['modes'][args.modes[0]]['params'] / 1e9:.3f} B; {args.dtype} GEMM ({gemm_size}²) best "
          f"{flop_text(gemm_peak)}FLOP/s over {len(rates)} measurements"
          + (f"; datasheet {datasheet / 1e12:.0f} TFLOP/s" if datasheet else "; no datasheet figure for this device"))
    for mode, r in results["modes"].items():
        report(mode, r, gemm_peak, datasheet)
    results.update(gemm_rates=rates, gemm_peak=gemm_peak, datasheet_peak=datasheet,
                   seconds=time.perf_counter() - start)
    print(f"total {results['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
