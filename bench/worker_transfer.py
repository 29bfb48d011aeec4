"""How a batch's tensors best leave a loader worker: in shared memory (the DataLoader's way: a segment and a file
descriptor per tensor) or pickled as NumPy arrays through the pipe (:func:`cornstarch.data.streaming.to_pipe`).

Two workers yield batches of 5 float32 tensors of each size; the main process counts batches per second both ways.
The crossover sets ``cornstarch.data.streaming.PIPE_BYTES``.

    OMP_NUM_THREADS=1 python bench/worker_transfer.py
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cornstarch.data.streaming as streaming  # noqa: E402

SIZES = [16 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20, 16 << 20]


class Batches(IterableDataset):
    """``n`` batches of 5 tensors of ``nbytes`` each, split between the workers; ``piped``: through ``to_pipe``."""

    def __init__(self, nbytes: int, piped: bool, n: int):
        self.nbytes, self.piped, self.n = nbytes, piped, n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for _ in range(self.n // info.num_workers):
            batch = {f"t{k}": torch.zeros(self.nbytes // 4, dtype=torch.float32) for k in range(5)}
            yield streaming.to_pipe(batch) if self.piped else batch


def rate(nbytes: int, piped: bool) -> float:
    """Batches per second received by the main process from 2 workers."""
    n = max(40, min(400, (200 << 20) // (5 * nbytes)))
    batches = iter(DataLoader(Batches(nbytes, piped, n), batch_size=None, num_workers=2))
    next(batches)
    count, start = 0, time.perf_counter()
    for batch in batches:
        streaming.from_pipe(batch)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(1)
    streaming.PIPE_BYTES = 1 << 40  # every tensor pickled when piped
    print(f"2 workers, batches of 5 float32 tensors; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for nbytes in SIZES:
        shared, piped = rate(nbytes, False), rate(nbytes, True)
        print(f"    {nbytes >> 10:6d} KB a tensor: shared memory {shared:8.1f} batches/s, pickled {piped:8.1f} "
              f"batches/s ({piped / shared:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
