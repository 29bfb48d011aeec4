"""Is data ever the bottleneck? Collation speed against training speed, and padding with/without grouping.

[1] Samples per second that ``MultimodalCollator`` produces (images decoded, processed, text templated, tokenized,
    placeholders expanded, padded) against samples per second that a train step of the default demo model
    (``experiments/digits_vlm.yaml``) consumes, both measured here in one run. Target: ratio >= 20.
[2] The fraction of real (non-pad) tokens per batch on a length-skewed set (answers of 4–200 tokens), with plain
    shuffled batches and with ``group_by_length``.

    python bench/collate_throughput.py [--batches 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jsonargparse import ArgumentParser  # noqa: E402

from cornstarch.data import MultimodalDataModule  # noqa: E402
from cornstarch.lit import MultimodalLitModule  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "digits_vlm.yaml")


def demo(config_path: str = CONFIG) -> tuple[MultimodalLitModule, MultimodalDataModule]:
    """The default experiment's module and data module, built as the CLI builds them."""
    cfg = yaml.safe_load(open(config_path))
    parser = ArgumentParser()
    parser.add_class_arguments(MultimodalLitModule, "model")
    parser.add_class_arguments(MultimodalDataModule, "data")
    init = parser.instantiate(parser.parse_object({"model": cfg["model"], "data": cfg["data"]}))
    init.data.processor = init.model.processor
    init.data.setup("fit")
    return init.model, init.data


def collate_rate(data: MultimodalDataModule, batches: int) -> tuple[float, dict]:
    """Samples per second of the train loader (no workers), and one batch."""
    loader = iter(data.train_dataloader())
    batch = next(loader)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    return batches * data.batch_size / (time.perf_counter() - start), batch


def train_rate(module: MultimodalLitModule, batch: dict, steps: int) -> float:
    """Samples per second of forward + backward + AdamW on one batch (all components trainable)."""
    model = module.model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return batch["input_ids"].shape[0] / statistics.median(times)


def skewed_rows(n: int) -> dict:
    """Demo digits whose answers repeat the digit's name 1–50 times (4–200 tokens), most of them short."""
    from cornstarch.data import digits_vlm_dataset

    base = digits_vlm_dataset("train", image_size=8, n=n)
    rng = torch.Generator().manual_seed(0)
    rows = {"messages": [], "images": []}
    for row in base:
        name = row["messages"][1]["content"]
        repeat = 50 if torch.rand(1, generator=rng) < 0.15 else int(torch.randint(1, 6, (1,), generator=rng))
        rows["messages"].append([row["messages"][0], {"role": "assistant", "content": " ".join([name] * repeat)}])
        rows["images"].append(row["images"])
    return rows


def real_fraction(data: MultimodalDataModule) -> float:
    real = total = 0
    for batch in data.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="batches collated / train steps timed")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--skewed", type=int, default=512, help="samples in the length-skewed set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    module, data = demo()
    collated, batch = collate_rate(data, args.batches)
    trained = train_rate(module, batch, args.batches)
    print(f"[1] default demo model, batch {data.batch_size}, {args.threads} threads")
    print(f"    collator: {collated:8.1f} samples/s   train step: {trained:8.1f} samples/s   "
          f"ratio collate/train: {collated / trained:.1f}x (target >= 20)")

    from datasets import Dataset

    skewed = Dataset.from_dict(skewed_rows(args.skewed))
    fractions = {}
    for grouped in (False, True):
        dm = MultimodalDataModule(train=skewed, processor=module.processor, batch_size=16, group_by_length=grouped)
        dm.setup("fit")
        fractions[grouped] = real_fraction(dm)
    print(f"[2] length-skewed set ({args.skewed} samples, answers 4-200 tokens), batch 16")
    print(f"    real-token fraction: plain {fractions[False]:.3f}   grouped {fractions[True]:.3f}   "
          f"ratio {fractions[True] / fractions[False]:.2f}x")


if __name__ == "__main__":
    main()
