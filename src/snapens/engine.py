"""The training engine: one network, a cyclic schedule, a snapshot at the end of every cycle, crash-safe.

:func:`fit` runs the loop the paper describes (Huang et al. 2017, section 3)::

    for each optimizer step t:            # the LR for step t is already in the param groups
        loss(model(x), y).backward(); optimizer.step()
        if t is the last step of cycle k: save snapshot k + 1
        scheduler.step()                  # set the LR for step t + 1

and owns the run folder: ``snapshots/`` (a :class:`~snapens.checkpoint.SnapshotStore`), ``best.safetensors``
(the best single model by *validation* accuracy), ``metrics.csv`` (one row per epoch) and ``state.pt`` (the
resume state, written atomically at every epoch end and when SIGINT/SIGTERM arrives).

Nothing here knows an architecture or a dataset: the model, the optimizer, the scheduler and the loaders are
passed in. A loader is any re-iterable of ``(x, y)`` batches with ``__len__``; if it has ``set_epoch(epoch)``
it is called before each epoch, so that data order and augmentation are functions of ``(seed, epoch)`` and a
resumed run replays exactly what an uninterrupted one would have seen.

Momentum is not reset at the restarts (as in the official code), except with ``reinit_factory`` (independent
models, one per cycle), where each new model starts with a fresh optimizer state.

Many processes (``torchrun``): when a ``torch.distributed`` process group with more than one rank is
initialised, :func:`fit` trains data-parallel. Each rank passes the same model, optimizer, scheduler and run
folder, and a training loader that yields *its* share of every global batch (``BatchLoader(rank=,
world_size=)``); all loaders must have the same length, so every rank takes the same steps. Then:

* the model is wrapped in ``DistributedDataParallel`` after it is moved to the device (and, with
  ``sync_batchnorm``, converted to ``SyncBatchNorm``; CUDA only) and before ``torch.compile``; snapshots and
  states always come from the unwrapped module. DDP averages the gradients of the ranks' mean losses, which
  for equal shards is the gradient of the mean loss over the global batch; the learning rate is not rescaled.
* rank 0 alone writes files and validates, on the full validation split, while the others wait; the
  validation numbers are broadcast, so the "best" decision and the metrics rows are the same on every rank.
  Training loss and accuracy are summed over the ranks.
* control messages (metrics, flags, RNG states) go through a CPU (gloo) group, a few per epoch, so they never
  wait on a GPU stream. A SIGINT/SIGTERM on any rank is seen by all within ``stop_check_every`` steps (the
  stop flag is all-reduced then, and at every epoch end); all ranks stop after the same step, rank 0 writes
  the state, and no rank returns before it is on disk. A non-finite loss on any rank stops all of them at the
  next snapshot or epoch end (the summed loss is non-finite everywhere).
* the resume state holds every rank's RNG state (dropout draws differ per rank); on resume every rank reads
  ``state.pt`` from the run folder, which must therefore be on a filesystem shared by the ranks, and the
  number of processes must be the one the run started with.
* errors found before training (a bad argument, a refused resume) make every rank raise, not hang.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from snapens import checkpoint
from snapens._precision import autocast as _autocast
from snapens._precision import cpu_supports_bf16, resolve_precision
from snapens.schedule import FGELR, SnapshotLR, StepDecayLR, SWAScheduleLR

__all__ = [
    "METRICS_FIELDS",
    "STATE_FILE",
    "FitResult",
    "NonFiniteLossError",
    "SnapshotEvent",
    "TrainingInterrupted",
    "all_ranks_agree",
    "broadcast_object",
    "cpu_supports_bf16",
    "fit",
    "make_scheduler",
    "raise_if_any_rank_failed",
    "read_resume_state",
    "resolve_device",
    "resolve_precision",
    "run_exists",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
BEST_FILE = "best.safetensors"
SNAPSHOT_DIR = "snapshots"
STATE_FORMAT = "snapens-train-state"
STATE_VERSION = 1
METRICS_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")

_T = TypeVar("_T")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the snapshots taken before are kept."""


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


class Loader(Protocol):
    """What :func:`fit` needs of a data loader (e.g. :class:`snapens.data.BatchLoader`)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SnapshotEvent:
    """What ``on_cycle_end`` receives after snapshot ``index`` (1-based) was written."""

    index: int
    step: int
    epoch: float
    lr: float
    metrics: dict[str, float]
    path: Path


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        run_dir: the run folder.
        snapshots: the snapshot manifest entries, sorted by index.
        rows: one dict per epoch, as in ``metrics.csv``.
        best_val_acc: best validation accuracy in [0, 1] (``nan`` without a validation loader).
        best_epoch: the epoch (1-based) of ``best.safetensors``, 0 if none.
        steps: optimizer steps done in total.
        train_seconds: seconds spent in training steps in this call (validation and file writes excluded).
        images_per_second: training images per second in this call.
    """

    run_dir: Path
    snapshots: list[checkpoint.SnapshotInfo]
    rows: list[dict[str, float]]
    best_val_acc: float
    best_epoch: int
    steps: int
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ device, precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else must name an available device.

    Raises:
        ValueError: an unknown device string, or CUDA asked for but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}; expected auto, cpu, cuda or cuda:N")
    return dev


# ------------------------------------------------------------------------------------------------- schedules


def make_scheduler(
    schedule: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    n_cycles: int,
    lr_min: float = 0.0,
    steps_per_epoch: int | None = None,
    **options: Any,
) -> SnapshotLR | StepDecayLR | FGELR | SWAScheduleLR:
    """The scheduler for a schedule name of :data:`snapens.config.SCHEDULES`.

    * ``cosine-cycles``: :class:`~snapens.schedule.SnapshotLR`, ``M`` cosine cycles (the snapshot ensemble);
      ``options`` ``cycle_decay`` and ``cycle_mult`` shape them.
    * ``step``: :class:`~snapens.schedule.StepDecayLR` with snapshots at the same steps (the paper's NoCycle).
    * ``single-cycle``: ``M`` cosine cycles too; :func:`fit` re-initialises the model at each cycle start when
      given ``reinit_factory`` (``M`` independent models, each trained for ``T / M`` steps).
    * ``fge``: :class:`~snapens.schedule.FGELR`; ``options`` ``cycle_epochs`` (required; converted to
      ``cycle_epochs * steps_per_epoch`` steps), ``fge_start``, ``fge_lr1`` and ``fge_lr2`` (multiples of lr0).
    * ``swa``: :class:`~snapens.schedule.SWAScheduleLR`, a snapshot every ``steps_per_epoch`` steps of the SWA
      phase; ``options`` ``swa_start`` and ``swa_lr`` (the first param group's SWA rate; the others scale with
      their lr).

    fge and swa ignore ``n_cycles``: their number of snapshots follows from the budget. Options left out or
    None take the scheduler's own (the papers') defaults.

    Raises:
        ValueError: an unknown schedule name or option, or a bad budget.
    """
    given = {k: v for k, v in options.items() if v is not None}
    allowed = {"cosine-cycles": {"cycle_decay", "cycle_mult"}, "single-cycle": {"cycle_decay", "cycle_mult"},
               "fge": {"fge_start", "cycle_epochs", "fge_lr1", "fge_lr2"}, "swa": {"swa_start", "swa_lr"}}
    unknown = sorted(set(given) - allowed.get(schedule, set()))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to the {schedule!r} schedule")
    if schedule in ("fge", "swa"):
        if lr_min:
            raise ValueError(f"lr_min={lr_min!r} applies to the cosine schedules, not to {schedule}")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"the {schedule} schedule needs steps_per_epoch >= 1, got {steps_per_epoch!r}")
    if schedule in ("cosine-cycles", "single-cycle"):
        return SnapshotLR(optimizer, total_steps=total_steps, n_cycles=n_cycles, lr_min=lr_min, **given)
    if schedule == "step":
        if lr_min:
            raise ValueError(f"lr_min={lr_min!r} applies to the cosine schedules; the step schedule decays lr0 "
                             "by 10x at 50% and again at 75% of the budget")
        return StepDecayLR(optimizer, total_steps=total_steps, n_cycles=n_cycles)
    if schedule == "fge":
        if "cycle_epochs" not in given:
            raise ValueError("the fge schedule needs cycle_epochs (the length of a cycle in epochs)")
        cycle_epochs = given.pop("cycle_epochs")
        renamed = {"fge_start": "fge_start", "fge_lr1": "lr1_factor", "fge_lr2": "lr2_factor"}
        cycle_steps = int(cycle_epochs) * steps_per_epoch
        try:
            return FGELR(optimizer, total_steps=total_steps, cycle_steps=cycle_steps,
                         **{renamed[k]: v for k, v in given.items()})
        except ValueError as exc:  # say it in epochs too: that is what the user chose
            raise ValueError(f"cycle_epochs={cycle_epochs} ({cycle_steps} steps of {steps_per_epoch} per epoch), "
                             f"epochs={total_steps / steps_per_epoch:g}: {exc}") from exc
    if schedule == "swa":
        kwargs = {"swa_start": given["swa_start"]} if "swa_start" in given else {}
        if "swa_lr" in given:
            group = optimizer.param_groups[0]
            kwargs["swa_factor"] = given["swa_lr"] / group.get("initial_lr", group["lr"])
        return SWAScheduleLR(optimizer, total_steps=total_steps, every=steps_per_epoch, **kwargs)
    raise ValueError(f"unknown schedule {schedule!r}; expected cosine-cycles, step, single-cycle, fge or swa")


# ------------------------------------------------------------------------------------------------ run folder


def run_exists(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` already holds (part of) a training run."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (STATE_FILE, METRICS_FILE, BEST_FILE, SNAPSHOT_DIR))


def read_resume_state(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``run_dir/state.pt`` and check that it can be resumed (without changing anything on disk).

    Raises:
        ValueError: the folder is not a snapens run, its state is unreadable, or the run already finished.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.is_dir():
        raise ValueError(f"cannot resume: {run_dir} is not a directory")
    if not path.is_file():
        raise ValueError(f"cannot resume: {run_dir} is not a snapens run folder ({STATE_FILE} is missing)")
    state = checkpoint.load_training_state(path)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"cannot resume: {path} is not a snapens training state")
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"cannot resume: {path} has unsupported format_version {state.get('format_version')!r}")
    if state.get("finished"):
        raise ValueError(
            f"cannot resume: the run in {run_dir} already finished ({state['epoch']} epochs, "
            f"{state['n_cycles']} snapshots); start a new run in another folder"
        )
    return state


def _remove_stale_temp_files(run_dir: Path) -> None:
    # Left behind by a process killed between writing a temp file and renaming it (checkpoint._atomic_open).
    for folder in (run_dir, run_dir / SNAPSHOT_DIR):
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.debug("removed stale temporary file %s", tmp)


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in METRICS_FIELDS})
    checkpoint.atomic_write_text(path, buf.getvalue())


def _fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


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


# -------------------------------------------------------------------------------------------- many processes

# Default group -> its gloo control group. Weak keys: holding a destroyed default group alive until the
# interpreter exits would let gloo's threads die unjoined there (std::terminate, SIGABRT at exit).
_CONTROL_GROUPS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _control_group() -> Any:
    """A gloo group over all ranks for control messages: CPU tensors, so they never wait on a GPU stream.

    The default group itself when it is gloo; otherwise (NCCL) a second group, made once per default group,
    by every rank at the same point (its first control message).
    """
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    group = _CONTROL_GROUPS.get(world)
    if group is None:
        group = _CONTROL_GROUPS[world] = dist.new_group(backend="gloo")
    return group


class _Ranks:
    """Where this process stands in the process group, and the control messages :func:`fit` sends.

    Outside ``torch.distributed`` (or with one rank) ``enabled`` is False, ``rank`` 0 and no method may be
    called. Every method is a collective: every rank calls it at the same point of the loop.
    """

    def __init__(self) -> None:
        self.enabled = _distributed()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.group = _control_group() if self.enabled else None

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def max_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0])

    def from_rank0(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.broadcast(t, src=0, group=self.group)
        return t.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Collective error check: if any rank passes an error, every rank raises; else every rank returns.

    Call it on every rank at the same point, with the exception this rank caught (or None). A failing rank
    re-raises its own error, the others raise a ValueError naming the failed ranks, so none is left waiting
    in a later collective. Outside ``torch.distributed`` it just re-raises ``error``.

    Raises:
        BaseException: ``error`` itself on a rank that failed.
        ValueError: on the other ranks, when some rank failed.
    """
    if not _distributed():
        if error is not None:
            raise error
        return
    ranks = _Ranks()
    flags = torch.zeros(ranks.world_size, dtype=torch.int64)
    flags[ranks.rank] = int(error is not None)
    dist.all_reduce(flags, group=ranks.group)
    if error is not None:
        raise error
    failed = [r for r, bad in enumerate(flags.tolist()) if bad]
    if failed:
        raise ValueError(f"rank(s) {', '.join(map(str, failed))} failed before training (see their error); "
                         "stopped on every rank")


@contextlib.contextmanager
def all_ranks_agree() -> Iterator[None]:
    """Run a block of checks that either passes on every rank or raises on every rank.

    The block must not use collectives itself. A single process just runs it.

    Example:
        >>> with all_ranks_agree():
        ...     validate_arguments()  # raises ValueError on one rank -> every rank raises
    """
    error: Exception | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    raise_if_any_rank_failed(error)


def broadcast_object(obj: _T) -> _T:
    """Rank 0's ``obj`` on every rank (a picklable value, e.g. a run folder named after rank 0's clock).

    Returns ``obj`` itself outside ``torch.distributed``.
    """
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


# ---------------------------------------------------------------------------------------------------- fit


@torch.no_grad()
def _validate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    loader: Loader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    channels_last: bool,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in [0, 1] over ``loader``; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast():
            logits = forward(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
    model.train(was_training)
    if seen == 0:
        return math.nan, math.nan
    return float(loss_sum) / seen, int(correct) / seen


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _all_finite(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values() if t.is_floating_point())


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: SnapshotLR | StepDecayLR | FGELR | SWAScheduleLR,
    train_loader: Loader,
    epochs: int,
    run_dir: str | os.PathLike[str],
    model_name: str,
    model_kwargs: Mapping[str, Any] | None = None,
    val_loader: Loader | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    reinit_factory: Callable[[], nn.Module] | None = None,
    reinit_seed: int = 0,
    resume: bool = False,
    on_cycle_end: Callable[[SnapshotEvent], None] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    progress: bool = False,
    progress_every: int = 25,
    handle_signals: bool = True,
    rank: int | None = None,
    sync_batchnorm: bool = False,
    stop_check_every: int = 10,
    extra_state: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs and save a snapshot at the end of every scheduler cycle.

    The budget is ``T = epochs * len(train_loader)`` optimizer steps; ``scheduler`` must be built for exactly
    that ``T`` (see :func:`make_scheduler`) and its ``snapshot_steps`` (0-based, ``M`` of them) say where
    snapshot ``k + 1`` is taken: after step ``snapshot_steps[k]``.

    Under an initialised ``torch.distributed`` process group of more than one rank it trains data-parallel
    (see the module docstring): call it on every rank with the same arguments and a loader that yields this
    rank's share of each global batch.

    Files on disk (the promise the kill-and-resume tests check): the run folder's writes reach the disk in
    the order the loop makes them, each atomically: the state before the first step; per epoch ``best``,
    ``metrics.csv``, then ``state.pt`` (on a background thread); a snapshot only after every write submitted
    before it is complete. So a kill at any moment leaves a ``state.pt`` no older than the last epoch end
    before the newest snapshot on disk, and resuming from it re-takes (bit-identically) any snapshot after it.

    Args:
        model: the network (moved to ``device``; parameters keep their identity, so an optimizer built on them
            stays valid).
        optimizer: built on ``model.parameters()``; its param groups hold the restart rate ``lr0``.
        scheduler: a scheduler of :mod:`snapens.schedule` (see :func:`make_scheduler`); snapshots are taken
            after each of its ``snapshot_steps``, however many there are.
        train_loader: batches ``(x, y)``; ``set_epoch(epoch)`` is called first if present.
        epochs: number of epochs.
        run_dir: the run folder (created if missing).
        model_name, model_kwargs: how to rebuild the model; stored in every snapshot.
        val_loader: validation batches; gives per-epoch ``val_loss``/``val_acc`` and ``best.safetensors``.
        loss_fn: ``(logits, y, x) -> mean loss`` (``x`` is the batch's input, e.g. for a distillation
            teacher); cross-entropy of ``logits`` and ``y`` by default.
        device: where to train (under torchrun: this rank's device, e.g. ``cuda:LOCAL_RANK``).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (``auto`` is resolved by :func:`resolve_precision`);
            ``fp16`` uses a gradient scaler.
        channels_last: put 4-D inputs and conv weights in channels-last memory format.
        compile: run the forward pass through ``torch.compile`` (snapshots come from the unwrapped model).
        reinit_factory: with it, the model is re-initialised at the start of every cycle after the first from
            ``reinit_factory()`` called under ``torch.manual_seed(reinit_seed + k)`` for cycle ``k``, and the
            optimizer state is reset: ``M`` independent models (the ``single-cycle`` baseline).
        reinit_seed: base seed for ``reinit_factory``.
        resume: continue from ``run_dir/state.pt``.
        on_cycle_end: called with a :class:`SnapshotEvent` after each snapshot (on every rank).
        on_epoch_end: called with each epoch's metrics row (on every rank; the rows are identical).
        progress: show a tqdm bar per epoch (rank 0 only).
        progress_every: steps between progress-bar updates (each costs one host sync).
        handle_signals: catch SIGINT/SIGTERM, save the state and raise :class:`TrainingInterrupted`.
        rank: only rank 0 writes files. None: the process group's rank (0 without one); if given under a
            process group it must equal the group's rank.
        sync_batchnorm: with many processes, convert BatchNorm layers to ``SyncBatchNorm`` (batch statistics
            over the global batch; CUDA only; the module is changed in place). Ignored in a single process.
        stop_check_every: with many processes, steps between the all-reduces of the stop flag: the most
            steps a rank trains on after a signal reached another rank.
        extra_state: JSON-like values stored in the state file (e.g. the config), returned unchanged.

    Returns:
        A :class:`FitResult` (``snapshots`` is empty on ranks other than 0).

    Raises:
        ValueError: inconsistent arguments, a run folder that already holds a run (without ``resume``), or a
            state that cannot be resumed; on every rank.
        NonFiniteLossError: the loss became NaN/inf; earlier snapshots are kept.
        TrainingInterrupted: SIGINT/SIGTERM arrived; the state was saved first.
    """
    ranks = _Ranks()
    with all_ranks_agree():
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        steps_per_epoch = len(train_loader)
        if steps_per_epoch < 1:
            raise ValueError("the training loader yields no batches")
        total_steps = epochs * steps_per_epoch
        if getattr(scheduler, "total_steps", None) != total_steps:
            raise ValueError(
                f"scheduler was built for {getattr(scheduler, 'total_steps', None)!r} steps, but epochs * "
                f"len(train_loader) = {epochs} * {steps_per_epoch} = {total_steps}"
            )
        if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
            raise ValueError(f"stop_check_every must be a positive integer, got {stop_check_every!r}")
        if ranks.enabled and rank is not None and rank != ranks.rank:
            raise ValueError(f"rank={rank} was passed, but this process is rank {ranks.rank} of the process group")
        snapshot_steps = list(scheduler.snapshot_steps)
        n_cycles = len(snapshot_steps)
        snap_index = {s: k for k, s in enumerate(snapshot_steps)}  # step -> 0-based cycle, O(1) per step
        cycle_starts = {s + 1: k + 1 for k, s in enumerate(snapshot_steps[:-1])}  # step -> cycle beginning there
        model_kwargs = dict(model_kwargs or {})
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        if sync_batchnorm and ranks.enabled and dev.type != "cuda":
            raise ValueError(f"sync_batchnorm needs CUDA devices (torch's SyncBatchNorm), got {dev}")
        run_dir = Path(run_dir)
        state_path = run_dir / STATE_FILE

        state: dict[str, Any] | None = None
        if resume:
            state = read_resume_state(run_dir)
            for key, now in (("total_steps", total_steps), ("n_cycles", n_cycles), ("epochs", epochs),
                             ("snapshot_steps", snapshot_steps), ("model_name", model_name),
                             ("world_size", ranks.world_size)):
                was = state.get(key, 1) if key == "world_size" else state.get(key)  # older states: 1 process
                if was != now:
                    raise ValueError(f"cannot resume {run_dir}: its {key} is {was!r} but this call has {now!r}")
        elif run_exists(run_dir):
            raise ValueError(f"{run_dir} already holds a training run; resume it or choose another folder")
    if ranks.enabled:
        lengths = ranks.all_gather(steps_per_epoch)
        if len(set(lengths)) > 1:
            raise ValueError(f"the ranks' training loaders have different lengths {lengths}; every rank must take "
                             "the same steps (shard with BatchLoader(rank=..., world_size=...))")
    writer = (ranks.rank if ranks.enabled else rank or 0) == 0
    loss_fn = loss_fn or _cross_entropy

    if sync_batchnorm:
        if ranks.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # reuses the parameters: optimizer stays valid
        else:
            logger.info("sync_batchnorm ignored: a single process")
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    autocast = _autocast(dev, precision)
    store = checkpoint.SnapshotStore(run_dir / SNAPSHOT_DIR)

    start_epoch, skip_batches, step = 0, 0, 0
    best_val_acc, best_epoch = -1.0, 0
    rows: list[dict[str, float]] = []
    partial: dict[str, Any] | None = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng_state(state["rng_ranks"][ranks.rank] if ranks.enabled else state["rng"])
        start_epoch, skip_batches, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        best_val_acc, best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        rows = [dict(r) for r in state["rows"]]
        partial = state.get("partial")
        logger.info("resuming %s at epoch %d, batch %d (step %d of %d)", run_dir, start_epoch + 1,
                    skip_batches, step, total_steps)
        if writer:
            _remove_stale_temp_files(run_dir)
            _write_metrics(run_dir / METRICS_FILE, rows)  # drop rows written after the state
    elif writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(run_dir)  # e.g. of a state.pt that a kill before the first step never renamed

    # Snapshots and states always come from `model` itself, never from the DDP or compiled wrappers.
    train_module: nn.Module = model
    if ranks.enabled:
        # Built after the resume load (every rank loaded the same state); DDP broadcasts rank 0's weights anyway.
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        train_module = DistributedDataParallel(model, device_ids=ids)
    forward: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(train_module) if compile else train_module  # type: ignore[assignment]
    )
    # Rank 0 validates alone, so validation must not go through DDP's forward (which may talk to the others).
    eval_forward = (torch.compile(model) if compile else model) if ranks.enabled else forward  # type: ignore

    def make_state(epoch: int, batch: int, finished: bool, partial_now: dict[str, Any] | None,
                   rng_ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "finished": finished,
            "epoch": epoch, "batch": batch, "step": step, "epochs": epochs, "total_steps": total_steps,
            "n_cycles": n_cycles, "snapshot_steps": snapshot_steps, "model_name": model_name,
            "model": checkpoint.unwrap_state_dict(model), "optimizer": _cpu_copy(optimizer.state_dict()),
            "scheduler": _cpu_copy(scheduler.state_dict()),
            "scaler": _cpu_copy(scaler.state_dict()) if scaler is not None else None,
            "rng": rng_ranks[0] if rng_ranks else checkpoint.capture_rng_state(), "rng_ranks": rng_ranks,
            "world_size": ranks.world_size, "best_val_acc": best_val_acc, "best_epoch": best_epoch,
            "rows": [dict(r) for r in rows], "partial": partial_now, "extra": _cpu_copy(dict(extra_state or {})),
        }

    def gather_rng() -> list[dict[str, Any]] | None:
        # Every rank's generators: dropout draws differ per rank and must continue per rank after a resume.
        return ranks.all_gather(checkpoint.capture_rng_state()) if ranks.enabled else None

    def totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[Any, Any, int]:
        # The epoch's sums so far over all ranks (a non-finite loss on any rank makes them non-finite everywhere).
        if not ranks.enabled:
            return loss_sum, correct, seen
        loss_all, correct_all, seen_all = ranks.sum([float(loss_sum), float(correct), float(seen)])
        return loss_all, correct_all, int(seen_all)

    def validate() -> tuple[float, float]:
        if val_loader is None:
            return math.nan, math.nan
        if not ranks.enabled:
            return _validate(forward, model, val_loader, dev, autocast, channels_last)
        # Rank 0 validates the whole split while the others wait in the broadcast.
        local = _validate(eval_forward, model, val_loader, dev, autocast, channels_last) if writer else (
            math.nan, math.nan)
        val_loss, val_acc = ranks.from_rank0(local)
        return val_loss, val_acc

    def agreed_stop() -> int | None:
        # The signal any rank received (the largest number if several), or None; a collective.
        return ranks.max_int(guard.signum or 0) or None

    train_module.train()
    train_seconds, images_done = 0.0, 0
    writes = _BackgroundWriter()
    with (_SignalGuard(handle_signals, state_path, second_raises=not ranks.enabled) as guard,
          _finally(writes.wait)):
        if state is None:
            # A state before the first step, written synchronously: a run killed before its first epoch end can
            # still be resumed (from the start, bit-exactly) rather than being neither resumable nor restartable.
            rng_ranks = gather_rng()
            if writer:
                with guard.critical():
                    checkpoint.save_training_state(state_path, make_state(0, 0, False, None, rng_ranks))
        for epoch in range(start_epoch, epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            # Running sums stay on the device: one host sync per epoch (and per progress update / snapshot).
            loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            seen, seconds = 0, 0.0
            if partial is not None and skip_batches:
                mine = partial["ranks"][ranks.rank] if ranks.enabled else partial  # each rank its own sums
                loss_sum += mine["loss_sum"].to(dev)
                correct += mine["correct"].to(dev)
                seen, seconds = int(mine["seen"]), float(partial["seconds"])
            partial = None
            epoch_val: tuple[float, float] | None = None
            bar = _progress_bar(progress and writer, steps_per_epoch, skip_batches, epoch, epochs)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            for i, (x, y) in enumerate(train_loader):
                if i < skip_batches:  # replaying a partial epoch: these batches were trained before the stop
                    continue
                x, y = _to_device(x, y, dev, channels_last)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step runs at (set before it)
                with autocast():
                    logits = forward(x)
                    loss = loss_fn(logits, y, x)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                loss_sum.add_(loss.detach(), alpha=y.shape[0])
                correct.add_((logits.detach().argmax(1) == y).sum())
                seen += y.shape[0]

                cycle = snap_index.get(step)
                step += 1
                if cycle is not None:
                    seconds += time.perf_counter() - t0
                    train_loss, train_acc = _check_finite(*totals(loss_sum, correct, seen), epoch, step)
                    val_loss, val_acc = validate()
                    if i + 1 == steps_per_epoch:
                        epoch_val = (val_loss, val_acc)  # the epoch ends here too: reuse this validation
                    metrics = {"train_loss": train_loss, "train_acc": train_acc}
                    if val_loader is not None:
                        metrics |= {"val_loss": val_loss, "val_acc": val_acc}
                    writes.wait()  # the ordering promise: the previous epoch's files first
                    with guard.critical():
                        _take_snapshot(store, model, writer, ranks, index=cycle + 1, step=step,
                                       epoch=epoch + (i + 1) / steps_per_epoch, lr=lr, model_name=model_name,
                                       model_kwargs=model_kwargs, metrics=metrics, n_cycles=n_cycles,
                                       on_cycle_end=on_cycle_end)
                    t0 = time.perf_counter()
                scheduler.step()
                if reinit_factory is not None and step in cycle_starts:
                    _reinitialise(model, optimizer, reinit_factory, reinit_seed + cycle_starts[step])
                if bar is not None:
                    bar.update(1)
                    if (i + 1) % progress_every == 0:
                        bar.set_postfix_str(_postfix(loss_sum, correct, seen, lr, seconds + time.perf_counter() - t0))
                stop: int | None = None
                if i + 1 < steps_per_epoch:  # a stop at an epoch end is handled below, with the epoch's state
                    if not ranks.enabled:
                        stop = guard.signum
                    elif (i + 1) % stop_check_every == 0:
                        stop = agreed_stop()
                if stop is not None:
                    seconds += time.perf_counter() - t0
                    _check_finite(*totals(loss_sum, correct, seen), epoch, step)
                    rng_ranks = gather_rng()
                    # Every rank's own partial sums, so that a resumed epoch adds up exactly as this one would.
                    sums = {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen}
                    sums_ranks = ranks.all_gather(sums) if ranks.enabled else None
                    if writer:
                        part = {**sums, "seconds": seconds, "ranks": sums_ranks}
                        writes.wait()
                        with guard.critical():
                            checkpoint.save_training_state(state_path,
                                                           make_state(epoch, i + 1, False, part, rng_ranks))
                    if bar is not None:
                        bar.close()
                    if ranks.enabled:
                        ranks.barrier()  # nobody exits (and makes torchrun stop the rest) before the state is saved
                    raise TrainingInterrupted(stop, state_path)
            seconds += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            train_seconds += seconds
            skip_batches = 0

            loss_now, correct_now, seen_now = totals(loss_sum, correct, seen)
            images_done += seen_now
            train_loss, train_acc = _check_finite(loss_now, correct_now, seen_now, epoch, step)
            val_loss, val_acc = epoch_val if epoch_val is not None else validate()
            row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds}
            rows.append(row)
            improved = val_loader is not None and val_acc > best_val_acc
            if improved:
                best_val_acc, best_epoch = val_acc, epoch + 1
            rng_ranks = gather_rng()
            if writer:
                best = checkpoint.unwrap_state_dict(model) if improved else None
                best_meta = {"model": {"name": model_name, "kwargs": model_kwargs}, "epoch": epoch + 1, "step": step,
                             "val_acc": val_acc, "val_loss": val_loss}
                epoch_state = make_state(epoch + 1, 0, epoch + 1 == epochs, None, rng_ranks)
                rows_now = [dict(r) for r in rows]

                def epoch_end_writes(best=best, best_meta=best_meta, epoch_state=epoch_state, rows_now=rows_now):
                    # Order matters for crash safety: state.pt last, so a crash before it replays this epoch.
                    if best is not None:
                        checkpoint.save_weights(run_dir / BEST_FILE, best, best_meta)
                    _write_metrics(run_dir / METRICS_FILE, rows_now)
                    checkpoint.save_training_state(state_path, epoch_state)

                writes.submit(epoch_end_writes)
            logger.info(
                "epoch %d/%d  step %d  lr %.4g  loss %.4f  acc %.2f%%%s  %.1fs  %.0f img/s%s",
                epoch + 1, epochs, step, lr, train_loss, 100 * train_acc,
                f"  val loss {val_loss:.4f}  val acc {100 * val_acc:.2f}%" if val_loader is not None else "",
                seconds, seen_now / max(seconds, 1e-9), "  (best)" if improved else "",
            )
            if on_epoch_end is not None:
                on_epoch_end(dict(row))
            stop = agreed_stop() if ranks.enabled else guard.signum
            if stop is not None and epoch + 1 < epochs:
                if ranks.enabled:
                    writes.wait()
                    ranks.barrier()  # the epoch's state is on disk before any rank leaves
                raise TrainingInterrupted(stop, state_path)
    if ranks.enabled:
        ranks.barrier()  # when fit returns on any rank, rank 0's files are complete

    snapshots = store.list() if writer else []
    return FitResult(
        run_dir=run_dir, snapshots=snapshots, rows=rows,
        best_val_acc=best_val_acc if val_loader is not None else math.nan, best_epoch=best_epoch, steps=step,
        train_seconds=train_seconds, images_per_second=images_done / max(train_seconds, 1e-9),
        extra=dict(extra_state or {}),
    )


@contextlib.contextmanager
def _finally(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` when the block exits, also on an exception (which then takes precedence)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            action()
        raise
    action()


def _check_finite(
    loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, epoch: int, step: int
) -> tuple[float, float]:
    """Mean loss and accuracy so far in the epoch (one host sync); NaN/inf stops the run."""
    total = float(loss_sum)
    if not math.isfinite(total):
        raise NonFiniteLossError(
            f"training loss became {total} in epoch {epoch + 1} (by step {step}); stopped. Snapshots taken "
            "before are kept. Try a lower learning rate or fp32 precision."
        )
    return total / max(seen, 1), int(correct) / max(seen, 1)


def _take_snapshot(
    store: checkpoint.SnapshotStore,
    model: nn.Module,
    writer: bool,
    ranks: _Ranks,
    *,
    index: int,
    step: int,
    epoch: float,
    lr: float,
    model_name: str,
    model_kwargs: dict[str, Any],
    metrics: dict[str, float],
    n_cycles: int,
    on_cycle_end: Callable[[SnapshotEvent], None] | None,
) -> None:
    # With many ranks only rank 0 copies the weights (the ones saved), and its verdict holds for all.
    weights = checkpoint.unwrap_state_dict(model) if writer or not ranks.enabled else None
    finite = _all_finite(weights) if weights is not None else True
    if ranks.enabled:
        finite = bool(ranks.from_rank0([float(finite)])[0])
    if not finite:  # a step can blow up the weights while its own loss was still finite
        raise NonFiniteLossError(
            f"the weights became NaN/inf at step {step} (epoch {epoch:.2f}); snapshot {index} not saved, "
            "earlier snapshots are kept. Try a lower learning rate or fp32 precision."
        )
    path = store.folder / checkpoint.snapshot_filename(index)
    if writer and weights is not None:
        info = store.save(weights, index=index, step=step, epoch=round(epoch, 6), lr=float(lr),
                          model_name=model_name, model_kwargs=model_kwargs, metrics=metrics)
        path = info.path
    val = f", val acc {100 * metrics['val_acc']:.2f}%" if "val_acc" in metrics else ""
    logger.info("*** snapshot %d/%d at step %d (epoch %.2f, lr %.3g%s) -> %s", index, n_cycles, step, epoch,
                lr, val, path)
    if on_cycle_end is not None:
        on_cycle_end(SnapshotEvent(index=index, step=step, epoch=epoch, lr=float(lr), metrics=dict(metrics),
                                   path=path))


def _reinitialise(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    factory: Callable[[], nn.Module],
    seed: int,
) -> None:
    # fork_rng: the fresh model's initialisation must not move the training RNG stream (dropout, resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = factory()
    model.load_state_dict(fresh.state_dict())
    optimizer.state.clear()  # a new, independent model: no momentum carried over
    logger.info("re-initialised the model (seed %d) for the next independent cycle", seed)


def _progress_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                dynamic_ncols=True, unit="step")


def _postfix(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, lr: float, seconds: float) -> str:
    n = max(seen, 1)
    return (f"loss {float(loss_sum) / n:.4f} acc {100 * int(correct) / n:.1f}% lr {lr:.3g} "
            f"{seen / max(seconds, 1e-9):.0f} img/s")
