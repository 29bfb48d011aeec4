"""Streaming train data: corpora read as they are used, never held whole, with exact resume.

Two kinds of stream:

- :class:`ShardStream`: the tar shards :mod:`~cornstarch.data.prepare` writes (WebDataset layout, so
  ``webdataset``/``tar`` read them too: each sample is a ``KEY.json`` member followed by its ``KEY.N.EXT`` images,
  or, encoded for a processor, by its ``KEY.NAME.npy`` columns, see :mod:`~cornstarch.data.encoded_shards`) plus an
  ``index.json`` of each sample's byte range. Each epoch the shards are taken in a seeded random order and the
  samples go through a seeded shuffle buffer; every rank and worker computes that order from the index alone (no
  bytes read) and reads only its own samples, each with one ``seek`` and one ``read``.
- :class:`HFStream`: a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``), shuffled with its own
  buffer and reseeded per epoch; each worker reads the stream and keeps its share.

:class:`StreamingBatches` deals the epoch's order out like the map-style samplers do (position ``p`` to rank
``p % ranks``; a rank's batch ``j`` to worker ``(j - first) % workers``, so the loader's round-robin over workers
hands batches out in order) and collates in the workers. :class:`StreamingLoader` counts the batches trained on (as
:class:`~cornstarch.data.resume.ResumableLoader` does) and starts each pass at its place, so a resumed run trains
on exactly the batches the uninterrupted run does: mid-epoch, with workers, on every rank. An epoch is
``samples // (ranks * batch_size)`` batches per rank (the rest of the shuffled epoch is left out, a different rest
each epoch).
"""

from __future__ import annotations

import io  # noqa: F401  (the docstring examples use it)
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset as HFIterableDataset

from ..batch import INDEX_KEY
from .collator import too_long
from .encoded_shards import read_sample
from .fingerprint import check_fingerprint, encoding_fingerprint
from .formats import SOURCE_PLACEHOLDER
from .resume import ResumableLoader

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT = "cornstarch-shards/1"
OPEN_SHARDS = 16  # shard files a worker keeps open
PIPE_BYTES = 1 << 18  # tensors up to this size leave a loader worker pickled (see to_pipe; bench/worker_transfer.py)
NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.float32, torch.float64}


def buffer_shuffle(order: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` through a shuffle buffer of ``buffer_size``: each item out is a random one of the next
    ``buffer_size`` waiting (a streaming shuffle: an item moves at most about ``buffer_size`` places back).

    >>> out = buffer_shuffle(np.arange(10), 4, np.random.default_rng(0))
    >>> sorted(out.tolist()) == list(range(10)), bool(out[:4].max() < 7)
    (True, True)
    """
    if buffer_size <= 1 or len(order) <= 1:
        return order
    picks = rng.integers(0, np.iinfo(np.int64).max, size=len(order))
    buffer, incoming = order[:buffer_size].tolist(), order[buffer_size:]
    out = np.empty_like(order)
    for i in range(len(order)):
        slot = int(picks[i] % len(buffer))
        out[i] = buffer[slot]
        if i < len(incoming):
            buffer[slot] = int(incoming[i])
        else:  # the stream has ended: the buffer drains
            buffer[slot] = buffer[-1]
            buffer.pop()
    return out


def tar_members(data: bytes) -> dict[str, bytes]:
    """Name → bytes of the members of a run of plain (ustar) tar members, e.g. one sample's in a shard.

    >>> import tarfile
    >>> out = io.BytesIO()
    >>> with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    ...     for name, text in [("a.json", b"{}"), ("a.0.png", b"x" * 600)]:
    ...         info = tarfile.TarInfo(name); info.size = len(text); tar.addfile(info, io.BytesIO(text))
    >>> {name: len(value) for name, value in tar_members(out.getvalue()).items()}
    {'a.json': 2, 'a.0.png': 600}
    """
    members, offset, end = {}, 0, len(data)
    while offset + 512 <= end and data[offset] != 0:
        header = data[offset:offset + 512]
        name = header[:100].split(b"\0", 1)[0].decode()
        if header[345]:  # a long name: its first part is in the prefix field
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        members[name] = data[offset + 512:offset + 512 + size]
        offset += 512 + -(-size // 512) * 512
    return members


class ShardStream:
    """Samples of the tar shards in ``directory`` (written by :func:`~cornstarch.data.prepare.prepare`): raw (messages
    and image bytes, collated by the loader) or encoded (:mod:`~cornstarch.data.encoded_shards`: only padded).

    Args:
        directory: the folder holding ``index.json`` and the shards.
        shuffle_buffer: samples in the shuffle buffer (``0``: shards and samples in order).
        seed: seed of the shard order and the buffer, with the epoch.
        placeholder: the model's image token, put where raw shards' text has ``<image>``.
        limit: read only the first ``limit`` samples (of the shards in their written order).
        fingerprint: the run's :func:`~cornstarch.data.fingerprint.encoding_fingerprint`; encoded shards made with
            another processor are refused (``None``: not checked).
        max_length, on_too_long: encoded samples longer than ``max_length`` tokens raise (``"error"``) or are left
            out of every epoch (``"skip"``), from the lengths ``index.json`` records (raw shards: the collator's).
        modality_ids, fields: modality key → placeholder id and → sample field, so the error for an over-long sample
            names its media's tokens (:func:`~cornstarch.data.collator.too_long`).

    Raises:
        FileNotFoundError: if ``directory`` has no ``index.json``.
        ValueError: for encoded shards whose fingerprint differs from ``fingerprint``.
        SampleError: naming the source row of the first encoded sample longer than ``max_length``, with
            ``on_too_long="error"``.
    """

    def __init__(self, directory: str, shuffle_buffer: int = 1000, seed: int = 0,
                 placeholder: str = SOURCE_PLACEHOLDER, limit: int | None = None,
                 fingerprint: dict[str, str] | None = None, max_length: int | None = None, on_too_long: str = "error",
                 modality_ids: Mapping[str, int] | None = None, fields: Mapping[str, str] | None = None):
        path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!r} has no {INDEX_FILE}: write shards with `cornstarch prepare "
                                    f"--config ...` or `python -m cornstarch.data.prepare`.")
        with open(path) as f:
            index = json.load(f)
        self.directory = directory
        self.encoding = index.get("encoding")
        if self.encoding is not None and fingerprint is not None:
            check_fingerprint(self.encoding["fingerprint"], fingerprint, f"{directory!r} (encoded shards)")
        self.files = [os.path.join(directory, shard["file"]) for shard in index["shards"]]
        offsets = [np.asarray(shard["offsets"], dtype=np.int64) for shard in index["shards"]]
        self.first = np.cumsum([0] + [len(o) - 1 for o in offsets])  # first sample id of each shard
        self.start = np.concatenate([o[:-1] for o in offsets]) if offsets else np.zeros(0, np.int64)
        self.end = np.concatenate([o[1:] for o in offsets]) if offsets else np.zeros(0, np.int64)
        self.shard = np.repeat(np.arange(len(offsets)), [len(o) - 1 for o in offsets])
        self.shuffle_buffer, self.seed, self.placeholder = shuffle_buffer, seed, placeholder
        written = len(self.start) if limit is None else min(limit, len(self.start))
        self.kept = np.arange(len(self.start)) < written  # [samples]: the samples each epoch reads
        self.modality_ids, self.fields = dict(modality_ids or {}), fields
        self._handles: dict[int, Any] = {}
        if self.encoding is not None and max_length is not None:
            self._fit(index["shards"], max_length, on_too_long)
        self.samples = int(self.kept.sum())

    def _fit(self, shards: list[dict[str, Any]], max_length: int, on_too_long: str) -> None:
        lengths = np.concatenate([np.asarray(shard["lengths"], dtype=np.int64) for shard in shards])
        over = np.flatnonzero(self.kept & (lengths > max_length))
        if len(over) and on_too_long == "error":
            sample = self.load(int(over[0]))
            raise too_long(sample[INDEX_KEY], sample["input_ids"], max_length, self.modality_ids, self.fields)
        if len(over):
            log.warning("%s: left out %d of %d encoded samples longer than max_length=%d", self.directory, len(over),
                        int(self.kept.sum()), max_length)
        self.kept[over] = False

    @property
    def encoded(self) -> bool:
        """Whether the shards hold encoded samples (collate them with
        :class:`~cornstarch.data.encoded_shards.EncodedSamples`)."""
        return self.encoding is not None

    def __len__(self) -> int:
        return self.samples

    def refs(self, epoch: int) -> Iterator[int]:
        """Sample ids in the order of ``epoch``: shards shuffled, then the shuffle buffer."""
        if not self.shuffle_buffer:
            return iter(np.flatnonzero(self.kept).tolist())
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(len(self.files))
        order = np.concatenate([np.arange(self.first[s], self.first[s + 1]) for s in shards]) if len(shards) else \
            np.zeros(0, np.int64)
        order = buffer_shuffle(order[self.kept[order]], self.shuffle_buffer, rng)
        return (int(ref) for start in range(0, len(order), 4096) for ref in order[start:start + 4096].tolist())

    def members(self, ref: int) -> dict[str, bytes]:
        """Name → bytes of sample ``ref``'s tar members, read with one ``seek`` and one ``read``."""
        shard = int(self.shard[ref])
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= OPEN_SHARDS:  # the buffer spans a few shards: close the longest open
                self._handles.pop(next(iter(self._handles))).close()
            handle = self._handles[shard] = open(self.files[shard], "rb")  # noqa: SIM115 (kept open, per worker)
        handle.seek(int(self.start[ref]))
        return tar_members(handle.read(int(self.end[ref] - self.start[ref])))

    def load(self, ref: int) -> dict[str, Any]:
        """Sample ``ref``: encoded, its columns (:func:`~cornstarch.data.encoded_shards.read_sample`); raw, its
        ``messages`` and ``images`` (encoded bytes, decoded by the collator)."""
        members = self.members(ref)
        if self.encoding is not None:
            return read_sample(members)
        meta = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
        messages = [{"role": m["role"], "content": m["content"].replace(SOURCE_PLACEHOLDER, self.placeholder)}
                    for m in meta["messages"]]
        return {"messages": messages, "images": [members[name] for name in meta["images"]], INDEX_KEY: meta["key"]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # workers open their own files


class HFStream:
    """Samples of a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``).

    Args:
        dataset: the stream (rows as cornstarch samples, e.g. read through a ``format``).
        shuffle_buffer: samples in its shuffle buffer (``0``: in order).
        seed: seed of the buffer (the epoch reseeds it).
        samples: samples per epoch, if the stream does not say (``dataset.info.splits``).
    """

    def __init__(self, dataset: HFIterableDataset, shuffle_buffer: int = 1000, seed: int = 0,
                 samples: int | None = None):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else dataset
        self.samples = samples if samples is not None else _known_size(dataset)

    def __len__(self) -> int:
        if self.samples is None:
            raise TypeError("The stream does not say how many samples it has: give samples=...")
        return self.samples

    def refs(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The rows in the order of ``epoch`` (read in batches: ``datasets`` would shard a stream iterated row by row
        in a loader worker across the workers itself)."""
        self.dataset.set_epoch(epoch)
        for batch in self.dataset.iter(batch_size=256):
            for j in range(len(next(iter(batch.values()), []))):
                yield {k: v[j] for k, v in batch.items()}

    @staticmethod
    def load(ref: dict[str, Any]) -> dict[str, Any]:
        return ref


def _known_size(dataset: HFIterableDataset) -> int | None:
    splits = getattr(dataset.info, "splits", None) or {}
    split = splits.get(str(dataset.split)) if dataset.split is not None else None
    return getattr(split, "num_examples", None) or None


class StreamingBatches(torch.utils.data.IterableDataset):
    """Collated train batches of one rank, read from a stream (see the module's docstring).

    Args:
        stream: a :class:`ShardStream` or :class:`HFStream` (``refs(epoch)``, ``load(ref)``, ``len``).
        batch_size: samples per batch of this rank.
        collate: samples → batch (run in the workers).
        num_replicas, rank: the data-parallel ranks; the defaults mean one process.

    ``epoch`` and ``first`` (the first batch of the pass) are set by :class:`StreamingLoader` before each pass.
    """

    def __init__(self, stream: Any, batch_size: int, collate: Callable[[list[dict[str, Any]]], Any],
                 num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.first = 0, 0

    def __len__(self) -> int:
        """Batches per epoch of each rank."""
        return len(self.stream) // (self.num_replicas * self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        length, first = len(self), self.first
        per_step = self.num_replicas * self.batch_size  # samples of one batch of every rank
        batch: list[Any] = []
        for position, ref in enumerate(self.stream.refs(self.epoch)):
            step = position // per_step
            if step >= length:
                break
            if step < first or (step - first) % workers != worker or position % self.num_replicas != self.rank:
                continue
            sample = self.stream.load(ref)
            sample.setdefault(INDEX_KEY, position)
            batch.append(sample)
            if len(batch) == self.batch_size:
                collated = self.collate(batch)
                yield collated if info is None else to_pipe(collated)
                batch = []


class _Piped:
    """A tensor's values on their way from a loader worker, pickled as a NumPy array."""

    def __init__(self, array: np.ndarray):
        self.array = array


def to_pipe(batch: Any) -> Any:
    """A worker's batch ready for the trip to the main process: tensors of at most ``PIPE_BYTES`` go pickled as
    NumPy arrays (a copy through the pipe costs less than the shared-memory segment and file descriptor the loader
    gives each tensor, which dominates for the small tensors of a padded batch); larger ones go as tensors, in shared
    memory. :func:`from_pipe` makes them tensors again.

    >>> batch = {"input_ids": torch.arange(6).view(2, 3), "answers": ["a", "b"]}
    >>> back = from_pipe(to_pipe(batch))
    >>> torch.equal(back["input_ids"], batch["input_ids"]), back["answers"]
    (True, ['a', 'b'])
    """
    if not isinstance(batch, dict):
        return batch
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.nbytes <= PIPE_BYTES and value.dtype in NUMPY_DTYPES:
            value = _Piped(value.numpy())
        out[key] = value
    return out


def from_pipe(batch: Any) -> Any:
    """A batch from :func:`to_pipe` with its tensors back (sharing the arrays' memory)."""
    if not isinstance(batch, dict):
        return batch
    return {k: torch.from_numpy(v.array) if isinstance(v, _Piped) else v for k, v in batch.items()}


def _as_is(batch: Any) -> Any:
    return batch


class StreamingLoader(ResumableLoader):
    """The train loader of a :class:`StreamingBatches`: counts the batches trained on and starts each pass where the
    run stands (state as :class:`~cornstarch.data.resume.ResumableLoader`'s). Workers are started per pass (not
    persistent), so each pass's start reaches them.

    Args:
        dataset: the :class:`StreamingBatches`.
        num_workers: loader worker processes.
        epoch_length: as for :class:`~cornstarch.data.resume.ResumableLoader`.

    >>> from cornstarch.data.streaming import StreamingBatches
    >>> class Numbers:
    ...     def __len__(self): return 12
    ...     def refs(self, epoch): return iter(np.random.default_rng(epoch).permutation(12).tolist())
    ...     def load(self, ref): return {"n": ref}
    >>> def batches(): return StreamingBatches(Numbers(), 2, lambda s: [x["n"] for x in s])
    >>> run = [b for loader in [StreamingLoader(batches())] for _ in range(2) for b in loader]
    >>> resumed = StreamingLoader(batches())
    >>> resumed.load_state_dict({"epoch": 0, "batch": 4, "epoch_length": 6})
    >>> [b for _ in range(2) for b in resumed] == run[4:]
    True
    """

    def __init__(self, dataset: StreamingBatches, num_workers: int = 0,
                 epoch_length: Callable[[], int | None] | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                         persistent_workers=False, epoch_length=epoch_length, **kwargs)

    def start_pass(self, epoch: int, batch: int) -> None:
        self.dataset.epoch, self.dataset.first = epoch, batch

    def __iter__(self) -> Iterator[Any]:
        return map(from_pipe, super().__iter__())


def is_streamed(spec: Any) -> bool:
    """Whether a split's spec is read as a stream (``streaming: true``, or ``path: shards``)."""
    return bool(getattr(spec, "streaming", False)) or getattr(spec, "path", None) == "shards"


def open_stream(spec: Any, placeholder: str | None, shuffle_buffer: int = 1000, seed: int = 0,
                collator: Any = None) -> Any:
    """The stream of a :class:`~cornstarch.data.DatasetSpec`: the shards in its ``data_dir`` (``path: shards``), or
    ``load_dataset(..., streaming=True)`` read through its ``format``.

    Args:
        spec: the split's spec.
        placeholder: the model's image token.
        shuffle_buffer, seed: the stream's shuffle.
        collator: the split's collator: encoded shards must have been made with its processor and settings, and its
            ``max_length``/``on_too_long`` apply to them.

    Raises:
        ValueError: for shards without ``data_dir``, encoded shards made with another processor, or a stream that
            does not say how many samples it has and no ``limit``.
    """
    if spec.path == "shards":
        if not spec.data_dir:
            raise ValueError("A 'shards' split needs data_dir: the folder prepare wrote.")
        checks = {} if collator is None else dict(fingerprint=encoding_fingerprint(collator),
                                                  max_length=collator.max_length, on_too_long=collator.on_too_long,
                                                  modality_ids=collator.processor.token_ids, fields=collator.fields)
        return ShardStream(spec.data_dir, shuffle_buffer, seed, placeholder or SOURCE_PLACEHOLDER, spec.limit,
                           **checks)
    dataset = spec.load(placeholder)
    samples = _known_size(dataset) if spec.limit is None else spec.limit
    if samples is None:
        raise ValueError(f"The stream of {spec.path!r} does not say how many samples it has (a load_dataset stream "
                         f"rarely does): set the spec's limit to the samples per epoch (--data.train.limit N); "
                         f"the epoch ends after limit // (ranks * batch_size) batches.")
    return HFStream(dataset, shuffle_buffer, seed, samples)
