"""A large LLaVA-format set: train-loader speed against the demo model's training, and memory as the set grows.

A synthetic LLaVA-Instruct-style set (one 8×8 PNG per row, written under ``--root``; single and multi-turn rows) at
each size of ``--sizes``, read two ways with the default demo model's processor and batch:

- streamed: converted to tar shards (:func:`cornstarch.data.prepare.prepare`), ``path: shards``
  (:mod:`cornstarch.data.streaming`), ``--workers`` worker processes decoding, processing and collating each batch;
- encoded on disk: the JSON read with ``format: llava``, encoded once at setup into ``cache_dir`` and read
  memory-mapped (``preprocess: true``, the default; no workers).

Each (size, way) is measured in a fresh process: the loader runs ``--batches`` batches while a thread samples the
memory of the process and its workers (the largest resident set, RSS, of one process; its private part, RSS less
file-backed pages such as memory-mapped data; and the summed proportional set size, PSS, which splits shared pages
among the processes), then the demo model's train step (forward + backward + AdamW, one thread) is timed on the
loader's last batch, so that the ratio compares figures taken under the same load of the shared machine. Targets:
loader/train >= 20, memory < 1.5 GB and flat from the smallest size to the largest.

    OMP_NUM_THREADS=1 python bench/streaming_throughput.py [--sizes 50000 200000] [--workers 2] [--batches 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
    """Samples, every 0.2 s, the largest RSS of this process or a child, the largest private (anonymous: RSS less
    file-backed pages such as memory-mapped data and libraries) of one, and their summed PSS (GB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rss = self.private = self.pss = 0.0
        self.running = True

    def run(self) -> None:
        me = psutil.Process()
        while self.running:
            try:
                infos = [p.memory_full_info() for p in [me, *me.children(recursive=True)]]
            except psutil.Error:
                continue
            self.rss = max(self.rss, max(i.rss for i in infos) / 1e9)
            self.private = max(self.private, max(i.rss - i.shared for i in infos) / 1e9)
            self.pss = max(self.pss, sum(i.pss for i in infos) / 1e9)
            time.sleep(0.2)


def measure(args: argparse.Namespace, size: int, path: str) -> dict:
    """In a fresh process: setup time, samples/s of the train loader over ``args.batches`` batches (after one), peak
    memory, and the demo model's train rate on the loader's last batch, measured right after it."""
    module, data, _ = demo()
    common = dict(processor=module.processor, batch_size=data.batch_size)
    if path == "streamed":
        dm = MultimodalDataModule(train=DatasetSpec("shards", data_dir=os.path.join(args.root, f"shards-{size}")),
                                  shuffle_buffer=1000, num_workers=args.workers, **common)
    else:
        spec = DatasetSpec("json", data_files=os.path.join(args.root, f"data-{size}.jsonl"), format="llava",
                           image_root=args.root)
        dm = MultimodalDataModule(train=spec, cache_dir=os.path.join(args.cache, str(size)), **common)
    meter = PeakMemory()
    meter.start()
    start = time.perf_counter()
    dm.setup("fit")
    setup = time.perf_counter() - start
    loader = iter(dm.train_dataloader())
    batch = next(loader)  # workers started, first batches in flight
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch["input_ids"].shape[0]
        if n >= args.batches * dm.batch_size:
            break
    rate = n / (time.perf_counter() - start)
    meter.running = False
    meter.join()
    del loader
    trained = train_rate(module, {k: v for k, v in batch.items() if k != "supervised_positions"}, args.steps)
    return {"setup": setup, "rate": rate, "train": trained, "rss": meter.rss, "private": meter.private,
            "pss": meter.pss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--root", default="/tmp/cornstarch-stream-bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="train steps timed")
    parser.add_argument("--cache", default="/tmp/cornstarch-stream-bench-cache", help="cache_dir of the encoded path")
    parser.add_argument("--measure", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.measure:
        print(json.dumps(measure(args, int(args.measure[0]), args.measure[1])))
        return
    print(f"demo model's processor and batch 32; {args.batches} batches per loader; each measured in a fresh process")
    for size in args.sizes:
        dataset(args.root, size)
        for path in ("streamed", "encoded"):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", str(size), path],
                                   capture_output=True, text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1])
            name = f"streamed shards ({args.workers} workers)" if path == "streamed" else "encoded on disk"
            print(f"    {size:>7} samples, {name}: setup {r['setup']:6.1f} s, loader {r['rate']:8.1f} samples/s, "
                  f"train {r['train']:6.1f} samples/s: ratio {r['rate'] / r['train']:5.1f}x (target >= 20); "
                  f"peak RSS {r['rss']:.2f} GB (private {r['private']:.2f}) of the largest process, PSS of all "
                  f"{r['pss']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
