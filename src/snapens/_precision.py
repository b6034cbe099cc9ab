"""Which floating-point precision the hardware runs natively: shared by training (engine) and inference (ensemble).

A private leaf module: it imports nothing else from :mod:`snapens`, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision", "autocast", "cpu_supports_bf16", "resolve_precision"]

logger = logging.getLogger(__name__)

#: The precisions a user may ask for; ``auto`` is resolved by :func:`resolve_precision`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_supports_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16), read from the ``cpuinfo`` flags.

    Without those units bf16 autocast on a CPU is emulated and slower than fp32. Returns False where the
    flags cannot be read (non-Linux).
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn ``auto|fp32|bf16|fp16`` into the precision to compute in on ``device``.

    ``auto`` picks ``bf16`` autocast where the hardware runs it natively (CUDA with bf16 support; CPUs with AMX
    or AVX512-BF16) and ``fp32`` otherwise. ``bf16`` on a CPU without native bf16 logs a warning (it is
    emulated, often several times slower than fp32).

    Raises:
        ValueError: an unknown precision, ``fp16`` off CUDA, or ``bf16`` on a CUDA device without it.
    """
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if dev.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {dev}); use bf16 or fp32")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(dev)}; use fp16 or fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
    if precision == "bf16" and dev.type == "cpu" and not cpu_supports_bf16():
        logger.warning("bf16 on a CPU without AMX/AVX512-BF16 is emulated and usually slower than fp32; "
                       "use precision auto or fp32 on this machine")
    return precision


def autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the autocast context for a resolved ``precision`` (``fp32``: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Precision:
    """How training computes on one device, resolved once: the autocast context and, for fp16, the gradient
    scaler that :meth:`backward_and_step` uses.

    fp16's narrow range underflows small gradients, so its loss is scaled by ``S`` before the backward pass and
    the gradients by ``1 / S`` before the step (steps with inf/NaN gradients are skipped and ``S`` shrinks);
    fp32 and bf16 step plainly. One object serves one training run: the scaler's ``S`` is part of its state
    (:meth:`state_dict`).

    Example:
        >>> prec = Precision.resolve("auto", torch.device("cpu"))
        >>> prec.name in ("fp32", "bf16")
        True
    """

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"a resolved precision is fp32, bf16 or fp16, got {name!r} (see Precision.resolve)")
        self.name = name
        self.device = torch.device(device)
        self._autocast = autocast(self.device, name)
        self.scaler = torch.amp.GradScaler(self.device.type) if name == "fp16" else None

    @classmethod
    def resolve(cls, precision: str | Precision, device: torch.device | str) -> Precision:
        """``auto|fp32|bf16|fp16`` on ``device`` (see :func:`resolve_precision`); a :class:`Precision` as is.

        Raises:
            ValueError: as :func:`resolve_precision`, or a :class:`Precision` made for another device type.
        """
        if isinstance(precision, Precision):
            if precision.device.type != torch.device(device).type:  # autocast is per device type
                raise ValueError(f"precision {precision.name} was resolved for {precision.device}, not {device}")
            return precision
        dev = torch.device(device)
        return cls(resolve_precision(precision, dev), dev)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {str(self.device)!r})"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the forward pass and the loss (none for fp32)."""
        return self._autocast()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``zero_grad``, backward of ``loss`` and one optimizer step (through the scaler for fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (None without a scaler), for the resume state."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; a missing or empty state leaves the scaler as it is."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))
