"""Many processes: the torchrun launch, the device of each process, the process group and its control messages.

Everything :func:`snapens.engine.fit` and ``snapens train`` need to know about ranks lives here:

* :func:`launch_context`, :func:`process_device`, :func:`distributed_session`: where this process sits in a
  ``torchrun`` job, the device it trains on (``cuda:LOCAL_RANK``), and the process group for a block.
* :func:`resolve_device`: ``auto|cpu|cuda|cuda:N|mps`` checked against this machine.
* :class:`_Ranks`: the control messages of the training loop (sums, the stop flag, rank 0's numbers), sent
  through a CPU (gloo) group so that they never wait on a GPU stream.
* :func:`all_ranks_agree`, :func:`raise_if_any_rank_failed`: checks that pass on every rank or raise on every
  rank, so that no rank is left waiting in a collective; :func:`broadcast_object`: rank 0's value everywhere.

Outside ``torch.distributed`` (or with one process) every helper degrades to the single-process behaviour.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_ranks_agree",
    "broadcast_object",
    "distributed_session",
    "launch_context",
    "process_device",
    "raise_if_any_rank_failed",
    "resolve_device",
]

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------- devices


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


# ------------------------------------------------------------------------------------------------ torchrun


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a ``torchrun`` job; rank 0 of 1 when started without it.

    Attributes:
        rank: global rank (torchrun's ``RANK``).
        world_size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``): the CUDA device this process uses.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there are several processes (and so a process group)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0


def launch_context(environ: Mapping[str, str] | None = None) -> DistContext:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (rank 0 of 1 where ``WORLD_SIZE`` is unset).

    Raises:
        ValueError: values that are not integers or not ``0 <= RANK < WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    try:
        rank, world, local = (int(env.get(k, d)) for k, d in zip(names, ("0", "1", "0")))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         + ", ".join(f"{k}={env.get(k)!r}" for k in names)) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def process_device(device: str, ctx: DistContext) -> torch.device:
    """The device this process trains on: ``device`` resolved, except that under torchrun CUDA is
    ``cuda:LOCAL_RANK`` (one GPU per process).

    Raises:
        ValueError: an unknown or unavailable device, ``cuda:N`` with N other than ``LOCAL_RANK`` under
            torchrun, fewer GPUs than local processes, or MPS with several processes.
    """
    dev = resolve_device(device)
    if not ctx.enabled:
        return dev
    if dev.type == "mps":
        raise ValueError("several processes (torchrun) need CUDA or CPU devices, got mps")
    if dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index != ctx.local_rank:
        raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK (here cuda:{ctx.local_rank}); got "
                         f"--device {device}: pass --device cuda or auto")
    if ctx.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {ctx.local_rank} needs GPU {ctx.local_rank}, but only "
                         f"{torch.cuda.device_count()} are visible; use --nproc_per_node <= the GPU count")
    return torch.device("cuda", ctx.local_rank)


@contextlib.contextmanager
def distributed_session(ctx: DistContext, device: torch.device) -> Iterator[None]:
    """A ``torch.distributed`` process group for the block when ``ctx.enabled``; nothing otherwise.

    NCCL with this process's GPU as its device when ``device`` is CUDA, gloo on CPU; the rendezvous comes
    from torchrun's environment (``MASTER_ADDR``, ``MASTER_PORT``). The group is destroyed when the block
    exits, also on an error.
    """
    if not ctx.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ control messages

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
