"""Is data ever the bottleneck? Batch production against training speed, and padding with/without grouping.

[1] Steady state: samples per second that the train loader of the default demo model (``experiments/digits_vlm.yaml``)
    produces, against samples per second that its train step (forward + backward + AdamW) consumes, both measured
    here in one run. The loader gathers samples encoded once at setup and pads/stacks them
    (``MultimodalDataModule(preprocess=True)``, the default); for reference, also the raw path
    (``preprocess=False``: images decoded and processed, text templated, tokenized and expanded every batch).
    Target: loader/train >= 20.
[2] The one-time cost: the encoding pass over the train split at setup (samples/s), and the data time over the
    experiment's epochs (encoding + gathering) against the raw path's, as effective samples/s and ratio to training.
[3] The fraction of real (non-pad) tokens per batch on a length-skewed set (answers of 4–200 tokens), with plain
    shuffled batches and with ``group_by_length``.

    OMP_NUM_THREADS=1 python bench/collate_throughput.py [--batches 20] [--threads 1]
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

from datasets import Dataset  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402

from cornstarch.data import MultimodalDataModule  # noqa: E402
from cornstarch.data.conversation import _render_template  # noqa: E402
from cornstarch.lit import MultimodalLitModule  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "digits_vlm.yaml")


def demo(config_path: str = CONFIG) -> tuple[MultimodalLitModule, MultimodalDataModule, dict]:
    """The default experiment's module and (not yet set up) data module, built as the CLI builds them, and the
    config."""
    cfg = yaml.safe_load(open(config_path))
    parser = ArgumentParser()
    parser.add_class_arguments(MultimodalLitModule, "model")
    parser.add_class_arguments(MultimodalDataModule, "data")
    init = parser.instantiate(parser.parse_object({"model": cfg["model"], "data": cfg["data"]}))
    return init.model, init.data, cfg


def like(data: MultimodalDataModule, train: Dataset, processor, preprocess: bool) -> MultimodalDataModule:
    """A data module with ``data``'s loader settings over the in-memory ``train`` split only."""
    return MultimodalDataModule(train=train, processor=processor, batch_size=data.batch_size,
                                num_workers=data.num_workers, seed=data.seed, preprocess=preprocess)


def loader_rate(data: MultimodalDataModule, batches: int | None) -> tuple[float, dict]:
    """Samples per second of the train loader (``batches`` of them, or one epoch with ``None``), and one batch."""
    loader = iter(data.train_dataloader())
    batch = next(loader)  # warm-up
    n = 0
    start = time.perf_counter()
    for batch in loader:
        n += batch["input_ids"].shape[0]
        if batches is not None and n >= batches * data.batch_size:
            break
    return n / (time.perf_counter() - start), batch


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
    from cornstarch.demo import digits_vlm_dataset

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
    parser.add_argument("--batches", type=int, default=20, help="raw-path batches collated / train steps timed")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (training runs use 1 here)")
    parser.add_argument("--skewed", type=int, default=512, help="samples in the length-skewed set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    disable_progress_bar()

    module, data, cfg = demo()
    train = data.specs["train"].load()  # building the demo rows is not collation: excluded
    n, epochs = len(train), cfg["trainer"]["max_epochs"]

    encoded = like(data, train, module.processor, preprocess=True)
    _render_template.cache_clear()  # a cold start: no chat-template render cached
    start = time.perf_counter()
    encoded.setup("fit")
    encode_s = time.perf_counter() - start
    gathered, batch = loader_rate(encoded, None)  # one epoch
    raw = like(data, train, module.processor, preprocess=False)
    raw.setup("fit")
    collated, _ = loader_rate(raw, args.batches)
    trained = train_rate(module, batch, args.batches)

    print(f"[1] default demo model (digits_vlm.yaml), batch {data.batch_size}, {args.threads} thread(s), no workers")
    print(f"    train step: {trained:9.1f} samples/s")
    print(f"    encoded loader (gather + pad): {gathered:9.1f} samples/s   ratio loader/train: "
          f"{gathered / trained:6.1f}x (target >= 20)")
    print(f"    raw collation (preprocess=False): {collated:6.1f} samples/s   ratio: {collated / trained:6.1f}x")
    data_s, raw_s, train_s = encode_s + epochs * n / gathered, epochs * n / collated, epochs * n / trained
    print(f"[2] one-time encoding of the train split: {n} samples in {encode_s:.2f} s ({n / encode_s:.0f} samples/s)")
    print(f"    over {epochs} epochs ({epochs * n} samples): data {data_s:.1f} s = {epochs * n / data_s:.0f} samples/s "
          f"({train_s / data_s:.1f}x training's {train_s:.0f} s); raw path {raw_s:.1f} s ({train_s / raw_s:.1f}x)")

    skewed = Dataset.from_dict(skewed_rows(args.skewed))
    fractions = {}
    for grouped in (False, True):
        dm = MultimodalDataModule(train=skewed, processor=module.processor, batch_size=16, group_by_length=grouped)
        dm.setup("fit")
        fractions[grouped] = real_fraction(dm)
    print(f"[3] length-skewed set ({args.skewed} samples, answers 4-200 tokens), batch 16")
    print(f"    real-token fraction: plain {fractions[False]:.3f}   grouped {fractions[True]:.3f}   "
          f"ratio {fractions[True] / fractions[False]:.2f}x")


if __name__ == "__main__":
    main()
