"""Checkpoints that are never lost or truncated, and training that stops on signals and non-finite losses.

- :func:`atomic_path` / :class:`AtomicCheckpointIO`: every checkpoint (a file, or the directory of shards a sharded
  ``fsdp2`` run writes) is written under a hidden temporary name in its destination directory, synced to disk and
  renamed into place, so a kill or a full disk never leaves a truncated file under a checkpoint's name.
- :class:`Checkpoint`: a ``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state: written after every
  validation, every ``last_every_n_steps`` steps, at the end of ``fit`` and when SIGTERM or SIGINT stop training.
- :class:`StopOnSignal`: SIGTERM (how schedulers preempt) and SIGINT (Ctrl-C) finish the current step, save
  ``last.ckpt`` and exit with ``128 + signal`` (143, 130), so a preempted job never looks finished.
- :class:`NonFiniteGuard`: a non-finite loss or gradient stops training (or skips the step) and is never saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt) or a resume that has nothing to resume from."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------------- atomic writes
def _fsync(path: Path) -> None:
    """Flush a file, or every file of a directory and the directory itself, to disk."""
    paths = [path] if path.is_file() else [*(p for p in path.rglob("*") if p.is_file()), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def partial_path(path: str | os.PathLike) -> Path:
    """The hidden name a checkpoint is written under before it is renamed into place.

    >>> str(partial_path("runs/x/checkpoints/last.ckpt"))
    'runs/x/checkpoints/.last.ckpt.partial'
    """
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, write: bool = True) -> Iterator[Path]:
    """Write ``path`` (a file or a directory) under :func:`partial_path` in the same directory, then sync it and
    rename it into place: readers see the old checkpoint or the new one, never part of one.

    Args:
        path: the final name.
        write: whether this process writes and renames (the global-zero rank); others get the temporary name to
            write their shards to and leave the rename to that rank.

    Yields:
        the temporary path to write.

    Raises:
        whatever the write raises (a full disk: ``OSError``); the temporary is removed and ``path`` is untouched.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.ckpt") as tmp:
    ...     _ = tmp.write_text("state")
    >>> sorted(p.name for p in d.iterdir()), (d / "a.ckpt").read_text()
    (['a.ckpt'], 'state')
    """
    final = Path(path)
    tmp = partial_path(final)
    if not write:
        yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)  # left by a killed writer
    try:
        yield tmp
        _fsync(tmp)
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")  # a directory cannot replace a non-empty one in one rename
            _remove(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        _remove(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` without the staging copy: ``torch.save`` straight into the file it is given
    (:class:`CornstarchTrainer` gives it a temporary name next to the destination), and a load error that names the
    file.

    Raises:
        CheckpointError: on load, for a file that is not a readable checkpoint (truncated, corrupt).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, lambda: super(AtomicCheckpointIO, self).load_checkpoint(
            path, map_location=map_location, weights_only=weights_only))


def read_checkpoint(path: str | os.PathLike, load: Any = None) -> Any:
    """Load a checkpoint file (``load()``, default ``torch.load`` on CPU) and turn a read error into one naming it.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if it is not a readable checkpoint.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "bad.ckpt"
    >>> _ = bad.write_bytes(b"PK" + bytes(100))
    >>> read_checkpoint(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    cornstarch.lit.checkpointing.CheckpointError: Checkpoint '.../bad.ckpt' (102 bytes) cannot be read: it is truncated ...
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    if load is None:
        def load():
            return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return load()
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError, ImportError, TypeError,
            __import__("pickle").UnpicklingError) as e:
        if path.is_dir():
            size = "a directory"
        else:
            size = f"{path.stat().st_size} bytes"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Checkpoint {str(path)!r} ({size}) cannot be read: it is truncated or corrupt ({type(e).__name__}: "
            f"{first}). Resume from another checkpoint in its directory, or start fresh without --ckpt_path."
        ) from e


# --------------------------------------------------------------------------------------------------- last.ckpt
class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (top-k by a metric, ``every_n_train_steps``, …) whose ``last.ckpt`` is always
    the newest state, not only the state of the last top-k save.

    With ``save_last`` (the default here), ``last.ckpt`` is written after every validation, every
    ``last_every_n_steps`` optimizer steps, at the end of ``fit``, and when a signal stops training
    (:class:`StopOnSignal`); never after another exception, whose state may be half a step. Without ``dirpath`` it
    is ``<trainer.default_root_dir>/checkpoints``.

    Args:
        last_every_n_steps: write ``last.ckpt`` every this many optimizer steps (``None``/0: only at the points above).
        save_last: as ``ModelCheckpoint``'s; default ``True``.
        **kwargs: ``ModelCheckpoint``'s (``dirpath``, ``monitor``, ``mode``, ``save_top_k``,
            ``every_n_train_steps``…).

    >>> Checkpoint(last_every_n_steps=50, monitor="val/exact_match", mode="max").save_last
    True
    """

    def __init__(self, last_every_n_steps: int | None = None, save_last: bool | str = True, **kwargs: Any):
        kwargs.setdefault("save_on_exception", False)  # on_exception below decides
        super().__init__(save_last=save_last, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 0:
            raise ValueError(f"last_every_n_steps must be >= 0, got {last_every_n_steps}.")
        self.last_every_n_steps = last_every_n_steps or 0
        self._last_step_written = -1

    def default_dirpath(self, trainer: L.Trainer) -> None:
        """Set ``dirpath`` to ``<default_root_dir>/checkpoints`` when none was given."""
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_written = trainer.global_step

    def _write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this step; top-k bookkeeping is left as it was."""
        if not self.save_last or self._last_step_written == trainer.global_step or trainer.sanity_checking \
                or trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        saved = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        if n and trainer.global_step % n == 0 and not trainer.fit_loop.epoch_loop._should_accumulate():
            self._write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised between steps, so the state is whole
            self._write_last(trainer)
            log.warning("Stopped by a signal at step %d; saved %s", trainer.global_step, self.last_model_path)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step_written": self._last_step_written}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_step_written = state_dict.get("last_step_written", -1)


# --------------------------------------------------------------------------------------------------- signals
class StopOnSignal(L.Callback):
    """SIGTERM and SIGINT stop training after the current step; :class:`Checkpoint` saves ``last.ckpt``, and the
    ``cornstarch`` command exits with ``128 + signal number`` (SIGTERM 143, SIGINT 130).

    Lightning itself turns SIGTERM into a stop between steps (``SIGTERMException``); this callback routes SIGINT the
    same way (a second Ctrl-C interrupts at once) and remembers which signal came. The ``CornstarchTrainer`` adds it.

    >>> StopOnSignal().received is None
    True
    """

    last_received: int | None = None  # the signal that stopped the latest fit in this process

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = StopOnSignal.last_received = signum
        log.warning("Received %s: stopping after this step and saving last.ckpt (again to stop at once)",
                    signal.Signals(signum).name)
        self._trainer._signal_connector.received_sigterm = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        StopOnSignal.last_received = None
        with contextlib.suppress(ValueError):  # not the main thread
            previous_term = signal.getsignal(signal.SIGTERM)
            self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._handler),
                              signal.SIGTERM: previous_term}

            def on_term(signum: int, frame: Any) -> None:
                self._handler(signum, frame)
                if callable(previous_term):
                    previous_term(signum, frame)
            signal.signal(signal.SIGTERM, on_term)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            with contextlib.suppress(ValueError):
                for signum, handler in self._previous.items():
                    signal.signal(signum, handler)
            self._previous = None

    @classmethod
    def exit_code(cls) -> int | None:
        """``128 + signal number`` once a signal stopped the latest ``fit`` of this process, else ``None``.

        >>> StopOnSignal.exit_code() is None
        True
        """
        return None if cls.last_received is None else 128 + int(cls.last_received)


# --------------------------------------------------------------------------------------------------- NaN
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
