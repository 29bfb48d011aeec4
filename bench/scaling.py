"""How cost grows with work: train-step time and peak memory of cornstarch vs HF Llava along three curves (CPU).

Each point trains ``LlavaForConditionalGeneration`` and the cornstarch ``MultimodalModel`` built from it
(``bench/step_vs_hf_llava.py``: identical weights, the identical batch, losses asserted equal within 1e-5 before
timing) from the Llava-shaped configuration of that bench (CLIP-style tower 4×128 on 64 px images, Llama-style LM
4×256, vocab 32 000; batch 4, one image of 65 tokens and 48 text tokens per sample, the last 16 supervised), all parts
trainable, with one quantity varied at a time:

- ``images``: images per sample 1, 2, 4, 8 (each image 65 placeholders in the text, ``pixel_values``
  ``[batch * images, 3, H, W]`` in sample order: how Llava and cornstarch both take several images per sample);
- ``answer``: supervised tokens per sample 16, 64, 128, 256, 512;
- ``batch``: samples per step 1, 2, 4, 8, 16, 32.

A step is forward + backward + fused ``AdamW.step()`` (transformers' default optimizer, the same on both sides) +
``zero_grad``. Steps of the two models alternate; after ``--warmup`` rounds the median of ``--repeats`` is taken per
point. Peak memory is the bench's ``peak_step_bytes``: bytes of tensors alive during the second train step
(parameters, gradients, AdamW state, activations, temporaries) from torch's memory profile, not the process's RSS.
Each point also counts both models' forward + backward FLOPs (torch's ``FlopCounterMode``): their ratio is what
skipping work can give when every FLOP costs the same and nothing else (the optimizer, memory-bound passes) takes
time; it does not depend on the machine's load. And each point times HF Llava's own code with cornstarch's two skips
(``LlavaWithTheSameSkips``: logits only where a token is supervised, the tower cut at the selected layer): HF's
time over that one is what skipping work gives on this machine, with the optimizer and every memory-bound pass
counted; beyond it, cornstarch would have to run transformers' layers faster than transformers does.

Writes a table (stdout), ``scaling.json`` (raw numbers) and one PNG per curve, ``scaling_<curve>.png``: step time
of both with the HF/cornstarch time and FLOP ratios on a second axis, and peak memory of both; machine and command
in each title.
Targets: HF/cornstarch time >= 1.5 and cornstarch/HF peak memory <= 1 at every point.

Run from the repository root: ``python bench/scaling.py`` (``--quick`` for a smoke run on a tiny model and short
curves, under a minute; ``--curves batch`` for one curve; ``--out DIR`` to write elsewhere than ``bench/``;
``--replot bench/scaling.json`` to redraw the PNGs from recorded numbers; ``--profile batch 1`` to see where one
point's steps spend their time).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_vs_hf_llava import (  # noqa: E402
    cpu_name,
    fill_defaults,
    LLAVA_SHAPED,
    MB,
    QUICK,
    Spec,
    adamw,
    assert_same_loss,
    build_llava,
    cornstarch_from_llava,
    flag,
    interleaved_median_ms,
    LlavaWithTheSameSkips,
    SKIPS,
    make_batch,
    make_step,
    pass_flops,
    peak_step_bytes,
)

CURVES = {"images": [1, 2, 4, 8], "answer": [16, 64, 128, 256, 512], "batch": [1, 2, 4, 8, 16, 32]}
QUICK_CURVES = {"images": [1, 2], "answer": [8, 32], "batch": [1, 2]}
LABELS = {"images": "images per sample", "answer": "supervised (answer) tokens per sample", "batch": "batch size"}
SPEED_TARGET, MEMORY_TARGET = 1.5, 1.0


def machine_name() -> str:
    """CPU model and core count (from ``/proc/cpuinfo`` on Linux), torch version and threads."""
    return f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def point_spec(base: Spec, curve: str, x: int) -> tuple[Spec, int]:
    """The model/batch shape of one point and its images per sample."""
    if curve == "images":
        return base, x
    if curve == "answer":
        return dataclasses.replace(base, answer_tokens=x), 1
    return dataclasses.replace(base, batch=x), 1


def multi_image_batch(spec: Spec, images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``spec.batch`` samples with ``images`` images each: ``images`` spans of placeholders (patches + CLS each),
    back to back after the first 16 text tokens, and ``pixel_values [batch * images, 3, H, W]`` in sample order."""
    batch = make_batch(spec, seed, image_tokens=images * (spec.patches + 1))
    g = torch.Generator().manual_seed(seed + 1)
    batch["pixel_values"] = torch.randn(spec.batch * images, 3, spec.image_size, spec.image_size, generator=g)
    return batch


CHUNKED = "cs_chunked"  # cornstarch with MultimodalModel.loss_chunk_size set (--loss-chunk-size)


def measure_point(spec: Spec, images: int, warmup: int, repeats: int, loss_chunk_size: int | None = None) -> dict:
    """Step time (median ms), peak step memory (bytes) and forward + backward FLOPs (torch's counter) of HF Llava
    and cornstarch at one point, and the step time of HF Llava with cornstarch's skips (``SKIPS``,
    ``LlavaWithTheSameSkips``); with ``loss_chunk_size``, also of cornstarch with its fused chunked head + loss
    (``CHUNKED``). All timed interleaved."""
    start = time.perf_counter()
    llava = build_llava(spec, "full").train()
    mllm = cornstarch_from_llava(llava).train()
    batch = multi_image_batch(spec, images)
    models = {"hf": llava, "cs": mllm}
    flops = {name: pass_flops(model, [batch])[0] for name, model in models.items()}
    dloss = assert_same_loss(models, batch)
    if loss_chunk_size:  # the same matmuls as "cs" (its in-place and out= kernels escape torch's FLOP counter)
        models[CHUNKED] = copy.deepcopy(mllm)
        models[CHUNKED].loss_chunk_size = loss_chunk_size
        dloss = max(dloss, assert_same_loss({"hf": llava, CHUNKED: models[CHUNKED]}, batch))
    peak = {name: peak_step_bytes(copy.deepcopy(model), batch) for name, model in models.items()}
    models[SKIPS] = LlavaWithTheSameSkips(llava).train()
    dloss = max(dloss, assert_same_loss({"hf": llava, SKIPS: models[SKIPS]}, batch))
    ms, busy = interleaved_median_ms({n: make_step(m, batch, adamw(m)) for n, m in models.items()}, warmup, repeats)
    return {"ms": ms, "peak_bytes": peak, "flops": flops, "dloss": dloss, "busy": busy,
            "tokens_per_sample": int(batch["input_ids"].shape[1]), "batch": spec.batch, "images": images,
            "answer": spec.answer_tokens, "loss_chunk_size": loss_chunk_size, "seconds": time.perf_counter() - start}


def run_curve(base: Spec, curve: str, xs: list[int], warmup: int, repeats: int,
              loss_chunk_size: int | None = None) -> list[dict]:
    points = []
    for x in xs:
        spec, images = point_spec(base, curve, x)
        point = {"x": x, **measure_point(spec, images, warmup, repeats, loss_chunk_size)}
        print_point(curve, point)
        points.append(point)
    return points


def profile_point(spec: Spec, images: int, steps: int = 3) -> None:
    """Print where ``steps`` train steps of each model spend their time (``torch.profiler``, by self CPU time)."""
    llava = build_llava(spec, "full").train()
    batch = multi_image_batch(spec, images)
    for name, model in {"hf": llava, "cs": cornstarch_from_llava(llava).train()}.items():
        step = make_step(model, batch, adamw(model))
        step()  # AdamW state exists from here on
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        print(f"{name}: {steps} steps\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                                      max_name_column_width=48))


# ----------------------------------------------------------------------------------------------- output
def ratios(point: dict) -> tuple[float, float]:
    """(HF/cs step time, cs/HF peak memory)."""
    return point["ms"]["hf"] / point["ms"]["cs"], point["peak_bytes"]["cs"] / point["peak_bytes"]["hf"]


def skipping_bound(point: dict) -> float | None:
    """HF / (HF with cornstarch's skips) step time: the most skipping work gives at this point (None in records
    made before it was measured)."""
    return point["ms"]["hf"] / point["ms"][SKIPS] if SKIPS in point["ms"] else None


def flop_ratio(point: dict) -> float:
    """HF/cs forward + backward FLOPs: the speed-up skipping work gives if every FLOP costs the same and nothing
    else (optimizer, memory-bound passes) takes time."""
    return point["flops"]["hf"] / point["flops"]["cs"]


def print_header(curve: str) -> None:
    print(f"{LABELS[curve]}:")
    print(f"    {'x':>5}{'tokens':>8}{'HF ms':>10}{'cs ms':>10}{'HF/cs':>7}{'FLOPs':>7}{'skips':>7}{'HF MB':>9}"
          f"{'cs MB':>9}{'cs/HF':>7}  |dloss|   other CPU")
    print(f"    {'':>33}{'time':>7}{'HF/cs':>7}{'bound':>7}{'peak':>9}{'peak':>9}{'memory':>7}")


def print_point(curve: str, p: dict) -> None:
    speed, memory = ratios(p)
    miss = ("" if speed >= SPEED_TARGET else "  < time target") + ("" if memory <= MEMORY_TARGET else "  > memory")
    print(f"    {p['x']:>5}{p['tokens_per_sample']:>8}{p['ms']['hf']:>10.1f}{p['ms']['cs']:>10.1f}{speed:>7.2f}"
          f"{flop_ratio(p):>7.2f}{skipping_bound(p):>7.2f}{p['peak_bytes']['hf'] / MB:>9.1f}{p['peak_bytes']['cs'] / MB:>9.1f}{memory:>7.2f}"
          f"  {p['dloss']:.1e}  "
          f"{flag(p['busy'])}{miss}", flush=True)
    if CHUNKED in p["ms"]:
        ms, peak = p["ms"][CHUNKED], p["peak_bytes"][CHUNKED]
        print(f"    {'':>5}{'':>8}{'loss_chunk_size ' + str(p['loss_chunk_size']):>20}{ms:>10.1f}"
              f"{p['ms']['hf'] / ms:>7.2f}{'':>7}{'':>7}{'':>9}{peak / MB:>9.1f}{peak / p['peak_bytes']['hf']:>7.2f}",
              flush=True)


def plot_curve(curve: str, points: list[dict], path: Path, title: str) -> None:
    """Two panels: step time of both with the HF/cs ratio on a second axis; peak step memory of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["x"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    left.plot(xs, [p["ms"]["hf"] for p in points], "o-", color="tab:red", label="HF Llava")
    left.plot(xs, [p["ms"]["cs"] for p in points], "o-", color="tab:blue", label="cornstarch")
    chunked = all(CHUNKED in p["ms"] for p in points)
    if chunked:
        label = f"cornstarch, loss_chunk_size {points[0]['loss_chunk_size']}"
        left.plot(xs, [p["ms"][CHUNKED] for p in points], "o--", color="tab:cyan", label=label)
        right.plot(xs, [p["peak_bytes"][CHUNKED] / MB for p in points], "o--", color="tab:cyan", label=label)
    left.set(xscale="log", xlabel=LABELS[curve], ylabel="train step, ms (median)")
    left.set_ylim(bottom=0)
    ratio_axis = left.twinx()
    ratio_axis.plot(xs, [ratios(p)[0] for p in points], "s--", color="tab:green", label="HF / cornstarch, time")
    ratio_axis.plot(xs, [flop_ratio(p) for p in points], "^:", color="tab:gray", label="HF / cornstarch, FLOPs")
    if all(SKIPS in p["ms"] for p in points):
        ratio_axis.plot(xs, [skipping_bound(p) for p in points], "v-.", color="tab:purple", lw=0.9,
                        label="HF / HF with cornstarch's skips, time (the bound of skipping)")
    if chunked:
        ratio_axis.plot(xs, [p["ms"]["hf"] / p["ms"][CHUNKED] for p in points], "s--", color="tab:olive",
                        label="HF / cornstarch with loss_chunk_size, time")
    ratio_axis.axhline(SPEED_TARGET, color="tab:green", lw=0.8, ls=":")
    ratio_axis.set_ylabel("speed ratio HF / cornstarch", color="tab:green")
    ratio_axis.set_ylim(0, max(3.0, 1.1 * max(p["ms"]["hf"] / min(p["ms"][k] for k in p["ms"] if k != "hf")
                                              for p in points)))
    lines = left.get_legend_handles_labels()
    extra = ratio_axis.get_legend_handles_labels()
    left.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper center", bbox_to_anchor=(0.5, -0.16),
                ncol=2, fontsize=8)
    right.plot(xs, [p["peak_bytes"]["hf"] / MB for p in points], "o-", color="tab:red", label="HF Llava")
    right.plot(xs, [p["peak_bytes"]["cs"] / MB for p in points], "o-", color="tab:blue", label="cornstarch")
    right.set(xscale="log", xlabel=LABELS[curve], ylabel="peak memory of a step, MB")
    right.set_ylim(bottom=0)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    for axis in (left, right):
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(curve: str, results: dict) -> str:
    return (f"cornstarch vs HF Llava by {LABELS[curve]}: train step with fused AdamW, all trainable\n"
            f"{results['machine']}\n`{results['command']}`")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", nargs="+", default=list(CURVES), choices=list(CURVES))
    parser.add_argument("--repeats", type=int, help="timed rounds per point (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for scaling.json and the PNGs (default bench/)")
    parser.add_argument("--loss-chunk-size", type=int,
                        help="also time cornstarch with MultimodalModel.loss_chunk_size set to this (default: not)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, two points per curve")
    parser.add_argument("--profile", nargs=2, metavar=("CURVE", "X"),
                        help="only profile the steps of one point, e.g. --profile batch 1")
    parser.add_argument("--replot", type=Path, help="only redraw the PNGs from this scaling.json (its command kept)")
    args = parser.parse_args(argv)
    fill_defaults(args, repeats=(5, 2), warmup=(1, 1))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        for curve, points in results["curves"].items():
            plot_curve(curve, points, args.out / f"scaling_{curve}.png", plot_title(curve, results))
        return results
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    base = QUICK if args.quick else LLAVA_SHAPED
    if args.profile:
        curve, x = args.profile
        if curve not in CURVES:
            raise SystemExit(f"--profile: curve must be one of {list(CURVES)}, got {curve!r}")
        profile_point(*point_spec(base, curve, int(x)))
        return {}
    grid = QUICK_CURVES if args.quick else CURVES
    command = "python bench/scaling.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    machine = machine_name()
    start = time.perf_counter()
    print(f"{machine}; transformers {tf.__version__}; warmup {args.warmup}, repeats {args.repeats}\n"
          f"base point: {base.describe()}; all trainable, fused AdamW both sides\ncommand: {command}")
    results = {"machine": machine, "command": command, "base": dataclasses.asdict(base),
               "loss_chunk_size": args.loss_chunk_size,
               "warmup": args.warmup, "repeats": args.repeats, "curves": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for curve in args.curves:
        print_header(curve)
        points = run_curve(base, curve, grid[curve], args.warmup, args.repeats, args.loss_chunk_size)
        results["curves"][curve] = points
        plot_curve(curve, points, args.out / f"scaling_{curve}.png", plot_title(curve, results))
    results["seconds"] = time.perf_counter() - start
    (args.out / "scaling.json").write_text(json.dumps(results, indent=1))
    misses = [(c, p["x"]) for c, ps in results["curves"].items() for p in ps
              if ratios(p)[0] < SPEED_TARGET or ratios(p)[1] > MEMORY_TARGET]
    print(f"targets (HF/cs >= {SPEED_TARGET}, cs/HF memory <= {MEMORY_TARGET}) missed at: "
          f"{', '.join(f'{c}={x}' for c, x in misses) or 'none'}")
    print(f"wrote {args.out / 'scaling.json'} and scaling_<curve>.png; total {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
