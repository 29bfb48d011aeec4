"""A non-finite loss or gradient stops training (or skips the step), and NaN weights are never checkpointed."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A device bool: every element of every tensor (a DTensor's local shard) is finite; ``None`` for no tensors.
    The max-abs norm is finite exactly when all elements are (a 2-norm can overflow on finite values)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return None
    return torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()


class NonFiniteGuard(L.Callback):
    """Detect a non-finite training loss or gradient on the step it happens, and never checkpoint it.

    Args:
        policy: ``"stop"``: raise :class:`NonFiniteError` naming the first bad step; on GPU the check accumulates a
            flag on the device and reads it only every ``check_every_n_steps`` steps and before each checkpoint
            (no host sync per step), so a stop can come up to that many steps late, but no checkpoint after the bad
            step is written. ``"skip"``: drop the update of a step whose gradient is not finite (no parameter or
            optimizer state changes) and go on; this reads the flag every step (one host sync per step), and
            stops after ``max_skips`` consecutive skips.
        check_every_n_steps: how often ``"stop"`` reads the flag (default: the trainer's ``log_every_n_steps``).
        max_skips: consecutive skipped steps after which ``"skip"`` stops.

    Raises:
        ValueError: for an unknown policy.
        NonFiniteError: during training, as described.

    >>> NonFiniteGuard("skip").policy
    'skip'
    """

    def __init__(self, policy: str = "stop", check_every_n_steps: int | None = None, max_skips: int = 10):
        if policy not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard policy must be 'stop' or 'skip', got {policy!r}.")
        self.policy = policy
        self.check_every_n_steps = check_every_n_steps
        self.max_skips = max_skips
        self._first_bad: torch.Tensor | None = None  # the first step with a non-finite value, -1 if none
        self._skips = 0

    def _note(self, finite: torch.Tensor, step: int) -> None:
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        self._first_bad = torch.where(~finite & (self._first_bad < 0), step, self._first_bad)

    def _raise_if_bad(self, trainer: L.Trainer, what: str) -> None:
        if self._first_bad is None:
            return
        bad = int(trainer.strategy.reduce(self._first_bad.clone().float(), reduce_op="max").item())
        if bad >= 0:
            raise NonFiniteError(
                f"The training loss or gradient is not finite (NaN or inf) from step {bad}{what}. Training stopped; "
                f"no checkpoint after step {bad} was written. Lower the learning rate, check the data, or set "
                f"NonFiniteGuard(policy='skip').")

    @staticmethod
    def _grads_finite(pl_module: L.LightningModule) -> torch.Tensor | None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return None
        return _all_finite(grads)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's loss scaler skips steps with inf gradients itself
        finite = self._grads_finite(pl_module)
        if finite is None:
            return
        if self.policy == "stop":
            self._note(finite, trainer.global_step + 1)
            return
        bad = not bool(trainer.strategy.reduce_boolean_decision(bool(finite), all=True))
        if not bad:
            self._skips = 0
            return
        self._skips += 1
        log.warning("Step %d: non-finite gradient, update skipped (%d in a row)", trainer.global_step + 1,
                    self._skips)
        if self._skips > self.max_skips:
            self._note(finite, trainer.global_step + 1)
            self._raise_if_bad(trainer, f" ({self._skips} steps in a row were skipped)")
        for p in pl_module.parameters():
            p.grad = None  # AdamW leaves parameters without a gradient, and their state, untouched

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.policy == "stop" and isinstance(loss, torch.Tensor):
            self._note(loss.detach().isfinite().all(), trainer.global_step)
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if self.policy == "stop" and trainer.global_step % every == 0:
            self._raise_if_bad(trainer, "")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._raise_if_bad(trainer, " (found before writing a checkpoint)")
        finite = _all_finite([p.detach() for p in pl_module.parameters() if p.is_floating_point()])
        if finite is not None and not bool(trainer.strategy.reduce_boolean_decision(bool(finite), all=True)):
            raise NonFiniteError(f"The model's weights are not finite at step {trainer.global_step}: the checkpoint "
                                 f"was not written. Lower the learning rate or check the data.")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_bad(trainer, "")

    def state_dict(self) -> dict[str, Any]:
        return {"skips": self._skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skips = state_dict.get("skips", 0)
