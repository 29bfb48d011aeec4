"""Generation benchmark: ``MultimodalModel.generate`` vs ``LlavaForConditionalGeneration.generate`` (CPU).

The Llava-shaped configuration of ``bench/step_vs_hf_llava.py`` (CLIP-style tower 4×128 on 64 px images, Llama-style
LM 4×256, vocab 32 000) with Llava's default feature selection (layer -2, CLS dropped: 64 image tokens), the two
models holding identical weights. Each prompt: 16 text tokens, the image, 32 − 3·i more text tokens (row i), so a
batch of several rows is left-padded. Both sides get the same call, the default batched greedy request:
``generate(input_ids, attention_mask, pixel_values, max_new_tokens=n, do_sample=False, pad_token_id=0,
eos_token_id=2)``. For each batch size and ``n``: the tokens of both are asserted identical, then calls alternate
(A B, B A, …) and the median of ``--repeats`` after ``--warmup`` is reported, with ``other CPU``, the share of the
machine that other processes used meanwhile (flagged above 10 %), both in wall time and in this process's CPU time
(with ``--threads 1`` the latter is the work done, which a busy machine disturbs far less than the wall time).

Also printed, for cornstarch: the shares of its ``generate`` time spent in the LM head's matrix products
(``[batch, 256] @ [256, 32000]`` once per new token: 33 MB of weights read per token) and in all matrix products
(the same products on the same weights as HF's), and the ratio to HF that would follow if everything but those
products cost nothing (the ceiling of any change that keeps the same products).

Also timed: ``llava_forwards_alone``, the model's own forwards and nothing else (the same tokens): HF's time over
its time ("bound") is the most that removing ``generate``'s bookkeeping can give.

With ``--compile``, also ``MultimodalModel.compile_generation = True`` (decode steps through ``torch.compile``
with a static cache): its time per call, its first call (the compilation, once per batch size) and the number of
calls after which the compilation has paid for itself against the eager loop.

Run from the repository root: ``python bench/generation_vs_hf_llava.py`` (``--quick``: a smaller model, seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_vs_hf_llava import (  # noqa: E402
    bench_spec,
    cpu_name,
    fill_defaults,
    PAD,
    Spec,
    build_llava,
    cornstarch_from_llava,
    flag,
    interleaved_median_ms,
)

EOS = 2


def prompts(spec: Spec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` left-padded prompts: 16 text tokens, one image (``spec.patches`` placeholders), 32 - 3*i text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        text = torch.randint(3, spec.image_token_id, (48 - 3 * (i % 8),), generator=g)
        rows.append(torch.cat([text[:16], torch.full((spec.patches,), spec.image_token_id), text[16:]]))
    length = max(len(r) for r in rows)
    ids = torch.full((batch, length), PAD)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    pixels = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def product_shares(call, vocab: int) -> tuple[float, float]:
    """Shares of the CPU time of ``call()`` spent in the LM head's matrix products (output ``vocab`` wide) and in
    all matrix products (``mm``, ``addmm``: the weights every token reads, the same work on both sides)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call()
    total = head = products = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm"):
            products += event.self_cpu_time_total
            if any(shape and shape[-1] == vocab for shape in event.input_shapes or ()):
                head += event.self_cpu_time_total
    return (head / total, products / total) if total else (float("nan"), float("nan"))


def llava_forwards_alone(llava: tf.LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor],
                         new_tokens: int) -> torch.Tensor:
    """Greedy decoding by the model's own forwards and nothing else: the bound of removing ``generate``'s bookkeeping.

    The least any greedy decoder built on the model's forwards does: Llava's forward on the prompt once (the tower,
    logits at the last position), then per new token the language model's own forward with the KV cache, the head
    on its last position and argmax; rows that ended get ``PAD``, and the loop stops when every row has ended.
    Positions come from the attention mask as in ``generate``, so the tokens are ``llava.generate``'s.

    Returns:
        ``[batch, prompt + generated]`` token ids, as ``generate`` returns them.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = llava(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], position_ids=positions,
                use_cache=True, logits_to_keep=1)
    language_model, cache = llava.model.language_model, out.past_key_values
    running = torch.ones(len(ids), dtype=torch.bool)
    generated = []
    for step in range(new_tokens):
        token = torch.where(running, out.logits[:, -1].argmax(-1), PAD)
        generated.append(token)
        running &= token != EOS
        if step == new_tokens - 1 or not running.any():
            break
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = language_model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                cache=cache, use_cache=True).last_hidden_state
        out = SimpleNamespace(logits=llava.lm_head(hidden))
    return torch.cat([ids, torch.stack(generated, dim=1)], dim=1)


def bench(spec: Spec, batch: int, new_tokens: int, llava, mllm, warmup: int, repeats: int,
          compiled: bool = False) -> dict:
    inputs = prompts(spec, batch)
    request = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)

    def cornstarch(compile_generation: bool):
        def run() -> torch.Tensor:
            mllm.compile_generation = compile_generation
            try:
                return mllm.generate(**inputs, **request)
            finally:
                mllm.compile_generation = False
        return run

    calls = {"hf": lambda: llava.generate(**inputs, **request), "cs": cornstarch(False),
             "hf forwards": lambda: llava_forwards_alone(llava, inputs, new_tokens)}
    cpu: dict[str, list[float]] = {name: [] for name in calls}

    def with_cpu_time(name: str):
        def run() -> None:
            start = time.process_time()
            calls[name]()
            cpu[name].append(time.process_time() - start)
        return run

    first_compiled_s = None
    with torch.no_grad():
        hf, cs = calls["hf"](), calls["cs"]()
        assert torch.equal(hf, cs), f"batch {batch}, {new_tokens} new tokens: the tokens differ"
        assert torch.equal(hf, calls["hf forwards"]()), f"batch {batch}, {new_tokens} new tokens: forwards alone differ"
        if compiled:
            calls["cs compiled"] = cornstarch(True)
            cpu["cs compiled"] = []
            start = time.perf_counter()
            tokens = calls["cs compiled"]()  # compiles on the first call with this batch size
            first_compiled_s = time.perf_counter() - start
            assert torch.equal(hf, tokens), f"batch {batch}, {new_tokens} new tokens: compiled tokens differ"
        ms, busy = interleaved_median_ms({name: with_cpu_time(name) for name in calls}, warmup, repeats)
        head, products = product_shares(calls["cs"], spec.vocab)
    cpu_ms = {name: 1e3 * statistics.median(t[warmup:]) for name, t in cpu.items()}
    return {"ms": ms, "cpu_ms": cpu_ms, "busy": busy, "shape": tuple(cs.shape), "head": head,
            "products": products, "first_compiled_s": first_compiled_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[24, 128])
    parser.add_argument("--repeats", type=int, help="timed rounds (default 9; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model, few rounds")
    parser.add_argument("--compile", action="store_true",
                        help="also time MultimodalModel.compile_generation (compiled decode steps, static cache)")
    args = parser.parse_args(argv)
    fill_defaults(args, repeats=(9, 3), warmup=(2, 1))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = bench_spec(args)
    start = time.perf_counter()
    print(f"machine: {cpu_name()}; torch {torch.__version__}, transformers {tf.__version__}, threads {args.threads}, "
          f"warmup {args.warmup}, repeats {args.repeats}")
    print(f"config: vision {spec.vision_layers}x{spec.vision_hidden} ({spec.patches} image tokens: layer -2, CLS "
          f"dropped), LM {spec.lm_layers}x{spec.lm_hidden}, vocab {spec.vocab}; greedy, left padding")
    llava = build_llava(spec, "default").eval()
    mllm = cornstarch_from_llava(llava).eval()
    print(f"    {'batch':>5} {'new':>4} {'HF ms':>9} {'cs ms':>9} {'HF/cs':>6}   {'CPU ms HF':>9} {'cs':>9} "
          f"{'HF/cs':>6} {'head':>5} {'products':>8} {'ceiling':>7} {'bound':>6}")
    compiled_batches: set[int] = set()
    for batch in args.batches:
        for new_tokens in args.new_tokens:
            r = bench(spec, batch, new_tokens, llava, mllm, args.warmup, args.repeats, args.compile)
            (hf, cs), (hf_cpu, cs_cpu) = list(r["ms"].values())[:2], list(r["cpu_ms"].values())[:2]
            print(f"    {batch:>5} {new_tokens:>4} {hf:>9.1f} {cs:>9.1f} {hf / cs:>6.2f}   {hf_cpu:>9.1f} {cs_cpu:>9.1f} "
                  f"{hf_cpu / cs_cpu:>6.2f} {r['head']:>5.0%} {r['products']:>8.0%} "
                  f"{hf_cpu / (cs_cpu * r['products']):>7.2f} {hf_cpu / r['cpu_ms']['hf forwards']:>6.2f}  "
                  f"tokens identical {r['shape']}; {flag(r['busy'])}")
            if args.compile:
                c, c_cpu = r["ms"]["cs compiled"], r["cpu_ms"]["cs compiled"]
                first = r["first_compiled_s"]
                saved = (cs - c) / 1e3  # wall s saved per call against the eager loop
                if batch in compiled_batches:
                    first_call = f"first call {first:.1f} s (compiled for batch {batch} above)"
                else:
                    even = f"{(first - c / 1e3) / saved:.0f} calls" if saved > 0 else "never"
                    first_call = f"first call {first:.1f} s (compilation); pays for itself after {even}"
                compiled_batches.add(batch)
                print(f"    {'':>10} compiled: {c:>9.1f} ms {hf / c:>6.2f}   CPU {c_cpu:>9.1f} ms {hf_cpu / c_cpu:>6.2f}; "
                      f"{first_call}")
    print("    ms: wall time per generate; CPU ms: this process's CPU time (with one thread, the work done, which other "
          "processes disturb less than the wall time);\n    head, products: shares of cornstarch's CPU time in the "
          "LM head's matrix products and in all of them (the same products, on the same weights, as HF's);\n"
          "    ceiling: the CPU-time ratio to HF if everything but those products cost nothing;\n"
          "    bound: HF's CPU time over that of the model's own forwards, the LM's once per token, and nothing else (same "
          "tokens): the most that removing generate's bookkeeping gives; beyond it, the LM's layers must run faster "
          "than eagerly (compiled)")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
