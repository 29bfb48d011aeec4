"""The ``cornstarch`` command: LightningCLI(MultimodalLitModule, MultimodalDataModule) plus ``export``.

    cornstarch fit --config experiments/digits_vlm.yaml
    cornstarch validate --config experiments/digits_vlm.yaml --ckpt_path runs/digits_vlm/checkpoints/last.ckpt
    cornstarch export --config experiments/digits_vlm.yaml --ckpt_path ... --output_dir exported/
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import MultimodalDataModule
from . import cluster
from .module import MultimodalLitModule

SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


def load_model_state(ckpt_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unsharded) module ``state_dict`` of a Lightning checkpoint: a single file (single process, DDP,
    FSDP with a gathered checkpoint) or a distributed checkpoint directory (FSDP2/FSDP1 sharded), read on CPU
    without any process group.

    Raises:
        FileNotFoundError: if ``ckpt_path`` does not exist.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    if path.is_dir():
        return _load_distributed_checkpoint(path)["state_dict"]
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class CornstarchTrainer(L.Trainer):
    """A Lightning ``Trainer`` with an ``export`` entry point and the cluster settings of :mod:`cornstarch.lit.cluster`.

    Args:
        collective_timeout: seconds a collective (or joining the process group) may wait before the rank fails
            with an error (Lightning's default: 30 minutes); for ``ddp``, ``fsdp2`` and ``fsdp1``.
        *args, **kwargs: ``lightning.Trainer``'s.
    """

    def __init__(self, *args: Any, collective_timeout: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cluster.configure(self, collective_timeout)

    def export(self, model: MultimodalLitModule, datamodule: Any = None, ckpt_path: str | None = None,
               output_dir: str = "exported", merge_lora: bool = True, weights_only: bool | None = None) -> str:
        """Write the trained model and its processor as ``save_pretrained`` directories.

        Args:
            model: the module (built from the config).
            datamodule: unused (accepted so the same config file works).
            ckpt_path: the Lightning checkpoint to export (a file, or the directory a distributed ``fsdp2`` run
                writes: its shards are consolidated here); ``None`` exports the config's initial weights.
            output_dir: the directory; ``MultimodalModel.from_pretrained`` and ``MultimodalProcessor.from_pretrained``
                load it.
            merge_lora: fold LoRA adapters into the LM weights.
            weights_only: accepted so a config printed by ``fit --print_config`` works; checkpoints are read fully.

        Returns:
            ``output_dir``.
        """
        if ckpt_path is not None:
            model.load_state_dict(load_model_state(ckpt_path))
        mllm = model.model
        if merge_lora and hasattr(mllm.language_model, "merge_and_unload"):
            mllm.language_model = mllm.language_model.merge_and_unload()
        mllm.save_pretrained(output_dir)
        model.processor.save_pretrained(output_dir)
        print(f"Exported model and processor to {output_dir}")
        return output_dir


class CornstarchCLI(LightningCLI):
    """LightningCLI with ``export`` and a clear error for a checkpoint path that does not exist."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

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
    """Entry point of the ``cornstarch`` console script."""
    cli = CornstarchCLI(MultimodalLitModule, MultimodalDataModule, trainer_class=CornstarchTrainer,
                        save_config_kwargs={"overwrite": True}, args=args)
    cluster.finish(cli.trainer)


if __name__ == "__main__":
    main()
