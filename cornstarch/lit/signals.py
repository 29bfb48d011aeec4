"""SIGTERM (how schedulers preempt) and SIGINT (Ctrl-C) finish the current step, save ``last.ckpt``
(:class:`~cornstarch.lit.checkpointing.Checkpoint`) and exit with ``128 + signal`` (143, 130), so a preempted job
never looks finished."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


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
