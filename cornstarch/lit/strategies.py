"""Distributed strategies for multimodal models, chosen with ``--trainer.strategy``.

- ``ddp`` (Lightning's): :func:`prepare_strategy` turns on ``find_unused_parameters`` unless the user set it
  (HF towers have parameters the loss never reaches: the last layer when features come from layer -2, CLIP's
  ``post_layernorm``), and :func:`after_freeze_change` rebuilds the DDP wrapper at a freeze-schedule transition
  (DDP's reducer only knows the parameters that required grad when it was built).
- ``fsdp2``: :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with all devices data-parallel; the
  module's ``configure_model`` shards the units of :mod:`cornstarch.lit.sharding`.
- ``fsdp1``: :class:`MultimodalFSDPStrategy`, Lightning's ``FSDPStrategy`` (GPU only) with the auto-wrap and
  activation-checkpointing policies derived from the model.

Importing ``cornstarch.lit`` (the ``cornstarch`` command does) registers ``fsdp2`` and ``fsdp1`` in Lightning's
``StrategyRegistry``; importing ``cornstarch`` or ``cornstarch.models`` imports no Lightning at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .sharding import fsdp1_policies, refresh_fsdp2

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all devices: Lightning's ``ModelParallelStrategy`` without tensor parallelism.

    The LightningModule's ``configure_model`` applies the sharding (``MultimodalLitModule`` does it from the
    model's own layer classes). Resuming restores the freeze-schedule stage (and the optimizer groups it implies)
    before the sharded optimizer state is loaded into them.

    Args:
        save_distributed_checkpoint: each rank writes its shard (a checkpoint directory); ``False`` gathers one
            file on rank 0. ``cornstarch export`` reads both.
        **kwargs: ``ModelParallelStrategy``'s (``process_group_backend``, ``timeout``).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # all processes, not (as Lightning's default) one per node
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        module = self.lightning_module
        stage = _saved_stage(Path(checkpoint_path))
        if stage is not None and hasattr(module, "restore_stage"):
            module.restore_stage(stage)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        fill_adam_state(getattr(optimizer, "_optimizer", optimizer))
        return super().optimizer_state(optimizer)


def fill_adam_state(optimizer: Any) -> None:
    """Give every parameter of an Adam/AdamW optimizer a state, zeros at step 0 where it has none yet.

    Parameters that never received a gradient (a tower's last layer when features come from layer -2) have no
    state; a distributed checkpoint then lacks their entries, while the optimizer it is loaded into expects them
    (torch initialises every state before loading). A zero state at step 0 is exactly what Adam creates at its
    first gradient, so filling it changes no update.
    """

    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
                optimizer.state[p] = state


def _saved_stage(path: Path) -> int | None:
    """The ``cornstarch_stage`` a checkpoint (file, or distributed checkpoint directory) was saved in."""

    meta = path / _METADATA_FILENAME if path.is_dir() else path
    if not meta.is_file():
        return None
    return torch.load(meta, map_location="cpu", weights_only=False).get("cornstarch_stage")


class MultimodalFSDPStrategy(FSDPStrategy):
    """FSDP1 with units derived from the model: Lightning's ``FSDPStrategy`` (GPU only).

    At wrap time the auto-wrap policy (encoder/decoder layers from ``_no_split_modules``, projectors, encoder
    wrappers), the activation-checkpointing policy (the same layers, when ``activation_checkpointing=True``) and
    ``use_orig_params`` come from :func:`cornstarch.lit.sharding.fsdp1_policies`. A policy given explicitly wins.

    Args:
        activation_checkpointing: recompute the layers' activations in backward.
        **kwargs: ``FSDPStrategy``'s.

    Raises:
        ValueError: at setup, for a freeze schedule that changes which parameters train (FSDP1 fixes
            ``requires_grad`` per flat parameter at wrap time; use ``fsdp2``).
    """

    def __init__(self, activation_checkpointing: bool = False, **kwargs: Any):
        self._derive_wrap = "auto_wrap_policy" not in kwargs
        self._derive_checkpointing = activation_checkpointing and "activation_checkpointing_policy" not in kwargs
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        mllm = getattr(model, "model", None)
        if mllm is not None and hasattr(mllm, "encoders"):
            _refuse_transitions(model)
            wrap, checkpointing, orig = fsdp1_policies(mllm)
            if self._derive_wrap:
                self.kwargs["auto_wrap_policy"] = wrap
            if self._derive_checkpointing:
                self._activation_checkpointing_kwargs = {"auto_wrap_policy": checkpointing}
            self.kwargs["use_orig_params"] = orig
        return super()._setup_model(model)


def _refuse_transitions(module: Any) -> None:
    schedule = getattr(module, "schedule", None)
    if schedule is None:
        return
    sets = {frozenset(s.train) for s in schedule.stages}
    if len(sets) > 1:
        raise ValueError(
            "fsdp1 (FSDPStrategy) cannot change which parameters train after wrapping, but the freeze schedule has "
            f"{len(schedule.stages)} stages training different components; use --trainer.strategy fsdp2, or train "
            "each stage as its own run."
        )


# ------------------------------------------------------------------------------------------------ hooks
def world_size(trainer: L.Trainer | None) -> int:
    return 1 if trainer is None else trainer.world_size


def sharded_fsdp1(trainer: L.Trainer | None) -> bool:
    """Whether the model is sharded by FSDP1 over several ranks (generation must then keep ranks in step)."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1


def prepare_strategy(trainer: L.Trainer) -> None:
    """Called from the module's ``setup``, before the strategy wraps the model.

    DDP: ``find_unused_parameters=True`` unless given (towers have parameters the loss does not reach).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)


def after_freeze_change(trainer: L.Trainer) -> None:
    """Make the strategy follow a ``requires_grad`` change (a freeze-schedule transition during ``fit``).

    DDP: a new ``DistributedDataParallel`` wrapper, so the reducer all-reduces exactly the parameters that train
    now (parameters unfrozen later would otherwise never be averaged, and ones frozen later make DDP fail).
    FSDP2: units are per component, so requires_grad flips whole units; each unit re-derives its gradient dtypes.
    """

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        old = strategy.model
        old._remove_autograd_hooks()  # the old reducer must not all-reduce anything any more
        strategy.model = strategy._setup_model(old.module)
        del old
        strategy._register_ddp_hooks()
        log.info("DDP wrapper rebuilt for the new freeze stage")
    elif isinstance(strategy, ModelParallelStrategy):
        refresh_fsdp2(strategy.lightning_module)


def register() -> None:
    """Register ``fsdp2`` and ``fsdp1`` with Lightning (idempotent)."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy,
                                  description="FSDP2: fully_shard per encoder/decoder layer, projector and root")
    if "fsdp1" not in StrategyRegistry:
        StrategyRegistry.register("fsdp1", MultimodalFSDPStrategy,
                                  description="FSDP1 with wrap units derived from the multimodal model (GPU)")


register()
