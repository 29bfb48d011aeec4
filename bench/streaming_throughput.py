"""Streaming a large LLaVA-format set: loader speed against the demo model's training, and memory as the set grows.

A synthetic LLaVA-Instruct-style set (one 8×8 PNG per row, written under ``--root``; single and multi-turn rows) is
converted to tar shards (:func:`cornstarch.data.prepare.prepare`) at each size of ``--sizes``. For each size, the
train loader of ``path: shards`` (:mod:`cornstarch.data.streaming`, ``--workers`` worker processes, the default demo
model's processor and batch) runs ``--batches`` batches while a thread samples the resident memory (RSS) of the
process and its workers, summed (an upper bound: pages the workers share with the parent count twice). In the same
run, the demo model's train step (forward + backward + AdamW, one thread) is timed on a batch of that loader.
Target: loader/train >= 20, peak RSS < 1.5 GB and flat from the smallest size to the largest.

    OMP_NUM_THREADS=1 python bench/streaming_throughput.py [--sizes 50000 200000] [--workers 2] [--batches 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.collate_throughput import demo, train_rate  # noqa: E402
from cornstarch.data import DatasetSpec, MultimodalDataModule  # noqa: E402
from cornstarch.data.prepare import prepare  # noqa: E402
from tests.data.llava_data import llava_rows, write_images  # noqa: E402


def dataset(root: str, size: int) -> str:
    """Shards of ``size`` LLaVA rows (one image each, ``root/images`` shared by the sizes), made once and reused."""
    shards = os.path.join(root, f"shards-{size}")
    if os.path.isfile(os.path.join(shards, "index.json")):
        return shards
    have = len(os.listdir(os.path.join(root, "images"))) if os.path.isdir(os.path.join(root, "images")) else 0
    if have < size:
        start = time.perf_counter()
        write_images(root, size)
        print(f"    wrote {size} 8x8 PNGs in {time.perf_counter() - start:.0f} s")
    names = [os.path.join("images", f"{i:07d}.png") for i in range(size)]
    path = os.path.join(root, f"data-{size}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in llava_rows(size, names, images_per_row=1))
    start = time.perf_counter()
    report = prepare(path, shards, progress=False)
    print(f"    prepare: {report['samples']} samples, {report['shards']} shards in {time.perf_counter() - start:.0f} s")
    return shards


class PeakRSS(threading.Thread):
    """Samples the summed RSS of this process and its children every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self) -> None:
        me = psutil.Process()
        while self.running:
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)
            time.sleep(0.05)


def stream(shards: str, processor, batch_size: int, workers: int, batches: int) -> tuple[float, float, dict]:
    """Samples/s of the streaming train loader over ``batches`` batches (after one), its peak RSS (GB), a batch."""
    data = MultimodalDataModule(train=DatasetSpec("shards", data_dir=shards), processor=processor,
                                batch_size=batch_size, num_workers=workers, shuffle_buffer=1000)
    meter = PeakRSS()
    meter.start()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batch = next(loader)  # workers started, first batches in flight
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch["input_ids"].shape[0]
        if n >= batches * batch_size:
            break
    rate = n / (time.perf_counter() - start)
    meter.running = False
    meter.join()
    return rate, meter.peak / 1e9, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--root", default="/tmp/cornstarch-stream-bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="train steps timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module, data, _ = demo()
    print(f"streaming train loader, demo model's processor and batch {data.batch_size}, {args.workers} workers")
    rows = []
    for size in args.sizes:
        shards = dataset(args.root, size)
        rate, peak, batch = stream(shards, module.processor, data.batch_size, args.workers, args.batches)
        rows.append((size, rate, peak))
        print(f"    {size:>8} samples: loader {rate:9.1f} samples/s   peak RSS {peak:.2f} GB")
    trained = train_rate(module, {k: v for k, v in batch.items() if k != "supervised_positions"}, args.steps)
    print(f"demo model train step (1 thread): {trained:.1f} samples/s")
    for size, rate, peak in rows:
        print(f"    {size:>8} samples: loader/train {rate / trained:6.1f}x (target >= 20)   peak RSS {peak:.2f} GB "
              f"(target < 1.5, flat)")


if __name__ == "__main__":
    main()
