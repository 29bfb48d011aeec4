"""Checkpoints that are never lost or truncated.

- :func:`atomic_path` / :class:`AtomicCheckpointIO`: every checkpoint (a file, or the directory of shards a sharded
  ``fsdp2`` run writes) is written under a hidden temporary name in its destination directory, synced to disk and
  renamed into place, so a kill or a full disk never leaves a truncated file under a checkpoint's name.
- :class:`Checkpoint`: a ``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state: written after every
  validation, every ``last_every_n_steps`` steps, at the end of ``fit`` and when SIGTERM or SIGINT stop training.

Signals (:mod:`cornstarch.lit.signals`) and non-finite losses (:mod:`cornstarch.lit.nonfinite`) stop training
without a checkpoint of a half step or of NaN weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
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


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in a checkpoint directory: ``.<name>.partial`` and ``.<name>.old`` entries
    (a kill during a save of a checkpoint whose name is never written again leaves one otherwise).

    Returns:
        the names removed, sorted.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / ".epoch=0-step=6.ckpt.partial").write_bytes(b"half")
    >>> _ = (d / "last.ckpt").write_bytes(b"whole")
    >>> remove_stale_temporaries(d), sorted(p.name for p in d.iterdir())
    (['.epoch=0-step=6.ckpt.partial'], ['last.ckpt'])
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.glob(".*") if p.name.endswith((PARTIAL_SUFFIX, ".old")))
    for path in stale:
        _remove(path)
    return [p.name for p in stale]


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
    (:class:`~cornstarch.lit.signals.StopOnSignal`); never after another exception, whose state may be half a step. Without ``dirpath`` it
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
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            removed = remove_stale_temporaries(self.dirpath)
            if removed:
                log.warning("Removed %d temporaries a killed run left in %s: %s", len(removed), self.dirpath,
                            ", ".join(removed))

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
