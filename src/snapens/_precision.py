"""Which floating-point precision the hardware runs natively: shared by training (engine) and inference (ensemble).

A private leaf module: it imports nothing else from :mod:`snapens`, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_supports_bf16", "resolve_precision"]

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
