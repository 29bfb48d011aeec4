"""Running on a cluster: the collective timeout, SLURM pre-emption and requeue, and failures named clearly.

Lightning chooses the cluster environment from the launcher's variables: ``TorchElasticEnvironment`` under
``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...), ``SLURMEnvironment`` under ``srun`` (``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ...; not when the job is named ``bash`` or ``interactive``).
:func:`configure` (called by the ``cornstarch`` command's trainer) adds what a cluster run needs on top:

- ``--trainer.collective_timeout SECONDS``: how long a collective (and joining the process group) may wait before
  the rank fails; Lightning's default is 30 minutes. A rank whose peer died or hangs then exits with an error
  within this time instead of waiting.
- Under SLURM with auto-requeue (``SLURMEnvironment``'s default): :class:`SlurmRequeue`. On the requeue signal
  (``SIGUSR1``; ``#SBATCH --signal=USR1@180`` asks SLURM to send it before the time limit) every rank finishes its
  optimizer step, the ranks agree, a checkpoint ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` is saved, rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` and the command stops (:func:`finish`: exit status 128 + the signal's
  number). The requeued job runs the same command and resumes without a ``--ckpt_path``
  (:func:`requeued_resume_path`).
- :class:`ClusterGuard`: a failed collective or rendezvous is explained (which rank, what probably happened, the
  timeout). :func:`fit_ckpt_path`: a sharded (``fsdp2``) checkpoint directory given to a strategy that reads
  single files (``ddp``, one device) is refused before anything is loaded; ``fsdp2`` resumes it on any number of
  ranks.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

log = logging.getLogger(__name__)

WORLD_SIZE_KEY = "cornstarch_world_size"


def configure(trainer: L.Trainer, collective_timeout: float | None = None) -> None:
    """Set the collective timeout on a distributed strategy and add the cluster callbacks (first, so they act
    before the checkpoint callbacks)."""
    if collective_timeout is not None:
        if collective_timeout <= 0:
            raise ValueError(f"collective_timeout must be positive seconds, got {collective_timeout}.")
        if hasattr(trainer.strategy, "_timeout"):  # DDP, FSDP2 (ModelParallel), FSDP1; one device has none
            trainer.strategy._timeout = timedelta(seconds=collective_timeout)
    callbacks: list[Callback] = [ClusterGuard()]
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        callbacks.append(SlurmRequeue(environment.requeue_signal))
    trainer.callbacks[:0] = callbacks


def timeout_seconds(trainer: L.Trainer) -> float | None:
    timeout = getattr(trainer.strategy, "_timeout", None)
    return timeout.total_seconds() if timeout is not None else None


# ------------------------------------------------------------------------------------------------- requeue
class SlurmRequeue(Callback):
    """Save, requeue and stop on SLURM's requeue signal, at a step boundary on which all ranks agree.

    The signal handler only records the signal (a checkpoint written from inside a handler could interrupt a
    collective on one rank and not on another). After each optimizer step the ranks reduce the flag; once any rank
    has it, all of them save ``hpc_ckpt_<n>.ckpt`` (the path chosen on rank 0), rank 0 calls
    ``scontrol requeue <job>`` and training stops. The checkpoint holds the data position, so the resumed run
    trains on exactly the batches the uninterrupted one would have.

    Args:
        signum: the requeue signal (``SLURMEnvironment.requeue_signal``).
    """

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        self.received = False
        self.requeued: str | None = None  # the checkpoint saved before requeueing

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before the trainer registers its own handlers: Lightning then leaves this signal to us.
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # within a gradient accumulation: act after its optimizer step (a checkpoint has no gradients)
        flag = torch.tensor([float(self.received)], device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item() or self.requeued:
            return
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        log.warning("Received %s: saving %s, requeueing and stopping.", self.signum.name, path)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue_job()
        trainer.should_stop = True
        self.requeued = path


def finish(trainer: L.Trainer | None) -> None:
    """End of the ``cornstarch`` command: wait for every rank (after a finished command), destroy the process group
    (without it a gloo process can abort at exit, and torchrun then reports its node as failed), and exit with status 128 + the signal's number if the run
    stopped to be requeued (a stop for pre-emption is not a finished run, e.g. for ``cornstarch fit ... &&
    cornstarch export ...``)."""
    if dist.is_available() and dist.is_initialized():
        if trainer is not None:  # a finished command: no rank leaves (and takes torchrun's store) while others work
            dist.barrier()
        dist.destroy_process_group()
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, SlurmRequeue) and callback.requeued:
            raise SystemExit(128 + callback.signum)


def requeue_job() -> int:
    """``scontrol requeue`` this SLURM job (an array task: ``<array job>_<task>``); returns its exit status."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"Unexpected SLURM job id {job!r}.")
    status = subprocess.call(["scontrol", "requeue", job])
    if status == 0:
        log.warning("Requeued SLURM job %s.", job)
    else:
        log.error("scontrol requeue %s failed with status %d: the job will not restart by itself.", job, status)
    return status


def requeued_resume_path(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The checkpoint a requeued SLURM job resumes from when its command names none.

    In a job SLURM has restarted (``SLURM_RESTART_COUNT`` ≥ 1) and with no ``ckpt_path``: the newest of
    Lightning's ``hpc_ckpt_<n>.ckpt`` (saved on the requeue signal) and the checkpoint callbacks' ``last.ckpt``
    (saved on ``SIGTERM``, which SLURM sends when it pre-empts a job). Otherwise ``ckpt_path`` unchanged (Lightning
    itself still resumes from an ``hpc_ckpt_<n>.ckpt`` under SLURM).
    """
    if ckpt_path is not None or not SLURMEnvironment.detect() or int(os.environ.get("SLURM_RESTART_COUNT", 0)) < 1:
        return ckpt_path
    candidates = set()
    hpc = trainer._checkpoint_connector._hpc_resume_path
    if hpc:
        candidates.add(hpc)
    for callback in trainer.checkpoint_callbacks:
        candidates |= callback._find_last_checkpoints(trainer)
    existing = [path for path in candidates if os.path.exists(path)]
    if not existing:
        return None
    newest = max(existing, key=os.path.getmtime)
    log.warning("Requeued SLURM job (restart %s): resuming from %s.", os.environ["SLURM_RESTART_COUNT"], newest)
    return newest


# ------------------------------------------------------------------------------------------------- guard
class ClusterGuard(Callback):
    """Records the world size in checkpoints and explains a failed collective or rendezvous."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[WORLD_SIZE_KEY] = trainer.world_size

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        message = explain_failure(exception, trainer.global_rank, trainer.world_size, timeout_seconds(trainer))
        if message:
            log.error(message)


def fit_ckpt_path(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The checkpoint ``cornstarch fit`` resumes from: :func:`requeued_resume_path`, checked by
    :func:`refuse_sharded` against the strategy.

    ``fsdp2`` (and ``fsdp1``) load a sharded directory on any number of ranks: torch's distributed checkpoint
    redistributes the shards of the model and the optimizer. Other strategies (``ddp``, one device) read one file;
    given a directory they would fail deep inside ``torch.load``.
    """
    ckpt_path = requeued_resume_path(trainer, ckpt_path)
    if ckpt_path is not None and not isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
        refuse_sharded(ckpt_path, type(trainer.strategy).__name__)
    return ckpt_path


def refuse_sharded(path: str | os.PathLike, strategy: str) -> None:
    """Raise if ``path`` is a sharded (distributed) checkpoint directory.

    Raises:
        ValueError: naming the ranks that wrote it and what to do instead.
    """
    meta = Path(path) / _METADATA_FILENAME
    if not Path(path).is_dir():
        return
    saved = torch.load(meta, map_location="cpu", weights_only=False).get(WORLD_SIZE_KEY) if meta.is_file() else None
    ranks = f"{saved} ranks" if saved else "several ranks"
    raise ValueError(
        f"{str(path)!r} is a sharded checkpoint (written by fsdp2 on {ranks}); {strategy} reads single-file "
        "checkpoints. Resume it with --trainer.strategy fsdp2 on any number of ranks (its shards are redistributed), "
        "or consolidate it with `cornstarch export` and start a new run from the exported weights."
    )


COLLECTIVE_ERRORS = ("timed out", "timeout", "connection closed", "connection reset", "pair closure", "nccl", "gloo")


def explain_failure(exception: BaseException, rank: int, world_size: int, timeout: float | None) -> str | None:
    """A message naming a distributed failure (``None`` for other exceptions)."""
    text = f"{type(exception).__name__}: {exception}"
    limit = f"{timeout:g} s" if timeout is not None else "the collective timeout"
    store = isinstance(exception, getattr(dist, "DistStoreError", ())) or "socket has timed out" in text
    if store or isinstance(exception, getattr(dist, "DistNetworkError", ())) and "connect" in text:
        return (f"Rank {rank} could not join the process group within {limit}: the rendezvous address "
                f"(MASTER_ADDR:MASTER_PORT, or torchrun's --rdzv-endpoint) is wrong or unreachable from this node, or "
                f"rank 0 never started. ({text.splitlines()[0]})")
    if world_size < 2:
        return None
    if isinstance(exception, getattr(dist, "DistError", ())) or any(s in text.lower() for s in COLLECTIVE_ERRORS):
        return (f"Rank {rank}: a collective failed: another rank died or stopped responding (a node failure, an "
                f"out-of-memory kill, pre-emption of one node), so this rank stops instead of waiting (the collective "
                f"timeout is {limit}; set it with --trainer.collective_timeout). Resume from the last checkpoint "
                f"once all nodes are back. ({text.splitlines()[0]})")
    return None
