"""MultimodalDataModule: Hugging Face ``datasets`` splits → collated multimodal batches, for Lightning."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from datasets import Dataset, load_dataset
from datasets import Image as ImageFeature
from torch.utils.data import DataLoader

from ..models.multimodal_language_model.import_paths import resolve
from .collator import MultimodalCollator, field_values
from .sampling import EpochShuffleSampler, LengthGroupedSampler

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "predict")


@dataclass
class DatasetSpec:
    """Where one split's samples come from.

    Args:
        path: ``"json"``, ``"imagefolder"``, ``"csv"``, ``"parquet"``, a local dataset directory or hub name
            (for ``datasets.load_dataset``), or ``"module:function"`` returning a ``datasets.Dataset``
            (e.g. ``"cornstarch.data.demo:digits_vlm_dataset"``).
        data_files: files for ``json``/``csv``/``parquet`` (relative media paths are relative to the first file).
        data_dir: directory for ``imagefolder`` (with ``metadata.jsonl``).
        split: the split to read (``"train"``, ``"test"``, …), also passed to a ``module:function``.
        name: the dataset configuration name, if any.
        limit: keep only the first ``limit`` samples.
        kwargs: extra keyword arguments for ``load_dataset`` or the function.
    """

    path: str
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Dataset:
        """Load the split (offline sources need no network)."""
        if ":" in self.path and not os.path.exists(self.path):
            dataset = resolve(self.path)(split=self.split, **self.kwargs)
        else:
            dataset = load_dataset(self.path, self.name, data_files=self.data_files, data_dir=self.data_dir,
                                   split=self.split, **self.kwargs)
        return dataset.select(range(min(self.limit, len(dataset)))) if self.limit is not None else dataset

    @property
    def base_dir(self) -> str | None:
        """Directory that relative media paths in the data files are relative to."""
        files = self.data_files
        if isinstance(files, dict):
            files = next(iter(files.values()), None)
        if isinstance(files, (list, tuple)):
            files = files[0] if files else None
        return os.path.dirname(os.path.abspath(files)) if isinstance(files, str) else self.data_dir


class IndexedDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` whose rows carry their index as ``__index__`` (errors name it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[int(index)], "__index__": int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch in one Arrow read (the DataLoader uses it when present): far fewer Python calls."""
        columns = self.dataset[[int(i) for i in indices]]
        return [{**{k: v[j] for k, v in columns.items()}, "__index__": int(i)} for j, i in enumerate(indices)]


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
        sampling_rate: audio sampling rate expected by the audio processor.
        fields: modality key → sample field (default ``vision→images``, ``audio→audios``).
        processor_kwargs: extra keyword arguments for the encoder processors.
        eval_prompts: val/test batches also carry generation prompts and reference answers (for exact match).

    >>> # dm = MultimodalDataModule(train=DatasetSpec("json", data_files="train.jsonl"), processor=proc)
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
        sampling_rate: int = 16000,
        fields: dict[str, str] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        eval_prompts: bool = True,
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
        self.collator_kwargs = dict(fields=fields, sampling_rate=sampling_rate, processor_kwargs=processor_kwargs or {})
        self.datasets: dict[str, Dataset] = {}
        self.lengths: dict[str, list[int]] = {}
        self.skipped: dict[str, int] = {}

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

    def collator(self, split: str = "train", generate: bool = False) -> MultimodalCollator:
        """The collator of a split (``generate``: left-padded prompts with reference answers; val/test batches
        also carry prompts and answers for generated exact match)."""
        spec = self.specs.get(split)
        return MultimodalCollator(
            self._processor(), max_length=self.max_length, on_too_long=self.on_too_long,
            padding_side="left" if generate else "right", generate=generate,
            with_prompts=split in ("val", "test") and self.eval_prompts,
            base_dir=spec.base_dir if isinstance(spec, DatasetSpec) else None, **self.collator_kwargs,
        )

    def setup(self, stage: str | None = None) -> None:
        for split, spec in self.specs.items():
            if spec is None or split in self.datasets:
                continue
            dataset = spec.load() if isinstance(spec, DatasetSpec) else spec
            if self.group_by_length and split == "train" or self.max_length and self.on_too_long == "skip":
                dataset = self._measure(split, dataset)
            self.datasets[split] = dataset

    def _measure(self, split: str, dataset: Dataset) -> Dataset:
        """Compute lengths (for grouping) and drop over-long samples (``on_too_long="skip"``), logging the count."""
        collator = self.collator(split)
        fields = collator.fields
        light = _without_decoding(dataset)
        rows = [dict(r, __index__=i) for i, r in enumerate(light)]
        items = [{key: len(field_values(r, name)) for key, name in fields.items()} for r in rows]
        for key in fields:
            first = next((i for i, its in enumerate(items) if its[key]), None)
            if first is not None:
                collator.remember_item_count(key, {**dataset[first], "__index__": first})
        lengths = collator.lengths(rows, items)
        if self.max_length and self.on_too_long == "skip":
            keep = [i for i, n in enumerate(lengths) if n <= self.max_length]
            self.skipped[split] = len(lengths) - len(keep)
            if self.skipped[split]:
                log.warning("%s: skipped %d of %d samples longer than max_length=%d", split, self.skipped[split],
                            len(lengths), self.max_length)
                dataset = dataset.select(keep)
                lengths = [lengths[i] for i in keep]
        self.lengths[split] = lengths
        return dataset

    # ----------------------------------------------------------------------------------------------- loaders
    def _loader(self, split: str, generate: bool = False) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ValueError(f"No {split} data: pass {split}=DatasetSpec(...) to MultimodalDataModule.")
        train = split == "train"
        sampler = None
        ranks = self._ranks()
        if train and self.group_by_length:
            sampler = LengthGroupedSampler(self.lengths["train"], self.batch_size, seed=self.seed, **ranks)
        elif train:
            sampler = EpochShuffleSampler(len(self.datasets[split]), seed=self.seed, **ranks)
        return DataLoader(
            IndexedDataset(self.datasets[split]), batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collator(split, generate=generate), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _ranks(self) -> dict[str, int]:
        """``num_replicas``/``rank`` of the data-parallel group the trainer runs in (one process: empty).

        The training samplers deal one global order out to the ranks, so ``devices=n`` with ``batch_size=b``
        trains on the batches a single process with ``batch_size=n*b`` would.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return {}
        kwargs = trainer.distributed_sampler_kwargs or {}
        return {"num_replicas": kwargs.get("num_replicas", trainer.world_size), "rank": kwargs.get("rank", trainer.global_rank)}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", generate=True)


def _undecoded(feature: Any) -> Any:
    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(_undecoded(inner), ImageFeature):
        return type(feature)(_undecoded(inner))
    return None


def _without_decoding(dataset: Dataset) -> Dataset:
    """The dataset with image columns (single or lists) left undecoded: counting items needs no pixels."""
    for name, feature in dataset.features.items():
        light = _undecoded(feature)
        if light is not None:
            dataset = dataset.cast_column(name, light)
    return dataset
