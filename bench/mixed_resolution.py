"""Tokens/s of a mixed-resolution batch on a dynamic-resolution tower: packing against padding to the largest image.

[1] A batch of samples, one image each at its own size (sides 32–192 px, multiples of the merged patch), trains on a
Qwen2-VL vision tower + a Llama-style LM, arranged three ways:

- ``padded``: every image pasted on a canvas of the batch's largest height and width (what a fixed-size pipeline,
  or a processor that pads each batch to its largest image, does), so every image yields the largest count of
  features, and rows padded to the longest sample;
- ``native``: each image at its own size (the tower takes all images' patches end to end), rows padded to the
  longest sample (``MultimodalCollator``'s batch);
- ``packed``: the same native batch packed (``pack_batch``) into rows as wide as the longest sample.

One train step is forward + backward, every parameter trainable. The figure is real tokens per second: the tokens
of the samples at their native size (text + image features), the same count for all three, over the step's time.
The three steps are timed in interleaved rounds (each round runs the three in turn), after warm-up; the median of
each is taken, and the ratios come from the one run. Each step's time is taken twice: wall-clock, and the CPU time
of this process (less disturbed when other processes share the cores); the FLOPs of each arrangement (torch's flop
counter) give the ratio the timings should approach. ``native`` and ``packed`` train the very same samples, so
their summed losses agree (checked).

[2] Measuring lengths at setup (length grouping, packing, ``max_length``): each image counted from its size under
    the processor's pixel budget (headers read, no pixel decoded) against processing every image (what the data
    layer does when the size does not tell), on a split of PNG images of random sizes; both timed in one run,
    alternately, median of the repeats, and their lengths compared (equal).

    OMP_NUM_THREADS=1 python bench/mixed_resolution.py [--samples 8] [--rounds 9] [--threads 1] [--split 400]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import Dataset  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2VLImageProcessorPil, Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel  # noqa: E402

from cornstarch.data.collator import MultimodalCollator  # noqa: E402
from cornstarch.data.packing import pack_batch  # noqa: E402
from cornstarch.data.raw import sample_lengths  # noqa: E402
from cornstarch.demo import demo_tokenizer  # noqa: E402
from cornstarch.models.multimodal_language_model import (ModalEncoderModule, MultimodalModel,  # noqa: E402
                                                        MultimodalProcessor)

PATCH, MERGE = 8, 2
BLOCK = PATCH * MERGE  # image sides are multiples of one merged patch: no resizing


def build(seed: int = 0) -> tuple[MultimodalModel, MultimodalCollator]:
    """Qwen2-VL tower (4 × 128, 8-pixel patches, merged 2 × 2) + Llama-style LM (4 × 256), and their collator."""
    torch.manual_seed(seed)
    tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(
        depth=4, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=2))
    tokenizer = demo_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 8, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model = MultimodalModel({"vision": ModalEncoderModule(tower)}, lm).train()
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                      min_pixels=BLOCK**2, max_pixels=256 * 256)  # part [1] resizes no image
    processor = MultimodalProcessor({"vision": images}, tokenizer, model=model, predefined_tokens={"vision": "<image>"})
    return model, MultimodalCollator(processor)


def samples(n: int, seed: int = 0) -> list[dict]:
    """``n`` samples, one random image each, sides drawn uniformly from 32–192 px in steps of 16."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (BLOCK * rng.integers(2, 13, size=2)).tolist()
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        out.append({"prompt": "<image> Which digit is shown?", "answer": ["seven", "two", "nine"][i % 3],
                    "images": [Image.fromarray(pixels)]})
    return out


def padded_to_largest(batch_samples: list[dict]) -> list[dict]:
    """The same samples with each image pasted at the top left of a black canvas of the batch's largest sides."""
    height = max(s["images"][0].height for s in batch_samples)
    width = max(s["images"][0].width for s in batch_samples)
    out = []
    for s in batch_samples:
        canvas = Image.new("RGB", (width, height))
        canvas.paste(s["images"][0], (0, 0))
        out.append({**s, "images": [canvas]})
    return out


def step(model: MultimodalModel, batch: dict) -> tuple[float, float, float]:
    """One forward + backward: (wall seconds, CPU seconds of this process, loss summed over supervised tokens)."""
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(**batch)
    (out.loss * supervised).backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu, float(out.loss) * supervised


def step_flops(model: MultimodalModel, batch: dict) -> int:
    """FLOPs of one forward + backward (torch's flop counter: matrix products and attention)."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=int, default=400, help="samples of part [2]")
    parser.add_argument("--length_repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, collate = build(args.seed)
    data = samples(args.samples, args.seed)
    native = collate(data)
    lengths = native["attention_mask"].sum(1)
    packed, _ = pack_batch(native, capacity=int(lengths.max()), pad_token_id=collate.pad_token_id)
    padded = collate(padded_to_largest(data))
    batches = {"padded": padded, "native": native, "packed": packed}
    real_tokens = int(lengths.sum())
    load_before = os.getloadavg()

    flops = {name: step_flops(model, batch) for name, batch in batches.items()}
    wall: dict[str, list[float]] = {name: [] for name in batches}
    cpu: dict[str, list[float]] = {name: [] for name in batches}
    losses: dict[str, float] = {}
    for r in range(args.warmup + args.rounds):
        for name, batch in batches.items():
            seconds, cpu_seconds, losses[name] = step(model, batch)
            if r >= args.warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    load_after = os.getloadavg()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    sizes = [f"{s['images'][0].width}×{s['images'][0].height}" for s in data]
    print(f"{args.samples} samples, images {', '.join(sizes)}; {real_tokens} real tokens; "
          f"{args.rounds} interleaved rounds after {args.warmup}")
    patches = {name: int(b["image_grid_thw"].prod(-1).sum()) for name, b in batches.items()}
    wall_s = {name: statistics.median(t) for name, t in wall.items()}
    cpu_s = {name: statistics.median(t) for name, t in cpu.items()}
    print("[1] train step")
    print("| arrangement | tower patches | LM rows × width | GFLOP | median step, wall (ms) | real tokens/s | "
          "vs padded | median step, CPU (ms) | real tokens/CPU-s | vs padded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch in batches.items():
        rows, width = batch["input_ids"].shape
        print(f"| {name} | {patches[name]} | {rows} × {width} | {flops[name] / 1e9:.2f} | "
              f"{1000 * wall_s[name]:.1f} | {real_tokens / wall_s[name]:,.0f} | {wall_s['padded'] / wall_s[name]:.2f}× | "
              f"{1000 * cpu_s[name]:.1f} | {real_tokens / cpu_s[name]:,.0f} | {cpu_s['padded'] / cpu_s[name]:.2f}× |")
    print(f"FLOP ratio padded / packed {flops['padded'] / flops['packed']:.2f}, padded / native "
          f"{flops['padded'] / flops['native']:.2f}; packed vs native: wall "
          f"{wall_s['native'] / wall_s['packed']:.2f}×, CPU {cpu_s['native'] / cpu_s['packed']:.2f}×; summed loss "
          f"native {losses['native']:.4f}, packed {losses['packed']:.4f}")
    assert abs(losses["native"] - losses["packed"]) <= 1e-3 * abs(losses["native"]), "packing changed the loss"
    measure_lengths(collate, args.split, args.length_repeats)


def png_split(n: int, seed: int = 0) -> Dataset:
    """``n`` samples, one PNG image each (sides 32–512 px), stored as bytes the way ``datasets`` stores images."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        h, w = rng.integers(32, 513, size=2).tolist()
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(png, format="PNG")
        rows.append({"prompt": "<image> Which digit is shown?", "answer": "seven",
                     "images": [{"bytes": png.getvalue(), "path": None}]})
    return Dataset.from_list(rows)


def measure_lengths(collate: MultimodalCollator, n: int, repeats: int) -> None:
    """Part [2]: setup's length measurement from image sizes against processing every image."""
    disable_progress_bar()
    split = png_split(n)
    by_size = collate._extra_from_sizes
    times: dict[str, list[float]] = {"sizes": [], "processing": []}
    lengths = {}
    for _ in range(repeats):
        for way in times:
            collate._extra_from_sizes = by_size if way == "sizes" else lambda *args: None  # None: process the images
            start = time.perf_counter()
            lengths[way] = sample_lengths(split, collate)
            times[way].append(time.perf_counter() - start)
    collate._extra_from_sizes = by_size
    median = {way: statistics.median(t) for way, t in times.items()}
    print(f"[2] lengths of {n} PNG samples (32–512 px a side) at setup, median of {repeats}: from sizes "
          f"{median['sizes']:.2f} s, processing every image {median['processing']:.2f} s: "
          f"{median['processing'] / median['sizes']:.1f}× faster; lengths equal: "
          f"{lengths['sizes'] == lengths['processing']}")
    assert lengths["sizes"] == lengths["processing"]


if __name__ == "__main__":
    main()
