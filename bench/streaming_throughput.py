"""A large LLaVA-format set: train-loader speed against the demo model's training, and memory as the set grows.

A synthetic LLaVA-Instruct-style set (one 8×8 PNG per row, written under ``--root``; single and multi-turn rows) at
each size of ``--sizes``, read three ways with the default demo model's processor and batch:

- encoded shards: converted by :func:`cornstarch.data.prepare.prepare` with the train collator (token ids, labels
  and processed pixels as ``.npy`` members, what ``cornstarch prepare --config ...`` writes), ``path: shards``,
  ``--workers`` worker processes reading, shuffling and padding;
- raw shards: converted without a processor (messages and PNG bytes), the workers decoding, processing and
  tokenizing every batch;
- encoded on disk: the JSON read with ``format: llava``, encoded once at setup into ``cache_dir`` and read
  memory-mapped (``preprocess: true``, the default; no workers).

Each (size, way) is measured in a fresh process: the loader runs ``--batches`` batches while a thread samples the
memory of the process and its workers (the largest resident set, RSS, of one process; its private part, RSS less
file-backed pages such as memory-mapped data; and the summed proportional set size, PSS, which splits shared pages
among the processes), then the demo model's train step (forward + backward + AdamW, one thread) is timed on the
loader's last batch, so that the ratio compares figures taken under the same load of the shared machine. Targets:
loader/train >= 20, memory < 1.5 GB and flat from the smallest size to the largest.

    OMP_NUM_THREADS=1 python bench/streaming_throughput.py [--sizes 50000 200000] [--workers 2] [--batches 400]
        [--ways encoded-shards raw-shards encoded-on-disk]
    OMP_NUM_THREADS=1 python bench/streaming_throughput.py --member-costs   # per-batch costs of what a shard holds
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


WAYS = {"encoded-shards": "encoded shards", "raw-shards": "raw shards", "encoded-on-disk": "encoded on disk"}


def dataset(root: str, size: int) -> None:
    """``size`` LLaVA rows (one image each, ``root/images`` shared by the sizes) as raw and as encoded shards, made
    once and reused."""
    done = os.path.join(root, "images", "written")  # how many images are complete
    have = int(open(done).read()) if os.path.isfile(done) else 0
    path = os.path.join(root, f"data-{size}.jsonl")
    if have < size or not os.path.isfile(path):
        start = time.perf_counter()
        names = write_images(root, size, start=min(have, size))
        if have < size:
            with open(done, "w") as f:
                f.write(str(size))
            print(f"    wrote {size - have} 8x8 PNGs in {time.perf_counter() - start:.0f} s")
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in llava_rows(size, names, images_per_row=1))
    for kind in ("raw", "encoded"):
        shards = os.path.join(root, f"{kind}-shards-{size}")
        if os.path.isfile(os.path.join(shards, "index.json")):
            continue
        collator = None
        if kind == "encoded":
            module, data, _ = demo()
            data.processor = module.processor
            collator = data.collator("train")
        start = time.perf_counter()
        report = prepare(path, shards, progress=False, collator=collator)
        size_gb = sum(e.stat().st_size for e in os.scandir(shards)) / 1e9
        print(f"    prepare ({kind}): {report['samples']} samples, {report['shards']} shards ({size_gb:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s")


def member_costs(batch: int = 32, repeats: int = 50) -> None:
    """Per batch of the demo's 8×8 images: decoding the PNGs, processing decoded arrays, and reading processed
    arrays from ``.npy`` members (``npy_array``, and ``np.load`` for comparison): what a shard could hold."""
    import io

    import numpy as np
    from PIL import Image

    from cornstarch.data.encoded_shards import npy_array, npy_bytes

    module, _, _ = demo()
    image_processor = module.processor.encoder_processors["vision"]
    arrays = [np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8) for i in range(batch)]
    pngs = []
    for array in arrays:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        pngs.append(out.getvalue())
    members = [npy_bytes(x[None]) for x in image_processor(arrays, return_tensors="np")["pixel_values"]]
    runs = {
        "decode PNGs": lambda: [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs],
        "process decoded arrays": lambda: image_processor(arrays, return_tensors="np"),
        "read processed .npy (npy_array)": lambda: [npy_array(m) for m in members],
        "read processed .npy (np.load)": lambda: [np.load(io.BytesIO(m)) for m in members],
    }
    print(f"per batch of {batch} 8x8 images (median of {repeats}):")
    for name, run in runs.items():
        times = []
        for _ in range(repeats + 3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"    {name:34s} {sorted(times[3:])[repeats // 2] * 1e3:7.3f} ms")


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
    if path.endswith("-shards"):
        shards = os.path.join(args.root, f"{path.split('-')[0]}-shards-{size}")
        dm = MultimodalDataModule(train=DatasetSpec("shards", data_dir=shards), shuffle_buffer=1000,
                                  num_workers=args.workers, **common)
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
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--member-costs", action="store_true", help="only time what a shard's members cost")
    parser.add_argument("--measure", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.member_costs:
        member_costs()
        return
    if args.measure:
        print(json.dumps(measure(args, int(args.measure[0]), args.measure[1])))
        return
    print(f"demo model's processor and batch 32; {args.batches} batches per loader; each measured in a fresh process; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for size in args.sizes:
        dataset(args.root, size)
        for path in args.ways:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", str(size), path],
                                   capture_output=True, text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1])
            name = WAYS[path] + (f" ({args.workers} workers)" if path.endswith("-shards") else "")
            print(f"    {size:>7} samples, {name}: setup {r['setup']:6.1f} s, loader {r['rate']:8.1f} samples/s, "
                  f"train {r['train']:6.1f} samples/s: ratio {r['rate'] / r['train']:5.1f}x (target >= 20); "
                  f"peak RSS {r['rss']:.2f} GB (private {r['private']:.2f}) of the largest process, PSS of all "
                  f"{r['pss']:.2f} GB; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
