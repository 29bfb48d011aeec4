"""MultimodalDataModule: Hugging Face ``datasets`` splits → collated multimodal batches, for Lightning.

Each split comes from :mod:`~cornstarch.data.sources`; with ``preprocess=True`` its samples are encoded once at
setup (:mod:`~cornstarch.data.encoded`), otherwise collated batch by batch (:mod:`~cornstarch.data.raw`). The train
loader shuffles (:mod:`~cornstarch.data.sampling`), optionally packs (:mod:`~cornstarch.data.packing`) and resumes
exactly (:mod:`~cornstarch.data.resume`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import numpy as np
from datasets import Dataset
from torch.utils.data import DataLoader

from ..batch import INDEX_KEY
from .collator import MultimodalCollator, default_fields, too_long
from .encoded import EncodedCollate, EncodedDataset, encode_split, encoded_lengths
from .encoded_shards import EncodedSamples
from .packing import BatchIndexed, PackedBatchSampler, PackingCollate, WithSupervisedPositions
from .raw import IndexedDataset, sample_lengths
from .resume import ResumableLoader
from .sampling import EpochShuffleSampler, LengthGroupedSampler
from .sources import DatasetSpec, load_split, media_dir
from .streaming import StreamingBatches, StreamingLoader, is_streamed, open_stream

__all__ = ["DatasetSpec", "MultimodalDataModule"]

log = logging.getLogger(__name__)


class MultimodalDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders of multimodal samples.

    Args:
        train, val, test, predict: a :class:`DatasetSpec` (or an in-memory ``datasets.Dataset``) per split.
        processor: a :class:`MultimodalProcessor`, a directory it was saved to, or ``None`` to take the
            Lightning module's ``processor`` at setup.
        batch_size: training batch size; ``eval_batch_size`` for the others (default: the same).
        num_workers: loader worker processes.
        seed: seed of the shuffle (and of length grouping).
        group_by_length: batch samples of similar length (less padding).
        max_length: longest sequence; longer samples raise, or are skipped with ``on_too_long="skip"``.
        on_too_long: ``"error"`` or ``"skip"``; skipped samples are dropped at setup and counted in the log.
        on_long_audio: ``"warn"`` (naming the sample) or ``"error"`` for an audio clip longer than the audio
            processor keeps (see :class:`~cornstarch.data.collator.MultimodalCollator`).
        sampling_rate: audio sampling rate expected by the audio processor.
        fields: modality key → sample field (default ``vision→images``, ``audio→audios``).
        processor_kwargs: extra keyword arguments for the encoder processors.
        eval_prompts: val/test batches also carry generation prompts and reference answers (for exact match).
        preprocess: encode every sample once at setup (``datasets.Dataset.map``: media decoded and processed, text
            templated, tokenized and expanded), so that a batch is only gathered, padded and stacked. The encoded
            split is held in memory (processed pixels included: fine for small images, large for 336-pixel ones)
            unless ``cache_dir`` keeps it on disk.
            ``False``: the collator does that work for every batch, every epoch (for random per-epoch transforms
            such as ``with_transform`` augmentations, or splits too large to hold encoded; use ``num_workers``).
        pack: train batches are ``batch_size`` rows of ``max_length`` tokens, each holding several whole samples
            (first-fit decreasing, reshuffled every epoch) with ``position_ids`` restarting per sample: each
            sample attends only to itself (see :mod:`cornstarch.data.packing`). Needs ``max_length``.
        cache_dir: with ``preprocess``, write each split's encoded samples to Arrow files in this folder (rewritten at
            every setup) and read them memory-mapped: a split larger than memory keeps the encoded path's speed, and
            the process's memory stays flat as the split grows. ``None``: the encoded splits are held in memory.
        shuffle_buffer: samples in the shuffle buffer of a streamed train split (a spec with ``streaming: true`` or
            ``path: shards``; see :mod:`cornstarch.data.streaming`); ``0`` reads it in order.

    A split is a :class:`DatasetSpec` (``DatasetSpec("json", data_files="train.jsonl")``, ``"imagefolder"``, a
    ``"module:function"``) or an in-memory ``datasets.Dataset``:

    >>> from transformers import CLIPImageProcessor
    >>> from cornstarch.demo import demo_tokenizer, digits_vlm_dataset
    >>> from cornstarch.models.multimodal_language_model import MultimodalProcessor
    >>> count = {"vision": lambda inputs, outputs: [4] * len(outputs["pixel_values"])}  # features per image
    >>> proc = MultimodalProcessor({"vision": CLIPImageProcessor(size={"shortest_edge": 8}, do_center_crop=False)},
    ...                            demo_tokenizer(), num_feature_calculation_funcs=count,
    ...                            predefined_tokens={"vision": "<image>"})
    >>> dm = MultimodalDataModule(train=digits_vlm_dataset("train", image_size=8, n=6), processor=proc, batch_size=4)
    >>> dm.setup("fit")
    >>> [tuple(b["pixel_values"].shape) for b in dm.train_dataloader()]  # 6 digits: a batch of 4, then 2
    [(4, 3, 8, 8), (2, 3, 8, 8)]
    """

    def __init__(
        self,
        train: DatasetSpec | Dataset | None = None,
        val: DatasetSpec | Dataset | None = None,
        test: DatasetSpec | Dataset | None = None,
        predict: DatasetSpec | Dataset | None = None,
        processor: Any = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        group_by_length: bool = False,
        max_length: int | None = None,
        on_too_long: str = "error",
        on_long_audio: str = "warn",
        sampling_rate: int = 16000,
        fields: dict[str, str] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        eval_prompts: bool = True,
        preprocess: bool = True,
        pack: bool = False,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.specs = {"train": train, "val": val, "test": test, "predict": predict}
        self.processor = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.max_length = max_length
        self.on_too_long = on_too_long
        self.eval_prompts = eval_prompts
        self.preprocess = preprocess
        self.pack = pack
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        if pack and (not max_length or group_by_length):
            raise ValueError("pack=True needs max_length (the tokens per packed row) and excludes group_by_length.")
        self.collator_kwargs = dict(fields=fields, sampling_rate=sampling_rate, processor_kwargs=processor_kwargs or {},
                                    on_long_audio=on_long_audio)
        self.datasets: dict[str, Dataset] = {}  # each split's samples (over-long ones skipped)
        self.streams: dict[str, Any] = {}  # streamed splits (train only): a ShardStream or HFStream
        self.encoded: dict[str, Dataset] = {}  # with preprocess: each split's encoded samples, row for row
        self.lengths: dict[str, list[int]] = {}
        self.skipped: dict[str, int] = {}
        self._train_loader: ResumableLoader | None = None  # the last train loader built (it counts the batches)
        self._train_position: dict[str, int] | None = None  # restored from a checkpoint, for the next train loader

    # ----------------------------------------------------------------------------------------------- setup
    def _processor(self) -> Any:
        if isinstance(self.processor, (str, os.PathLike)):
            from ..models.multimodal_language_model import MultimodalProcessor

            self.processor = MultimodalProcessor.from_pretrained(self.processor)
        if self.processor is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self.processor = getattr(module, "processor", None)
        if self.processor is None:
            raise ValueError("MultimodalDataModule has no processor: pass processor=... or use a LightningModule "
                             "with a .processor attribute.")
        return self.processor

    def collator(self, split: str = "train", generate: bool = False, **overrides: Any) -> MultimodalCollator:
        """The collator of a split (``generate``: left-padded prompts with reference answers; val/test batches
        also carry prompts and answers for generated exact match); ``overrides``: other collator fields."""
        spec = self.specs.get(split)
        fields = {"max_length": self.max_length, "on_too_long": self.on_too_long, **overrides}
        return MultimodalCollator(
            self._processor(), **fields,
            padding_side="left" if generate else "right", generate=generate,
            with_prompts=split in ("val", "test") and self.eval_prompts,
            base_dir=media_dir(spec), **self.collator_kwargs,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":  # a new fit starts at the first batch, unless a checkpoint says otherwise
            self._train_loader, self._train_position = None, None
        for split, spec in self.specs.items():
            if spec is None or split in self.datasets or split in self.streams:
                continue
            if is_streamed(spec):
                self.streams[split] = self._stream(split, spec)
                continue
            dataset = load_split(spec, self._placeholder() if getattr(spec, "format", None) else None)
            if self.preprocess:
                dataset, self.encoded[split] = self._fit_lengths(split, dataset, self._encode(split, dataset))
            elif self.group_by_length and split == "train" or self.max_length and self.on_too_long == "skip":
                dataset = self._measure(split, dataset)
            self.datasets[split] = dataset

    def _placeholder(self) -> str | None:
        """The model's image placeholder token (for the readers of data formats)."""
        processor = self._processor()
        fields = {**default_fields(list(processor.tokens)), **dict(self.collator_kwargs["fields"] or {})}
        return next((processor.tokens[key] for key, name in fields.items() if name == "images"), None)

    def _stream(self, split: str, spec: DatasetSpec) -> Any:
        """The stream of a streamed split (train only; no packing or length grouping)."""
        if split != "train":
            raise ValueError(f"The {split} split is streamed (streaming: true or path: shards), but only the train "
                             f"split streams: {split} reads its whole split in order at every pass, with generation "
                             f"prompts and answers; read it map-style (e.g. path: json, format: llava; cache_dir keeps "
                             f"its encoded samples on disk).")
        if self.pack or self.group_by_length:
            raise ValueError("A streamed train split cannot be packed or grouped by length (both need every "
                             "sample's length before the epoch starts): set pack and group_by_length to false.")
        return open_stream(spec, self._placeholder(), self.shuffle_buffer, self.seed, self.collator(split))

    def _encode(self, split: str, dataset: Dataset) -> Dataset:
        """The split encoded once (:func:`~cornstarch.data.encoded.encode_split`); an empty split raises first."""
        if len(dataset) == 0:
            raise ValueError(f"The {split} data has no samples.")
        return encode_split(dataset, self.collator(split, generate=split == "predict", max_length=None), split,
                            self._cache_file(split, "encoded"))

    def _cache_file(self, split: str, stage: str) -> str | None:
        """Where ``cache_dir`` keeps a split's encoded samples (``None`` without a ``cache_dir``)."""
        if self.cache_dir is None:
            return None
        os.makedirs(self.cache_dir, exist_ok=True)
        return os.path.join(self.cache_dir, f"{split}-{stage}.arrow")

    def _fit_lengths(self, split: str, dataset: Dataset, encoded: Dataset) -> tuple[Dataset, Dataset]:
        """Exact lengths of encoded samples; over-long ones raise or are dropped from both the samples and their
        encodings (``on_too_long="skip"``, logged)."""
        lengths = encoded_lengths(encoded)
        if self.max_length is not None:
            too_long_rows = np.flatnonzero(lengths > self.max_length)
            self.skipped[split] = len(too_long_rows)
            if len(too_long_rows):
                first = int(too_long_rows[0])
                error = too_long(first, encoded[first]["input_ids"], self.max_length, self._processor().token_ids,
                                 self.collator_kwargs["fields"])
                if self.on_too_long == "error":
                    raise error
                log.warning("%s: skipped %d of %d samples longer than max_length=%d; the first: %s", split,
                            len(too_long_rows), len(lengths), self.max_length, error)
                keep = np.flatnonzero(lengths <= self.max_length)
                kept = self._cache_file(split, "kept")
                dataset = dataset.select(keep)
                encoded = encoded.select(keep).flatten_indices(keep_in_memory=kept is None, cache_file_name=kept)
                lengths = lengths[keep]
        self.lengths[split] = lengths.tolist()
        return dataset, encoded

    def _measure(self, split: str, dataset: Dataset) -> Dataset:
        """Compute lengths (for grouping); over-long samples raise, naming the first, or are dropped
        (``on_too_long="skip"``), logging the count and the first."""
        collate = self.collator(split, max_length=None)
        lengths = sample_lengths(dataset, collate)
        first = next((i for i, n in enumerate(lengths) if self.max_length and n > self.max_length), None)
        if self.max_length and self.on_too_long == "skip":
            self.skipped[split] = 0
        if first is not None:
            ids = collate.encode([{**dataset[first], INDEX_KEY: first}])["input_ids"][0]  # the first alone, named
            error = too_long(first, ids, self.max_length, collate.processor.token_ids, collate.fields)
            if self.on_too_long == "error":
                raise error
            keep = [i for i, n in enumerate(lengths) if n <= self.max_length]
            self.skipped[split] = len(lengths) - len(keep)
            log.warning("%s: skipped %d of %d samples longer than max_length=%d; the first: %s", split,
                        self.skipped[split], len(lengths), self.max_length, error)
            dataset = dataset.select(keep)
            lengths = [lengths[i] for i in keep]
        self.lengths[split] = lengths
        return dataset

    # ----------------------------------------------------------------------------------------------- loaders
    def _loader(self, split: str, generate: bool = False) -> DataLoader:
        if split not in self.datasets and split not in self.streams:
            self.setup()
        if split in self.streams:
            collate = self.collator(split)
            if getattr(self.streams[split], "encoded", False):  # encoded shards: only padded
                collate = EncodedSamples(collate)
            stream = StreamingBatches(self.streams[split], self.batch_size, WithSupervisedPositions(collate),
                                      **self._ranks())
            return self._resuming(StreamingLoader(stream, num_workers=self.num_workers,
                                                  epoch_length=self._epoch_length))
        if split not in self.datasets:
            raise ValueError(f"No {split} data: pass {split}=DatasetSpec(...) to MultimodalDataModule.")
        train = split == "train"
        collator = self.collator(split, generate=generate)
        if self.preprocess:
            dataset, collate = EncodedDataset(self.encoded[split]), EncodedCollate(collator)
        else:
            dataset, collate = IndexedDataset(self.datasets[split]), collator
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if not train:
            return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=collate, **workers)
        ranks = self._ranks()
        batch_size = self.batch_size
        if self.pack:  # the sampler yields whole batches (rows of packed samples)
            sampler = PackedBatchSampler(self._lengths("train"), self.max_length, self.batch_size, seed=self.seed,
                                         **ranks)
            dataset, batch_size = BatchIndexed(dataset), None
            collate = PackingCollate(collate, self.max_length, collator.pad_token_id)
        elif self.group_by_length:
            sampler = LengthGroupedSampler(self.lengths["train"], self.batch_size, seed=self.seed, **ranks)
        else:
            sampler = EpochShuffleSampler(len(self.datasets[split]), seed=self.seed, **ranks)
        return self._resuming(ResumableLoader(dataset, batch_size=batch_size, sampler=sampler,
                                              collate_fn=WithSupervisedPositions(collate),
                                              epoch_length=self._epoch_length, **workers))

    def _resuming(self, loader: ResumableLoader) -> ResumableLoader:
        """The new train loader, placed where the last one was (or where a checkpoint says)."""
        if self._train_loader is not None:  # a reloaded loader goes on where the last one was
            loader.load_state_dict(self._train_loader.state_dict())
        elif self._train_position is not None:
            loader.load_state_dict(self._train_position)
        self._train_loader, self._train_position = loader, None
        return loader

    # ----------------------------------------------------------------------------------------------- resume
    def _epoch_length(self) -> int | None:
        """Train batches per epoch as the trainer runs them (``limit_train_batches``), once it knows."""
        batches = getattr(getattr(self, "trainer", None), "num_training_batches", None)
        return int(batches) if batches is not None and 0 < batches < float("inf") else None

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the train data (saved in every checkpoint; see :class:`ResumableLoader`)."""
        if self._train_loader is None:
            return {}
        return {"train_position": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the train data where the checkpoint was taken, mid-epoch included. Lightning restores the data
        module before it asks for loaders (after, under strategies that restore after setup: then the loader
        already built is moved)."""
        position = state.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(position)
        else:
            self._train_position = position

    def _lengths(self, split: str) -> list[int]:
        """Token lengths of a split's samples (measured at setup when not preprocessed)."""
        if split not in self.lengths:
            self.datasets[split] = self._measure(split, self.datasets[split])
        return self.lengths[split]

    def _ranks(self) -> dict[str, int]:
        """``num_replicas``/``rank`` of the data-parallel group the trainer runs in (one process: empty).

        The training samplers deal one global order out to the ranks, so ``devices=n`` with ``batch_size=b``
        trains on the batches a single process with ``batch_size=n*b`` would.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return {}
        kwargs = trainer.distributed_sampler_kwargs or {}
        return {"num_replicas": kwargs.get("num_replicas", trainer.world_size),
                "rank": kwargs.get("rank", trainer.global_rank)}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", generate=True)
