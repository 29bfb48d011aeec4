"""The ``cornstarch`` command: LightningCLI(MultimodalLitModule, MultimodalDataModule) plus ``export`` and
``prepare``.

    cornstarch fit --config experiments/digits_vlm.yaml
    cornstarch validate --config experiments/digits_vlm.yaml --ckpt_path runs/digits_vlm/checkpoints/last.ckpt
    cornstarch export --config experiments/digits_vlm.yaml --ckpt_path ... --output_dir exported/
    cornstarch export --config experiments/gpu/llava15_7b_finetune.yaml --ckpt_path ... --format hf
    cornstarch prepare --config my_llava.yaml --output_dir data/shards   # data.train's JSON → encoded tar shards
    cornstarch fit --config experiments/digits_vlm.yaml --ckpt_path last   # resume; an error if there is none
    cornstarch fit --config experiments/digits_vlm.yaml --ckpt_path auto   # resume if possible (requeued jobs)

Checkpoints are written atomically, ``last.ckpt`` is always the newest state, SIGTERM/SIGINT save it and exit
143/130, and a non-finite loss stops training: see :mod:`cornstarch.lit.checkpointing`. On Linux the command first
makes glibc keep freed host memory for reuse between steps (:mod:`cornstarch.lit.host_memory`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import MultimodalDataModule
from . import cluster
from .checkpointing import AtomicCheckpointIO, Checkpoint, CheckpointError, atomic_path, read_checkpoint
from .host_memory import keep_freed_host_memory
from .nonfinite import NonFiniteGuard
from .signals import StopOnSignal
from .module import MultimodalLitModule

SPECIAL_CKPT = {"last", "auto", "best", "hpc", "registry"}
log = logging.getLogger(__name__)


def load_model_state(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unsharded) module ``state_dict`` of a Lightning checkpoint: a single file (single process, DDP,
    FSDP with a gathered checkpoint) or a distributed checkpoint directory (FSDP2/FSDP1 sharded), read on CPU
    without any process group.

    Raises:
        FileNotFoundError: if ``ckpt_path`` does not exist.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        return read_checkpoint(path, lambda: _load_distributed_checkpoint(path))["state_dict"]
    return read_checkpoint(path)["state_dict"]


class CornstarchTrainer(L.Trainer):
    """A Lightning ``Trainer`` whose checkpoints are atomic, with ``export`` and strict resuming.

    Beyond ``L.Trainer``: every checkpoint is written under a temporary name in its directory and renamed into
    place (:func:`~cornstarch.lit.checkpointing.atomic_path`); :class:`~cornstarch.lit.signals.StopOnSignal`
    and :class:`~cornstarch.lit.nonfinite.NonFiniteGuard` are added unless given; a
    :class:`~cornstarch.lit.checkpointing.Checkpoint` without ``dirpath`` writes to ``<default_root_dir>/checkpoints``;
    ``fit(ckpt_path="last")`` fails when there is no ``last.ckpt`` and ``ckpt_path="auto"`` resumes from it if
    there is one; the cluster settings of :mod:`cornstarch.lit.cluster` apply.

    Args:
        collective_timeout: seconds a collective (or joining the process group) may wait before the rank fails
            with an error (Lightning's default: 30 minutes); for ``ddp``, ``fsdp2`` and ``fsdp1``.
        callbacks, *args, **kwargs: ``lightning.Trainer``'s.
    """

    def __init__(self, *args: Any, callbacks: list[L.Callback] | L.Callback | None = None,
                 collective_timeout: float | None = None, **kwargs: Any):
        if not isinstance(callbacks, (list, tuple)):
            callbacks = [] if callbacks is None else [callbacks]
        callbacks = list(callbacks)
        callbacks += [cls() for cls in (StopOnSignal, NonFiniteGuard) if not any(isinstance(c, cls) for c in callbacks)]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:
            self.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in self.checkpoint_callbacks:
            if isinstance(callback, Checkpoint):
                callback.default_dirpath(self)
        cluster.configure(self, collective_timeout)

    def save_checkpoint(self, filepath: Any, weights_only: bool | None = None, storage_options: Any = None) -> None:
        """``L.Trainer.save_checkpoint``, written under a temporary name next to ``filepath`` and renamed into place
        once complete (all ranks write a sharded checkpoint's files; the global-zero rank renames)."""
        if self.model is None:
            return super().save_checkpoint(filepath, weights_only, storage_options)
        with atomic_path(filepath, write=self.is_global_zero) as tmp:
            self.strategy.barrier("atomic_save_start")  # the stale temporary is gone before any rank writes
            super().save_checkpoint(tmp, weights_only, storage_options)
        self.strategy.barrier("atomic_save_end")

    def last_checkpoint(self) -> str | None:
        """The newest ``last*.ckpt`` in the checkpoint callbacks' directories, or ``None``."""
        found = [path for callback in self.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
                 and callback.dirpath for path in Path(callback.dirpath).glob("last*.ckpt")]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None

    def _resolve(self, ckpt_path: str | None, fresh_allowed: bool = False) -> str | None:
        """``"last"`` (and, where ``fresh_allowed``, ``"auto"``) as the newest ``last.ckpt``; other values as given.

        Raises:
            CheckpointError: for ``"last"`` with no ``last.ckpt`` in the checkpoint directories.
        """
        if ckpt_path not in ("last", "auto") or (ckpt_path == "auto" and not fresh_allowed):
            return ckpt_path
        found = self.last_checkpoint()
        if found is None and ckpt_path == "last":
            dirs = [str(c.dirpath) for c in self.checkpoint_callbacks if getattr(c, "dirpath", None)]
            raise CheckpointError(
                f"--ckpt_path last: there is no last.ckpt in {dirs or 'any checkpoint directory'} (relative to "
                f"{os.getcwd()}). Run from the first run's directory or set --trainer.default_root_dir to it; to "
                f"start fresh, leave out --ckpt_path (or pass --ckpt_path auto: resume if a last.ckpt exists).")
        log.info("Resuming from %s", found) if found else log.info("No last.ckpt yet: training from scratch")
        return found

    def fit(self, model: Any, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """``L.Trainer.fit``; ``ckpt_path="last"`` must find a ``last.ckpt``, ``"auto"`` uses one if it exists.

        Raises:
            CheckpointError: for ``"last"`` with no ``last.ckpt`` in the checkpoint directories, or a checkpoint
                that cannot be read.
        """
        return super().fit(model, *args, ckpt_path=self._resolve(ckpt_path, fresh_allowed=True), **kwargs)

    def validate(self, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        """``L.Trainer.validate``; ``ckpt_path="last"`` must find a ``last.ckpt`` (raises ``CheckpointError``)."""
        return super().validate(*args, ckpt_path=self._resolve(ckpt_path), **kwargs)

    def test(self, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        """``L.Trainer.test``; ``ckpt_path="last"`` must find a ``last.ckpt`` (raises ``CheckpointError``)."""
        return super().test(*args, ckpt_path=self._resolve(ckpt_path), **kwargs)

    def predict(self, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        """``L.Trainer.predict``; ``ckpt_path="last"`` must find a ``last.ckpt`` (raises ``CheckpointError``)."""
        return super().predict(*args, ckpt_path=self._resolve(ckpt_path), **kwargs)

    def export(self, model: MultimodalLitModule, datamodule: Any = None, ckpt_path: str | None = None,
               output_dir: str = "exported", merge_lora: bool = True, weights_only: bool | None = None,
               format: Literal["cornstarch", "hf"] = "cornstarch") -> str:
        """Write the trained model and its processor as ``save_pretrained`` directories.

        Args:
            model: the module (built from the config).
            datamodule: unused (accepted so the same config file works).
            ckpt_path: the Lightning checkpoint to export (a file, or the directory a distributed ``fsdp2`` run
                writes: its shards are consolidated here); ``None`` exports the config's initial weights.
            output_dir: the directory; ``MultimodalModel.from_pretrained`` and ``MultimodalProcessor.from_pretrained``
                load it (``format="cornstarch"``), or transformers' ``AutoModelForImageTextToText`` (or the native
                audio class) and ``AutoProcessor`` do (``format="hf"``).
            merge_lora: fold LoRA adapters into the LM weights (``"hf"`` always merges them).
            weights_only: accepted so a config printed by ``fit --print_config`` works; checkpoints are read fully.
            format: ``"cornstarch"``, or ``"hf"``: the native transformers classes (``MultimodalModel.to_hf``).

        Returns:
            ``output_dir``.

        Raises:
            ValueError: with ``format="hf"``, naming the part of the model or processor that has no native class.
        """
        if ckpt_path is not None:
            model.load_state_dict(load_model_state(ckpt_path))
        mllm = model.model
        if (merge_lora or format == "hf") and hasattr(mllm.language_model, "merge_and_unload"):
            mllm.language_model = mllm.language_model.merge_and_unload()
        if format == "hf":
            native, processor = mllm.to_hf(), model.processor.to_hf()  # both checked before anything is written
            native.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
        else:
            mllm.save_pretrained(output_dir)
            model.processor.save_pretrained(output_dir)
        print(f"Exported model and processor to {output_dir} ({format})")
        return output_dir


    def prepare(self, model: MultimodalLitModule, datamodule: MultimodalDataModule, output_dir: str,
                split: str = "train", encode: bool = True, samples_per_shard: int = 1000) -> dict[str, Any]:
        """Convert a split's LLaVA / ShareGPT / messages JSON and its images into tar shards for streaming
        (:func:`~cornstarch.data.prepare.prepare_split`), with a progress bar; rows with a corrupt or missing image
        (or otherwise bad) are skipped, counted and listed in ``output_dir/report.json``.

        Args:
            model: the module (built from the config): its processor encodes the samples.
            datamodule: the data module; ``data.{split}`` names the JSON file, its ``format`` and ``image_root``.
            output_dir: the folder for the shards; train on them with ``data.train: {path: shards, data_dir: ...}``.
            split: the split to convert.
            encode: write encoded samples (token ids, labels, processed pixels; the default: streaming only reads
                and pads them, for this processor only); ``false``: raw samples, processed while training.
            samples_per_shard: samples per tar shard.

        Returns:
            The report (see :func:`~cornstarch.data.prepare.prepare`).
        """
        from ..data.prepare import prepare_split, summary

        if datamodule.processor is None:
            datamodule.processor = model.processor
        report = prepare_split(datamodule, output_dir, split, encode, samples_per_shard)
        print(summary(report, output_dir))
        return report


class CornstarchCLI(LightningCLI):
    """LightningCLI with ``export``, ``prepare`` and a clear error for a checkpoint path that does not exist."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}, "prepare": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, {}) if self.subcommand else self.config
        ckpt = config.get("ckpt_path") if hasattr(config, "get") else None
        if ckpt and ckpt not in SPECIAL_CKPT and not os.path.exists(ckpt):
            raise FileNotFoundError(f"--ckpt_path {ckpt!r} does not exist.")

    def before_fit(self) -> None:
        # a requeued SLURM job resumes where it stopped, with the same command; an unreadable checkpoint is refused
        config = self.config_init["fit"]
        config["ckpt_path"] = cluster.fit_ckpt_path(self.trainer, config.get("ckpt_path"))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``cornstarch`` console script.

    Raises:
        SystemExit: with ``128 + signal number`` after a signal stopped training and a checkpoint was saved
            (SIGTERM 143, SIGINT 130, SLURM's requeue signal), so a preempted run never exits 0.
    """
    keep_freed_host_memory()
    try:
        cli = CornstarchCLI(MultimodalLitModule, MultimodalDataModule, trainer_class=CornstarchTrainer,
                            save_config_kwargs={"overwrite": True}, args=args)
    except (SystemExit, KeyboardInterrupt):
        cluster.finish(None)
        if StopOnSignal.exit_code() is None:
            raise
        sys.exit(StopOnSignal.exit_code())
    cluster.finish(cli.trainer)


if __name__ == "__main__":
    main()
