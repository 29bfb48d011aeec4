"""A large LLaVA-format set: train-loader speed against the demo model's training, and memory as the set grows.

A synthetic LLaVA-Instruct-style set (one 8×8 PNG per row, written under ``--root``; single and multi-turn rows) at
each size of ``--sizes``, read two ways with the default demo model's processor and batch:

- streamed: converted to tar shards (:func:`cornstarch.data.prepare.prepare`), ``path: shards``
  (:mod:`cornstarch.data.streaming`), ``--workers`` worker processes decoding, processing and collating each batch;
- encoded on disk: the JSON read with ``format: llava``, encoded once at setup into ``cache_dir`` and read
  memory-mapped (``preprocess: true``, the default; no workers).

Each loader runs ``--batches`` batches while a thread samples the memory of the process and its workers: the
largest resident set (RSS) of one process, and the summed proportional set size (PSS: pages shared between the
processes split among them; file pages of memory-mapped data count while resident). In the same run, the demo
model's train step (forward + backward + AdamW, one thread) is timed on a batch. Targets: loader/train >= 20,
memory < 1.5 GB and flat from the smallest size to the largest.

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
    done = os.path.join(root, "images", "written")  # how many images are complete
    have = int(open(done).read()) if os.path.isfile(done) else 0
    start = time.perf_counter()
    names = write_images(root, size, start=min(have, size))
    if have < size:
        with open(done, "w") as f:
            f.write(str(size))
        print(f"    wrote {size - have} 8x8 PNGs in {time.perf_counter() - start:.0f} s")
    path = os.path.join(root, f"data-{size}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in llava_rows(size, names, images_per_row=1))
    start = time.perf_counter()
    report = prepare(path, shards, progress=False)
    print(f"    prepare: {report['samples']} samples, {report['shards']} shards in {time.perf_counter() - start:.0f} s")
    return shards


class PeakMemory(threading.Thread):
    """Samples the largest RSS of this process or a child, and their summed PSS, every 0.2 s (GB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rss = self.pss = 0.0
        self.running = True

    def run(self) -> None:
        me = psutil.Process()
        while self.running:
            try:
                infos = [p.memory_full_info() for p in [me, *me.children(recursive=True)]]
            except psutil.Error:
                continue
            self.rss = max(self.rss, max(i.rss for i in infos) / 1e9)
            self.pss = max(self.pss, sum(i.pss for i in infos) / 1e9)
            time.sleep(0.2)


def measure(data: MultimodalDataModule, batches: int) -> dict:
    """Setup time, samples/s of the train loader over ``batches`` batches (after one), peak memory, a batch."""
    meter = PeakMemory()
    meter.start()
    start = time.perf_counter()
    data.setup("fit")
    setup = time.perf_counter() - start
    loader = iter(data.train_dataloader())
    batch = next(loader)  # workers started, first batches in flight
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch["input_ids"].shape[0]
        if n >= batches * data.batch_size:
            break
    rate = n / (time.perf_counter() - start)
    meter.running = False
    meter.join()
    del loader
    return {"setup": setup, "rate": rate, "rss": meter.rss, "pss": meter.pss, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--root", default="/tmp/cornstarch-stream-bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="train steps timed")
    parser.add_argument("--cache", default="/tmp/cornstarch-stream-bench-cache", help="cache_dir of the encoded path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module, data, _ = demo()
    print(f"demo model's processor and batch {data.batch_size}; {args.batches} batches per loader")
    results = []
    for size in args.sizes:
        shards = dataset(args.root, size)
        common = dict(processor=module.processor, batch_size=data.batch_size)
        streamed = measure(MultimodalDataModule(train=DatasetSpec("shards", data_dir=shards), shuffle_buffer=1000,
                                                num_workers=args.workers, **common), args.batches)
        spec = DatasetSpec("json", data_files=os.path.join(args.root, f"data-{size}.jsonl"), format="llava",
                           image_root=args.root)
        encoded = measure(MultimodalDataModule(train=spec, cache_dir=os.path.join(args.cache, str(size)), **common),
                          args.batches)
        results.append((size, streamed, encoded))
        for name, r in (("streamed shards", streamed), ("encoded on disk", encoded)):
            print(f"    {size:>7} samples, {name}: setup {r['setup']:6.1f} s, loader {r['rate']:8.1f} samples/s, "
                  f"peak RSS (largest process) {r['rss']:.2f} GB, peak PSS (all) {r['pss']:.2f} GB", flush=True)
    batch = {k: v for k, v in results[-1][2]["batch"].items() if k != "supervised_positions"}
    trained = train_rate(module, batch, args.steps)
    print(f"demo model train step (1 thread, batch {data.batch_size}): {trained:.1f} samples/s")
    for size, streamed, encoded in results:
        print(f"    {size:>7} samples: loader/train streamed {streamed['rate'] / trained:5.1f}x ({args.workers} "
              f"workers), encoded on disk {encoded['rate'] / trained:5.1f}x (target >= 20)")


if __name__ == "__main__":
    main()
