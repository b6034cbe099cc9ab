"""The engine's guards around file writes: a background writer for the epoch-end files and the SIGINT/SIGTERM guard.

Private to :mod:`snapens.engine`; :class:`TrainingInterrupted` is public there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("snapens.engine")


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after the resume state was written.

    Attributes:
        signum: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
        state_path: where the resume state was written.
    """

    def __init__(self, signum: int, state_path: Path) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}; state saved to {state_path}")
        self.signum = int(signum)
        self.state_path = state_path


# ------------------------------------------------------------------------------------------ background writes


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU: safe to serialise while training mutates the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class _BackgroundWriter:
    """Runs the epoch-end file writes (best, metrics, state) on one worker thread, in submission order.

    Serialising and fsync'ing the state costs ~0.1 s for a WRN-16-4; done in the background it overlaps the
    next epoch's steps. Each job works on CPU copies taken when it was submitted. Crash safety is unchanged:
    every file is still replaced atomically, and the state is written after the files it vouches for.
    A failed job re-raises at the next :meth:`submit` or :meth:`wait`.

    The order of files on disk is the order of the writes in the loop: :func:`fit` calls :meth:`wait` before
    every write it does itself (a snapshot, a state on SIGINT/SIGTERM), so a snapshot taken after epoch ``e``
    never reaches the disk before the state of epoch ``e``; see :func:`fit` ("Files on disk").
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # re-raised in the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="snapens-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# ------------------------------------------------------------------------------------------------- signals


class _SignalGuard:
    """Turn the first SIGINT/SIGTERM into a flag that the loop checks between steps; a second one raises.

    With ``second_raises=False`` (many processes) a second signal is only logged: torchrun forwards the signal
    it receives to every worker, so after a Ctrl-C each worker gets SIGINT twice (terminal and launcher), and
    a rank leaving early would strand the others in a collective. torchrun's SIGKILL after its grace period
    (30 s) remains the hard stop.
    """

    def __init__(self, enabled: bool, state_path: Path, *, second_raises: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._state_path = state_path
        self._second_raises = second_raises
        self._previous: dict[int, Any] = {}
        self._in_write = False
        self._deferred: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if not self._second_raises:
                logger.warning("%s received again: still stopping at the next agreed step",
                               signal.Signals(signum).name)
                return
            if self._in_write:  # never inside torch.save / safetensors: raise when the write is complete
                self._deferred = signum
                return
            # Impatient second signal: stop now; atomic writes keep files whole.
            raise TrainingInterrupted(signum, self._state_path)
        self.signum = signum
        logger.warning("%s received: finishing the current step and saving the state", signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A file write that a second signal must not cut short (a raise inside ``torch.save`` turns into
        ``RuntimeError: unexpected pos``): the second signal is raised when the block is done."""
        self._in_write = True
        try:
            yield
        finally:
            self._in_write = False
        if self._deferred is not None:
            raise TrainingInterrupted(self._deferred, self._state_path)

    def __enter__(self) -> _SignalGuard:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
